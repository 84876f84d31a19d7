"""`make bench`: the pipeline against a plain HF Trainer + PEFT script, its fixed overhead, the grid's fan-out,
memory per method and model FLOPs utilisation. Prints a table; the last stdout line is one JSON object, also
written to benchmarks/results.json and rendered into benchmarks/README.md (benchmarks/report.py).

    python -m benchmarks.run [--quick] [--skip grid,memory] [--only export,serving] [--repeats 3] [--methods lora,full]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    METHODS,
    PIPELINE_IMPORTS,
    PLAIN_IMPORTS,
    ROOT,
    SAMPLES,
    SHARED,
    adaptflow,
    build_bench_model,
    control,
    flatten_alpaca_seed,
    log,
    plain_script,
    ratios,
    throughput,
)

USER_STEPS, USER_BATCH, USER_MAX_LENGTH = 150, 16, 128


def whole_run(bench_model: Path, repeats: int, work: Path) -> dict[str, Any]:
    """What users compare: `adaptflow run` with a user's config (default checkpointing and logging, LoRA r8 q,v,
    150 steps, batch 16, max length 128) against the plain script on the same data, alternated. On the team's
    stories260k and Goodreads quotes when ../shared is there, else on the bench model and the sample stories.

    Ratios are plain / pipeline train seconds (>= 1: the pipeline's Trainer call is no slower, its checkpoint
    saves included) and pipeline / plain tokens per second (checkpoint saves excluded, reported apart)."""
    model, data = bench_model, SAMPLES
    if (SHARED / "models" / "stories260k").is_dir():
        model, data = SHARED / "models" / "stories260k", SHARED / "data" / "quotes" / "goodreads_quotes.jsonl"
    config = work / "user.json"
    config.write_text(
        json.dumps(
            {
                "model": {"name_or_path": str(model)},
                "data": {"train": str(data), "eval_fraction": 0.1, "max_length": USER_MAX_LENGTH},
                "method": {"name": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
                "train": {"max_steps": USER_STEPS, "batch_size": USER_BATCH, "learning_rate": 3e-3},
                "registry": {"name": "bench-user"},
            }
        )
    )
    plain, ours = [], []
    for attempt in range(repeats):
        log(f"whole run: {attempt + 1}/{repeats} (plain script, then adaptflow run)")
        plain.append(plain_script(model, data, "lora", USER_STEPS, USER_BATCH, USER_MAX_LENGTH, work / "plain-user")[0])
        ours.append(adaptflow(["run", str(config), "--force"], work / "user")[0]["metrics"])
    seconds_ratio, seconds_range = ratios([r["train_seconds"] for r in plain], [m["train_seconds"] for m in ours])
    tps_ratio, tps_range = ratios(
        [m["train_tokens_per_second"] for m in ours], [r["train_tokens_per_second"] for r in plain]
    )
    return {
        "model": model.name,
        "data": data.name,
        "repeats": repeats,
        "pipeline_train_seconds": [round(m["train_seconds"], 2) for m in ours],
        "pipeline_checkpoint_seconds": [round(m["checkpoint_seconds"], 2) for m in ours],
        "plain_train_seconds": [round(r["train_seconds"], 2) for r in plain],
        "train_seconds_ratio": seconds_ratio,
        "train_seconds_ratio_range": seconds_range,
        "tokens_per_second_ratio": tps_ratio,
        "tokens_per_second_ratio_range": tps_range,
    }


def overhead(work: Path, repeats: int) -> dict[str, Any]:
    """`adaptflow run` on the embedded defaults (the demo preset): wall time minus training and evaluation,
    on a fresh store and then warm; next to the plain script's own fixed cost (imports, model load) on the
    same work, which no pipeline can avoid."""
    from tasks.modeling import builtin_model_path

    log("overhead: adaptflow run deployments/demo.yaml (a fresh store, then warm) and the plain script")
    runs = []
    for attempt in ["fresh"] + ["warm"] * repeats:
        result, wall = adaptflow(["run", str(ROOT / "deployments" / "demo.yaml")], work / "overhead")
        m = result["metrics"]
        runs.append(
            {
                "store": attempt,
                "wall_seconds": round(wall, 1),
                "train_seconds": round(m["train_seconds"], 1),
                "eval_seconds": round(m["eval_seconds"], 1),
                "overhead_seconds": round(wall - m["train_seconds"] - m["eval_seconds"], 1),
            }
        )
    demo = load_config(ROOT / "deployments" / "demo.yaml")
    plain = []
    for _ in range(repeats):
        reference, wall = plain_script(
            builtin_model_path("tiny"), SAMPLES, "lora", demo["train"]["max_steps"], demo["train"]["batch_size"],
            demo["data"]["max_length"], work / "plain-demo",
        )  # fmt: skip
        plain.append({"wall_seconds": round(wall, 1), "fixed_seconds": round(wall - reference["train_seconds"], 1)})
    # The command's own settings (flows/process_tuning.py) apply to its imports too.
    tuned = {**os.environ, "TORCHDYNAMO_DISABLE": os.environ.get("TORCHDYNAMO_DISABLE", "1")}
    ours_imports = statistics.median(import_seconds(PIPELINE_IMPORTS, tuned) for _ in range(repeats))
    plain_imports = statistics.median(import_seconds(PLAIN_IMPORTS) for _ in range(repeats))
    warm = statistics.median(r["overhead_seconds"] for r in runs if r["store"] == "warm")
    plain_fixed = statistics.median(r["fixed_seconds"] for r in plain)
    return {
        "runs": runs,
        "plain_script": plain,
        "warm_overhead_seconds": round(warm, 1),
        "plain_fixed_seconds": round(plain_fixed, 1),
        "pipeline_extra_seconds": round(warm - plain_fixed, 1),
        "pipeline_import_seconds": round(ours_imports, 1),
        "plain_import_seconds": round(plain_imports, 1),
        "overhead_beyond_imports_seconds": round(warm - ours_imports, 1),
    }


def import_seconds(statement: str, env: dict[str, str] | None = None) -> float:
    """Seconds a fresh interpreter takes to run `statement` (its imports): the floor under any run's overhead."""
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def load_config(path: Path) -> dict[str, Any]:
    import yaml

    return dict(yaml.safe_load(path.read_text()))


