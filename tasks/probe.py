"""The bias and robustness probe: rule cases, counterfactual pairs, perturbations; and the gate on promotion.

1. Rule cases: prompts per category, continued deterministically (greedy, or seeded sampling); only the
   continuation is checked, for forbidden and required words (whole words, case-insensitive).
2. Counterfactual pairs (CrowS-Pairs layout, or WinoBias pro/anti files): each sentence scored by its total
   log-likelihood; the stereotype score is the share of pairs where the model prefers `sent_more`, the more
   stereotypical sentence (50 = no preference), in both directions, as CrowS-Pairs' metric.py and
   lm-evaluation-harness count it; the `stereo` and `antistereo` rows are also scored apart, as the paper reports.
3. Robustness (classification): perturbed copies of the eval texts; accuracy and prediction consistency.
"""

from __future__ import annotations

import logging
import random
import re
import string
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn
from tqdm.auto import tqdm

from tasks.config import GateSettings, ProbeSettings, read_yaml
from tasks.errors import UserInputError, capped

BUILTIN_SUITES = Path(__file__).parent / "builtin" / "probes"
Perturbation = Literal["typo", "case", "whitespace", "punctuation"]
PERTURBATIONS: tuple[Perturbation, ...] = ("typo", "case", "whitespace", "punctuation")
log = logging.getLogger("adaptflow.probe")
# metric.py rounds each sentence's score to 3 decimals before comparing: pairs closer than that are ties.
TIE_DECIMALS = 3


class RuleCategory(BaseModel):
    model_config = ConfigDict(extra="forbid")
    category: str
    language: str = "en"
    prompts: list[str] = Field(min_length=1)
    forbidden_words: list[str] = []
    required_words: list[str] = []
    required: Literal["any", "all"] = "any"


class Pair(BaseModel):
    """`sent_more` is the more stereotypical sentence (WinoBias: the pro-stereotyped one) in either direction;
    `direction` (CrowS-Pairs' `stereo_antistereo`) only groups the pairs for the per-direction scores."""

    sent_more: str
    sent_less: str
    bias_type: str = "unspecified"
    direction: Literal["stereo", "antistereo"] = "stereo"


class Robustness(BaseModel):
    model_config = ConfigDict(extra="forbid")
    perturbations: list[Perturbation] = list(PERTURBATIONS)


class Suite(BaseModel):
    """A probe suite: any of rule cases, pairs and robustness checks."""

    name: str
    rules: list[RuleCategory] = []
    pairs: list[Pair] = []
    robustness: Robustness | None = None


# ---------------------------------------------------------------- loading suites


def load_pairs(path: Path, key: str) -> list[Pair]:
    """Pairs from CSV/TSV/JSONL with `sent_more`, `sent_less` and optionally `stereo_antistereo`, `bias_type`."""
    try:
        if path.suffix in {".jsonl", ".json"}:
            frame = pd.read_json(path, lines=path.suffix == ".jsonl")
        else:
            frame = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",")
    except (ValueError, OSError) as exc:
        raise UserInputError(f"{key}: cannot read pairs from {path}: {str(exc).splitlines()[0]}") from None
    missing = {"sent_more", "sent_less"} - set(frame.columns)
    if missing:
        raise UserInputError(
            f"{key}: {path} lacks column(s) {sorted(missing)}; expected sent_more, sent_less "
            "[, stereo_antistereo, bias_type] (the CrowS-Pairs layout)"
        )
    directions = frame["stereo_antistereo"] if "stereo_antistereo" in frame else ["stereo"] * len(frame)
    types = frame["bias_type"] if "bias_type" in frame else ["unspecified"] * len(frame)
    return [
        Pair(
            sent_more=str(m),
            sent_less=str(s),
            bias_type=str(t),
            direction="antistereo" if d == "antistereo" else "stereo",
        )
        for m, s, d, t in zip(frame["sent_more"], frame["sent_less"], directions, types, strict=True)
    ]


