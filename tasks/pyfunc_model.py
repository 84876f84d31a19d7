"""The MLflow pyfunc that serves an adaptflow model: generates text, answers chats, or returns label names.

Logged as "models from code": MLflow stores this file's source, not a pickle, and runs it on load.
It loads the package through `adapters_impl.packaged`; `adapters_impl` is logged with the model (`code_paths`),
so adapter-only versions (bottleneck adapters, prefix, prompt) load where adaptflow is not installed.

Inputs: a string, a list of strings, or a DataFrame (`text` or `prompt` column). A chat model (instruction,
preference) also takes one conversation (a list of `{role, content}`, answered with a list of one answer) and
OpenAI-style chat requests (`{"messages": [...], "max_tokens": N}`), answered with a `chat.completion` object. Its
registered signature (`tasks/registry.py`'s `model_signature`) declares `messages`, `prompt` and `max_tokens`:
MLflow then hands a request over as a one-row DataFrame (what `mlflow models serve` makes of a JSON body with
`messages`), so each DataFrame row with `messages` is a chat request too (one row: its object; several: a list).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

from adapters_impl.model_heads import head_of_package

Conversation = list[dict[str, str]]


class BadRequest(ValueError):
    """A request this model cannot answer; served as HTTP 400 with the one-line reason."""


def _bad_request(reason: str) -> Exception:
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(reason)


def _token_limit(value: Any, key: str) -> int:
    """A requested length: a positive integer, capped by the server's limit (`serving_limits`: a client that gives
    up cannot be seen from here, so a request for a billion tokens would otherwise run on for hours)."""
    from adapters_impl.packaged import serving_limits

    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value or value <= 0:
        raise BadRequest(f"{key} must be a positive integer, got {value!r}")
    return min(int(value), serving_limits()[0])


def _max_seconds() -> float:
    from adapters_impl.packaged import serving_limits

    return serving_limits()[1]


def _texts(model_input: Any) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):  # a pandas DataFrame: the text or prompt column, else the first one
        if not len(model_input.columns):  # what the signature's enforcement leaves of inputs it does not declare
            raise BadRequest("no input the model reads: give `messages` or `prompt` (see the model's signature)")
        column = next((c for c in ("text", "prompt") if c in model_input.columns), model_input.columns[0])
        return [str(t) for t in model_input[column]]
    return [str(t) for t in model_input]


def _conversation(value: Any) -> Conversation:
    if isinstance(value, str):
        try:
            value = json.loads(value)  # a JSON cell of a DataFrame
        except json.JSONDecodeError as exc:
            raise BadRequest(f"messages: not JSON ({exc.msg})") from None
    if not isinstance(value, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        raise BadRequest('messages: expected a list of {"role": ..., "content": ...} objects with string values')
    if not any(m["role"] == "user" for m in value):
        raise BadRequest("messages: no user turn to answer")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _plain(value: Any) -> Any:
    """A DataFrame cell as a plain Python value: numpy scalars and arrays unwrapped, a missing value None."""
    if hasattr(value, "tolist"):  # numpy scalar or array
        value = value.tolist()
    if isinstance(value, float) and value != value:  # NaN: a row without this column's value
        return None
    return value


def _chat_requests(model_input: Any) -> list[dict[str, Any]] | None:
    """The chat requests in `model_input` (a dict, or DataFrame rows with `messages`); None when it holds none."""
    if isinstance(model_input, dict) and "messages" in model_input:
        return [model_input]
    if hasattr(model_input, "columns") and "messages" in model_input.columns:
        rows = model_input.to_dict(orient="records")
        return [{k: _plain(v) for k, v in row.items() if _plain(v) is not None} for row in rows]
    return None


def _conversations(model_input: Any) -> list[Conversation]:
    """Every input as a conversation: texts become one user message each."""
    if isinstance(model_input, list) and model_input and isinstance(model_input[0], dict):
        return [_conversation(model_input)]  # one conversation
    return [[{"role": "user", "content": text}] for text in _texts(model_input)]


class AdaptflowModel(PythonModel):
    """Generation for causal LMs and chat answers for instruction models (greedy, deterministic), label names for
    classifiers."""

    # `predict` takes strings, DataFrames, conversations and chat requests: no type hint describes that, and MLflow
    # would warn at every registration that it has none. This is MLflow's own switch for such models.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        from adapters_impl.packaged import load_packaged

        packaged = load_packaged(context.artifacts["model"])
        self.model, self.tokenizer, self.info = packaged.model, packaged.tokenizer, packaged.info

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        # Untyped on purpose: MLflow would turn type hints into a strict input schema.
        try:
            return self._predict(model_input, params)
        except BadRequest as exc:  # HTTP 400 with the reason, never a stack trace in the body
            raise _bad_request(str(exc)) from None

    def _predict(self, model_input: Any, params: dict[str, Any] | None) -> Any:
        import torch

        params = {**self.info.get("generation", {}), **(params or {})}
        with torch.no_grad():
            # What predict returns follows the package's head, not the objective registry: this file runs where
            # only adapters_impl is installed (MLflow's code_paths), so it cannot import tasks.objectives.
            output = head_of_package(self.info).output
            if output in ("label", "score"):
                texts = _texts(model_input)
                self.tokenizer.padding_side = "right"
                batch = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True)
                logits = self.model(**batch).logits.float()
                if output == "score":  # one number per text (several per text when the head has several)
                    return [row[0] if len(row) == 1 else row for row in logits.tolist()]
                names = self.info["label_names"]
                return [names[i] for i in logits.argmax(-1).tolist()]
            if self.info.get("chat"):
                requests = _chat_requests(model_input)
                if requests is not None:  # OpenAI-style chat requests
                    completions = []
                    for request in requests:
                        asked = request.get("max_tokens")
                        default = params.get("max_new_tokens", 128)
                        limit = _token_limit(default if asked is None else asked, "max_tokens")
                        completions.append(self._chat_completion(_conversation(request["messages"]), limit))
                    return completions[0] if len(completions) == 1 else completions
                limit = _token_limit(params.get("max_new_tokens", 128), "max_new_tokens")
                return [self._answer(c, limit)[0] for c in _conversations(model_input)]
            limit = _token_limit(params.get("max_new_tokens", 40), "max_new_tokens")
            return [self._continue(text, limit) for text in _texts(model_input)]

    def _continue(self, text: str, limit: int) -> str:
        batch = self.tokenizer(text, return_tensors="pt")  # one at a time: no padding to get wrong
        generated = self.model.generate(  # type: ignore[operator]
            **batch,
            max_new_tokens=limit,
            max_time=_max_seconds(),
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return str(self.tokenizer.decode(generated[0, batch["input_ids"].shape[1] :], skip_special_tokens=True))

    def _answer(self, messages: Conversation, limit: int) -> tuple[str, int, int, bool]:
        """The response to a conversation, rendered with the model's chat template exactly as in training; with
        the prompt's and the answer's token counts, and whether it ended at the end of turn."""
        import torch

        from adapters_impl.packaged import chat_prompt_ids, response_only, stop_ids

        chat = self.info["chat"]
        ids = chat_prompt_ids(self.tokenizer, chat, messages)
        stops = stop_ids(self.tokenizer, chat["end_of_turn"])
        generated = self.model.generate(  # type: ignore[operator]
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=limit,
            max_time=_max_seconds(),
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=self.tokenizer.pad_token_id,
        )[0, len(ids) :].tolist()
        stopped = next((i + 1 for i, t in enumerate(generated) if t in stops), None)
        new = generated[:stopped] if stopped else generated
        decoded = self.tokenizer.decode(new, skip_special_tokens=False)
        return response_only(decoded, chat["end_of_turn"], self.tokenizer.eos_token), len(ids), len(new), bool(stopped)

    def _chat_completion(self, messages: Conversation, limit: int) -> dict[str, Any]:
        """An OpenAI `chat.completion` object answering the conversation."""
        content, prompt_tokens, new_tokens, stopped = self._answer(messages, limit)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": str(self.info.get("method", "adaptflow")),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop" if stopped else "length",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": new_tokens,
                "total_tokens": prompt_tokens + new_tokens,
            },
        }


mlflow.models.set_model(AdaptflowModel())
