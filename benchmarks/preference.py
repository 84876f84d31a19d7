"""Preference tuning on the real model, builtin:smollm2-135m-instruct (the `preference` section of `make bench`; it
needs ../shared/data/preference and skips without it). Issue 27's measurements, in one process per part (on 2
shared cores a process start, with its imports, model load and tokenization, costs more than the few steps
measured):

- quality: DPO (loss sigmoid) and SimPO on dpo_en_demo, KTO on kto_en_demo, trained and evaluated with the stage
  functions `adaptflow run` uses (the rows encoded by the objective's `PreferenceEncoder`, the train stage's
  `MethodTrainer` + `training_arguments` with the objective's `training` hook, its eval metrics
  `evaluate_preferences`), on a fixed held-out split: reward accuracy, pair accuracy (KTO: label accuracy) and
  preference loss, base -> tuned. The split is of the rows the pipeline keeps at max_length (prompts cut first).
- speed: that trainer against the plain TRL `DPOTrainer` + peft script (benchmarks/plain_dpo.py), same model,
  pairs (those that fit max_length whole, so neither side cuts), LoRA, steps, batch, lr and seed, alternated
  (plain, pipeline, ...), then the A/A control (plain, plain, ...): real tokens/s and the growth of the process's
  resident memory during each `train()` (sampled every 10 ms, freed memory returned to the OS before each run).

    PYTHONPATH=. python -m benchmarks.preference speed|quality [dpo,simpo,kto] > part.json
    PYTHONPATH=. python -m benchmarks.preference record part.json ...   # into results.json and README.md
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import ROOT, SHARED, log, ratios

NAME = "builtin:smollm2-135m-instruct"
DATA = SHARED / "data" / "preference"
LORA = "r 8, alpha 16, dropout 0, all-linear (peft LoraConfig, both sides)"
PAIRS = {"max_length": 192, "held_out": 10, "steps": 5, "batch": 2, "lr": 2e-3}
UNPAIRED = {"max_length": 192, "held_out": 16, "steps": 5, "batch": 4, "lr": 2e-3}
LOSSES = {
    "dpo": {"loss": "sigmoid", "beta": 0.1},
    "simpo": {"loss": "simpo", "beta": 2.0, "gamma": 0.5},
    "kto": {"loss": "kto", "beta": 0.1},
}
SPEED = {"max_length": 192, "steps": 2, "batch": 2, "lr": 5e-4, "beta": 0.1, "repeats": 2, "control_repeats": 1}


def load() -> str:
    """The machine's load average at the time of a measurement (the other work on it)."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def available() -> bool:
    return (DATA / "dpo_en_demo.json").is_file() and (DATA / "kto_en_demo.json").is_file()


def model_path() -> str:
    from tasks.modeling import builtin_model_path

    return str(builtin_model_path(NAME.removeprefix("builtin:")))


def _encoding() -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    from tasks.objectives.instruction.chat import resolve_template
    from tasks.objectives.instruction.settings import InstructionSettings

    tokenizer = AutoTokenizer.from_pretrained(model_path())
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return tokenizer, resolve_template(tokenizer, InstructionSettings(template="tokenizer"))


def _rows(name: str) -> tuple[list[dict[str, Any]], bool]:
    from tasks.objectives.preference import DataOptions, normalize

    normal = normalize(json.loads((DATA / f"{name}.json").read_text()), DataOptions(), name)
    return normal.rows, normal.paired


def _options(preference: dict[str, Any], paired: bool, max_length: int) -> dict[str, Any]:
    """What the tokenize stage hands the objective's training hook (its `options`)."""
    return preference | {"paired": paired, "max_length": max_length}


def _base(seed: int = 0) -> Any:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    from benchmarks.plain_dpo import lora_config

    set_seed(seed)
    torch.manual_seed(seed)
    return get_peft_model(AutoModelForCausalLM.from_pretrained(model_path(), dtype=torch.float32), lora_config())


def pipeline_trainer(
    model: Any, tokenizer: Any, rows: Any, options: dict[str, Any], budget: dict[str, Any], out: Path
) -> Any:
    """The train stage's Trainer for task preference (tasks/training.py `train_loaded`): the objective's mixin and
    collator on MethodTrainer, with `training_arguments` from the run's `train:` settings."""
    from datasets import Dataset

    from adapters_impl import get_method
    from tasks.config import TrainSettings
    from tasks.objectives.preference.objective import OBJECTIVE
    from tasks.training import MethodTrainer, training_arguments

    assert OBJECTIVE.training is not None
    custom = OBJECTIVE.training(options, model, tokenizer, lambda: None)
    trainer_class = type(f"{custom.mixin.__name__}Trainer", (custom.mixin, MethodTrainer), {})
    settings = TrainSettings(
        max_steps=budget["steps"], batch_size=budget["batch"], learning_rate=budget["lr"], seed=0,
        save_steps=10 * budget["steps"], logging_steps=10,
    )  # fmt: skip
    trainer = trainer_class(
        **dict(custom.kwargs),
        model=model,
        save_method=get_method("lora").save,
        args=training_arguments(settings, out, model),
        train_dataset=Dataset.from_list(rows),
        data_collator=custom.collator,
    )
    trainer.model_accepts_loss_kwargs = False  # as the train stage does for an objective without a token loss
    return trainer


