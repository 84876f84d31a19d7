"""One worker of a distributed train stage: `python -m torch.distributed.run ... -m tasks.train_worker SPEC.json`.

It loads the adapted model with the method's own `load` (from the stage's adapter folder, or the checkpoint it
resumes from) and trains it as rank RANK; rank 0 writes `trained.json` beside the spec. A failure is written to
`error-rank<RANK>.json` for the stage to report.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import traceback
from pathlib import Path

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to end this process when its launcher dies, even by SIGKILL: no orphaned worker."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the launcher's own stop is what remains
        return
    if os.getppid() == 1:  # the launcher died before the request
        os._exit(1)


def main(argv: list[str]) -> int:
    die_with_parent()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("adaptflow").setLevel(logging.INFO)
    from tasks import training
    from tasks.adapting import load_adapted
    from tasks.distributed import WorkerSpec, write_error

    spec_path = Path(argv[0])
    rank = int(os.environ.get("RANK", "0"))
    try:
        spec = WorkerSpec.model_validate_json(spec_path.read_text())
        resume_from = Path(spec.resume_from) if spec.resume_from else None
        model = load_adapted(spec.adapted, resume_from or spec.adapted.adapter_dir, trainable=True)
        trained = training.train_loaded(
            model, spec.adapted, spec.tokenized, spec.settings, spec.run, resume_from, rank=rank
        )
        if rank == 0:
            staging = spec_path.parent / "trained.json.partial"
            staging.write_text(trained.model_dump_json())
            staging.replace(spec_path.parent / "trained.json")
    except BaseException as exc:  # every failure is reported to the stage, then the exit code
        write_error(spec_path.parent, rank, exc)
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
