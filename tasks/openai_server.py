"""An OpenAI-compatible HTTP endpoint for one registered version (`adaptflow serve-model`).

`/v1/chat/completions` (instruction versions), `/v1/completions` (every generating version), `/v1/models`, and
`/health` (the generation counters). The model is the registered package loaded by the same loader as `adaptflow
predict` (`adapters_impl.packaged`), chats are rendered by the same function (`chat_prompt_ids`: the package's chat
template, training's one-BOS encoding), and answers are cut at the template's end of turn as `predict` cuts them:
greedy (`temperature: 0`) answers equal `predict`'s.

Honoured: `temperature` (0 is greedy; default 1, OpenAI's), `top_p`, `max_tokens` / `max_completion_tokens` (capped
by `ADAPTFLOW_SERVE_MAX_TOKENS` and the model's context), `stop` (up to 4 strings, cut from the text), `n` (the
choices are generated one after another), `seed`, `stream` (server-sent events, with `stream_options.include_usage`),
and vLLM's extension `ignore_eos`. A request takes at most `ADAPTFLOW_SERVE_MAX_SECONDS`. Other parameters with a
value other than their default are refused, not ignored. Bad requests get HTTP 400 with a one-line reason in
OpenAI's error shape. A client that disconnects stops its generation at the next token (a `StoppingCriteria`
reads the request's cancellation flag), and so does SIGTERM / Ctrl-C for every running generation before the
server exits. Classification versions are listed by `/v1/models`; both completion routes answer them 400 (they
return labels, not text: `adaptflow predict` classifies).

Why not `transformers serve` (transformers/cli/serving in the pinned 5.24): it loads models by hub id or folder
through its own `ModelManager`, so an adapter-only version (LoRA on a pinned base, bottleneck adapters, prefix and
prompt tuning) cannot be served; it renders the tokenizer's own template through its own tokenization, not the
package's template with training's encoding; it ignores `n`; it answers malformed requests with FastAPI's 422
shape; `max_tokens` is uncapped; a stop string stays in the text; a non-streamed generation runs on after its
client has gone; and it needs the `openai` package at run time. Each would mean overriding internals of a module
that is months old and undocumented as an API. So this is a small FastAPI + uvicorn app (what `transformers
serve` and `mlflow models serve` run on) around transformers' own generation pieces: `generate` with a
`StoppingCriteria`, and `TextIteratorStreamer` for the text as it is generated.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from adapters_impl.packaged import PackagedModel, chat_prompt_ids, serving_limits, stop_ids
from tasks.errors import UserInputError

log = logging.getLogger("adaptflow.serve")

MAX_CHOICES = 8  # choices per request: n, times the prompts of a completion request
MAX_STOPS = 4  # OpenAI's own limit on `stop`
ROLES = ("system", "developer", "user", "assistant")
# OpenAI's bookkeeping fields: they do not change the text, so they are accepted and ignored.
IGNORED = {"user", "metadata", "store", "service_tier", "stream_options", "model"}
CHAT_FIELDS = {"messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "stream"}
COMMON_FIELDS = {"seed", "ignore_eos"}
COMPLETION_FIELDS = {"prompt", "max_tokens", "temperature", "top_p", "n", "stop", "stream"}
# Parameters this server does not implement are refused unless they carry their default (what a client that does
# not use them sends): silently ignoring `logprobs` or `tools` would answer a different question.
DEFAULT_VALUES: dict[str, Any] = {
    "best_of": 1,
    "echo": False,
    "tool_choice": "none",
    "response_format": {"type": "text"},
}
POLL_SECONDS = 0.2  # how often a waiting handler looks up from the generation (client gone? server stopping?)


class ApiError(Exception):
    """A request answered with an HTTP error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(" ".join(message.split()))  # one line, whatever the cause held
        self.status, self.param, self.code = status, param, code

    def payload(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.payload(), status_code=self.status)


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


