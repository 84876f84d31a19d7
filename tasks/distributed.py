"""Distributed training: the train stage launches torchrun (`torch.distributed.run`) and waits for its workers.

The stage writes what a worker needs to `<run_dir>/distributed/spec.json`; each worker (tasks.train_worker) loads
the adapted model with the method's own `load` from the stage's adapter folder and trains it with the same
MethodTrainer (the HF Trainer wraps it in DDP or FSDP); rank 0 writes the checkpoints, the adapter, the MLflow
metrics and `trained.json`. A worker that fails writes `error-rank<N>.json`; the stage reports the first one.
The launcher runs in its own session, so that a failure, Ctrl-C or SIGTERM here ends it and its workers.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tasks.adapting import AdaptedRef
from tasks.config import FsdpSettings, TrainSettings
from tasks.errors import RunFailed, UserInputError
from tasks.tokenization import TokenizedRef
from tasks.tracking import PROJECT_ROOT, RunRef
from tasks.trained import TrainedRef, TrainingDiverged

log = logging.getLogger("adaptflow")

# Seconds the launcher gets to stop its workers after SIGTERM before its whole group is killed.
STOP_GRACE_SECONDS = 20.0
_LAUNCHED: set[int] = set()  # process groups of launchers still running: killed at exit whatever happens


class WorkerSpec(BaseModel):
    """What every worker of one distributed train stage needs (spec.json)."""

    adapted: AdaptedRef
    tokenized: TokenizedRef
    settings: TrainSettings
    run: RunRef
    resume_from: str | None = None


class WorkerError(BaseModel):
    """A worker's failure, as it wrote it (error-rank<N>.json)."""

    rank: int
    type: str
    message: str
    user_error: bool = False
    diverged: bool = False
    time: float


def check_device(settings: TrainSettings) -> None:
    """What the config alone cannot tell: FSDP and the process count against this machine's devices.

    Raises:
        UserInputError: FSDP without CUDA (accelerate shards with FSDP on GPUs only), or more processes per
            node than GPUs (or, on CPU, than cores).
    """
    import torch

    distributed = settings.distributed
    if distributed is None or distributed.world_size == 1:
        return
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if distributed.strategy == "fsdp" and gpus == 0:
        raise UserInputError(
            "train.distributed.strategy: fsdp needs CUDA GPUs (accelerate shards with FSDP on GPUs only; on CPU "
            "torch.distributed trains with gloo under ddp); use strategy: ddp here"
        )
    if gpus and distributed.nproc_per_node > gpus:
        raise UserInputError(
            f"train.distributed.nproc_per_node: {distributed.nproc_per_node} processes, but this node has {gpus} "
            "GPU(s); one process per GPU"
        )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not gpus and distributed.nproc_per_node > cores:  # each CPU process holds a model copy and wants a core
        raise UserInputError(
            f"train.distributed.nproc_per_node: {distributed.nproc_per_node} CPU processes, but this node has "
            f"{cores} core(s) for them; at most {cores}"
        )


def fsdp_arguments(fsdp: FsdpSettings) -> dict[str, Any]:
    """The HF Trainer's `fsdp` and `fsdp_config` for our settings; full state dicts, so rank 0 saves whole
    (consolidated) weights in the method's own format."""
    options = [fsdp.sharding, "auto_wrap"] + (["offload"] if fsdp.cpu_offload else [])
    config: dict[str, Any] = {
        "state_dict_type": "FULL_STATE_DICT",
        "use_orig_params": True,  # peft's frozen base and trainable adapters share FSDP units
        "sync_module_states": True,
        "activation_checkpointing": fsdp.activation_checkpointing,
    }
    if fsdp.auto_wrap == "size":
        config["min_num_params"] = fsdp.min_num_params
    return {"fsdp": " ".join(options), "fsdp_config": config}


def rendezvous_id(settings: TrainSettings) -> str:
    """The same on every node of one run (the rendezvous keys are prefixed with it): the training settings but
    what may differ between nodes (the node's rank, its output folder)."""
    assert settings.distributed is not None
    shared = settings.model_dump(mode="json", exclude={"output_dir": True, "distributed": {"node_rank"}})
    return hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:16]


def launch_command(settings: TrainSettings, spec: Path) -> list[str]:
    """torchrun for this node: one node on a free local port, or a static rendezvous at rdzv_endpoint
    (node 0 hosts it; node ranks fix which node holds global rank 0, the one that tracks)."""
    distributed = settings.distributed
    assert distributed is not None
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={distributed.nproc_per_node}"]
    if distributed.nnodes == 1 and distributed.rdzv_endpoint is None:
        command.append("--standalone")
    else:
        command += [
            f"--nnodes={distributed.nnodes}",
            f"--node_rank={distributed.node_rank}",
            "--rdzv_backend=static",
            f"--rdzv_endpoint={distributed.rdzv_endpoint}",
            f"--rdzv_id={rendezvous_id(settings)}",
        ]
    return [*command, "--max_restarts=0", "--monitor_interval=0.5", "-m", "tasks.train_worker", str(spec)]


# Runs the launcher with a request to the kernel: SIGTERM it when this process dies (even by SIGKILL), so that
# it stops its workers; then it becomes the launcher (exec keeps the request).
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
    "os.getppid() == 1 and os._exit(1); os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


