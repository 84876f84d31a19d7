"""The MLflow pyfunc that serves an adaptflow model: generates text or returns label names.

Logged as "models from code": MLflow stores this file's source, not a pickle, and runs it on load.
It loads the package through `adapters_impl.packaged`; `adapters_impl` is logged with the model (`code_paths`),
so adapter-only versions (bottleneck adapters, prefix, prompt) load where adaptflow is not installed.
"""

from __future__ import annotations

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
        from adapters_impl.packaged import load_packaged

        packaged = load_packaged(context.artifacts["model"])
        self.model, self.tokenizer, self.info = packaged.model, packaged.tokenizer, packaged.info

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        # Untyped on purpose: MLflow would turn type hints into a strict input schema.
        import torch

        texts = _texts(model_input)
        params = {**self.info.get("generation", {}), **(params or {})}
        with torch.no_grad():
            # What predict returns per objective is decided here, not by the objective registry: this file runs
            # where only adapters_impl is installed (MLflow's code_paths), so it cannot import tasks.objectives.
            if self.info["task"] == "classification":
                self.tokenizer.padding_side = "right"
                batch = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True)
                ids = self.model(**batch).logits.argmax(-1).tolist()
                names = self.info["label_names"]
                return [names[i] for i in ids]
            outputs = []
            for text in texts:  # one at a time: no padding to get wrong, and prompts are short
                batch = self.tokenizer(text, return_tensors="pt")
                generated = self.model.generate(  # type: ignore[operator]
                    **batch,
                    max_new_tokens=int(params.get("max_new_tokens", 40)),
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
                continuation = generated[0, batch["input_ids"].shape[1] :]
                outputs.append(self.tokenizer.decode(continuation, skip_special_tokens=True))
            return outputs


mlflow.models.set_model(AdaptflowModel())
