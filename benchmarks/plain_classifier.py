"""The classification script a user would write by hand: HF Trainer + PEFT LoRA on a sequence classifier, no
pipeline; the reference for the real-model classification row (`benchmarks.real_quality`).

    python -m benchmarks.plain_classifier --model DIR --train FILE --eval FILE --steps 30 --batch 8 --max-length 64
Prints one JSON line: eval_accuracy, eval_f1_macro, train_tokens_per_second (real tokens), train_seconds,
peak_memory_mb.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch
from datasets import load_dataset
from peft import LoraConfig, TaskType, get_peft_model
from sklearn.metrics import accuracy_score, f1_score
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--output", default="/tmp/plain-classifier")
    args = parser.parse_args()

    set_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    data = load_dataset("json", data_files={"train": args.train, "eval": args.eval})
    names = sorted(set(data["train"]["label"]))
    index = {name: i for i, name in enumerate(names)}

    def encode(batch: dict) -> dict:
        encoded = tokenizer(batch["text"], truncation=True, max_length=args.max_length)
        return {**encoded, "labels": [index[v] for v in batch["label"]]}

    data = data.map(encode, batched=True, remove_columns=["text", "label"])
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model,
        dtype=torch.float32,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id=index,
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    model = get_peft_model(
        model,
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type=TaskType.SEQ_CLS),
    )
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.output,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch,
            per_device_eval_batch_size=16,
            learning_rate=args.lr,
            seed=0,
            data_seed=0,
            save_strategy="no",
            report_to="none",
            logging_steps=10,
            use_cpu=not torch.cuda.is_available(),
            include_num_input_tokens_seen="non_padding",
            disable_tqdm=True,
        ),
        train_dataset=data["train"],
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    output = trainer.predict(data["eval"])
    predicted = np.argmax(output.predictions, axis=-1)
    truth = output.label_ids
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    print(
        json.dumps(
            {
                "eval_accuracy": float(accuracy_score(truth, predicted)),
                "eval_f1_macro": float(f1_score(truth, predicted, average="macro", zero_division=0)),
                "eval_loss": float(output.metrics["test_loss"]),
                "train_tokens_per_second": trainer.state.num_input_tokens_seen / seconds,
                "train_seconds": seconds,
                "peak_memory_mb": peak,
            }
        )
    )


if __name__ == "__main__":
    main()