def grid(work: Path) -> list[dict[str, Any]]:
    """The 8-trial preset grid at max_parallel 1 and 2 and on a 2-worker Dask LocalCluster."""
    rows = []
    for label, overrides in [
        ("local, max_parallel 1", ["--set", "grid.max_parallel=1"]),
        ("local, max_parallel 2", ["--set", "grid.max_parallel=2"]),
        ("dask LocalCluster, 2 workers", ["--set", "grid.runner=dask", "--set", "grid.max_parallel=2"]),
    ]:
        log(f"grid: {label}")
        result, wall = adaptflow(["grid", str(ROOT / "deployments" / "grid.yaml"), *overrides], work / "grid")
        losses = [round(t["metrics"].get("eval_loss", float("nan")), 6) for t in result["trials"]]
        rows.append(
            {"runner": label, "trials": len(result["trials"]), "wall_seconds": round(wall, 1), "eval_losses": losses}
        )
    return rows


PRUNE_STEPS, PRUNE_TRAIN_ROWS, PRUNE_EVAL_ROWS = 90, 400, 100


def pruning_config(work: Path) -> Path:
    """The 16-trial grid of issue 18 on stories260k: r 2/4/8/16 x alpha 8/32 x q,v / all-linear, 90 steps, on
    the first 400 Goodreads quotes with the next 100 held out for evaluation (and ranking at the rungs)."""
    quotes = (SHARED / "data" / "quotes" / "goodreads_quotes.jsonl").read_text().splitlines()
    train, held_out = work / "quotes_train.jsonl", work / "quotes_eval.jsonl"
    train.write_text("\n".join(quotes[:PRUNE_TRAIN_ROWS]) + "\n")
    held_out.write_text("\n".join(quotes[PRUNE_TRAIN_ROWS : PRUNE_TRAIN_ROWS + PRUNE_EVAL_ROWS]) + "\n")
    config = work / "prune.json"
    config.write_text(
        json.dumps(
            {
                "model": {"name_or_path": str(SHARED / "models" / "stories260k")},
                "data": {"train": str(train), "eval": str(held_out), "max_length": 128},
                "method": {"name": "lora", "dropout": 0.0},
                "train": {"max_steps": PRUNE_STEPS, "batch_size": 8, "learning_rate": 3e-3, "logging_steps": 10},
                "registry": {"name": "bench-prune"},
                "bias_probe": {"suite": None},
                "grid": {
                    "r": [2, 4, 8, 16],
                    "alpha": [8, 32],
                    "target_modules": [["q_proj", "v_proj"], "all-linear"],
                    "select": {"metric": "eval_loss", "mode": "min"},
                    "max_parallel": 2,
                },
            }
        )
    )
    return config


