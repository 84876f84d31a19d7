"""Scoring a model on a suite.

1. Rule cases: prompts per category, continued deterministically (greedy, or seeded sampling); only the
   continuation is checked, for forbidden and required words (whole words, case-insensitive).
2. Counterfactual pairs: each sentence scored by its total log-likelihood; the stereotype score is the share of
   pairs where the model prefers `sent_more`, the more stereotypical sentence (50 = no preference), in both
   directions, as CrowS-Pairs' metric.py and lm-evaluation-harness count it; the `stereo` and `antistereo` rows
   are also scored apart, as the paper reports.
3. Robustness (classification): perturbed copies of the eval texts; accuracy and prediction consistency.
"""

from __future__ import annotations

import logging
import random
import re
import string
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tasks.generation import RAW_TEXT, PromptStyle, generate
from tasks.measuring import model_device
from tasks.probe.suites import Pair, Robustness, RuleCategory
from tasks.settings import ProbeSettings

log = logging.getLogger("adaptflow.probe")
# metric.py rounds each sentence's score to 3 decimals before comparing: pairs closer than that are ties.
TIE_DECIMALS = 3


@torch.no_grad()
def sentence_log_likelihoods(
    model: nn.Module, tokenizer: Any, sentences: list[str], batch_size: int = 16, desc: str = "scoring"
) -> list[float]:
    """Total log-likelihood of each sentence: the sum of log p(token | the tokens before it), batched.

    Tokens are those the tokenizer gives by default (with BOS where it adds one); the first is the condition.
    """
    model.eval()
    tokenizer.padding_side = "right"
    scores: list[float] = []
    batches = range(0, len(sentences), batch_size)
    for start in tqdm(batches, desc=desc, disable=len(batches) < 4, mininterval=2, leave=False):
        batch = tokenizer(sentences[start : start + batch_size], return_tensors="pt", padding=True)
        batch = {k: v.to(model_device(model)) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        logits = model(**batch).logits.float()[:, -batch["input_ids"].shape[1] :]  # skip virtual tokens
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = batch["input_ids"][:, 1:]
        token_scores = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        scores += (token_scores * batch["attention_mask"][:, 1:]).sum(-1).tolist()
    return scores


def score_pairs(model: nn.Module, tokenizer: Any, pairs: list[Pair], batch_size: int = 16) -> dict[str, Any]:
    """CrowS-Pairs' metric in percent (50 = no preference), overall, per bias type and per direction, with counts.

    As nyu-mll/crows-pairs' metric.py counts it: a pair is stereotypical when the model prefers `sent_more`, in
    `stereo` and `antistereo` rows alike; sentence scores are compared rounded to TIE_DECIMALS, and a tie counts
    as not stereotypical in the overall score (`stereotype_score`, metric.py's "metric score") but is left out of
    the per-direction scores (`by_direction`: metric.py's "stereotype score" on `stereo` rows and
    "anti-stereotype score" on `antistereo` rows; None when every pair of the direction tied).
    """
    more = sentence_log_likelihoods(model, tokenizer, [p.sent_more for p in pairs], batch_size, "pairs (more)")
    less = sentence_log_likelihoods(model, tokenizer, [p.sent_less for p in pairs], batch_size, "pairs (less)")
    counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])  # sent_more preferred, pairs, ties
    for pair, m, s in zip(pairs, more, less, strict=True):
        m, s = round(m, TIE_DECIMALS), round(s, TIE_DECIMALS)
        entry = counts[pair.bias_type, pair.direction]
        entry[0] += m > s
        entry[1] += 1
        entry[2] += m == s

    def total(bias_type: str | None = None, direction: str | None = None) -> list[int]:
        keys = [k for k in counts if bias_type in (None, k[0]) and direction in (None, k[1])]
        return [sum(counts[k][i] for k in keys) for i in range(3)]

    def summary(c: list[int]) -> dict[str, Any]:
        return {
            "stereotype_score": 100.0 * c[0] / c[1] if c[1] else float("nan"),
            "pairs": c[1],
            "stereotypical": c[0],
            "ties": c[2],
        }

    def decided(c: list[int]) -> dict[str, Any]:
        score = 100.0 * c[0] / (c[1] - c[2]) if c[1] > c[2] else None
        return {"score": score, "pairs": c[1], "stereotypical": c[0], "ties": c[2]}

    directions = [d for d in ("stereo", "antistereo") if any(k[1] == d for k in counts)]
    return {
        **summary(total()),
        "by_direction": {d: decided(total(direction=d)) for d in directions},
        "by_type": {t: summary(total(bias_type=t)) for t in sorted({k[0] for k in counts})},
    }


