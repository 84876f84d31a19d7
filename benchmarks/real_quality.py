"""Quality and speed on the real model, builtin:smollm2-135m-instruct (the `real_instruction`,
`real_classification` and `real_throughput` sections of `make bench`; they need ../shared's data and skip without).

- real_instruction: instruction LoRA on the flattened Alpaca seed tasks (a fixed held-out split, the model's own
  chat template) through `adaptflow run`: response loss, ROUGE-L, exact match, base -> tuned, and the default bias
  probe; then WinoBias (`adaptflow probe`) on the base and on the registered version, and `adaptflow plan`'s peak
  against the run's measured peak.
- real_classification: classification LoRA on SMS spam (a stratified held-out split written once, used by both
  sides): accuracy and macro-F1, base (majority class) -> tuned, and the plain HF Trainer + PEFT script
  (benchmarks/plain_classifier.py) on the same budget and data.
- real_throughput: tokens/s and peak memory of `adaptflow run` against the plain script on this model,
  alternated, with the A/A control (run.throughput() / run.control() on the converted folder).

Budgets are small on purpose (about 6-7 s per training step on 2 CPU cores); they are recorded with the numbers.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import ROOT, SHARED, adaptflow, control, flatten_alpaca_seed, log, throughput

NAME = "builtin:smollm2-135m-instruct"
INSTRUCTION = {"steps": 40, "batch": 4, "max_length": 160, "eval_generations": 24, "max_new_tokens": 48, "lr": 1e-3}
CLASSIFICATION = {"steps": 30, "batch": 8, "max_length": 64, "eval_rows": 300, "lr": 1e-3}
THROUGHPUT = {"steps": 8, "batch": 8, "max_length": 64, "repeats": 2}
# WinoBias's test split, the first lines of each of its two types: the whole folder (1,584 pairs) scores for
# several minutes per model on 2 cores.
WINOBIAS_LINES = 100


def load() -> str:
    """The machine's load average at the time of a measurement (the other work on it)."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def available() -> bool:
    return (SHARED / "data" / "alpaca_seed").is_dir() and (SHARED / "data" / "sms_spam").is_dir()