def grid_pruning(work: Path, seeds: list[int], etas: list[int], dask_seeds: list[int]) -> dict[str, Any]:
    """Successive halving (`grid.prune`) against the full grid, per runner and seed: steps trained, wall time
    and whether the pruned grid picks the full grid's winner. Each grid runs in its own process and store."""
    config = pruning_config(work)
    rows: list[dict[str, Any]] = []
    # Seed by seed, so that a run cut short still has both runners on the first seed.
    for seed, runner in sorted([(s, "local") for s in seeds] + [(s, "dask") for s in dask_seeds]):
        full: dict[str, Any] = {}
        full_wall = 0.0
        for eta in [None, *etas]:
            label = f"{runner} seed {seed} " + (f"pruned eta {eta}" if eta else "full")
            log(f"grid pruning: {label}")
            overrides = ["--set", f"grid.runner={runner}", "--set", f"train.seed={seed}"]
            if eta:
                overrides += ["--set", f"grid.prune={{strategy: halving, eta: {eta}}}"]
            result, wall = adaptflow(["grid", str(config), *overrides], work / f"prune-{runner}-{seed}-{eta}")
            if eta is None:
                full, full_wall = result, wall
            # The full grid's trials by name, best first: where the pruned grid's winner stands in it.
            full_ranking = sorted(
                (t for t in full["trials"] if "eval_loss" in t["metrics"]), key=lambda t: t["metrics"]["eval_loss"]
            )
            winner = result["best"]
            rows.append(
                {
                    "runner": runner,
                    "seed": seed,
                    "eta": eta,
                    "trials": len(result["trials"]),
                    "steps_total": result["steps_total"],
                    "steps_saved": result["steps_saved"],
                    "steps_ratio": round(result["steps_total"] / full["steps_total"], 3),
                    "wall_seconds": round(wall, 1),
                    "wall_ratio": round(wall / full_wall, 3),
                    "winner": winner["name"],
                    "winner_eval_loss": round(winner["metrics"]["eval_loss"], 6),
                    "full_best": full["best"]["name"],
                    "full_best_eval_loss": round(full["best"]["metrics"]["eval_loss"], 6),
                    "loss_ratio": round(winner["metrics"]["eval_loss"] / full["best"]["metrics"]["eval_loss"], 5),
                    "winner_matches": winner["name"] == full["best"]["name"],
                    "winner_rank_in_full": 1 + [t["name"] for t in full_ranking].index(winner["name"]),
                    # The same trial in the full grid: pruning resumes exactly, so these should be equal.
                    "winner_eval_loss_in_full": next(
                        round(t["metrics"]["eval_loss"], 6) for t in full_ranking if t["name"] == winner["name"]
                    ),
                }
            )
            log(f"grid pruning: {label}: {json.dumps(rows[-1])}")
    return {
        "model": "stories260k",
        "data": f"goodreads_quotes.jsonl ({PRUNE_TRAIN_ROWS} rows train, {PRUNE_EVAL_ROWS} held out)",
        "max_steps": PRUNE_STEPS,
        "max_parallel": 2,
        "rows": rows,
    }