def split(name: str, max_length: int, held_out: int) -> dict[str, Any]:
    """The rows the pipeline keeps at `max_length`, encoded, shuffled with seed 0: the first `held_out` to
    evaluate, the rest to train on."""
    from tasks.objectives.preference import encode_all

    tokenizer, template = _encoding()
    rows, paired = _rows(name)
    encoded, dropped = encode_all(rows, tokenizer, template, max_length, paired)
    random.Random(0).shuffle(encoded)
    return {
        "paired": paired,
        "train": encoded[held_out:],
        "eval": encoded[:held_out],
        "info": {"rows": len(rows), "kept": len(encoded), "pref_dropped_rows": dropped, "eval_rows": held_out,
                 "train_rows": len(encoded) - held_out}
        | ({} if paired else {"eval_desirable": sum(bool(r["label"]) for r in encoded[:held_out])}),
    }  # fmt: skip


def quality_run(tag: str, work: Path) -> dict[str, Any]:
    from tasks.objectives.preference import PreferenceLoss, Reference, evaluate_preferences
    from tasks.objectives.preference.objective import full_collator
    from tasks.objectives.preference.settings import loss_settings

    preference = LOSSES[tag]
    budget = UNPAIRED if tag == "kto" else PAIRS
    data = split("kto_en_demo" if tag == "kto" else "dpo_en_demo", budget["max_length"], budget["held_out"])
    tokenizer, _ = _encoding()
    options = _options(preference, data["paired"], budget["max_length"])
    collate = full_collator(tokenizer, options)
    model = _base()
    settings = loss_settings(options)
    # The untouched base (LoRA's B is zero) as its own reference, as the evaluate stage's base metrics.
    own = PreferenceLoss(settings, Reference() if settings.uses_reference else None)
    log(f"preference quality: {tag} base eval (load {load()})")
    before_load = load()
    base = evaluate_preferences(model, data["eval"], collate, 4, own)
    trainer = pipeline_trainer(model, tokenizer, data["train"], options, budget, work / tag)
    log(f"preference quality: {tag} training {budget['steps']} steps (load {load()})")
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    tuned = evaluate_preferences(model, data["eval"], collate, 4, own)
    logged = [e for e in trainer.state.log_history if "loss" in e]
    return {
        "loss": preference["loss"],
        "settings": preference,
        "data": data["info"] | {"budget": budget},
        "load_before": before_load,
        "load_after": load(),
        "train_seconds": round(seconds, 1),
        "base": {k.removeprefix("eval_"): round(v, 4) for k, v in base.items()},
        "tuned": {k.removeprefix("eval_"): round(v, 4) for k, v in tuned.items()},
        "train_log": [{k: round(v, 4) for k, v in e.items() if isinstance(v, float)} for e in logged],
    }


def whole_pairs(max_length: int, count: int) -> tuple[list[dict[str, Any]], int]:
    """dpo_en_demo's pairs that fit `max_length` without any cut, so TRL (which cuts a row's end) and the pipeline
    (which cuts its prompt) train on the same tokens: the first `count`."""
    from tasks.objectives.preference.encode import render

    tokenizer, template = _encoding()
    rows, _ = _rows("dpo_en_demo")
    whole = [
        r
        for r in rows
        if max(len(render(r["prompt"], r[side], tokenizer, template).ids) for side in ("chosen", "rejected"))
        <= max_length
    ]
    if len(whole) < count:
        raise RuntimeError(f"only {len(whole)} dpo_en_demo pairs fit {max_length} tokens whole; need {count}")
    return whole[:count], len(whole)