def _winobias_subset(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for source in (SHARED / "data" / "winobias").glob("*_stereotyped_type*.txt.test"):
        lines = [line for line in source.read_text().splitlines() if line.strip()][:WINOBIAS_LINES]
        (folder / source.name).write_text("\n".join(lines) + "\n")
    return folder


def _pairs(probe: dict[str, Any] | None) -> dict[str, Any] | None:
    if not probe or "pairs" not in probe:
        return None
    pairs = probe["pairs"]
    return {"stereotype_score": round(pairs["stereotype_score"], 1), "pairs": pairs["pairs"], "ties": pairs["ties"]}


def instruction(work: Path) -> dict[str, Any]:
    b = INSTRUCTION
    data = flatten_alpaca_seed(work / "alpaca_seed.jsonl")
    config = work / "real-instruct.json"
    config.write_text(
        json.dumps(
            {
                "model": {"name_or_path": NAME},
                "task": "instruction",
                "data": {"train": str(data), "eval_fraction": 0.1, "split_seed": 0, "max_length": b["max_length"]},
                "instruction": {
                    "template": "tokenizer",
                    "loss_on": "assistant",
                    "eval_generations": b["eval_generations"],
                    "max_new_tokens": b["max_new_tokens"],
                },
                "method": {"name": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"},
                "train": {
                    "max_steps": b["steps"],
                    "batch_size": b["batch"],
                    "eval_batch_size": 8,
                    "learning_rate": b["lr"],
                    "seed": 0,
                    "save_steps": b["steps"],
                    "logging_steps": 10,
                },
                "bias_probe": {"suite": "default", "max_new_tokens": 12},
                "registry": {"name": "bench-real-instruct"},
            }
        )
    )
    home = work / "real-instruct"
    log(f"real_instruction: adaptflow run on {data.name} (load {load()})")
    before = load()
    result, wall = adaptflow(["run", str(config)], home)
    metrics = result["metrics"]
    keys = ("eval_loss", "eval_rouge_l", "eval_exact_match", "eval_token_accuracy")
    out: dict[str, Any] = {
        "model": NAME,
        "data": f"{data.name} ({sum(1 for _ in data.open())} rows, eval_fraction 0.1, split_seed 0)",
        "budget": b | {"lora": "r 8, alpha 16, all-linear", "template": "tokenizer", "loss_on": "assistant"},
        "load_before": before,
        "load_after": load(),
        "wall_seconds": round(wall, 1),
        "train_seconds": round(metrics["train_seconds"], 1),
        "peak_memory_mb": round(metrics["peak_memory_mb"], 1),
        "train_tokens_per_second": round(metrics["train_tokens_per_second"], 1),
        "tuned": {k: round(metrics[k], 4) for k in keys if k in metrics},
        "base": {k: round(metrics[f"base_{k}"], 4) for k in keys if f"base_{k}" in metrics},
        "sft_dropped_rows": metrics.get("sft_dropped_rows"),
        "bias_probe": {
            "suite": "default",
            "base": _pairs((result.get("bias_probe") or {}).get("base")),
            "tuned": _pairs(result.get("bias_probe")),
            "rules_pass_rate": {
                "base": ((result["bias_probe"].get("base") or {}).get("rules") or {}).get("pass_rate"),
                "tuned": (result["bias_probe"].get("rules") or {}).get("pass_rate"),
            },
        },
    }
    tuned_uri = f"models:/{result['model_name']}/{result['model_version']}"
    out["model_uri"] = tuned_uri
    # Commit what is measured so far: the probes and the plan below are extras.
    try:
        suite = _winobias_subset(work / "winobias")
        winobias: dict[str, Any] = {"pairs_per_file": WINOBIAS_LINES, "split": "test", "load_before": load()}
        for side, model in (("base", NAME), ("tuned", tuned_uri)):
            log(f"real_instruction: WinoBias probe on {side} ({model})")
            probe, seconds = adaptflow(["probe", model, "--suite", str(suite)], home)
            winobias[side] = _pairs(probe) | {"seconds": round(seconds, 1)}
        winobias["load_after"] = load()
        out["winobias"] = winobias
    except Exception as error:
        out["winobias"] = {"error": str(error)[-500:]}
    try:
        log("real_instruction: adaptflow plan")
        plan, _ = adaptflow(["plan", str(config)], home)
        out["plan"] = {"planned_mb": round(plan["peak_bytes"] / 2**20, 1), "measured_mb": out["peak_memory_mb"]}
        out["plan"]["ratio"] = round(out["plan"]["planned_mb"] / out["plan"]["measured_mb"], 3)
    except Exception as error:
        out["plan"] = {"error": str(error)[-500:]}
    return out


def sms_split(work: Path, eval_rows: int) -> tuple[Path, Path]:
    """SMS spam as JSONL text/label: a stratified held-out set of `eval_rows` (seed 0), the rest for training."""
    rows = []
    lines = (SHARED / "data" / "sms_spam" / "SMSSpamCollection.tsv").read_text(encoding="utf-8").splitlines()
    if lines and lines[0].partition("\t")[0].strip().lower() == "label":  # the team's copy opens with `Label\tSMS`
        lines = lines[1:]
    for line in lines:
        label, _, text = line.partition("\t")
        if text.strip():
            rows.append({"text": text, "label": label})
    rng = random.Random(0)
    train, held = [], []
    for label in sorted({r["label"] for r in rows}):
        group = [r for r in rows if r["label"] == label]
        rng.shuffle(group)
        take = round(eval_rows * len(group) / len(rows))
        held += group[:take]
        train += group[take:]
    rng.shuffle(train)
    rng.shuffle(held)
    paths = work / "sms_train.jsonl", work / "sms_eval.jsonl"
    for path, part in zip(paths, (train, held), strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
    return paths


def _majority_f1_macro(labels: list[str]) -> float:
    share = max(labels.count(label) for label in set(labels)) / len(labels)
    return 2 * share / (1 + share) / len(set(labels))


def classification(work: Path) -> dict[str, Any]:
    b = CLASSIFICATION
    train, held = sms_split(work, b["eval_rows"])
    config = work / "real-sms.json"
    config.write_text(
        json.dumps(
            {
                "model": {"name_or_path": NAME},
                "task": "classification",
                "data": {"train": str(train), "eval": str(held), "max_length": b["max_length"]},
                "method": {"name": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"},
                "train": {
                    "max_steps": b["steps"],
                    "batch_size": b["batch"],
                    "eval_batch_size": 16,
                    "learning_rate": b["lr"],
                    "seed": 0,
                    "save_steps": b["steps"],
                    "logging_steps": 10,
                },
                "bias_probe": {"suite": None},
                "registry": {"name": "bench-real-sms", "promote": {"metric": "eval_accuracy", "mode": "max"}},
            }
        )
    )
    labels = [json.loads(line)["label"] for line in held.open()]
    out: dict[str, Any] = {
        "model": NAME,
        "data": f"SMSSpamCollection.tsv: {sum(1 for _ in train.open())} train rows, {len(labels)} held out "
        f"(stratified, seed 0; {labels.count('spam')} spam)",
        "budget": b | {"lora": "r 8, alpha 16, all-linear"},
        # The base is the majority class (an untrained head would be noise); its macro-F1: the majority label's
        # F1 (precision p, recall 1) averaged with 0 for every other label.
        "majority_f1_macro": round(_majority_f1_macro(labels), 4),
    }
    log(f"real_classification: adaptflow run (load {load()})")
    before = load()
    result, wall = adaptflow(["run", str(config)], work / "real-sms")
    metrics = result["metrics"]
    out["pipeline"] = {
        "load_before": before,
        "load_after": load(),
        "wall_seconds": round(wall, 1),
        "train_seconds": round(metrics["train_seconds"], 1),
        "train_tokens_per_second": round(metrics["train_tokens_per_second"], 1),
        "peak_memory_mb": round(metrics["peak_memory_mb"], 1),
    } | {k: round(v, 4) for k, v in metrics.items() if k.startswith(("eval_accuracy", "eval_f1", "base_eval_"))}
    log(f"real_classification: plain script (load {load()})")
    from tasks.modeling import builtin_model_path

    before = load()
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.plain_classifier", "--model", str(builtin_model_path("smollm2-135m-instruct")),
         "--train", str(train), "--eval", str(held), "--steps", str(b["steps"]), "--batch", str(b["batch"]),
         "--max-length", str(b["max_length"]), "--lr", str(b["lr"]), "--output", str(work / "plain-sms")],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    if done.returncode != 0:  # reported: the pipeline's numbers stand
        out["plain"] = {"error": done.stderr[-500:]}
        return out
    plain = json.loads(done.stdout.strip().splitlines()[-1])
    out["plain"] = {
        "load_before": before,
        "load_after": load(),
        "wall_seconds": round(time.perf_counter() - started, 1),
    } | {k: round(v, 4) if isinstance(v, float) else v for k, v in plain.items()}
    return out


def speed(work: Path, repeats: int | None = None) -> dict[str, Any]:
    from tasks.modeling import builtin_model_path

    b = THROUGHPUT | ({"repeats": repeats} if repeats else {})
    model = builtin_model_path("smollm2-135m-instruct")
    before = load()
    rows = throughput(model, ["lora"], b["steps"], b["batch"], b["max_length"], b["repeats"], work)
    middle = load()
    aa = control(model, "lora", b["steps"], b["batch"], b["max_length"], b["repeats"], work)
    return {
        "model": NAME,
        "budget": b | {"data": "the bundled sample stories", "lora": "r 8, alpha 16, q_proj/v_proj (both sides)"},
        "load": {"before": before, "after_throughput": middle, "after_control": load()},
        "rows": rows,
        "control": aa,
    }


def main() -> None:
    import tempfile

    part = sys.argv[1] if len(sys.argv) > 1 else "instruction"
    work = Path(tempfile.mkdtemp(prefix="adaptflow-real-quality-"))
    print(json.dumps({"instruction": instruction, "classification": classification, "speed": speed}[part](work)))


if __name__ == "__main__":
    main()