def instruction(work: Path, repeats: int) -> dict[str, Any]:
    """`task: instruction` (LoRA all-linear, plain template, loss on responses): response loss and ROUGE-L of
    held-out answers, base -> tuned, on the bundled sample (builtin:tiny, the `instruct` preset) and, when
    ../shared is there, on the flattened Alpaca seed tasks with stories260k; then tokens/s with and without
    `train.packing` on the sample's short rows (alternated, `repeats` runs each)."""
    cases = [("builtin:tiny", ROOT / "tasks" / "builtin" / "sample_instructions.jsonl", 96, 80, 24)]
    if (SHARED / "models" / "stories260k").is_dir():
        alpaca = flatten_alpaca_seed(work / "alpaca_seed.jsonl")
        cases.append((str(SHARED / "models" / "stories260k"), alpaca, 384, 150, 64))
    rows = []
    for model, data, max_length, steps, answer in cases:
        log(f"instruction: {Path(model).name} on {data.name}")
        config = work / "instruct.json"
        config.write_text(
            json.dumps(
                {
                    "model": {"name_or_path": model},
                    "task": "instruction",
                    "data": {"train": str(data), "eval_fraction": 0.1, "max_length": max_length},
                    "instruction": {"eval_generations": 64, "max_new_tokens": answer},
                    "method": {"name": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"},
                    "train": {"max_steps": steps, "batch_size": 16, "learning_rate": 5e-3, "save_steps": steps},
                    "registry": {"name": "bench-instruct"},
                    "bias_probe": {"suite": None},
                }
            )
        )
        metrics = adaptflow(["run", str(config)], work / "instruct")[0]["metrics"]
        keys = ("eval_loss", "eval_rouge_l", "eval_exact_match", "eval_token_accuracy")
        rows.append(
            {"model": Path(model).name, "data": data.name, "steps": steps, "max_length": max_length}
            | {k: round(metrics[k], 4) for k in keys}
            | {f"base_{k}": round(metrics[f"base_{k}"], 4) for k in keys}
            | {"sft_dropped_rows": metrics["sft_dropped_rows"], "train_seconds": round(metrics["train_seconds"], 1)}
        )
    packed: dict[bool, list[float]] = {False: [], True: []}
    sample = ROOT / "tasks" / "builtin" / "sample_instructions.jsonl"
    for attempt in range(repeats):
        for packing in (False, True):
            log(f"instruction: packing={packing} {attempt + 1}/{repeats}")
            config = work / "packing.json"
            config.write_text(
                json.dumps(
                    {
                        "model": {"name_or_path": str(work / "bench-model")},
                        "task": "instruction",
                        "data": {"train": str(sample), "eval_fraction": 0.1, "max_length": 96},
                        "instruction": {"eval_generations": 0},
                        "method": {"name": "lora", "target_modules": "all-linear"},
                        "train": {"max_steps": 40, "batch_size": 16, "packing": packing, "save_steps": 40},
                        "registry": {"name": f"bench-packing-{packing}".lower()},
                        "bias_probe": {"suite": None},
                    }
                )
            )
            metrics = adaptflow(["run", str(config), "--force"], work / "packing")[0]["metrics"]
            packed[packing].append(metrics["train_tokens_per_second"])
    ratio, spread = ratios(packed[True], packed[False])
    return {
        "runs": rows,
        "packing": {
            "repeats": repeats,
            "unpacked_tokens_per_second": [round(v) for v in packed[False]],
            "packed_tokens_per_second": [round(v) for v in packed[True]],
            "ratio": ratio,
            "ratio_range": spread,
        },
    }


def matmul_peak_flops(size: int = 1024, repeats: int = 10) -> float:
    """This machine's measured fp32 matmul throughput (FLOP/s): the denominator of MFU."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def mfu(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Achieved training FLOP/s (6 x parameters x tokens/s, attention aside) over the matmul peak."""
    peak = matmul_peak_flops()
    return {
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "by_method": {
            r["method"]: round(6 * r["total_params"] * r["pipeline_tokens_per_second"] / peak, 4) for r in rows
        },
    }


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="LoRA only, fewer steps")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods for throughput")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side for throughput and overhead")
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated sections to skip: " + ",".join(SECTIONS),
    )
    parser.add_argument("--only", default="", help="comma-separated sections to run, the others skipped")
    parser.add_argument("--prune-seeds", default="0,1,2", help="grid_pruning: train.seed values, local runner")
    parser.add_argument("--prune-dask-seeds", default="0", help="grid_pruning: train.seed values, dask runner")
    parser.add_argument("--prune-etas", default="3,2", help="grid_pruning: grid.prune eta values")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    only = set(filter(None, args.only.split(",")))
    if only - set(SECTIONS):
        parser.error(f"--only: unknown sections {sorted(only - set(SECTIONS))}; sections: {', '.join(SECTIONS)}")
    if only:
        skip |= set(SECTIONS) - only
    import torch

    results: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        + (torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only"),
    }
    steps = 10 if args.quick else 100  # short runs are dominated by the first steps (allocations, caches)
    # What the throughput rows measured, for benchmarks/README.md (a --quick run is not a full one).
    results["settings"] = {"quick": args.quick, "steps": steps, "batch": 8, "max_length": 128}
    work = Path(tempfile.mkdtemp(prefix="adaptflow-bench-"))
    try:
        model = work / "bench-model"
        results["bench_model_params"] = build_bench_model(model)
        if "throughput" not in skip:
            repeats = 1 if args.quick else args.repeats
            methods = ["lora"] if args.quick else args.methods.split(",")
            rows = throughput(model, methods, steps, 8, 128, repeats, work)
            results["throughput"] = rows
            results["mfu"] = mfu(rows)
            if not args.quick:
                results["control"] = control(model, methods[-1], steps, 8, 128, repeats, work)
        if "whole_run" not in skip and not args.quick:
            results["whole_run"] = whole_run(model, args.repeats, work)
        if "overhead" not in skip:
            results["overhead"] = overhead(work, 1 if args.quick else args.repeats)
        if "grid" not in skip and not args.quick:
            results["grid"] = grid(work)
        if "instruction" not in skip and not args.quick:
            results["instruction"] = instruction(work, args.repeats)
        if "grid_pruning" not in skip and not args.quick and (SHARED / "models" / "stories260k").is_dir():
            results["grid_pruning"] = grid_pruning(
                work, int_list(args.prune_seeds), int_list(args.prune_etas), int_list(args.prune_dask_seeds)
            )
        if "memory_plan" not in skip and not args.quick:
            from benchmarks import memory_plan

            log("memory_plan: the plan against the measured peak on a 27M-parameter Llama")
            results["memory_plan"] = memory_plan.run(work)
        if "real_model" not in skip and not args.quick:
            from benchmarks import real_model

            log("real_model: first use and cached load of builtin:smollm2-135m-instruct")
            results["real_model"] = real_model.run(work, args.repeats)
        real = [key for key in ("real_instruction", "real_classification", "real_throughput") if key not in skip]
        if real and not args.quick:
            from benchmarks import real_quality

            if not real_quality.available():
                log(f"{', '.join(real)}: skipped, no {real_quality.SHARED}/data (alpaca_seed, sms_spam)")
            else:
                parts = {
                    "real_instruction": real_quality.instruction,
                    "real_classification": real_quality.classification,
                    "real_throughput": real_quality.speed,
                }
                for key in real:
                    log(f"{key}: on {real_quality.NAME}")
                    results[key] = parts[key](work)
        if "export" not in skip and not args.quick:
            from benchmarks import export

            log("export: every format and quantization of builtin:smollm2-135m-instruct + a LoRA, read back")
            results["export"] = export.run(work / "export")
        if "serving" not in skip and not args.quick:
            from benchmarks import serving

            log("serving: adaptflow serve-model's app on builtin:smollm2-135m-instruct through the OpenAI client")
            results["serving"] = serving.run()
        if "preference" not in skip and not args.quick:
            from benchmarks import preference

            if not preference.available():
                log(f"preference: skipped, no {preference.DATA} (dpo_en_demo.json, kto_en_demo.json)")
            else:
                log(f"preference: DPO, SimPO, KTO and DPO speed vs plain TRL on {preference.NAME}")
                results["preference"] = preference.run(work, args.repeats)
        if "memory" not in skip and not args.quick:
            from benchmarks import memory

            log("memory: full vs LoRA vs QLoRA on a 70M-parameter Llama")
            results["memory"] = memory.run()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    keep_earlier_sections(results, ROOT / "benchmarks" / "results.json")
    print_tables(results)
    (ROOT / "benchmarks" / "results.json").write_text(json.dumps(results, indent=2))
    from benchmarks import report

    report.write(results)
    print(json.dumps(results))


