"""What training leaves: the trained adapter (or model) on disk and what training measured, and how training
fails. Below both trainers (tasks/training.py in process, tasks/distributed.py under torchrun)."""

from __future__ import annotations

from pydantic import BaseModel

from tasks.adapting import AdaptedRef
from tasks.errors import RunFailed


class TrainingDiverged(RunFailed):
    """The loss became NaN or infinite (a clear message and exit 1; never retried)."""


class TrainedRef(BaseModel):
    """The trained adapter (or model) on disk and what training measured."""

    adapted: AdaptedRef
    adapter_dir: str
    steps: int
    train_loss: float
    train_seconds: float  # the whole trainer.train() call, checkpoints included
    train_tokens_per_second: float  # real tokens per second of training, checkpoint saves excluded
    checkpoint_seconds: float = 0.0
    peak_memory_mb: float
    loss_history: list[tuple[int, float]]
    resumed_from_step: int | None = None
    tracking_failures: int = 0
    world_size: int = 1  # processes that trained together (train.distributed)
    global_batch_size: int = 0  # sequences per optimizer step over all processes
    # Evaluation while training (tasks/periodic_eval.py): its run metrics, and (step, metrics) per evaluation.
    periodic: dict[str, float] = {}
    eval_history: list[tuple[int, dict[str, float]]] = []

    def metrics(self) -> dict[str, float]:
        """What training measured, as the run's metrics (the same keys for runs and grid trials)."""
        measured: dict[str, float] = {
            "trainable_params": self.adapted.trainable_params,
            "total_params": self.adapted.total_params,
            "train_seconds": self.train_seconds,
            "train_tokens_per_second": self.train_tokens_per_second,
            "checkpoint_seconds": self.checkpoint_seconds,
            "peak_memory_mb": self.peak_memory_mb,
        }
        if self.tracking_failures:  # metrics were buffered and retried while the tracking server was away
            measured["tracking_failures"] = self.tracking_failures
        if self.world_size > 1:  # in-process runs keep their metric keys
            measured["world_size"] = self.world_size
            measured["global_batch_size"] = self.global_batch_size
        return measured | self.periodic