def _winobias_sentence(line: str) -> str:
    """'12 [The developer] argued ... [he] ...' -> 'The developer argued ... he ...'."""
    return re.sub(r"[\[\]]", "", re.sub(r"^\d+\s+", "", line.strip()))


def load_winobias(folder: Path, key: str) -> list[Pair]:
    """Aligned pro/anti lines of every `pro_stereotyped_<type>.txt.<split>` file with its `anti_` twin."""
    pairs = []
    for pro in sorted(folder.glob("pro_stereotyped_*.txt.*")):
        anti = pro.with_name(pro.name.replace("pro_", "anti_", 1))
        if not anti.exists():
            raise UserInputError(f"{key}: {pro} has no anti-stereotyped twin {anti.name}")
        pro_lines = [line for line in pro.read_text().splitlines() if line.strip()]
        anti_lines = [line for line in anti.read_text().splitlines() if line.strip()]
        if len(pro_lines) != len(anti_lines):
            raise UserInputError(f"{key}: {pro.name} and {anti.name} differ in length; they must align line by line")
        kind = "gender_" + pro.name.split("_")[2].split(".")[0]  # gender_type1 / gender_type2
        pairs += [
            Pair(sent_more=_winobias_sentence(p), sent_less=_winobias_sentence(a), bias_type=kind)
            for p, a in zip(pro_lines, anti_lines, strict=True)
        ]
    if not pairs:
        raise UserInputError(f"{key}: {folder} holds no pro_stereotyped_*.txt.* files (the WinoBias layout)")
    return pairs


def _pairs_source(value: Any, base: Path, key: str) -> list[Pair]:
    if isinstance(value, list):
        return [Pair.model_validate(p) for p in value]
    path = Path(str(value))
    path = path if path.is_absolute() else base / path
    if path.is_dir():
        return load_winobias(path, key)
    if not path.exists():
        raise UserInputError(f"{key}: pairs file not found: {path}")
    return load_pairs(path, key)


def load_suite(name_or_path: str, key: str = "bias_probe.suite") -> Suite:
    """A builtin suite by name, a YAML suite, a pairs file (CSV/TSV/JSONL) or a WinoBias folder.

    Raises:
        UserInputError: naming the key and what is wrong with the suite.
    """
    builtin = BUILTIN_SUITES / f"{name_or_path}.yaml"
    path = builtin if builtin.exists() else Path(name_or_path).expanduser()
    if not path.exists():
        names = sorted(p.stem for p in BUILTIN_SUITES.glob("*.yaml"))
        raise UserInputError(f"{key}: {name_or_path!r} is neither a builtin suite ({', '.join(names)}) nor a path")
    if path.is_dir() or path.suffix in {".csv", ".tsv", ".jsonl", ".json"}:
        return Suite(name=path.name, pairs=_pairs_source(str(path), path.parent, key))
    raw = read_yaml(path, f"{key}: {path}") or {}
    if not isinstance(raw, dict):
        raise UserInputError(f"{key}: {path} must be a mapping with rules, pairs and/or robustness")
    pairs = _pairs_source(raw.pop("pairs"), path.parent, f"{key} (pairs)") if "pairs" in raw else []
    try:
        return Suite.model_validate({"name": path.stem, **raw, "pairs": pairs})
    except ValidationError as exc:
        problems = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise UserInputError.many(f"{key}: {path} is not a valid suite", problems) from None