SECTIONS = (
    "throughput",
    "whole_run",
    "overhead",
    "grid",
    "grid_pruning",
    "instruction",
    "real_model",
    "real_instruction",
    "real_classification",
    "real_throughput",
    "export",
    "serving",
    "memory",
    "memory_plan",
    "periodic_eval",  # python -m benchmarks.periodic_eval
    "preference_rows",  # python benchmarks/preference_rows.py
    "preference",
)
# Keys that belong to a section and travel with it when a later run skips that section.
SECTION_KEYS = {"throughput": ("throughput", "mfu", "control", "settings", "bench_model_params")}


def keep_earlier_sections(results: dict[str, Any], path: Path) -> None:
    """Sections this run skipped keep the earlier run's measurement from `path`, stamped with that run's date
    and machine (`results["stamps"]`), so that measuring one section again does not drop the others."""
    stamp = {"date": results["date"], "machine": results["machine"]}
    measured = {key for key in SECTIONS if key in results}
    results["stamps"] = {key: stamp for key in measured}
    if not path.exists():
        return
    earlier = json.loads(path.read_text())
    for key in SECTIONS:
        if key in measured or key not in earlier:
            continue
        for part in SECTION_KEYS.get(key, (key,)):
            if part in earlier:
                results[part] = earlier[part]
        earlier_stamp = {"date": earlier.get("date"), "machine": earlier.get("machine")}
        results["stamps"][key] = earlier.get("stamps", {}).get(key, earlier_stamp)


