"""A second kind of objective, added the way another package would add one: its module (tests/plugins/
text_regression.py) and one entry point line, nothing else touched. In fresh processes it validates, trains,
registers and serves through the same stages as the builtin objectives: run -> register -> predict.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = Path(__file__).resolve().parent / "plugins"
# The one line: what `[project.entry-points."adaptflow.objectives"]` writes into a package's metadata.
ENTRY_POINTS = "[adaptflow.objectives]\ntext_regression = text_regression:OBJECTIVE\n"


def _install_plugin(site: Path) -> dict[str, str]:
    """The plugin as pip would lay it out: its module on the path and its distribution's metadata beside it."""
    meta = site / "adaptflow_text_regression-0.1.dist-info"
    meta.mkdir(parents=True)
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: adaptflow-text-regression\nVersion: 0.1\n")
    (meta / "entry_points.txt").write_text(ENTRY_POINTS)
    (site / "text_regression.py").write_text((PLUGINS / "text_regression.py").read_text())
    path = os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path}


def _adaptflow(args: list[str], env: dict[str, str], cwd: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args, "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_plugin_objective_runs_registers_and_predicts_in_fresh_processes(tmp_path: Path, tiny_model: str) -> None:
    env = _install_plugin(tmp_path / "site")
    rows = [{"body": f"{'good ' * (i % 5 + 1)}story number {i}", "stars": float(i % 5 + 1)} for i in range(40)]
    data = tmp_path / "scores.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "regression.yaml"
    config.write_text(
        json.dumps(
            {
                "model": {"name_or_path": tiny_model},
                "task": "text_regression",
                "regression": {"target_column": "stars", "scale": 5.0},
                "data": {"train": str(data), "text_column": "body", "max_length": 32},
                "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                "train": {"max_steps": 30, "batch_size": 8, "learning_rate": 5e-3, "save_steps": 30},
                "registry": {"name": "scores", "promote": {"metric": "eval_mae"}},
                "bias_probe": {"suite": None},
            }
        )
    )
    listing = _adaptflow(["methods"], env, tmp_path)
    assert any(t["name"] == "text_regression" for t in listing["tasks"])

    result = _adaptflow(["run", str(config)], env, tmp_path)
    assert result["task"] == "text_regression" and result["model_version"] == "1"
    metrics = result["metrics"]
    assert {"eval_mae", "base_eval_mae", "eval_loss"} <= set(metrics)
    assert result["aliases"] == ["champion"]  # the first version, promoted on the plugin's own metric

    predicted = _adaptflow(
        ["predict", result["model_uri"], "--text", "good good story", "--text", "a story"], env, tmp_path
    )
    scores = predicted["predictions"]
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)  # the plugin head's output: a score

    # The registry refuses what the plugin's section does not allow, naming its key, before anything opens.
    config.write_text(config.read_text().replace('"scale": 5.0', '"scale": -1'))
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", str(config)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 2 and "regression.scale" in done.stderr
