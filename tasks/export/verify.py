"""Checks that an exported artifact is the model the version was evaluated as, each read back by another reader.

- GGUF: transformers' own GGUF loader (`from_pretrained(folder, gguf_file=...)`, which dequantizes) gives the
  merged model's logits within a tolerance set by the quantization, the same greedy tokens (16-bit and 32-bit
  floats), the same token ids for sample texts and rendered conversations (the template's special tokens
  included), and the same chat template.
- hf-merged: the folder reloaded with `from_pretrained` gives the same logits, token ids and chat template.
- LoRA GGUF: `gguf.GGUFReader` reads the adapter; base + alpha/r * B @ A rebuilds the merged weights (`gguf_lora`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.export.source import ExportSource

# Largest |logit difference| allowed, as a fraction of the largest |logit| (at least 1): rounding is relative.
# f32 is rounding alone; f16 keeps 10 mantissa bits, bf16 7, q8_0 8 bits per weight in blocks of 32.
LOGIT_TOLERANCE = {"f32": 1e-4, "f16": 5e-3, "bf16": 2e-2, "q8_0": 8e-2}
GREEDY_QUANTS = ("f32", "f16", "bf16")
GREEDY_PROMPTS = 3
GREEDY_TOKENS = 12


@torch.no_grad()
def _logits(model: nn.Module, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float()  # type: ignore[no-any-return]


def encoded(source: ExportSource) -> list[list[int]]:
    """The sample texts as the version's tokenizer encodes them (with its BOS convention)."""
    return [list(source.tokenizer(text)["input_ids"]) for text in source.sample_texts()]


def compare_logits(reference: nn.Module, candidate: nn.Module, inputs: list[list[int]], quant: str) -> dict[str, Any]:
    """Max |logit difference| over the inputs, and whether it is within the quantization's tolerance."""
    diff, scale = 0.0, 1.0
    for ids in inputs:
        expected, found = _logits(reference, ids), _logits(candidate, ids)
        diff = max(diff, float((expected - found).abs().max()))
        scale = max(scale, float(expected.abs().max()))
    tolerance = LOGIT_TOLERANCE[quant] * scale
    return {"max_abs_logit_diff": diff, "logit_tolerance": tolerance, "logits_within_tolerance": diff <= tolerance}


@torch.no_grad()
def compare_greedy(
    reference: nn.Module, candidate: nn.Module, prompts: list[list[int]], tolerance: float, pad: int | None
) -> dict[str, Any]:
    """Greedy continuations of both models. They must agree token for token, except where the reference's top
    two logits are closer than the tolerance when they part (a tie that rounding may break either way)."""
    identical, ties = 0, 0
    for ids in prompts:
        batch = torch.tensor([ids])
        mask = torch.ones_like(batch)
        kwargs = {"max_new_tokens": GREEDY_TOKENS, "do_sample": False, "pad_token_id": pad, "attention_mask": mask}
        ours = reference.generate(batch, **kwargs)[0, len(ids) :].tolist()  # type: ignore[operator]
        theirs = candidate.generate(batch, **kwargs)[0, len(ids) :].tolist()  # type: ignore[operator]
        if ours == theirs:
            identical += 1
            continue
        # Where they part: is the reference's choice there a near tie?
        step = next(
            (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs))
        )
        top = _logits(reference, ids + ours[:step])[-1].topk(2).values
        if float(top[0] - top[1]) <= tolerance:
            ties += 1
    return {
        "greedy_prompts": len(prompts),
        "greedy_identical": identical,
        "greedy_parted_at_ties": ties,
        "greedy_match": identical + ties == len(prompts),
    }


def compare_tokenizers(source: ExportSource, tokenizer: Any) -> dict[str, Any]:
    """Token ids of the sample texts (BOS convention included) and the chat template's rendering."""
    mismatched = []
    texts = source.sample_texts()
    for text in texts:
        if list(source.tokenizer(text)["input_ids"]) != list(tokenizer(text)["input_ids"]):
            mismatched.append(text[:80])
    checks: dict[str, Any] = {"token_id_texts": len(texts), "same_token_ids": not mismatched}
    if mismatched:
        checks["token_id_mismatches"] = mismatched
    if source.template:
        rendered_ok = all(
            source.render(c, True) == tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
            for c in source.conversations()
        )
        checks["chat_template_match"] = rendered_ok
    return checks


def verify_loaded(source: ExportSource, model: nn.Module, tokenizer: Any, quant: str) -> dict[str, Any]:
    """The checks of a model read back from an artifact, against the version's merged model."""
    model.eval()
    inputs = encoded(source)
    checks = compare_logits(source.model, model, inputs, quant)
    if quant in GREEDY_QUANTS:
        checks |= compare_greedy(
            source.model, model, inputs[:GREEDY_PROMPTS], checks["logit_tolerance"], source.tokenizer.pad_token_id
        )
    else:
        checks["greedy_match"] = None  # not expected of 8-bit weights: their logits are checked instead
    checks |= compare_tokenizers(source, tokenizer)
    return checks


def load_gguf(path: Path) -> tuple[nn.Module, Any]:
    """A GGUF file as transformers reads it (dequantized to float32), with the tokenizer it rebuilds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


def verify_gguf(source: ExportSource, path: Path, quant: str, reference: nn.Module | None = None) -> dict[str, Any]:
    """Read `path` back with transformers' GGUF loader and compare with the merged model (or `reference`)."""
    try:
        model, tokenizer = load_gguf(path)
    except Exception as exc:  # an unreadable artifact is a failed verification, recorded as such
        return {"readable": False, "read_error": f"{exc.__class__.__name__}: {str(exc)[:300]}"}
    if reference is not None:
        source = ExportSource(source.uri, source.folder, source.info, reference, source.tokenizer)
    return {"readable": True, **verify_loaded(source, model, tokenizer, quant)}


def verify_hf_folder(source: ExportSource, folder: Path, quant: str) -> dict[str, Any]:
    """Reload an hf-merged folder with `from_pretrained` and compare with the merged model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return verify_loaded(source, model, tokenizer, quant)