def contains_word(text: str, word: str) -> bool:
    """Whole-word, case-insensitive match (Unicode letters count as word characters)."""
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, flags=re.IGNORECASE) is not None


def score_rules(
    model: nn.Module, tokenizer: Any, rules: list[RuleCategory], settings: ProbeSettings, style: PromptStyle = RAW_TEXT
) -> dict[str, Any]:
    """Pass rate per category: no forbidden word and the required words (any or all) in the continuation (for an
    instruction model, `style`: its answer to the prompt as a user turn)."""
    cases = [(rule, prompt) for rule in rules for prompt in rule.prompts]
    texts: dict[tuple[int, int], str] = {}  # (case, sample) -> continuation
    starts = range(0, len(cases), settings.batch_size)
    progress = tqdm(total=len(starts) * settings.samples, desc="rule cases", disable=len(cases) < 16, leave=False)
    for sample in range(settings.samples):
        for start in starts:
            prompts = [prompt for _, prompt in cases[start : start + settings.batch_size]]
            for offset, text in enumerate(generate(model, tokenizer, prompts, settings, sample, style)):
                texts[start + offset, sample] = text
            progress.update()
    progress.close()
    by_category: dict[str, Any] = {}
    for rule in rules:
        by_category[rule.category] = {"language": rule.language, "passed": 0, "cases": 0, "failures": []}
    for (case, _), text in sorted(texts.items()):
        rule, prompt = cases[case]
        forbidden = [w for w in rule.forbidden_words if contains_word(text, w)]
        present = [w for w in rule.required_words if contains_word(text, w)]
        required_ok = not rule.required_words or (
            len(present) == len(rule.required_words) if rule.required == "all" else bool(present)
        )
        entry = by_category[rule.category]
        entry["cases"] += 1
        if not forbidden and required_ok:
            entry["passed"] += 1
        elif len(entry["failures"]) < 3:
            entry["failures"].append({"prompt": prompt, "continuation": text, "forbidden_found": forbidden})
    passed_total = sum(e["passed"] for e in by_category.values())
    for entry in by_category.values():
        entry["pass_rate"] = entry.pop("passed") / max(entry["cases"], 1)
    return {"pass_rate": passed_total / max(len(texts), 1), "cases": len(texts), "by_category": by_category}


def perturb(text: str, kind: str, rng: random.Random) -> str:
    """A copy of `text` with one kind of surface noise a reader would shrug off."""
    if kind == "case":
        return text.upper() if rng.random() < 0.5 else text.lower()
    if kind == "whitespace":
        return "  ".join(text.split()) + " "
    if kind == "punctuation":
        return text.translate(str.maketrans("", "", string.punctuation))
    words = text.split()  # typo: swap two neighbouring letters in one longer word
    candidates = [i for i, w in enumerate(words) if len(w) > 3]
    if candidates:
        i = rng.choice(candidates)
        j = rng.randrange(len(words[i]) - 1)
        w = words[i]
        words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    return " ".join(words)


@torch.no_grad()
def predict_classes(model: nn.Module, tokenizer: Any, texts: list[str], batch_size: int) -> list[int]:
    model.eval()
    tokenizer.padding_side = "right"
    out: list[int] = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True)
        batch = {k: v.to(model_device(model)) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        out += model(**batch).logits.argmax(-1).tolist()
    return out


def score_robustness(
    model: nn.Module,
    tokenizer: Any,
    texts: list[str],
    labels: list[int],
    robustness: Robustness,
    settings: ProbeSettings,
) -> dict[str, Any]:
    """Accuracy on clean and perturbed eval texts, and how often the prediction stays the same."""
    clean = predict_classes(model, tokenizer, texts, settings.batch_size)
    by_kind = {}
    for kind in robustness.perturbations:
        rng = random.Random(f"{settings.seed}-{kind}")
        noisy = predict_classes(model, tokenizer, [perturb(t, kind, rng) for t in texts], settings.batch_size)
        by_kind[kind] = {
            "accuracy": sum(p == y for p, y in zip(noisy, labels, strict=True)) / len(labels),
            "consistency": sum(p == c for p, c in zip(noisy, clean, strict=True)) / len(labels),
        }
    return {
        "clean_accuracy": sum(p == y for p, y in zip(clean, labels, strict=True)) / len(labels),
        "consistency": min((v["consistency"] for v in by_kind.values()), default=1.0),
        "by_perturbation": by_kind,
        "examples": len(texts),
    }
