"""Process settings the `adaptflow` command applies before it imports torch: what a tuned training job sets.

- The allocator: glibc returns freed memory at the top of the heap to the system and serves large blocks with
  fresh `mmap`s, so a training step that frees and re-allocates its activations page-faults them in again
  (15 k to 650 k minor faults in 100 steps of the benchmark's 3M model, depending on the process's history;
  blocks over 32 MB, like a 50M model's logits, fault in every step). Keeping freed memory (trim threshold),
  growing the heap in larger steps (top pad) and serving blocks below 256 MB from the heap cuts that to
  12-15 k at the same peak memory, and ~5% off a step: the knobs of MALLOC_TRIM_THRESHOLD_ and friends.
- torch.compile: bitsandbytes wraps its fallback CPU kernels in `torch.compile` when it is imported, and peft
  imports bitsandbytes for every method; that alone imports torch's inductor (1.3 s). adaptflow never
  compiles, so dynamo is off unless TORCHDYNAMO_DISABLE says otherwise (bitsandbytes then runs those
  fallbacks eagerly; its native CPU and CUDA kernels are unaffected).

- The services' defaults (`SERVICES`): what Prefect and MLflow default to is tuned for a server room, not for a
  busy 2-core machine or an offline one.

Child processes (grid workers, Dask workers, torchrun's ranks) inherit them all through the environment.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable

# glibc's mallopt parameters and the values (bytes) set here.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
ALLOCATOR = {
    "MALLOC_TRIM_THRESHOLD_": (_M_TRIM_THRESHOLD, 1 << 30),
    "MALLOC_TOP_PAD_": (_M_TOP_PAD, 64 << 20),
    "MALLOC_MMAP_THRESHOLD_": (_M_MMAP_THRESHOLD, 256 << 20),
}

SERVICES = {
    # Offline, Prefect's server would log a telemetry error on every start.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # The temporary server migrates a fresh SQLite database on first start: 20 s (Prefect's default) is too little
    # on a busy 2-core machine.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # MLflow's HTTP client retries a dead server for minutes by default; fail (and buffer, and retry) sooner.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def tune_process() -> dict[str, str]:
    """Apply the settings to this process and its future children; what the caller had set wins.
    Returns the settings applied here (empty where there is no glibc and nothing to change)."""
    applied = {variable: value for variable, value in SERVICES.items() if variable not in os.environ}
    os.environ.update(applied)
    if "TORCHDYNAMO_DISABLE" not in os.environ:
        os.environ["TORCHDYNAMO_DISABLE"] = "1"
        applied["TORCHDYNAMO_DISABLE"] = "1"
    mallopt = _glibc_mallopt()
    for variable, (parameter, value) in ALLOCATOR.items():
        if variable in os.environ or mallopt is None:
            continue  # glibc read the caller's value at start-up; not ours to override
        if mallopt(parameter, value) == 1:
            os.environ[variable] = str(value)
            applied[variable] = str(value)
    return applied


def _glibc_mallopt() -> Callable[[int, int], int] | None:
    name = ctypes.util.find_library("c")
    if not name or "libc.so" not in name:
        return None
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt
