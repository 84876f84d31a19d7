"""Causal language modelling: continue text. Every token is a target; metrics are eval loss and perplexity."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from adapters_impl.model_heads import CAUSAL_LM
from tasks.objectives.base import IGNORE_INDEX, Encode, Encoding, Objective, ReportInput

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

    from datasets import Dataset
    from torch import nn

    from tasks.config import RunConfig
    from tasks.generation import PromptStyle
    from tasks.load import DataRef
    from tasks.modeling import ModelSource
    from tasks.probe.suites import Suite
    from tasks.settings import ProbeSettings
    from tasks.tokenization import TokenizedRef

# The stages (tasks/*.py) import the objectives, and the config reads their names: what an objective uses of the
# stages is imported inside its functions.
log = logging.getLogger("adaptflow.probe")


def encoder(
    tokenizer: Any,
    data: DataRef,
    train: Dataset,
    eval_: Dataset,
    max_length: int,
    options: dict[str, Any],
    encoding: Encoding,
) -> tuple[Encode, None]:
    """Ids with an eos at the end; the labels are the ids (the model shifts them)."""
    eos = tokenizer.eos_token_id
    column = data.text_column

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        # Room for an eos token, so the model learns where a text ends.
        encoded = tokenizer(batch[column], truncation=True, max_length=max_length - 1)
        ids = [[*seq, eos] if eos is not None and (not seq or seq[-1] != eos) else seq for seq in encoded["input_ids"]]
        return {
            "input_ids": ids,
            "attention_mask": [[1] * len(s) for s in ids],
            "labels": [list(s) for s in ids],
        }

    return encode, None


def collator(tokenizer: Any) -> Any:
    """Dynamic padding; labels are padded with IGNORE_INDEX so padding never counts."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)


def metrics(
    model: nn.Module, tokenizer: Any, tokenized: TokenizedRef, batch_size: int, keep: Path | None
) -> dict[str, float]:
    from tasks.measuring import causal_lm_metrics

    _, eval_split = tokenized.splits()
    return causal_lm_metrics(model, eval_split, collator(tokenizer), batch_size, prefix="")


def eval_loss(model: nn.Module, dataset: Dataset, collate: Any, batch_size: int) -> float:
    """Mean loss per real token."""
    from tasks.measuring import causal_lm_nll

    nll, tokens = causal_lm_nll(model, dataset, collate, batch_size)
    return nll / max(tokens, 1)


def base_model(source: ModelSource) -> tuple[nn.Module, Any]:
    from tasks.modeling import load_base_model, load_tokenizer

    tokenizer = load_tokenizer(source)
    return load_base_model(source, CAUSAL_LM, tokenizer), tokenizer


def base_metrics(source: ModelSource, tokenized: TokenizedRef, batch_size: int) -> dict[str, float]:
    """The untouched base model's loss and perplexity on the same eval set."""
    from tasks.measuring import causal_lm_metrics

    model, tokenizer = base_model(source)
    _, eval_split = tokenized.splits()
    return causal_lm_metrics(model, eval_split, collator(tokenizer), batch_size, prefix="base_")


def base_generations(source: ModelSource, data: DataRef, tokenized: TokenizedRef) -> list[str]:
    """The untouched base model's greedy continuations of the report's fixed prompts (deterministic)."""
    from tasks.generation import GREEDY, fixed_prompts, generate

    model, tokenizer = base_model(source)
    return generate(model, tokenizer, fixed_prompts(data), GREEDY, 0)


def report(given: ReportInput) -> tuple[dict[str, Any], dict[str, float]]:
    """Loss and perplexity, tuned vs base, and greedy generations for fixed prompts, tuned vs base."""
    from tasks.generation import GREEDY, fixed_prompts, generate

    prompts = fixed_prompts(given.data)
    tuned = generate(given.model, given.tokenizer, prompts, GREEDY, 0)
    sections = {
        "metrics": {
            key: (given.metrics.get(key), given.metrics.get(f"base_{key}")) for key in ("eval_loss", "eval_perplexity")
        },
        "generations": [
            {"prompt": prompt, "tuned": t, "base": b}
            for prompt, t, b in zip(prompts, tuned, given.base_texts, strict=True)
        ],
    }
    return sections, {}


def probe(
    model: nn.Module,
    tokenizer: Any,
    suite: Suite,
    settings: ProbeSettings,
    texts: list[str] | None,
    labels: list[int] | None,
    options: Mapping[str, Any],
) -> dict[str, Any]:
    """The generation checks: counterfactual pairs and rule cases (prompts continued as raw text)."""
    return generation_checks(model, tokenizer, suite, settings)


def generation_checks(
    model: nn.Module, tokenizer: Any, suite: Suite, settings: ProbeSettings, style: PromptStyle | None = None
) -> dict[str, Any]:
    """Counterfactual pairs (sentence likelihoods, as CrowS-Pairs scores them) and rule cases, whose prompts reach
    the model in `style` (default: raw text)."""
    from tasks.generation import RAW_TEXT
    from tasks.probe.scoring import score_pairs, score_rules

    result: dict[str, Any] = {}
    if suite.pairs:
        log.info("probe: scoring %d counterfactual pairs", len(suite.pairs))
        result["pairs"] = score_pairs(model, tokenizer, suite.pairs, settings.batch_size)
    if suite.rules:
        log.info("probe: %d rule categories", len(suite.rules))
        result["rules"] = score_rules(model, tokenizer, suite.rules, settings, style or RAW_TEXT)
    return result


def metric_names(config: RunConfig) -> tuple[str, ...]:
    return ("eval_loss", "eval_perplexity")


OBJECTIVE = Objective(
    name="causal_lm",
    summary="Continue text: every token is a target; eval loss and perplexity, greedy generations vs the base",
    encoder=encoder,
    collator=collator,
    head=CAUSAL_LM,
    metrics=metrics,
    eval_loss=eval_loss,
    base_metrics=base_metrics,
    report=report,
    probe=probe,
    metric_names=metric_names,
    min_tokens=2,  # a causal text needs two tokens to predict anything
    base_generations=base_generations,
    probes_base=True,
)
