"""The preference-tuning script a user would write by hand: TRL's `DPOTrainer` + a peft `LoraConfig`, no pipeline.
The reference adaptflow's DPO training is measured against (benchmarks/preference.py builds its trainer from
`plain_trainer` here; run alone it is the whole script).

    python -m benchmarks.plain_dpo --model DIR --data FILE.jsonl --steps 6 --batch 2 --max-length 256
Data: JSONL rows with conversational `prompt`, `chosen`, `rejected` message lists (TRL's explicit-prompt format).
Prints one JSON line: train_tokens_per_second (real tokens of the chosen and rejected rows), train_seconds,
peak_memory_mb, tokens.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from typing import Any

import torch
from datasets import Dataset, load_dataset
from peft import LoraConfig, TaskType
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from trl import DPOConfig, DPOTrainer


def lora_config(r: int = 8) -> LoraConfig:
    """adaptflow's `method: {name: lora, r, alpha: 2r, dropout: 0, target_modules: all-linear}` in peft's terms."""
    return LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear", task_type=TaskType.CAUSAL_LM
    )


def dpo_config(output: str, steps: int, batch: int, max_length: int, lr: float, beta: float, **extra: Any) -> DPOConfig:
    """What a user writes: DPO (loss sigmoid), no checkpoints, no reporting. TRL 1.16 checkpoints gradients by
    default; off here so both sides do the same work (adaptflow's train.gradient_checkpointing is off by default)."""
    return DPOConfig(
        output_dir=output,
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=lr,
        beta=beta,
        loss_type=["sigmoid"],
        max_length=max_length,
        gradient_checkpointing=False,
        seed=0,
        data_seed=0,
        save_strategy="no",
        report_to="none",
        logging_steps=10,
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        **extra,
    )


def plain_trainer(model_path: str, tokenizer: Any, data: Dataset, config: DPOConfig, r: int = 8) -> DPOTrainer:
    set_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return DPOTrainer(
        model=model, args=config, train_dataset=data, processing_class=tokenizer, peft_config=lora_config(r)
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2, help="pairs per step")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--output", default="/tmp/plain-dpo")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    data = load_dataset("json", data_files=args.data)["train"]
    config = dpo_config(args.output, args.steps, args.batch, args.max_length, args.lr, args.beta)
    trainer = plain_trainer(args.model, tokenizer, data, config, args.r)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    tokens = int(trainer.state.num_input_tokens_seen)
    print(
        json.dumps(
            {"train_tokens_per_second": tokens / seconds, "train_seconds": seconds, "peak_memory_mb": peak,
             "tokens": tokens}
        )
    )  # fmt: skip


if __name__ == "__main__":
    main()
