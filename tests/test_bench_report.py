"""benchmarks/README.md is rendered from results.json: every section present, dated and with its machine; no other."""

from __future__ import annotations

import re
from pathlib import Path

from benchmarks.report import SECTIONS, write

DATE, MACHINE = "2031-02-03", "x86_64, 2 cores, torch 9.9, CPU only"
RESULTS = {
    "date": DATE,
    "machine": MACHINE,
    "bench_model_params": 3_100_000,
    "settings": {"quick": False, "steps": 100, "batch": 8, "max_length": 128},
    "throughput": [
        {
            "method": "lora",
            "repeats": 3,
            "pipeline_tokens_per_second": 3886.0,
            "plain_tokens_per_second": 3829.0,
            "throughput_ratio": 1.015,
            "throughput_ratio_range": [0.86, 1.26],
            "throughput_ratio_best": 0.98,
            "pipeline_peak_memory_mb": 712.0,
            "plain_peak_memory_mb": 618.0,
            "memory_ratio": 1.152,
            "total_params": 3_100_000,
        }
    ],
    "mfu": {"matmul_peak_gflops": 120.5, "by_method": {"lora": 0.0006}},
    "grid_pruning": {
        "model": "stories260k",
        "data": "goodreads_quotes.jsonl (400 rows train, 100 held out)",
        "max_steps": 90,
        "max_parallel": 2,
        "rows": [
            {
                "runner": "local",
                "seed": 0,
                "eta": eta,
                "trials": 16,
                "steps_total": steps,
                "steps_saved": 1440 - steps,
                "steps_ratio": round(steps / 1440, 3),
                "wall_seconds": wall,
                "wall_ratio": round(wall / 300.0, 3),
                "winner": winner,
                "winner_eval_loss": loss,
                "full_best": "r16-a32-all-linear",
                "full_best_eval_loss": 3.1,
                "loss_ratio": round(loss / 3.1, 5),
                "winner_matches": winner == "r16-a32-all-linear",
                "winner_rank_in_full": rank,
                "winner_eval_loss_in_full": loss,
            }
            for eta, steps, wall, winner, loss, rank in [
                (None, 1440, 300.0, "r16-a32-all-linear", 3.1, 1),
                (3, 400, 120.0, "r8-a32-all-linear", 3.11, 2),
            ]
        ],
    },
    "export": {
        "model": "builtin:smollm2-135m-instruct + a seeded peft LoRA",
        "prompts": 8,
        "tokens": 24,
        "torch_threads": 2,
        "load": {"before": [1.5, 1.2, 1.0], "after": [1.9, 1.4, 1.1]},
        "llama_cpp": "not run",
        "rows": [
            {
                "format": "gguf",
                "quant": "q8_0",
                "export_seconds": 61.23,
                "write_seconds": 9.87,
                "bytes": 144_800_000,
                "files": {"model.gguf": 144_800_000},
                "verified": True,
                "failed": [],
                "max_abs_logit_diff": 0.4321,
                "max_abs_logit": 38.5,
                "greedy_identical_prompts": 7,
                "greedy_token_agreement": 0.9583,
            }
        ],
    },
    "serving": {
        "model": "builtin:smollm2-135m-instruct (fp32, CPU)",
        "torch_threads": 2,
        "prompt_tokens": 40,
        "tokens": 64,
        "repeats": 2,
        "first_token_seconds_median": 0.1234,
        "stream_tokens_per_second_median": 31.5,
        "non_streamed_request_seconds_median": 2.1,
        "generate_alone_tokens_per_second_median": 33.3,
        "first_token_seconds": [0.12, 0.13],
        "stream_tokens_per_second": [31.0, 32.0],
        "generate_alone_tokens_per_second": [33.0, 33.6],
        "load": {"before": [1.5, 1.2, 1.0], "after": [1.9, 1.4, 1.1]},
    },
    "overhead": {
        "runs": [
            {
                "store": "fresh",
                "wall_seconds": 30.1,
                "train_seconds": 4.5,
                "eval_seconds": 1.0,
                "overhead_seconds": 24.6,
            },
            {
                "store": "warm",
                "wall_seconds": 25.0,
                "train_seconds": 4.4,
                "eval_seconds": 1.0,
                "overhead_seconds": 19.6,
            },
        ],
        "plain_script": [{"wall_seconds": 14.0, "fixed_seconds": 9.8}],
        "warm_overhead_seconds": 19.6,
        "plain_fixed_seconds": 9.8,
        "pipeline_extra_seconds": 9.8,
        "pipeline_import_seconds": 12.9,
        "plain_import_seconds": 8.3,
        "overhead_beyond_imports_seconds": 6.7,
    },
    "real_model": {
        "model": "builtin:smollm2-135m-instruct",
        "first_use_seconds": 28.7,
        "download_seconds": 1.5,
        "convert_seconds": 21.9,
        "converted_mb": 541.6,
        "repeats": 2,
        "load_seconds": {"plain": [1.1, 1.3], "builtin": [1.2, 1.4], "gguf_path": [1.3, 1.5]},
        "load_median_seconds": {"plain": 1.2, "builtin": 1.3, "gguf_path": 1.4},
        "extra_seconds": {"builtin": 0.1, "gguf_path": 0.2},
    },
    "preference": {
        "quality": {
            "model": "builtin:smollm2-135m-instruct",
            "lora": "r 8",
            "runs": [
                {
                    "loss": "sigmoid",
                    "settings": {"loss": "sigmoid", "beta": 0.1},
                    "data": {
                        "rows": 300,
                        "kept": 76,
                        "pref_dropped_rows": 224,
                        "eval_rows": 16,
                        "train_rows": 60,
                        "budget": {"max_length": 256, "steps": 12},
                    },
                    "load_before": "19.1 18.2 15.0",
                    "load_after": "18.0 18.1 15.2",
                    "train_seconds": 321.5,
                    "base": {"loss": 0.6931, "reward_accuracy": 0.0, "pair_accuracy": 0.4375, "reward_margin": 0.0},
                    "tuned": {"loss": 0.61, "reward_accuracy": 0.8125, "pair_accuracy": 0.5625, "reward_margin": 0.42},
                },
                {
                    "loss": "kto",
                    "settings": {"loss": "kto", "beta": 0.1},
                    "data": {
                        "rows": 300,
                        "kept": 142,
                        "pref_dropped_rows": 158,
                        "eval_rows": 24,
                        "train_rows": 118,
                        "eval_desirable": 11,
                        "budget": {"max_length": 256, "steps": 12},
                    },
                    "load_before": "19.1 18.2 15.0",
                    "load_after": "18.0 18.1 15.2",
                    "train_seconds": 200.0,
                    "base": {"loss": 0.5, "label_accuracy": 0.5, "reward_margin": 0.0},
                    "tuned": {"loss": 0.45, "label_accuracy": 0.7083, "reward_margin": 0.3},
                },
            ],
        },
        "speed": {
            "budget": {"max_length": 192, "steps": 3},
            "load": {"before": "19.4", "after_pipeline": "19.0", "after_control": "18.7"},
            "pipeline_runs_tokens_per_second": [40.1, 42.0],
            "plain_runs_tokens_per_second": [41.0, 39.5],
            "throughput_ratio": 1.013,
            "throughput_ratio_range": [0.98, 1.06],
            "throughput_ratio_best": 1.024,
            "pipeline_memory_growth_mb": 420.0,
            "plain_memory_growth_mb": 380.0,
            "memory_ratio": 1.105,
            "control": {
                "first_runs_tokens_per_second": [40.0, 41.0],
                "second_runs_tokens_per_second": [39.0, 42.0],
                "ratio": 1.0,
                "ratio_range": [0.95, 1.05],
            },
        },
    },
}