# ---------------------------------------------------------------- request fields


def _integer(body: dict[str, Any], key: str, low: int, high: int | None, default: int | None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value != int(value):
        raise _bad(f"{key} must be an integer, got {value!r}", key)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise _bad(f"{key} must be {bound}, got {int(value)}", key)
    return int(value)


def _number(body: dict[str, Any], key: str, low: float, high: float, default: float, open_low: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(f"{key} must be a number, got {value!r}", key)
    if value > high or value < low or (open_low and value == low):
        shown = f"({low}, {high}]" if open_low else f"[{low}, {high}]"
        raise _bad(f"{key} must be in {shown}, got {value}", key)
    return float(value)


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(f"{key} must be true or false, got {value!r}", key)
    return value


def _stops(body: dict[str, Any]) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise _bad(f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them, got {value!r}", "stop")
    return list(stops)


def _check_fields(body: dict[str, Any], honoured: set[str]) -> None:
    for key, value in body.items():
        if key in honoured or key in IGNORED or key in COMMON_FIELDS:
            continue
        if value in (None, False, 0, "", [], {}) or DEFAULT_VALUES.get(key, object()) == value:
            continue  # a default: the client does not use it
        names = ", ".join(sorted(honoured | COMMON_FIELDS))
        raise _bad(f"{key} is not supported by this server (it honours {names})", key)


def _text_content(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    raise _bad(f"messages[{index}].content must be a string or a list of text parts", "messages")


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise _bad('messages must be a non-empty list of {"role": ..., "content": ...} objects', "messages")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, dict) else message
            raise _bad(f"messages[{index}].role must be one of {', '.join(ROLES)}, got {role!r}", "messages")
        role = "system" if message["role"] == "developer" else message["role"]  # OpenAI's newer name for system
        messages.append({"role": role, "content": _text_content(message.get("content"), index)})
    if not any(m["role"] == "user" for m in messages):
        raise _bad("messages: no user turn to answer", "messages")
    return messages


# ---------------------------------------------------------------- generation


class TextCutter:
    """A generated text, released as it arrives and cut before the first stop string (and, for answers, stripped as
    `predict` strips them): a suffix that could begin a stop string is held back until the next piece decides."""

    def __init__(self, stops: list[str], strip: bool) -> None:
        self.stops, self.strip = stops, strip
        self.pending, self.started, self.done = "", not strip, False

    def feed(self, piece: str) -> str:
        if self.done:
            return ""
        self.pending += piece
        if not self.started:
            self.pending = self.pending.lstrip()
            self.started = bool(self.pending)
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            self.pending, self.done = self.pending[: min(found)], True
            return self.flush()
        held = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        ready = self.pending[: len(self.pending) - held]
        if self.strip:
            ready = ready.rstrip()  # trailing spaces wait: the answer may end here
        self.pending = self.pending[len(ready) :]
        return ready

    def flush(self) -> str:
        ready, self.pending = (self.pending.rstrip() if self.strip else self.pending), ""
        return ready


class _StopWhen(StoppingCriteria):
    """Ends `generate` at the next token once `flag()` says so (client gone, server stopping, stop string seen)."""

    def __init__(self, flag: Callable[[], bool]) -> None:
        self.flag = flag

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.flag(), dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


@dataclass
class Sampling:
    """What a request asks of every one of its choices."""

    temperature: float
    top_p: float
    seed: int | None
    ignore_eos: bool
    stops: list[str]


@dataclass
class Choice:
    """One generated answer: its prompt, its text as it streams, and how it ended."""

    index: int
    prompt: list[int]
    max_tokens: int
    streamer: TextIteratorStreamer
    cutter: TextCutter
    tokens: int = 0
    finish_reason: str = "length"
    stop_seen: bool = False
    generated: threading.Event = field(default_factory=threading.Event)  # set once generation has ended


class Job:
    """One request's choices, generated one after another on one thread that holds the model meanwhile (one
    generation at a time: on CPU a second would only halve the speed of both)."""

    def __init__(self, engine: Engine, request_id: str, choices: list[Choice], sampling: Sampling) -> None:
        self.engine, self.request_id, self.choices, self.sampling = engine, request_id, choices, sampling
        self.deadline = time.monotonic() + engine.max_seconds
        self.cancelled: str | None = None  # why the answer is no longer wanted
        self.error: str | None = None
        self.current: Choice | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"generate-{request_id}", daemon=True)

    def cancel(self, reason: str) -> None:
        if self.cancelled is None and not self.done.is_set():
            self.cancelled = reason

    def stopping(self) -> bool:
        """The whole request ends: its client went away, or the server is stopping."""
        if self.engine.stopping.is_set() and self.cancelled is None:
            self.cancelled = "server shutting down"
        return self.cancelled is not None

    def _stop_now(self) -> bool:
        return self.stopping() or (self.current is not None and self.current.stop_seen)

    def _run(self) -> None:
        lock, held = self.engine.lock, False
        try:
            while not (held := lock.acquire(timeout=POLL_SECONDS)):  # queued behind another request
                if self.stopping():
                    return
            if self.sampling.seed is not None:
                torch.manual_seed(self.sampling.seed)  # under the lock: the seed governs this request alone
            for choice in self.choices:
                if self.stopping():
                    break
                self.current = choice
                self._generate(choice)
        except Exception as exc:  # answered as a 500 with this line; the traceback goes to the server's log
            log.exception("%s: generation failed", self.request_id)
            self.error = (
                f"generation failed: {exc.__class__.__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            )
        finally:
            if held:
                lock.release()
            for choice in self.choices:
                if not choice.generated.is_set():  # never generated (cancelled, failed): end its stream for the reader
                    choice.streamer.end()
                    choice.generated.set()
            self.done.set()

    def _generate(self, choice: Choice) -> None:
        engine, sampling, started = self.engine, self.sampling, time.monotonic()
        sample = sampling.temperature > 0
        config = GenerationConfig(
            max_new_tokens=choice.max_tokens,
            min_new_tokens=choice.max_tokens if sampling.ignore_eos else None,  # end-of-sequence suppressed
            max_time=max(self.deadline - started, 0.001),
            do_sample=sample,
            temperature=sampling.temperature if sample else None,
            top_p=sampling.top_p if sample else None,
            top_k=0 if sample else None,  # OpenAI's sampling has no top-k; transformers' default would be 50
            eos_token_id=engine.stop_ids,
            pad_token_id=engine.packaged.tokenizer.pad_token_id,
        )
        ids = torch.tensor([choice.prompt])
        try:
            output = engine.packaged.model.generate(  # type: ignore[operator]
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                generation_config=config,
                streamer=choice.streamer,
                stopping_criteria=StoppingCriteriaList([_StopWhen(self._stop_now)]),
            )
        except BaseException:
            choice.streamer.end()
            raise
        new = output[0, len(choice.prompt) :].tolist()
        choice.tokens = len(new)
        ended = bool(new) and new[-1] in engine.stop_ids and not sampling.ignore_eos
        out_of_time = time.monotonic() >= self.deadline
        if choice.stop_seen or ended or not (choice.tokens >= choice.max_tokens or out_of_time):
            choice.finish_reason = "stop"
        seconds = time.monotonic() - started
        engine.count(choice.tokens, cancelled=self.cancelled is not None)
        if self.cancelled:
            log.info(
                "%s choice %d: generation stopped early (%s) after %d of at most %d tokens, %.2f s",
                self.request_id, choice.index, self.cancelled, choice.tokens, choice.max_tokens, seconds,
            )  # fmt: skip
        else:
            log.info(
                "%s choice %d: %d tokens in %.2f s (%s)",
                self.request_id, choice.index, choice.tokens, seconds, choice.finish_reason,
            )  # fmt: skip
        choice.generated.set()


@dataclass
class ServedVersion:
    """What the server says about its model: its id in requests and responses, and where it came from."""

    model_id: str
    model_uri: str
    version: str | None
    created: int
    names: set[str]  # what a request's `model` may say: the id, the URI, NAME/VERSION


def served_version(model_uri: str) -> ServedVersion:
    """The registered version a `models:/NAME/VERSION` or `models:/NAME@ALIAS` URI names (an alias is resolved
    once: the server keeps serving that version when the alias moves), or a `runs:/` URI as it is.

    Raises:
        UserInputError: another kind of URI, or no such model, version or alias (exit 2, naming MODEL_URI).
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if model_uri.startswith("runs:/"):
        return ServedVersion(model_uri, model_uri, None, int(time.time()), {model_uri})
    rest = model_uri.removeprefix("models:/")
    name, alias, version = rest, None, None
    if "@" in rest:
        name, alias = rest.split("@", 1)
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
    if rest == model_uri or not name or not (alias or (version and version.isdigit())):
        raise UserInputError(
            f"MODEL_URI: expected models:/NAME/VERSION, models:/NAME@ALIAS or runs:/RUN_ID/PATH, got {model_uri!r}"
        )
    client = MlflowClient()
    try:
        found = (
            client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, str(version))
        )
    except MlflowException as exc:
        raise UserInputError(f"MODEL_URI: {model_uri}: {str(exc).splitlines()[0][:300]}") from None
    pinned = f"models:/{name}/{found.version}"
    names = {name, f"{name}/{found.version}", model_uri, pinned}
    return ServedVersion(name, pinned, str(found.version), int(found.creation_timestamp or 0) // 1000, names)


class Engine:
    """A loaded package and what serving it needs: request parsing, the model's lock, counters, the stop flag."""

    def __init__(self, packaged: PackagedModel, served: ServedVersion) -> None:
        self.packaged, self.served = packaged, served
        self.max_tokens, self.max_seconds = serving_limits()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.stats = {"requests": 0, "generations": 0, "cancelled": 0, "tokens": 0}
        self.stats_lock = threading.Lock()
        info, tokenizer = packaged.info, packaged.tokenizer
        self.chat: dict[str, Any] | None = info.get("chat")
        self.task = str(info["task"])
        self.generates = packaged.head.output == "text"  # a classifier or a scorer answers no text
        if not self.generates:
            self.stop_ids: list[int] = []
        elif self.chat:
            self.stop_ids = stop_ids(tokenizer, self.chat["end_of_turn"])
        else:
            self.stop_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.context = int(getattr(packaged.model.config, "max_position_embeddings", 0) or 0)
        self.default_tokens = int(info.get("generation", {}).get("max_new_tokens", 128 if self.chat else 40))

    def count(self, tokens: int, cancelled: bool) -> None:
        with self.stats_lock:
            self.stats["generations"] += 1
            self.stats["tokens"] += tokens
            self.stats["cancelled"] += int(cancelled)

    def shutdown(self) -> None:
        """Stop every running and queued generation (SIGTERM, Ctrl-C): each ends at its next token."""
        if not self.stopping.is_set():
            log.info("stopping: ending the running generations")
        self.stopping.set()

    def describe(self) -> dict[str, Any]:
        """The model as `/v1/models` lists it (OpenAI's fields, and adaptflow's own under `adaptflow`)."""
        served = self.served
        endpoints = ["/v1/completions"] if self.generates else []
        if self.chat:
            endpoints.insert(0, "/v1/chat/completions")
        return {
            "id": served.model_id,
            "object": "model",
            "created": served.created,
            "owned_by": "adaptflow",
            "adaptflow": {
                "model_uri": served.model_uri,
                "version": served.version,
                "task": self.task,
                "method": self.packaged.info.get("method"),
                "chat_template": self.chat["name"] if self.chat else None,
                "endpoints": endpoints,
                "max_tokens": self.max_tokens,
                "max_seconds": self.max_seconds,
            },
        }

    # ---- requests

    def _check_model(self, body: dict[str, Any], route: str) -> None:
        asked = body.get("model")
        if asked is not None and not isinstance(asked, str):
            raise _bad(f"model must be a string, got {asked!r}", "model")
        if asked is not None and asked not in self.served.names:
            raise ApiError(
                404, f"model {asked!r} is not served here; this server serves {self.served.model_id!r}", "model",
                "model_not_found",
            )  # fmt: skip
        what = f"{self.served.model_id} ({self.served.model_uri})"
        if not self.generates:
            answers = "labels" if self.packaged.head.output == "label" else "scores"
            raise _bad(
                f"{what} is a text classifier or scorer (task: {self.task}): it answers {answers}, not text, so "
                f"{route} cannot serve it; `adaptflow predict {self.served.model_uri} --text TEXT` answers"
            )
        if route == "/v1/chat/completions" and not self.chat:
            raise _bad(
                f"{what} is not an instruction model (task: {self.task}) and has no chat template: use /v1/completions"
            )

    def _sampling(self, body: dict[str, Any], stops: list[str]) -> Sampling:
        return Sampling(
            temperature=_number(body, "temperature", 0.0, 2.0, 1.0),
            top_p=_number(body, "top_p", 0.0, 1.0, 1.0, open_low=True),
            seed=_integer(body, "seed", -(2**63), 2**63 - 1, None),
            ignore_eos=_flag(body, "ignore_eos"),
            stops=stops,
        )

    def _limit(self, body: dict[str, Any], key: str, prompt: list[int]) -> int:
        """The answer's length: what the request asks (default: what the version was registered with), at most the
        server's cap and what the model's context leaves after the prompt."""
        asked = _integer(body, key, 1, None, None)
        limit = min(asked if asked is not None else self.default_tokens, self.max_tokens)
        if self.context:
            if len(prompt) >= self.context:
                raise _bad(f"the prompt is {len(prompt)} tokens; the model reads at most {self.context} (its context)")
            limit = min(limit, self.context - len(prompt))
        return limit

    def _choices(
        self, prompts: list[list[int]], body: dict[str, Any], key: str, stops: list[str], chat: bool
    ) -> list[Choice]:
        n = _integer(body, "n", 1, MAX_CHOICES, 1) or 1
        if len(prompts) * n > MAX_CHOICES:
            raise _bad(
                f"at most {MAX_CHOICES} choices per request (n times the prompts), asked {len(prompts) * n}", "n"
            )
        tokenizer = self.packaged.tokenizer
        choices: list[Choice] = []
        for prompt in prompts:
            limit = self._limit(body, key, prompt)
            for _ in range(n):
                # An answer is decoded with its special tokens, as `predict` decodes it, so the end of turn shows
                # and is cut like a stop string; a text completion is decoded as `predict --text` decodes it.
                streamer = TextIteratorStreamer(
                    tokenizer, skip_prompt=True, timeout=POLL_SECONDS, skip_special_tokens=not chat
                )
                cut = [*stops, self.chat["end_of_turn"], tokenizer.eos_token] if chat and self.chat else stops
                cutter = TextCutter([s for s in cut if s], strip=chat)
                choices.append(Choice(len(choices), prompt, limit, streamer, cutter))
        return choices

    def chat_job(self, body: dict[str, Any]) -> tuple[Job, bool, bool]:
        """A chat request as a job (not started), whether it streams, and whether it wants usage in the stream."""
        _check_fields(body, CHAT_FIELDS)
        self._check_model(body, "/v1/chat/completions")
        assert self.chat is not None
        messages = _messages(body.get("messages"))
        stops = _stops(body)
        prompt = chat_prompt_ids(self.packaged.tokenizer, self.chat, messages)
        # max_tokens is the older name of max_completion_tokens; an error names the one the client sent
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        return self._job(body, self._choices([prompt], body, key, stops, chat=True), stops)

    def completion_job(self, body: dict[str, Any]) -> tuple[Job, bool, bool]:
        """A text completion request as a job: each prompt continued as `predict --text` continues it."""
        _check_fields(body, COMPLETION_FIELDS)
        self._check_model(body, "/v1/completions")
        value = body.get("prompt")
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise _bad("prompt must be a string or a non-empty list of strings (token ids are not accepted)", "prompt")
        tokenizer = self.packaged.tokenizer
        prompts = [list(tokenizer(text)["input_ids"]) for text in texts]
        if any(not p for p in prompts):
            raise _bad("prompt: an empty prompt gives the model nothing to continue", "prompt")
        stops = _stops(body)
        return self._job(body, self._choices(prompts, body, "max_tokens", stops, chat=False), stops)

    def _job(self, body: dict[str, Any], choices: list[Choice], stops: list[str]) -> tuple[Job, bool, bool]:
        stream = _flag(body, "stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise _bad('stream_options must be {"include_usage": true|false}', "stream_options")
        if options and not stream:
            raise _bad("stream_options is only allowed with stream: true", "stream_options")
        sampling = self._sampling(body, stops)
        if self.stopping.is_set():
            raise ApiError(503, "the server is shutting down")
        with self.stats_lock:
            self.stats["requests"] += 1
        return Job(self, uuid.uuid4().hex[:24], choices, sampling), stream, bool(options.get("include_usage"))


# ---------------------------------------------------------------- the app


async def _wait(event: threading.Event) -> None:
    while not await anyio.to_thread.run_sync(event.wait, POLL_SECONDS, abandon_on_cancel=True):
        pass


async def _pieces(job: Job, choice: Choice, request: Request | None = None) -> AsyncIterator[str]:
    """The text of one choice as it is generated, cut at its first stop; with `request` (a non-streamed answer),
    the job is cancelled when its client disconnects. Returns once the choice's generation has ended."""

    def next_piece() -> str | None:
        try:
            return next(choice.streamer)
        except StopIteration:
            return None
        except queue.Empty:  # nothing yet: look up (client gone? server stopping?) and wait again
            return ""

    while (piece := await anyio.to_thread.run_sync(next_piece, abandon_on_cancel=True)) is not None:
        if request is not None and await request.is_disconnected():
            job.cancel("client disconnected")
        job.stopping()  # notices the server stopping while queued
        text = choice.cutter.feed(piece)
        choice.stop_seen = choice.stop_seen or choice.cutter.done
        if text:
            yield text
    if tail := choice.cutter.flush():
        yield tail
    await _wait(choice.generated)


def _usage(job: Job) -> dict[str, int]:
    prompts = {id(c.prompt): len(c.prompt) for c in job.choices}  # each prompt once, however many choices it has
    prompt_tokens, completion_tokens = sum(prompts.values()), sum(c.tokens for c in job.choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _finish_reason(choice: Choice) -> str:
    """Once its text is read: "stop" when a stop string cut it. The reader sees a stop string only as the text
    arrives, which can be after the generating thread decided on "length"."""
    return "stop" if choice.stop_seen else choice.finish_reason


def _ended_badly(job: Job) -> ApiError | None:
    if job.error:
        return ApiError(500, job.error)
    if job.cancelled == "server shutting down":
        return ApiError(503, "the server is shutting down; the generation was stopped")
    return None


async def _answer(engine: Engine, job: Job, chat: bool, request: Request) -> JSONResponse:
    texts: list[str] = []
    job.thread.start()
    try:
        for choice in job.choices:
            texts.append("".join([text async for text in _pieces(job, choice, request)]))
        await _wait(job.done)
    finally:
        job.cancel("client disconnected")  # a no-op when the job finished
    if error := _ended_badly(job):
        return error.response()
    served = engine.served
    if chat:
        choices: list[dict[str, Any]] = [
            {"index": c.index, "message": {"role": "assistant", "content": t}, "finish_reason": _finish_reason(c),
             "logprobs": None}
            for c, t in zip(job.choices, texts, strict=True)
        ]  # fmt: skip
    else:
        choices = [
            {"index": c.index, "text": t, "finish_reason": _finish_reason(c), "logprobs": None}
            for c, t in zip(job.choices, texts, strict=True)
        ]
    return JSONResponse(
        {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{job.request_id}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": served.model_id,
            "choices": choices,
            "usage": _usage(job),
        }
    )


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _stream(engine: Engine, job: Job, chat: bool, include_usage: bool) -> StreamingResponse:
    head = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{job.request_id}",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": engine.served.model_id,
    }

    def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
        return _event({**head, "choices": [choice], **({"usage": None} if include_usage else {})})

    async def events() -> AsyncIterator[str]:
        job.thread.start()
        try:
            for choice in job.choices:
                if chat:
                    yield chunk(choice.index, None, None, role=True)
                async for text in _pieces(job, choice):
                    yield chunk(choice.index, text, None)
                if error := _ended_badly(job):  # the status is sent: say it in the stream, as OpenAI does
                    yield _event(error.payload())
                    return
                yield chunk(choice.index, None, _finish_reason(choice))
            if include_usage:
                yield _event({**head, "choices": [], "usage": _usage(job)})
            yield "data: [DONE]\n\n"
        finally:
            # The client left (the response task is cancelled) or the stream ended: stop what still runs.
            job.cancel("client disconnected")

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def build_app(engine: Engine) -> FastAPI:
    """The FastAPI app serving `engine`'s model."""
    app = FastAPI(title="adaptflow serve-model", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return ApiError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _bad(f"invalid request: {exc.errors()[0].get('msg', 'malformed')}").response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return ApiError(500, f"internal error: {exc.__class__.__name__}").response()

    async def json_body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _bad(f"the request body is not JSON ({getattr(exc, 'msg', exc)})") from None
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        return body

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        job, stream, usage = engine.chat_job(await json_body(request))
        return _stream(engine, job, True, usage) if stream else await _answer(engine, job, True, request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        job, stream, usage = engine.completion_job(await json_body(request))
        return _stream(engine, job, False, usage) if stream else await _answer(engine, job, False, request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [engine.describe()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        if model not in engine.served.names:
            raise ApiError(404, f"model {model!r} is not served here; this server serves {engine.served.model_id!r}")
        return engine.describe()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        with engine.stats_lock:
            stats = dict(engine.stats)
        return {"status": "stopping" if engine.stopping.is_set() else "ok", "model": engine.served.model_id, **stats}

    return app


class _Server(uvicorn.Server):
    """uvicorn's server, which on SIGTERM / Ctrl-C also ends the running generations (uvicorn alone waits for every
    open response to finish, and a generation may run for minutes), and which says where it listens."""

    def __init__(self, config: uvicorn.Config, engine: Engine, announce: Callable[[str], None]) -> None:
        super().__init__(config)
        self.engine, self.announce = engine, announce

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.engine.shutdown()
        super().handle_exit(sig, frame)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and sockets:
            host, port = sockets[0].getsockname()[:2]
            self.announce(f"http://{host}:{port}/v1")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so a port in use is named at once.

    Raises:
        OSError: the address cannot be bound (in use, not this machine's).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def serve(engine: Engine, sock: socket.socket, announce: Callable[[str], None]) -> None:
    """Serve until SIGTERM / Ctrl-C (re-raised by uvicorn once it has shut down: the CLI's handler then exits)."""
    config = uvicorn.Config(build_app(engine), log_level="info", timeout_graceful_shutdown=5, lifespan="off")
    _Server(config, engine, announce).run(sockets=[sock])
