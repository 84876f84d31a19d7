"""`adaptflow serve-model`: the OpenAI Python client against the real command (a subprocess serving a registered
instruction model), and the request rules, the stop-string cutting and the classifier answer in process."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import mlflow
import openai
import pytest
from conftest import write_config
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from adapters_impl.packaged import PackagedModel, chat_prompt_ids, with_pad_token
from tasks.openai_server import MAX_CHOICES, Engine, ServedVersion, TextCutter, build_app

BIN = Path(sys.executable).parent
QUESTION = [{"role": "user", "content": "Which pet does Lily have?"}]
SERVER_MAX_TOKENS = 400  # the served model's context is 512: room for long generations below it


# ---------------------------------------------------------------- in process


@given(
    text=st.text(alphabet="ab <>/\n", max_size=40),
    stops=st.lists(st.text(alphabet="ab<>/", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=8),
    strip=st.booleans(),
)
def test_streamed_pieces_join_to_the_text_cut_before_its_first_stop(
    text: str, stops: list[str], cuts: list[int], strip: bool
) -> None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    expected = text[: min(found)] if found else text
    expected = expected.strip() if strip else expected
    cutter = TextCutter(stops, strip)
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    out = "".join(cutter.feed(text[a:b]) for a, b in itertools.pairwise(bounds)) + cutter.flush()
    assert out == expected
    assert cutter.done == bool(found)


def _served(name: str) -> ServedVersion:
    return ServedVersion(name, f"models:/{name}/1", "1", 0, {name, f"{name}/1"})


@pytest.fixture(scope="module")
def chat_app(tiny_model: str) -> Iterator[TestClient]:
    """The tiny base as an instruction package with the plain template (no training: the rules are the point)."""
    from tasks.objectives.instruction.chat import resolve_template
    from tasks.objectives.instruction.settings import InstructionSettings

    tokenizer = with_pad_token(AutoTokenizer.from_pretrained(tiny_model))
    template = resolve_template(tokenizer, InstructionSettings(template="plain"))
    chat = {"name": template.name, "source": template.source, "end_of_turn": template.end_of_turn}
    info = {"task": "instruction", "method": "lora", "chat": chat, "generation": {"max_new_tokens": 8}}
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    engine = Engine(PackagedModel(Path(tiny_model), info, model, tokenizer), _served("chat"))
    with TestClient(build_app(engine)) as client:
        yield client


def _error(response: httpx.Response) -> str:
    """The reason of an OpenAI-shaped error: one line, no traceback."""
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    message = body["error"]["message"]
    assert "\n" not in message and "Traceback" not in response.text
    return str(message)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"messages": []}, "messages must be a non-empty list"),
        ({"messages": "hi"}, "messages must be a non-empty list"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role must be one of"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content must be a string"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "no user turn"),
        ({"messages": QUESTION, "max_tokens": 0}, "max_tokens must be at least 1, got 0"),
        ({"messages": QUESTION, "max_tokens": -3}, "max_tokens must be at least 1, got -3"),
        ({"messages": QUESTION, "max_tokens": 2.5}, "max_tokens must be an integer"),
        ({"messages": QUESTION, "temperature": 3}, "temperature must be in [0.0, 2.0], got 3"),
        ({"messages": QUESTION, "top_p": 0}, "top_p must be in (0.0, 1.0], got 0"),
        ({"messages": QUESTION, "n": MAX_CHOICES + 1}, f"n must be between 1 and {MAX_CHOICES}"),
        ({"messages": QUESTION, "stop": ["a", "b", "c", "d", "e"]}, "stop must be a non-empty string or a list"),
        ({"messages": QUESTION, "stop": [""]}, "stop must be a non-empty string"),
        ({"messages": QUESTION, "stream": "yes"}, "stream must be true or false"),
        ({"messages": QUESTION, "stream_options": {"include_usage": True}}, "only allowed with stream: true"),
        ({"messages": QUESTION, "logprobs": True}, "logprobs is not supported by this server"),
        ({"messages": QUESTION, "tools": [{"type": "function"}]}, "tools is not supported"),
        ({"messages": QUESTION, "model": "gpt-4o"}, "model 'gpt-4o' is not served here"),
    ],
)
def test_bad_chat_requests_get_one_line_reasons(chat_app: TestClient, body: dict[str, Any], reason: str) -> None:
    response = chat_app.post("/v1/chat/completions", json=body)
    assert response.status_code == (404 if "model" in body else 400)
    assert reason in _error(response)


def test_bad_bodies_and_completion_requests_get_one_line_reasons(chat_app: TestClient) -> None:
    for content, reason in [(b"{not json", "not JSON"), (b"[1, 2]", "must be a JSON object")]:
        response = chat_app.post("/v1/chat/completions", content=content)
        assert response.status_code == 400 and reason in _error(response)
    for body, reason in [
        ({"prompt": [1, 2, 3]}, "prompt must be a string or a non-empty list of strings"),
        ({"prompt": ""}, "an empty prompt"),
        ({"prompt": "x" * 2000}, "the model reads at most 512"),
        ({"prompt": ["a", "b", "c"], "n": 3}, f"at most {MAX_CHOICES} choices per request"),
        ({"prompt": "a", "echo": True}, "echo is not supported"),
    ]:
        response = chat_app.post("/v1/completions", json=body)
        assert response.status_code == 400 and reason in _error(response), body
    assert chat_app.get("/v1/nowhere").status_code == 404
    # Defaults that clients send for parameters they do not use are accepted.
    fine = chat_app.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "echo": False, "best_of": 1})
    assert fine.status_code == 200 and fine.json()["usage"]["completion_tokens"] <= 2


def test_a_classifier_is_listed_but_completions_say_it_answers_labels(tiny_model: str) -> None:
    tokenizer = with_pad_token(AutoTokenizer.from_pretrained(tiny_model))
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2).eval()
    info = {"task": "classification", "method": "full", "label_names": ["neg", "pos"]}
    engine = Engine(PackagedModel(Path(tiny_model), info, model, tokenizer), _served("reviews"))
    with TestClient(build_app(engine)) as client:
        (listed,) = client.get("/v1/models").json()["data"]
        assert listed["id"] == "reviews" and listed["adaptflow"]["task"] == "classification"
        assert listed["adaptflow"]["endpoints"] == []
        for route, body in [("/v1/chat/completions", {"messages": QUESTION}), ("/v1/completions", {"prompt": "a"})]:
            response = client.post(route, json=body)
            assert response.status_code == 400
            assert "is a text classifier or scorer (task: classification): it answers labels" in _error(response)


def test_a_base_language_model_has_completions_but_no_chat(tiny_model: str) -> None:
    tokenizer = with_pad_token(AutoTokenizer.from_pretrained(tiny_model))
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    info = {"task": "causal_lm", "method": "lora"}
    engine = Engine(PackagedModel(Path(tiny_model), info, model, tokenizer), _served("stories"))
    with TestClient(build_app(engine)) as client:
        response = client.post("/v1/chat/completions", json={"messages": QUESTION})
        assert response.status_code == 400 and "not an instruction model" in _error(response)
        done = client.post("/v1/completions", json={"prompt": "Once", "max_tokens": 3, "temperature": 0})
        assert done.status_code == 200 and done.json()["choices"][0]["finish_reason"] in ("stop", "length")


# ---------------------------------------------------------------- the real command


def _start(store: str, log: Path, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    """`adaptflow serve-model ARGS --port 0` as a user starts it; (process, base URL) once it listens."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "ADAPTFLOW_SERVE_MAX_TOKENS": str(SERVER_MAX_TOKENS)}
    with log.open("w") as out:
        server = subprocess.Popen(
            [str(BIN / "adaptflow"), "serve-model", *args, "--port", "0"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 180
    while not (found := re.search(r"at (http://\S+/v1) ", log.read_text())):
        assert server.poll() is None and time.monotonic() < deadline, f"did not start: {log.read_text()[-3000:]}"
        time.sleep(0.3)
    return server, found.group(1)


def _stop(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(30)


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory, tiny_model: str) -> dict[str, Any]:
    """A LoRA instruction version of the tiny model, trained enough to answer in words, in its own store."""
    from test_instruction_task import CONVERSATIONS

    folder = tmp_path_factory.mktemp("serve-model")
    store = f"sqlite:///{folder / 'mlflow.db'}"
    data = folder / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    config = write_config(
        folder / "instruct.yaml",
        model={"name_or_path": tiny_model},
        task="instruction",
        data={"train": str(data), "max_length": 96, "eval_fraction": 0.2},
        instruction={"eval_generations": 2, "max_new_tokens": 12},
        method={"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
        train={"max_steps": 24, "batch_size": 8, "learning_rate": 2e-2, "save_steps": 24, "logging_steps": 12},
        registry={"name": "chat"},
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "ADAPTFLOW_MLFLOW_DIR": str(folder / "mlflow")}
    done = subprocess.run(
        [str(BIN / "adaptflow"), "run", str(config), "--json"], env=env, cwd=folder, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return {"store": store, "folder": folder}


@pytest.fixture(scope="module")
def server(registered: dict[str, Any]) -> Iterator[dict[str, Any]]:
    log = registered["folder"] / "serve.log"
    process, url = _start(registered["store"], log, "--name", "chat")
    try:
        yield {"url": url, "log": log, "client": openai.OpenAI(base_url=url, api_key="unused", max_retries=0)}
    finally:
        _stop(process)


def _health(url: str) -> dict[str, Any]:
    return dict(httpx.get(url.removesuffix("/v1") + "/health").json())


@pytest.mark.slow
def test_chat_greedy_answers_what_predict_answers_and_streams_the_same(
    server: dict[str, Any], registered: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    client: openai.OpenAI = server["client"]
    (model,) = client.models.list().data
    assert model.id == "chat" and model.model_extra and model.model_extra["adaptflow"]["model_uri"] == "models:/chat/1"
    reply = client.chat.completions.create(model="chat", messages=QUESTION, temperature=0, max_tokens=12)
    (choice,) = reply.choices
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["store"])
    mlflow.set_tracking_uri(registered["store"])
    mlflow.set_registry_uri(registered["store"])
    python_model = mlflow.pyfunc.load_model("models:/chat/1").unwrap_python_model()
    predicted = python_model.predict(None, QUESTION, {"max_new_tokens": 12})[0]
    assert predicted.strip(), "the fixture's model answers in words: the comparison means something"
    assert choice.message.content == predicted, "served = predicted (same package, template and encoding)"
    prompt_ids = chat_prompt_ids(python_model.tokenizer, python_model.info["chat"], QUESTION)
    assert reply.usage is not None and reply.usage.prompt_tokens == len(prompt_ids)
    assert 0 < reply.usage.completion_tokens <= 12

    stream = client.chat.completions.create(
        model="chat", messages=QUESTION, temperature=0, max_tokens=12, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2, "streamed in pieces"
    assert text == predicted
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


@pytest.mark.slow
def test_completion_n_seed_stop_and_the_server_cap(server: dict[str, Any]) -> None:
    client: openai.OpenAI = server["client"]
    prompt = "Which pet does Tom have?"
    greedy = {"model": "chat", "prompt": prompt, "temperature": 0, "max_tokens": 16, "extra_body": {"ignore_eos": True}}
    text = client.completions.create(**greedy).choices[0].text  # type: ignore[call-overload]
    assert len(text) >= 6, text
    stop = text[3:5]  # a stop string from the middle of what the model writes
    cut = client.completions.create(**greedy, stop=[stop, "\x00"])  # type: ignore[call-overload]
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"

    asked = {"model": "chat", "prompt": prompt, "max_tokens": 10, "n": 2, "seed": 7, "temperature": 1.0}
    first, again = client.completions.create(**asked), client.completions.create(**asked)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices], "the seed makes sampling repeatable"
    assert first.choices[0].text != first.choices[1].text, "two samples, not one copied"
    assert first.usage is not None and first.usage.completion_tokens <= 20

    chat = client.chat.completions.create(model="chat", messages=QUESTION, n=2, max_tokens=6, seed=1)
    assert [c.index for c in chat.choices] == [0, 1]

    capped = client.completions.create(
        model="chat", prompt=prompt, max_tokens=1_000_000_000, extra_body={"ignore_eos": True}
    )
    assert capped.usage is not None and capped.usage.completion_tokens == SERVER_MAX_TOKENS
    assert capped.choices[0].finish_reason == "length"

    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="chat", messages=QUESTION, max_tokens=0)
    assert refused.value.status_code == 400 and "max_tokens must be at least 1, got 0" in refused.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)


@pytest.mark.slow
def test_a_client_that_leaves_stops_its_generation(server: dict[str, Any]) -> None:
    client: openai.OpenAI = server["client"]
    url, log = server["url"], server["log"]
    long = {"model": "chat", "prompt": "x", "max_tokens": SERVER_MAX_TOKENS, "n": MAX_CHOICES}
    before = _health(url)
    stream = client.completions.create(**long, stream=True, extra_body={"ignore_eos": True})
    for number, _ in enumerate(stream):
        if number == 2:
            break
    stream.close()  # the client leaves after three chunks of up to 8 x 400 tokens
    deadline = time.monotonic() + 30
    while (now := _health(url))["cancelled"] == before["cancelled"]:
        assert time.monotonic() < deadline, f"no generation was cancelled: {now}"
        time.sleep(0.2)
    assert now["tokens"] - before["tokens"] < SERVER_MAX_TOKENS, "stopped within its first choice, none after"
    (stopped,) = re.findall(r"stopped early \(client disconnected\) after (\d+) of at most (\d+)", log.read_text())
    assert int(stopped[0]) < int(stopped[1]) == SERVER_MAX_TOKENS

    # A non-streamed request whose client gives up (a timeout) stops too.
    before = now
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{url}/completions", json={**long, "ignore_eos": True}, timeout=0.5)
    while (now := _health(url))["cancelled"] == before["cancelled"]:
        assert time.monotonic() < deadline + 30, f"the abandoned request ran on: {now}"
        time.sleep(0.2)
    assert now["tokens"] - before["tokens"] < MAX_CHOICES * SERVER_MAX_TOKENS
    quick = client.completions.create(model="chat", prompt="x", max_tokens=2)
    assert quick.choices[0].finish_reason in ("stop", "length"), "the model is free again"


@pytest.mark.slow
def test_sigterm_mid_request_ends_the_generation_and_the_server(registered: dict[str, Any]) -> None:
    log = registered["folder"] / "serve-term.log"
    process, url = _start(registered["store"], log, "models:/chat/1")
    try:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        stream = client.completions.create(
            model="chat", prompt="x", max_tokens=SERVER_MAX_TOKENS, n=MAX_CHOICES, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        with pytest.raises(openai.APIError, match="shutting down"):
            for number, _ in enumerate(stream):
                if number == 2:
                    os.kill(process.pid, signal.SIGTERM)
                    sent = time.monotonic()
        process.wait(20)
        assert time.monotonic() - sent < 10, "the server stopped promptly"
    finally:
        _stop(process)
    assert process.returncode == 0, log.read_text()[-3000:]
    text = log.read_text()
    (stopped,) = re.findall(r"stopped early \(server shutting down\) after (\d+) of at most (\d+)", text)
    assert int(stopped[0]) < int(stopped[1])
    assert "adaptflow serve-model: stopped" in text and "Traceback" not in text


@pytest.mark.slow
def test_bad_command_lines_exit_2_naming_what_is_wrong(registered: dict[str, Any], tmp_path: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["store"]}

    def serve_model(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "adaptflow"), "serve-model", *args], env=env, capture_output=True, text=True, timeout=300
        )

    neither = serve_model()
    assert neither.returncode == 2 and "give MODEL_URI" in neither.stderr
    missing = serve_model("--name", "nothing-here", "--port", "0")
    assert missing.returncode == 2 and "MODEL_URI: models:/nothing-here@champion" in missing.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = serve_model("--name", "chat", "--port", str(taken.getsockname()[1]))
    assert busy.returncode == 2 and "cannot listen on 127.0.0.1" in busy.stderr
    assert "Traceback" not in neither.stderr + missing.stderr + busy.stderr