def train_distributed(
    adapted: AdaptedRef, tokenized: TokenizedRef, settings: TrainSettings, run: RunRef, resume_from: Path | None
) -> TrainedRef | None:
    """Train on `train.distributed`'s processes and return rank 0's TrainedRef (None on a node other than 0).

    Raises:
        UserInputError: a worker found the user's input wrong (exit 2).
        TrainingDiverged: the loss became NaN or infinite.
        RunFailed: a worker failed (the first one's rank and message) or the launcher did.
    """

    distributed = settings.distributed
    assert distributed is not None
    folder = Path(run.run_dir) / "distributed"
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [*folder.glob("error-rank*.json"), folder / "trained.json"]:
        stale.unlink(missing_ok=True)
    spec = folder / "spec.json"
    spec.write_text(
        WorkerSpec(
            adapted=adapted,
            tokenized=tokenized,
            settings=settings,
            run=run,
            resume_from=str(resume_from) if resume_from else None,
        ).model_dump_json(indent=1)
    )
    log.info(
        "distributed training (%s): world size %d (%d node(s) x %d processes), global batch %d "
        "(batch_size %d x grad_accum %d x world size)",
        distributed.strategy,
        distributed.world_size,
        distributed.nnodes,
        distributed.nproc_per_node,
        settings.batch_size * settings.grad_accum * distributed.world_size,
        settings.batch_size,
        settings.grad_accum,
    )
    code, tail = run_launcher(launch_command(settings, spec))
    errors = sorted(
        (WorkerError.model_validate_json(p.read_text()) for p in folder.glob("error-rank*.json")),
        key=lambda e: e.time,
    )
    killed = [(rank, name) for rank, name in killed_ranks(tail) if rank not in {e.rank for e in errors}]
    if killed:  # a rank killed by a signal wrote no error: the others' errors are their lost peer, not the cause
        shown = ", ".join(f"rank {rank} by {name}" for rank, name in killed)
        raise RunFailed(
            f"distributed training failed: {shown} (of {distributed.world_size}; torchrun's report), the other "
            "ranks lost their peer; --resume continues from the last checkpoint"
        )
    if errors:  # the first to fail is the cause; the others mostly lost their peer
        first = errors[0]
        where = f"rank {first.rank} of {distributed.world_size}"
        if first.user_error:
            raise UserInputError(f"{first.message} (distributed training, {where})")
        if first.diverged:
            raise TrainingDiverged(f"{first.message} (distributed training, {where})")
        raise RunFailed(f"distributed training failed on {where}: {first.type}: {first.message}")
    result = folder / "trained.json"
    if code != 0 or (distributed.node_rank == 0 and not result.exists()):
        shown = "\n".join(f"  {line}" for line in tail)
        raise RunFailed(f"distributed training failed: torchrun exited with code {code}; its last lines:\n{shown}")
    return TrainedRef.model_validate_json(result.read_text()) if distributed.node_rank == 0 else None


# torchrun's failure report (torch.distributed.elastic's ChildFailedError): each failed rank's block has
# "rank      : 1 (local_rank: 1)" and "exitcode  : -9 (pid: 4242)  (SIGKILL)" for a rank a signal ended.
_REPORTED_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)")
_REPORTED_SIGNAL = re.compile(r"^\s*exitcode\s*:\s*-\d+ \(pid: \d+\)\s*\((SIG[A-Z]+)\)")


def killed_ranks(lines: list[str]) -> list[tuple[int, str]]:
    """The (global rank, signal name) of the rank torchrun reports as the root cause (its first observed failure)
    when a signal ended it: the ranks torchrun then stops itself (SIGTERM) are its consequence, not its cause."""
    roots = [i for i, line in enumerate(lines) if line.startswith("Root Cause")]
    if roots:
        lines = lines[roots[-1] :]
    killed, rank = [], None
    for line in lines:
        if match := _REPORTED_RANK.match(line):
            rank = int(match.group(1))
        elif (match := _REPORTED_SIGNAL.match(line)) and rank is not None:
            killed.append((rank, match.group(1)))
    return list(dict.fromkeys(killed))


def run_launcher(command: list[str]) -> tuple[int, list[str]]:
    """Run the launcher in its own session, its output passed on to stderr (stdout may carry --json); wait for it.

    On any exception here (Ctrl-C, SIGTERM raised as Interrupted) the launcher and its workers are stopped first.
    Returns its exit code and its last lines.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default for several processes, without its warning
    proc = subprocess.Popen(
        [sys.executable, "-c", _DIE_WITH_PARENT, *command[1:]] if sys.platform == "linux" else command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    _LAUNCHED.add(proc.pid)
    tail: deque[str] = deque(maxlen=30)
    reader = threading.Thread(target=_pass_on, args=(proc, tail), daemon=True)
    reader.start()
    try:
        code = proc.wait()
    except BaseException:
        stop(proc)
        raise
    finally:
        _LAUNCHED.discard(proc.pid)
    reader.join(timeout=5)
    return code, list(tail)


def _pass_on(proc: subprocess.Popen[bytes], tail: deque[str]) -> None:
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.decode(errors="replace")
        tail.append(line.rstrip())
        sys.stderr.write(line)
    sys.stderr.flush()


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the launcher: SIGTERM (it stops its workers), then SIGKILL to its group; the workers die with
    their launcher (tasks.train_worker asks the kernel for that), so none is left."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=STOP_GRACE_SECONDS)
            return
        except subprocess.TimeoutExpired:
            continue


@atexit.register
def _kill_launched() -> None:
    for pgid in list(_LAUNCHED):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def write_error(folder: Path, rank: int, exc: BaseException) -> None:
    """A worker's failure, for the stage to report (the first one by time is the cause)."""

    error = WorkerError(
        rank=rank,
        type=exc.__class__.__name__,
        message=str(exc) or repr(exc),
        user_error=isinstance(exc, UserInputError),
        diverged=isinstance(exc, TrainingDiverged),
        time=time.time(),
    )
    (folder / f"error-rank{rank}.json").write_text(json.dumps(error.model_dump()))
