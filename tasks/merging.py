"""Merge: fold the adapter into the base, check merged vs unmerged logits, save the merged model."""

from __future__ import annotations

import logging
from itertools import islice
from pathlib import Path

import torch
from pydantic import BaseModel
from torch import nn

from adapters_impl import get_method
from tasks.adapting import load_adapted, load_full_precision_base
from tasks.evaluation import eval_loss
from tasks.measuring import EVAL_BATCH_SIZE, _batches, model_device
from tasks.modeling import ModelSource, load_tokenizer
from tasks.tokenization import TokenizedRef, make_collator
from tasks.tracking import RunRef, log_metrics
from tasks.training import TrainedRef

CHECK_BATCHES = 4
log = logging.getLogger("adaptflow")

# How far merged logits may be from the unmerged model's, by the dtype the check computed in: fp32 rounding only;
# TF32 matmuls keep 10 mantissa bits, fp16 10, bf16 7 (logits of magnitude ~10 then differ in the second decimal).
MERGE_TOLERANCE = {"fp32": 1e-4, "tf32": 1e-2, "fp16": 5e-2, "bf16": 2e-1}


class MergedRef(BaseModel):
    """The merged model's folder and how far its logits are from the unmerged model's (None: not mergeable).

    For lossy merges (QLoRA into a full-precision base) also the merged model's eval loss on the whole eval set.
    """

    merged_dir: str | None
    merge_max_abs_diff: float | None
    merged_eval_loss: float | None = None
    merge_tolerance: float | None = None


def merge_tolerance(dtype: torch.dtype, device: str) -> float:
    """The merge check's tolerance for models computing in `dtype` on `device` (TF32 when CUDA matmuls allow it)."""
    if dtype == torch.bfloat16:
        return MERGE_TOLERANCE["bf16"]
    if dtype == torch.float16:
        return MERGE_TOLERANCE["fp16"]
    if device.startswith("cuda") and torch.backends.cuda.matmul.allow_tf32:
        return MERGE_TOLERANCE["tf32"]
    return MERGE_TOLERANCE["fp32"]


def base_dtype(source: ModelSource) -> torch.dtype:
    """The dtype the base model's weights are stored in (its config's `dtype`), fp32 when it does not say."""
    from transformers import AutoConfig

    stored = getattr(AutoConfig.from_pretrained(source.name_or_path, **source.kwargs()), "dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else torch.float32


@torch.no_grad()
def _logits(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    model.eval()
    outputs = []
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        outputs.append(model(**inputs).logits.float().cpu())
    return outputs


def merge_model(
    trained: TrainedRef, tokenized: TokenizedRef, run: RunRef, batch_size: int = EVAL_BATCH_SIZE, save: bool = False
) -> MergedRef:
    """Check the merge when the method allows it (in memory); with `save` (registry.merged) also write the merged
    model, in the base's own dtype, for the registry to store. Methods that cannot merge register adapter-only."""
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
    computed_in = next(p.dtype for p in merged.parameters() if p.is_floating_point())
    # Rounding error is relative: logits of magnitude 30 (a real 30-layer model) differ by more than a toy's.
    scale = max(1.0, max(float(b.abs().max()) for b in before))
    tolerance = merge_tolerance(computed_in, str(model_device(merged))) * scale
    if diff > tolerance and not method.lossy_merge:
        log.warning("merged logits differ by %.3g, more than the %.3g expected in %s", diff, tolerance, computed_in)
    metrics = {"merge_max_abs_diff": diff, "merge_tolerance": tolerance}
    if method.lossy_merge:  # what users lose by serving the merged model instead of the adapted one
        metrics["merged_eval_loss"] = eval_loss(merged, eval_split, collator, batch_size, tokenized.task)
    folder = None
    if save:
        folder = Path(run.run_dir) / "merged"
        merged.to(base_dtype(adapted.source)).save_pretrained(str(folder), safe_serialization=True)  # type: ignore[operator]
        tokenizer.save_pretrained(str(folder))
    log_metrics(run, metrics)
    return MergedRef(
        merged_dir=str(folder) if folder else None,
        merge_max_abs_diff=diff,
        merged_eval_loss=metrics.get("merged_eval_loss"),
        merge_tolerance=tolerance,
    )
