"""The script a user would write by hand: HF Trainer + PEFT, no pipeline. The reference the pipeline must match.

    python -m benchmarks.plain_trainer --model DIR --data FILE --method lora --steps 30 --batch 8 --max-length 128
Prints one JSON line: train_tokens_per_second (real tokens only), train_seconds, peak_memory_mb.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from typing import Any

import torch
from datasets import load_dataset
from peft import (
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
    prepare_model_for_kbit_training,
)
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainingArguments,
    set_seed,
)

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_config(method: str) -> object | None:
    task = TaskType.CAUSAL_LM
    return {
        "full": None,
        "lora": LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type=task),
        "dora": LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type=task, use_dora=True
        ),
        "qlora": LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type=task),
        "ia3": IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], task_type=task
        ),
        "prefix": PrefixTuningConfig(num_virtual_tokens=10, task_type=task),
        "prompt": PromptTuningConfig(num_virtual_tokens=10, task_type=task),
    }[method]


def encode(tokenizer: Any, data: Any, max_length: int) -> Any:
    """Token ids + eos, labels = ids (the collator pads them with -100)."""

    def row_ids(row: dict) -> dict:
        ids = tokenizer(row["text"], truncation=True, max_length=max_length - 1)["input_ids"] + [tokenizer.eos_token_id]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}

    return data.map(row_ids, remove_columns=data.column_names)


def plain_arguments(output: str, steps: int, batch: int, lr: float) -> TrainingArguments:
    """The TrainingArguments a user would write: no checkpoints, no reporting."""
    return TrainingArguments(
        output_dir=output,
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=lr,
        seed=0,
        data_seed=0,
        save_strategy="no",
        report_to="none",
        logging_steps=10,
        use_cpu=not torch.cuda.is_available(),
        # bf16 autocast where the GPU has it, as a user would (and as the pipeline's precision "auto" does).
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--method", default="lora")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--output", default="/tmp/plain-trainer")
    args = parser.parse_args()

    set_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    data = load_dataset("json", data_files=args.data)["train"]

    data = encode(tokenizer, data, args.max_length)
    extra = {}
    if args.method == "qlora":
        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, **extra)
    if args.method == "qlora":
        model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    config = peft_config(args.method)
    if config is not None:
        model = get_peft_model(model, config)
    trainer = Trainer(
        model=model,
        args=plain_arguments(args.output, args.steps, args.batch, args.lr),
        train_dataset=data,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
    )
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    print(
        json.dumps(
            {
                "train_tokens_per_second": trainer.state.num_input_tokens_seen / seconds,
                "train_seconds": seconds,
                "peak_memory_mb": peak,
                "tokens": trainer.state.num_input_tokens_seen,
            }
        )
    )


if __name__ == "__main__":
    main()
