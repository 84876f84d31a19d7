"""Merge: fold the adapter into the base, check merged vs unmerged logits, save the merged model."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import torch
from pydantic import BaseModel
from torch import nn

from adapters_impl import get_method
from tasks.adapting import load_adapted, load_full_precision_base
from tasks.evaluation import EVAL_BATCH_SIZE, _batches, eval_loss, model_device
from tasks.modeling import load_tokenizer
from tasks.tokenization import TokenizedRef, make_collator
from tasks.tracking import RunRef, log_metrics
from tasks.training import TrainedRef

CHECK_BATCHES = 4


class MergedRef(BaseModel):
    """The merged model's folder and how far its logits are from the unmerged model's (None: not mergeable).

    For lossy merges (QLoRA into a full-precision base) also the merged model's eval loss on the whole eval set.
    """

    merged_dir: str | None
    merge_max_abs_diff: float | None
    merged_eval_loss: float | None = None


@torch.no_grad()
def _logits(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    model.eval()
    outputs = []
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        outputs.append(model(**inputs).logits.float().cpu())
    return outputs


def merge_model(
    trained: TrainedRef, tokenized: TokenizedRef, run: RunRef, batch_size: int = EVAL_BATCH_SIZE
) -> MergedRef:
    """Merge when the method allows it; methods that cannot merge register adapter-only."""
    adapted = trained.adapted
    method = get_method(adapted.method_name)
    if method.merge is None:
        return MergedRef(merged_dir=None, merge_max_abs_diff=None)
    model = load_adapted(adapted, trained.adapter_dir)
    tokenizer = load_tokenizer(adapted.source)
    _, eval_split = tokenized.splits()
    collator = make_collator(tokenizer, tokenized.task)
    batches = list(islice(_batches(eval_split, collator, batch_size, model_device(model)), CHECK_BATCHES))
    before = _logits(model, batches)
    merged = method.merge(model, lambda: load_full_precision_base(adapted))
    after = _logits(merged, batches)
    diff = max(float((a - b).abs().max()) for a, b in zip(before, after, strict=True))
    folder = Path(run.run_dir) / "merged"
    merged.save_pretrained(str(folder), safe_serialization=True)  # type: ignore[operator]
    tokenizer.save_pretrained(str(folder))
    metrics = {"merge_max_abs_diff": diff}
    if method.lossy_merge:  # what users lose by serving the merged model instead of the adapted one
        metrics["merged_eval_loss"] = eval_loss(merged, eval_split, collator, batch_size, tokenized.task)
    log_metrics(run, metrics)
    return MergedRef(merged_dir=str(folder), merge_max_abs_diff=diff, merged_eval_loss=metrics.get("merged_eval_loss"))