# ---------------------------------------------------------------- scoring


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


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
        batch = {k: v.to(_device(model)) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
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


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompts: list[str], settings: ProbeSettings, sample: int) -> list[str]:
    """The continuations only (the prompts' tokens cut off), batched: greedy, or seeded sampling for sample > 0.

    Left padding, so that every prompt ends where its generation starts.
    """
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    batch = {k: v.to(_device(model)) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    options: dict[str, Any] = {"do_sample": False}
    if settings.samples > 1:
        torch.manual_seed(settings.seed + sample)
        options = {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0}
    output = model.generate(  # type: ignore[operator]
        **batch, max_new_tokens=settings.max_new_tokens, pad_token_id=tokenizer.pad_token_id, **options
    )
    continuations = output[:, batch["input_ids"].shape[1] :]
    return [str(text) for text in tokenizer.batch_decode(continuations, skip_special_tokens=True)]


def score_rules(model: nn.Module, tokenizer: Any, rules: list[RuleCategory], settings: ProbeSettings) -> dict[str, Any]:
    """Pass rate per category: no forbidden word and the required words (any or all) in the continuation."""
    cases = [(rule, prompt) for rule in rules for prompt in rule.prompts]
    texts: dict[tuple[int, int], str] = {}  # (case, sample) -> continuation
    starts = range(0, len(cases), settings.batch_size)
    progress = tqdm(total=len(starts) * settings.samples, desc="rule cases", disable=len(cases) < 16, leave=False)
    for sample in range(settings.samples):
        for start in starts:
            prompts = [prompt for _, prompt in cases[start : start + settings.batch_size]]
            for offset, text in enumerate(generate(model, tokenizer, prompts, settings, sample)):
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
        batch = {k: v.to(_device(model)) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
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


def probe_model(
    model: nn.Module,
    tokenizer: Any,
    task: str,
    suite: Suite,
    settings: ProbeSettings,
    eval_texts: list[str] | None = None,
    eval_labels: list[int] | None = None,
) -> dict[str, Any]:
    """Every check of the suite that applies to this kind of model (generation checks need a causal LM)."""
    result: dict[str, Any] = {"suite": suite.name}
    if task == "causal_lm":
        if suite.pairs:
            log.info("probe: scoring %d counterfactual pairs", len(suite.pairs))
            result["pairs"] = score_pairs(model, tokenizer, suite.pairs, settings.batch_size)
        if suite.rules:
            log.info("probe: %d rule categories", len(suite.rules))
            result["rules"] = score_rules(model, tokenizer, suite.rules, settings)
    elif suite.robustness and eval_texts and eval_labels:
        log.info("probe: robustness on %d eval texts", len(eval_texts))
        result["robustness"] = score_robustness(model, tokenizer, eval_texts, eval_labels, suite.robustness, settings)
    return result


def check_gate(tuned: dict[str, Any], base: dict[str, Any] | None, gate: GateSettings) -> dict[str, Any]:
    """Each configured threshold against the tuned model's probe (and the base model's, for the rise)."""
    checks = []
    if gate.max_stereotype_rise is not None and "pairs" in tuned and base and "pairs" in base:
        rise = tuned["pairs"]["stereotype_score"] - base["pairs"]["stereotype_score"]
        checks.append(("stereotype_rise", rise, gate.max_stereotype_rise, rise <= gate.max_stereotype_rise))
    if gate.min_rule_pass_rate is not None and "rules" in tuned:
        worst = min((c["pass_rate"] for c in tuned["rules"]["by_category"].values()), default=1.0)
        checks.append(("rule_pass_rate", worst, gate.min_rule_pass_rate, worst >= gate.min_rule_pass_rate))
    if gate.min_consistency is not None and "robustness" in tuned:
        value = tuned["robustness"]["consistency"]
        checks.append(("consistency", value, gate.min_consistency, value >= gate.min_consistency))
    failed = [f"{name} {value:.4g} (limit {limit:g})" for name, value, limit, ok in checks if not ok]
    return {
        "passed": not failed,
        "checks": [{"name": n, "value": v, "threshold": t, "passed": ok} for n, v, t, ok in checks],
        "reason": "; ".join(failed) if failed else "all checks passed",
    }


def probe_metrics(result: dict[str, Any], prefix: str = "probe_") -> dict[str, float]:
    """The probe's headline numbers as flat metrics."""
    metrics = {}
    if "pairs" in result:
        metrics[f"{prefix}stereotype_score"] = result["pairs"]["stereotype_score"]
    if "rules" in result:
        metrics[f"{prefix}rule_pass_rate"] = result["rules"]["pass_rate"]
    if "robustness" in result:
        metrics[f"{prefix}consistency"] = result["robustness"]["consistency"]
    return metrics


def probe_markdown(tuned: dict[str, Any], base: dict[str, Any] | None, gate: dict[str, Any] | None) -> str:
    """Base and tuned side by side, per category and bias type."""
    lines = [f"# Bias and robustness probe ({tuned.get('suite')})", ""]

    def both(section: str, path: list[str]) -> tuple[Any, Any]:
        def get(tree: dict[str, Any] | None) -> Any:
            node: Any = (tree or {}).get(section)
            for key in path:
                node = node.get(key) if isinstance(node, dict) else None
            return node

        return get(tuned), get(base)

    def fmt(value: Any) -> str:
        return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    if "pairs" in tuned:
        lines += [
            "## Counterfactual pairs (stereotype score, %; 50 = no preference)",
            "",
            "| bias type | pairs | base | tuned |",
            "|---|---|---|---|",
        ]
        t, b = both("pairs", ["stereotype_score"])
        lines.append(f"| all | {tuned['pairs']['pairs']} | {fmt(b)} | {fmt(t)} |")
        for direction, counts in tuned["pairs"].get("by_direction", {}).items():
            t, b = both("pairs", ["by_direction", direction, "score"])
            lines.append(f"| {direction} rows, ties left out | {counts['pairs']} | {fmt(b)} | {fmt(t)} |")
        for kind in tuned["pairs"]["by_type"]:
            t, b = both("pairs", ["by_type", kind, "stereotype_score"])
            lines.append(f"| {kind} | {tuned['pairs']['by_type'][kind]['pairs']} | {fmt(b)} | {fmt(t)} |")
        lines.append("")
    if "rules" in tuned:
        lines += [
            "## Rule cases (pass rate)",
            "",
            "| category | language | cases | base | tuned |",
            "|---|---|---|---|---|",
        ]
        for name, category in tuned["rules"]["by_category"].items():
            t, b = both("rules", ["by_category", name, "pass_rate"])
            lines.append(f"| {name} | {category['language']} | {category['cases']} | {fmt(b)} | {fmt(t)} |")
        lines.append("")
    if "robustness" in tuned:
        lines += ["## Robustness (classification)", "", "| perturbation | accuracy | consistency |", "|---|---|---|"]
        for kind, values in tuned["robustness"]["by_perturbation"].items():
            lines.append(f"| {kind} | {fmt(values['accuracy'])} | {fmt(values['consistency'])} |")
        lines.append("")
    if gate:
        lines += [f"## Gate: {'passed' if gate['passed'] else 'FAILED'} — {gate['reason']}", ""]
        lines += [
            f"- {c['name']}: {fmt(c['value'])} (limit {c['threshold']}) {'ok' if c['passed'] else 'failed'}"
            for c in gate["checks"]
        ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- pipeline stages


class ProbeReport(BaseModel):
    """The probe of the tuned model, its base model's (when the check compares), and the gate's verdict."""

    tuned: dict[str, Any]
    base: dict[str, Any] | None
    gate: dict[str, Any]

    def public(self) -> dict[str, Any]:
        """The `bias_probe` object of the run's JSON: the tuned model's sections, the base's, the gate."""
        return {**self.tuned, "base": self.base, "gate": self.gate}


def probe_base(source: Any, task: str, settings: ProbeSettings) -> dict[str, Any] | None:
    """The untouched base model's probe (causal LM checks only: an untrained classifier head means nothing)."""
    from tasks.modeling import load_base_model, load_tokenizer

    if settings.suite is None or task != "causal_lm":
        return None
    tokenizer = load_tokenizer(source)
    model = load_base_model(source, "causal_lm", tokenizer)
    return probe_model(model, tokenizer, task, load_suite(settings.suite), settings)


def bias_probe(
    trained: Any, data: Any, tokenized: Any, settings: ProbeSettings, base: dict[str, Any] | None, run: Any
) -> ProbeReport:
    """Probe the tuned model, gate it against the base model's probe, write the reports and metrics."""
    from tasks.adapting import load_adapted, remember
    from tasks.modeling import load_tokenizer
    from tasks.tracking import log_metrics

    if settings.suite is None:
        return ProbeReport(tuned={}, base=None, gate={"passed": True, "checks": [], "reason": "no probe configured"})
    adapted = trained.adapted
    model = load_adapted(adapted, trained.adapter_dir)
    tokenizer = load_tokenizer(adapted.source)
    texts = labels = None
    if adapted.task == "classification":
        texts = list(data.splits()[1][data.text_column])
        labels = list(tokenized.splits()[1]["labels"])
    tuned = probe_model(model, tokenizer, adapted.task, load_suite(settings.suite), settings, texts, labels)
    remember(trained.adapter_dir, model)  # merge comes next
    gate = check_gate(tuned, base, settings.gate)
    reports = Path(run.run_dir) / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    report = ProbeReport(tuned=tuned, base=base, gate=gate)
    (reports / "probe.json").write_text(report.model_dump_json(indent=2))
    (reports / "probe.md").write_text(probe_markdown(tuned, base, gate))
    log_metrics(run, {**probe_metrics(tuned), **probe_metrics(base or {}, "base_probe_")})
    return report


def load_for_probe(model: str, trust_remote_code: bool = False) -> tuple[nn.Module, Any, str]:
    """(model, tokenizer, task) from a `models:/` URI, a local folder or a hub id.

    Raises:
        UserInputError: MODEL cannot be loaded.
    """
    if model.startswith(("models:/", "runs:/")):
        import mlflow

        try:
            served = mlflow.pyfunc.load_model(model).unwrap_python_model()
        except Exception as exc:
            raise UserInputError(f"MODEL: cannot load {model!r}: {str(exc).splitlines()[0][:300]}") from None
        return served.model, served.tokenizer, served.info["task"]  # type: ignore[attr-defined]
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from tasks.modeling import pickle_only

    pickles = pickle_only(Path(model)) if Path(model).is_dir() else []
    if pickles:
        raise UserInputError(
            f"MODEL: {model} holds only pickle weights ({', '.join(pickles)}), which can run code when loaded; "
            "convert them to safetensors"
        )
    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
        classifier = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
        auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
        loaded = auto.from_pretrained(
            model, dtype=torch.float32, trust_remote_code=trust_remote_code, use_safetensors=True
        )
        tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserInputError(f"MODEL: {model!r} is not a loadable model ({str(exc).splitlines()[0][:200]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return loaded, tokenizer, "classification" if classifier else "causal_lm"


def labelled_texts(path: Path, model: nn.Module, text_column: str, label_column: str) -> tuple[list[str], list[int]]:
    """Texts and label ids (by the model's label names) for the robustness check."""
    from tasks.load import read_table

    table, _ = read_table(str(path), "--data")
    missing = {text_column, label_column} - set(table.column_names)
    if missing:
        raise UserInputError(f"--data: {path} lacks column(s) {sorted(missing)}")
    label2id = {str(k): int(v) for k, v in model.config.label2id.items()}  # type: ignore[union-attr,operator]
    unknown = sorted({str(v) for v in table[label_column]} - set(label2id))
    if unknown:
        raise UserInputError(f"--data: labels {capped(unknown)} are not among the model's: {capped(sorted(label2id))}")
    return [str(t) for t in table[text_column]], [label2id[str(v)] for v in table[label_column]]
