"""Batched generation of continuations, shared by the evaluation report and the probe."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from tasks.measuring import model_device
from tasks.settings import ProbeSettings

if TYPE_CHECKING:
    from tasks.load import DataRef


class Decoding(Protocol):
    """How to continue: `samples` > 1 samples (seeded by `seed` + the sample's index), else greedy."""

    @property
    def samples(self) -> int: ...
    @property
    def seed(self) -> int: ...
    @property
    def max_new_tokens(self) -> int: ...


@dataclass(frozen=True)
class PromptStyle:
    """How a prompt reaches the model: as raw text to continue (the default), or — for an instruction model — as
    a user turn of its chat template (`encode`: text -> ids), answered until its end of turn (`stop_ids`, and the
    `end_of_turn` text where it is several tokens)."""

    encode: Callable[[str], list[int]] | None = None
    stop_ids: tuple[int, ...] = ()
    end_of_turn: str = ""


RAW_TEXT = PromptStyle()


@torch.no_grad()
def generate(
    model: nn.Module, tokenizer: Any, prompts: list[str], settings: Decoding, sample: int, style: PromptStyle = RAW_TEXT
) -> list[str]:
    """The continuations only (the prompts' tokens cut off), batched: greedy, or seeded sampling for sample > 0.

    Left padding, so that every prompt ends where its generation starts.
    """
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        if style.encode is None:
            batch = tokenizer(prompts, return_tensors="pt", padding=True)
        else:
            batch = tokenizer.pad({"input_ids": [style.encode(p) for p in prompts]}, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    batch = {k: v.to(model_device(model)) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    options: dict[str, Any] = {"do_sample": False}
    if settings.samples > 1:
        torch.manual_seed(settings.seed + sample)
        options = {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0}
    if style.stop_ids:
        options["eos_token_id"] = list(style.stop_ids)
    output = model.generate(  # type: ignore[operator]
        **batch, max_new_tokens=settings.max_new_tokens, pad_token_id=tokenizer.pad_token_id, **options
    )
    continuations = output[:, batch["input_ids"].shape[1] :]
    texts = [str(text) for text in tokenizer.batch_decode(continuations, skip_special_tokens=True)]
    return [text.split(style.end_of_turn)[0] if style.end_of_turn else text for text in texts]


@torch.no_grad()
def generate_from_ids(
    model: nn.Module, pad_id: int, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int]
) -> list[list[int]]:
    """Greedy continuations of already-encoded prompts (their ids only), batched and left-padded, each ending at
    its first stop id (which is kept)."""
    model.eval()
    width = max(len(p) for p in prompts)
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(context, int):  # positions past the context fail (learned) or extrapolate (rotary)
        max_new_tokens = min(max_new_tokens, context - width)
        if max_new_tokens <= 0:
            return [[] for _ in prompts]
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=model_device(model))
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=ids.device)
    output = model.generate(  # type: ignore[operator]
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stop_ids or None,
        pad_token_id=pad_id,
    )
    out = []
    for row in output[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        out.append(row[:end])
    return out


# The evaluation report's generations: greedy continuations of the first eval texts, cut to their first words.
PROMPTS = 4  # generations for the first few eval texts, cut to their first words
PROMPT_WORDS = 6
GREEDY = ProbeSettings(samples=1, max_new_tokens=30)


def fixed_prompts(data: DataRef) -> list[str]:
    """The first eval texts, cut to their first words: the same prompts for every run on this data."""
    texts = data.splits()[1][data.text_column][:PROMPTS]
    return [" ".join(str(t).split()[:PROMPT_WORDS]) for t in texts]
