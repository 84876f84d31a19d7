"""The MLflow pyfunc that serves an adaptflow model: generates text or returns label names.

Logged as "models from code": MLflow stores this file's source, not a pickle, and runs it on load.
Merged models need only torch and transformers; adapter-only ones (bottleneck adapters, prefix, prompt) load
through adaptflow's `adapters_impl`, which is logged with the model (`code_paths`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


def _texts(model_input: Any) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):  # a pandas DataFrame: the text column, else the first one
        column = "text" if "text" in model_input.columns else model_input.columns[0]
        return [str(t) for t in model_input[column]]
    return [str(t) for t in model_input]


class AdaptflowModel(PythonModel):
    """Generation for causal LMs (greedy, deterministic), label names for classifiers."""

    def load_context(self, context: Any) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        folder = Path(context.artifacts["model"])
        self.folder = folder
        self.info = json.loads((folder / "adaptflow.json").read_text())
        self.tokenizer = AutoTokenizer.from_pretrained(folder / self.info["tokenizer"])
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        auto = AutoModelForSequenceClassification if self.info["task"] == "classification" else AutoModelForCausalLM
        # Safetensors only, unless the run that registered this base allowed pickles (model.allow_pickle).
        safetensors_only = None if self.info.get("allow_pickle") else True
        model = auto.from_pretrained(
            folder / self.info["weights"], dtype=torch.float32, use_safetensors=safetensors_only
        )
        if self.info.get("adapter"):
            from adapters_impl import get_method

            model = get_method(self.info["method"]).load(model, folder / self.info["adapter"], False)
        self.model = model.eval()

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        # Untyped on purpose: MLflow would turn type hints into a strict input schema.
        import torch

        texts = _texts(model_input)
        params = {**self.info.get("generation", {}), **(params or {})}
        with torch.no_grad():
            if self.info["task"] == "classification":
                self.tokenizer.padding_side = "right"
                batch = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True)
                ids = self.model(**batch).logits.argmax(-1).tolist()
                names = self.info["label_names"]
                return [names[i] for i in ids]
            outputs = []
            for text in texts:  # one at a time: no padding to get wrong, and prompts are short
                batch = self.tokenizer(text, return_tensors="pt")
                generated = self.model.generate(
                    **batch,
                    max_new_tokens=int(params.get("max_new_tokens", 40)),
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
                continuation = generated[0, batch["input_ids"].shape[1] :]
                outputs.append(self.tokenizer.decode(continuation, skip_special_tokens=True))
            return outputs


mlflow.models.set_model(AdaptflowModel())
