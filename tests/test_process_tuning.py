"""The `adaptflow` command's process settings: freed activations are reused without page faults, torch.compile
does not import inductor, and what the caller set wins. Each case runs in a fresh interpreter (they are
process-wide and the allocator reads its settings once)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# A training step's pattern, ten times: six 40 MB activations (the size of a 50M model's logits) allocated,
# written, then freed. The minor page faults that costs, and what the settings became.
PROBE = """
import json, os, resource, sys
from flows import process_tuning
applied = process_tuning.tune_process() if sys.argv[1] == "tuned" else {}
import torch
def step():
    activations = [torch.empty(10 << 20, dtype=torch.float32).fill_(1.0) for _ in range(6)]
    del activations
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
torch.compile(lambda x: x + 1)
print(json.dumps({"faults": faults, "applied": applied, "inductor": "torch._inductor.compile_fx" in sys.modules,
                  "dynamo_disable": os.environ.get("TORCHDYNAMO_DISABLE")}))
"""


def probe(mode: str, **env: str) -> dict:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "TORCHDYNAMO_DISABLE"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env={**environment, **env}, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings")
def test_tuned_process_reuses_freed_memory_and_skips_inductor():
    plain, tuned = probe("plain"), probe("tuned")
    # 10 x 6 x 40 MB is ~614 k pages. Blocks over 32 MB are always fresh mmaps by default, so every page faults
    # again; tuned, freed blocks stay in the heap and are reused.
    assert plain["faults"] > 500_000
    assert tuned["faults"] < plain["faults"] / 3
    assert plain["inductor"] and not tuned["inductor"]
    assert tuned["applied"]["TORCHDYNAMO_DISABLE"] == "1"
    assert set(tuned["applied"]) >= {"MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_"}


def test_the_callers_settings_win():
    tuned = probe("tuned", TORCHDYNAMO_DISABLE="0", MALLOC_TRIM_THRESHOLD_="1000")
    assert tuned["dynamo_disable"] == "0" and tuned["inductor"]
    assert "TORCHDYNAMO_DISABLE" not in tuned["applied"] and "MALLOC_TRIM_THRESHOLD_" not in tuned["applied"]


def test_every_command_starts_tuned_also_when_main_is_called_in_process() -> None:
    """The settings come with the session every command starts in, not only with the console script's `entry`
    (tests and embedders call `main`)."""
    code = (
        "import os; from flows.cli import main; code = main(['methods', '--json']); "
        "print(code, os.environ.get('TORCHDYNAMO_DISABLE'), os.environ.get('MALLOC_TOP_PAD_'))"
    )
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "TORCHDYNAMO_DISABLE"}
    done = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, check=True)
    lines = done.stdout.strip().splitlines()
    assert json.loads(lines[-2])["command"] == "methods"  # the JSON line is still the command's last
    assert lines[-1].split()[:2] == ["0", "1"]
    if sys.platform.startswith("linux"):
        assert lines[-1].split()[2] == str(64 << 20)
