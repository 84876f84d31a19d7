"""Evaluation while training (issue 28): what periodic evaluation costs as a share of training, the steps early
stopping saves, and the best checkpoint's metric against the last step's.

Two configs on the builtin tiny model: "overfit" (40 rows of word salad, full fine-tuning, lr 3e-3, 400 steps) and
X. Each runs twice through the
real CLI: with `train.eval_steps` alone (the full run: its history gives the last step's metric and the cost),
and with `train.best` + `train.early_stopping: {patience: 3}`.

    python -m benchmarks.periodic_eval [--out benchmarks/periodic_eval.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

SAMPLES = Path(__file__).resolve().parent.parent / "tasks" / "builtin"


def salad(path: Path, rows: int = 40) -> Path:
    stories = (SAMPLES / "sample_stories.jsonl").read_text().splitlines()
    words = sorted({w for line in stories for w in json.loads(line)["text"].split()})
    rng = random.Random(0)
    path.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=20))}) + "\n" for _ in range(rows)))
    return path


def configs(work: Path) -> dict[str, dict]:
    common = {"registry": {"name": "bench-periodic"}, "bias_probe": {"suite": None}, "model": {"name_or_path": "builtin:tiny"}}  # fmt: skip
    return {
        "overfit": {
            **common,
            "data": {"train": str(salad(work / "salad.jsonl")), "max_length": 48, "eval_fraction": 0.3},
            "method": {"name": "full"},
            "train": {"max_steps": 400, "batch_size": 8, "learning_rate": 3e-3, "save_steps": 100, "eval_steps": 10},
        },
        "normal": {
            **common,
            "data": {"train": str(SAMPLES / "sample_stories.jsonl"), "max_length": 64},
            "method": {"name": "lora", "target_modules": "all-linear"},
            "train": {"max_steps": 200, "batch_size": 8, "learning_rate": 2e-3, "eval_steps": 20},
        },
    }


def run(config: dict, work: Path, name: str) -> dict:
    path = work / f"{name}.yaml"
    path.write_text(json.dumps(config))
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
        "PREFECT_HOME": str(work / "prefect"),
    }
    command = [str(Path(sys.executable).with_name("adaptflow")), "run", str(path), "--force", "--json"]
    done = subprocess.run(command, env=env, cwd=work, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    history = json.loads((Path(result["run_dir"]) / "reports" / "eval_history.json").read_text())
    return {"metrics": result["metrics"], "history": history}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("periodic_eval.json")))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-periodic-") as folder:
        work = Path(folder)
        for name, config in configs(work).items():
            full = run(config, work, f"{name}-full")
            stopping = {**config["train"], "best": {"metric": "eval_loss"}, "early_stopping": {"patience": 3}}
            stopped = run({**config, "train": stopping}, work, f"{name}-stop")
            m, s = full["metrics"], stopped["metrics"]
            last_step, last = full["history"][-1]
            rows.append(
                {
                    "config": name,
                    "max_steps": config["train"]["max_steps"],
                    "eval_steps": config["train"]["eval_steps"],
                    "eval_share_of_train": m["periodic_eval_seconds"]
                    / (m["train_seconds"] + m["periodic_eval_seconds"]),
                    "periodic_eval_seconds": m["periodic_eval_seconds"],
                    "train_seconds": m["train_seconds"],
                    "steps_early_stopping": s["steps"],
                    "steps_saved": m["steps"] - s["steps"],
                    "best_step": s["best_step"],
                    "best_eval_loss": s["eval_loss"],
                    "last_step": last_step,
                    "last_eval_loss": last["eval_loss"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