def test_report_renders_present_sections_with_date_and_machine_and_leaves_out_absent_ones(tmp_path: Path) -> None:
    page = write(RESULTS, tmp_path / "README.md").read_text()
    assert "## How it is measured" in page
    # Each "## " section of the page, by heading.
    sections = {part.split("\n", 1)[0]: part for part in re.split(r"^## ", page, flags=re.M)[1:]}
    for key, heading, _ in SECTIONS:
        if key in RESULTS:
            body = sections[heading]
            assert DATE in body and MACHINE in body, heading
            assert "|" in body, f"{heading}: no table"
        else:
            assert heading not in sections, f"{heading} rendered without results"
    assert "3886" in sections["Training throughput and MFU"] and "0.0006" in sections["Training throughput and MFU"]
    pruning = sections["Grid pruning: successive halving vs the full grid"]
    assert (
        "0.278" in pruning
        and "**no** (full: r16-a32-all-linear)" in pruning
        and "eta 3: the full grid's winner in 0 of 1" in pruning
    )
    assert "19.6" in sections["Fixed overhead of `adaptflow run deployments/demo.yaml`"]
    exported = sections["Export: time, size, logits and greedy agreement per format and quantization"]
    assert "| gguf | q8_0 | 61.2 | 9.9 | 144.8 (model.gguf 144.8) | 0.4321 | 7 / 8 | 0.958 | yes |" in exported
    serving = sections["Serving: first token and tokens/s through the OpenAI client"]
    assert "0.123" in serving and "31.5" in serving and "33.3" in serving and "noisy" in serving
    real = sections["Real model: first use and cached load"]
    assert "28.7" in real and "+0.10 s" in real and "+0.20 s" in real
    preference = sections["Real model: preference tuning (DPO, SimPO, KTO) and DPO speed vs plain TRL"]
    assert "0.000 → 0.812 (+0.812)" in preference and "0.500 → 0.708 (+0.208)" in preference
    assert "**1.013** (0.98–1.06)" in preference and "1.105" in preference


def test_a_run_that_skips_a_section_keeps_the_earlier_one_with_its_date(tmp_path: Path) -> None:
    import json

    from benchmarks.report import render
    from benchmarks.run import keep_earlier_sections

    earlier = tmp_path / "results.json"
    earlier.write_text(json.dumps(RESULTS))
    later = {"date": "2031-05-06", "machine": "another machine", "overhead": RESULTS["overhead"]}
    keep_earlier_sections(later, earlier)
    assert later["throughput"] == RESULTS["throughput"] and later["mfu"] == RESULTS["mfu"]
    assert later["stamps"]["throughput"] == {"date": DATE, "machine": MACHINE}
    assert later["stamps"]["overhead"] == {"date": "2031-05-06", "machine": "another machine"}
    page = render(later)
    throughput = page.split("## Training throughput")[1].split("##")[0]
    assert f"Measured {DATE} on {MACHINE}." in throughput
    assert "Measured 2031-05-06 on another machine." in page.split("## Fixed overhead")[1]