class PeakRss:
    """The process's resident memory, sampled every 10 ms while inside: the peak above the level at entry."""

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        gc.collect()
        with contextlib.suppress(OSError):  # freed heap back to the OS: each run's growth starts level
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.start = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def speed(work: Path, repeats: int | None = None) -> dict[str, Any]:
    from datasets import Dataset

    from benchmarks.plain_dpo import dpo_config, plain_trainer
    from tasks.objectives.preference import encode_all

    b = SPEED | ({"repeats": repeats} if repeats else {})
    count = b["steps"] * b["batch"]
    pairs, fitting = whole_pairs(b["max_length"], count)
    tokenizer, template = _encoding()
    encoded, _ = encode_all(pairs, tokenizer, template, b["max_length"], paired=True)
    explicit = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in pairs])
    options = _options({"loss": "sigmoid", "beta": b["beta"]}, True, b["max_length"])

    def plain() -> tuple[float, int, float]:
        config = dpo_config(str(work / "plain"), b["steps"], b["batch"], b["max_length"], b["lr"], b["beta"])
        trainer = plain_trainer(model_path(), tokenizer, explicit, config)
        with PeakRss() as rss:
            started = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - started
        return (
            int(trainer.state.num_input_tokens_seen) / seconds,
            int(trainer.state.num_input_tokens_seen),
            rss.growth_mb,
        )

    def ours() -> tuple[float, int, float]:
        trainer = pipeline_trainer(_base(), tokenizer, encoded, options, b, work / "ours")
        with PeakRss() as rss:
            started = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - started - trainer.checkpoint_seconds
        return int(trainer.tokens_seen) / seconds, int(trainer.tokens_seen), rss.growth_mb

    runs: dict[str, list[tuple[float, int, float]]] = {"plain": [], "pipeline": [], "first": [], "second": []}
    loads = {"before": load()}
    # One run of each side first, not counted: the process's first Trainer pays one-time costs (lazy imports,
    # allocator growth) that would otherwise all fall on the side that runs first.
    log(f"preference speed: warm-up, one run per side, not counted (load {load()})")
    plain()
    ours()
    for attempt in range(b["repeats"]):
        for side, make in (("plain", plain), ("pipeline", ours)):
            log(f"preference speed: {side} {attempt + 1}/{b['repeats']} (load {load()})")
            runs[side].append(make())
            log(f"  {runs[side][-1][0]:.1f} tok/s, {runs[side][-1][1]} tokens, +{runs[side][-1][2]:.0f} MB")
    loads["after_pipeline"] = load()
    for attempt in range(b["control_repeats"]):
        for side in ("first", "second"):
            log(f"preference speed: A/A control, plain {side} {attempt + 1}/{b['control_repeats']} (load {load()})")
            runs[side].append(plain())
            log(f"  {runs[side][-1][0]:.1f} tok/s")
    loads["after_control"] = load()
    tps = {side: [r[0] for r in values] for side, values in runs.items()}
    mem = {side: statistics.median(r[2] for r in values) for side, values in runs.items() if values}
    ratio, spread = ratios(tps["pipeline"], tps["plain"])
    control, control_spread = ratios(tps["second"], tps["first"])
    return {
        "model": NAME,
        "budget": b
        | {
            "pairs": f"the first {count} of the {fitting} dpo_en_demo pairs that fit {b['max_length']} tokens whole",
            "lora": LORA,
            "trl": "trl 1.16.0 DPOConfig, gradient_checkpointing off",
        },
        "load": loads,
        "pipeline_runs_tokens_per_second": [round(t, 1) for t in tps["pipeline"]],
        "plain_runs_tokens_per_second": [round(t, 1) for t in tps["plain"]],
        "pipeline_tokens": [r[1] for r in runs["pipeline"]],
        "plain_tokens": [r[1] for r in runs["plain"]],
        "throughput_ratio": ratio,
        "throughput_ratio_range": spread,
        "throughput_ratio_best": round(max(tps["pipeline"]) / max(tps["plain"]), 3),
        "pipeline_memory_growth_mb": round(mem["pipeline"], 1),
        "plain_memory_growth_mb": round(mem["plain"], 1),
        "memory_ratio": round(mem["pipeline"] / mem["plain"], 3) if mem["plain"] > 0 else None,
        "control": {
            "first_runs_tokens_per_second": [round(t, 1) for t in tps["first"]],
            "second_runs_tokens_per_second": [round(t, 1) for t in tps["second"]],
            "ratio": control,
            "ratio_range": control_spread,
        },
    }


def quality(work: Path, tags: tuple[str, ...] = tuple(LOSSES)) -> dict[str, Any]:
    return {"model": NAME, "lora": LORA, "runs": [quality_run(tag, work) for tag in tags]}


def run(work: Path, repeats: int | None = None) -> dict[str, Any]:
    """Both parts, one after the other (`make bench`)."""
    return {"speed": speed(work, repeats), "quality": quality(work)}


def record(paths: list[Path]) -> None:
    """Parts measured apart (`speed`, `quality` per loss) into results.json's `preference` section, stamped, and
    benchmarks/README.md rendered again."""
    import datetime
    import platform

    import torch

    from benchmarks import report

    section: dict[str, Any] = {}
    for path in paths:
        part = json.loads(path.read_text().strip().splitlines()[-1])  # the Trainer prints its logs above
        if "runs" in part:
            section.setdefault("quality", {"model": part["model"], "lora": part["lora"], "runs": []})
            section["quality"]["runs"] += part["runs"]
        else:
            section["speed"] = part
    results_path = ROOT / "benchmarks" / "results.json"
    results = json.loads(results_path.read_text())
    results["preference"] = section
    results.setdefault("stamps", {})["preference"] = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, CPU only",
    }
    results_path.write_text(json.dumps(results, indent=2))
    report.write(results)


def main() -> None:
    part = sys.argv[1] if len(sys.argv) > 1 else "all"
    if part == "record":
        record([Path(p) for p in sys.argv[2:]])
        return
    if not available():
        log(f"preference: skipped, no {DATA} (dpo_en_demo.json, kto_en_demo.json)")
        return
    work = Path(tempfile.mkdtemp(prefix="adaptflow-bench-pref-"))
    if part == "speed":
        out = speed(work)
    elif part == "quality":
        out = quality(work, tuple(sys.argv[2].split(",")) if len(sys.argv) > 2 else tuple(LOSSES))
    else:
        out = run(work)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