def print_tables(results: dict[str, Any]) -> None:
    print(f"machine: {results['machine']}; throughput model: {results['bench_model_params'] / 1e6:.1f}M parameters")
    if "throughput" in results:
        print("\nmethod  pipeline tok/s  plain tok/s  ratio (range)       best   pipeline MB  plain MB  ratio   MFU")
        for r in results["throughput"]:
            print(
                f"{r['method']:7s} {r['pipeline_tokens_per_second']:14.0f} {r['plain_tokens_per_second']:12.0f} "
                f"{r['throughput_ratio']:6.3f} ({r['throughput_ratio_range'][0]:.2f}-{r['throughput_ratio_range'][1]:.2f}) {r['throughput_ratio_best']:6.3f} {r['pipeline_peak_memory_mb']:12.0f} {r['plain_peak_memory_mb']:9.0f} "
                f"{r['memory_ratio']:6.3f} {results['mfu']['by_method'][r['method']]:6.4f}"
            )
        print(f"(MFU against a measured fp32 matmul peak of {results['mfu']['matmul_peak_gflops']} GFLOP/s)")
    if "control" in results:
        c = results["control"]
        print(
            f"A/A control, the plain script against itself ({c['method']}, same alternation): ratio of medians "
            f"{c['ratio']:.3f} ({c['ratio_range'][0]:.2f}-{c['ratio_range'][1]:.2f}); ratios this far from 1 are noise"
        )
    if "whole_run" in results:
        w = results["whole_run"]
        print(
            f"\nwhole `adaptflow run` vs the plain script ({w['model']}, {w['data']}, LoRA, {USER_STEPS} steps, "
            f"alternated x{w['repeats']}):\n  train seconds pipeline {w['pipeline_train_seconds']} "
            f"(checkpoint saves {w['pipeline_checkpoint_seconds']}), plain {w['plain_train_seconds']}"
            f"\n  plain/pipeline train seconds {w['train_seconds_ratio']:.3f} "
            f"({w['train_seconds_ratio_range'][0]:.2f}-{w['train_seconds_ratio_range'][1]:.2f}); "
            f"pipeline/plain tokens/s {w['tokens_per_second_ratio']:.3f} "
            f"({w['tokens_per_second_ratio_range'][0]:.2f}-{w['tokens_per_second_ratio_range'][1]:.2f})"
        )
    if "overhead" in results:
        o = results["overhead"]
        print("\noverhead of `adaptflow run deployments/demo.yaml` (wall - train - eval):")
        for r in o["runs"]:
            print(
                f"  {r['store']:5s} store: wall {r['wall_seconds']} s, train {r['train_seconds']} s, eval {r['eval_seconds']} s -> overhead {r['overhead_seconds']} s"
            )
        print(
            f"  the plain script on the same work: wall - train = {o['plain_fixed_seconds']} s (imports, model load)"
            f"\n  pipeline beyond the plain script (warm, median): {o['pipeline_extra_seconds']} s"
            f"\n  imports alone, in a fresh interpreter: pipeline {o['pipeline_import_seconds']} s, "
            f"plain script {o['plain_import_seconds']} s"
            f"\n  pipeline overhead beyond its imports (warm): {o['overhead_beyond_imports_seconds']} s"
        )
    if "grid" in results:
        print("\ngrid (8 trials, deployments/grid.yaml):")
        for r in results["grid"]:
            print(f"  {r['runner']:30s} {r['wall_seconds']:7.1f} s")
    if "grid_pruning" in results:
        print("\ngrid pruning (16 trials, stories260k): steps and winner, pruned vs full")
        for r in results["grid_pruning"]["rows"]:
            print(
                f"  {r['runner']:5s} seed {r['seed']} {'eta ' + str(r['eta']) if r['eta'] else 'full':5s} "
                f"steps {r['steps_total']:5d} ({r['steps_ratio']:.3f}) wall {r['wall_seconds']:7.1f} s  "
                f"winner {r['winner']} {r['winner_eval_loss']:.4f} (full best {r['full_best_eval_loss']:.4f}, "
                f"rank {r['winner_rank_in_full']})"
            )
    if "memory_plan" in results:
        print("\nmemory plan vs measured peak (27M Llama, batch 8 x 256):")
        for r in results["memory_plan"]["rows"]:
            print(
                f"  {r['method']:6s} checkpointing {r['gradient_checkpointing']!s:5s} planned "
                f"{r['planned_mib']:7.1f} MiB measured {r['measured_mib']:7.1f} MiB ratio {r['ratio']:.3f}"
            )
    if "memory" in results:
        from benchmarks.memory import print_table

        print()
        print_table(results["memory"])


if __name__ == "__main__":
    main()
