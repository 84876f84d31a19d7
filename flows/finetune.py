"""One Prefect flow per adaptation method; each takes the full, typed run config (a form in the Prefect UI)."""

from __future__ import annotations

from prefect import flow

from flows.pipeline import RunResult, finetune
from tasks.config import RunConfig


@flow(name="lora_finetune", log_prints=True)
def lora_finetune(config: RunConfig) -> RunResult:
    """Fine-tune with LoRA, evaluate against the base, merge, register and promote."""
    return finetune(config)


FLOWS = {"lora": lora_finetune}
