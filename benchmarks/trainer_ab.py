"""The train stage's Trainer set-up against the plain script's, in one process, alternating: what is left of a
throughput gap once the process (Prefect, MLflow, the temporary server) and the machine's noise are the same.

    python -m benchmarks.trainer_ab [--method prefix] [--steps 60] [--repeats 4]
Prints tokens/s per run for each side and the ratio of the best runs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer

from adapters_impl import get_method
from benchmarks.harness import SAMPLES, build_bench_model
from benchmarks.plain_trainer import encode, peft_config, plain_arguments
from tasks.config import TrainSettings
from tasks.training import MethodTrainer, training_arguments


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="prefix", choices=["full", "lora", "dora", "ia3", "prefix", "prompt"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="adaptflow-ab-"))
    build_bench_model(work / "model")
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    data = load_dataset("json", data_files=str(SAMPLES))["train"]

    data = encode(tokenizer, data, 128)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    def model() -> Any:
        from peft import get_peft_model

        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
        config = peft_config(args.method)
        return base if config is None else get_peft_model(base, config)

    def plain() -> Trainer:
        return Trainer(
            model=model(),
            args=plain_arguments(str(work / "plain"), args.steps, 8, 3e-3),
            train_dataset=data,
            data_collator=collator,
        )

    def ours() -> Trainer:
        settings = TrainSettings(max_steps=args.steps, batch_size=8, learning_rate=3e-3, save_steps=10 * args.steps)
        return MethodTrainer(
            model=model(),
            save_method=get_method(args.method).save,
            args=training_arguments(settings, work / "ours"),
            train_dataset=data,
            data_collator=collator,
        )

    runs: dict[str, list[float]] = {"plain": [], "pipeline": []}
    for _ in range(args.repeats):
        for side, make in (("plain", plain), ("pipeline", ours)):
            trainer = make()
            started = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - started
            if isinstance(trainer, MethodTrainer):  # counts its own tokens; its checkpoint saves are reported apart
                tokens, seconds = int(trainer.tokens_seen), seconds - trainer.checkpoint_seconds
            else:
                tokens = trainer.state.num_input_tokens_seen
            runs[side].append(round(tokens / seconds, 1))
    print(
        f"{args.method}: tokens/s {runs}; best pipeline / best plain = {max(runs['pipeline']) / max(runs['plain']):.3f}"
    )


if __name__ == "__main__":
    main()
