"""Serving latency of `adaptflow serve-model`'s app on the real model: time to the first streamed token and decode
tokens per second through the OpenAI client over HTTP, next to `model.generate` alone on the same prompt (what
the server adds).

    python -m benchmarks.serving [--repeats 5] [--tokens 64]

The base `builtin:smollm2-135m-instruct` is served as an instruction package with its own chat template (the
server's work does not depend on adapter weights once they are merged). Greedy, `ignore_eos`, so every request
generates exactly `--tokens` tokens. Prints a JSON object; measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch
import uvicorn
from openai import OpenAI
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters_impl.packaged import PackagedModel, chat_prompt_ids, with_pad_token
from tasks.modeling import builtin_model_path
from tasks.objectives.instruction.chat import resolve_template
from tasks.objectives.instruction.settings import InstructionSettings
from tasks.openai_server import Engine, ServedVersion, build_app

QUESTION = [{"role": "user", "content": "Give three tips for staying healthy."}]


def run(repeats: int = 5, tokens: int = 64) -> dict[str, Any]:
    """The section of benchmarks/results.json: `repeats` requests of `tokens` tokens each way, after a warm-up."""
    args = argparse.Namespace(repeats=repeats, tokens=tokens)
    load_before = os.getloadavg()
    folder = builtin_model_path("smollm2-135m-instruct")
    tokenizer = with_pad_token(AutoTokenizer.from_pretrained(folder))
    template = resolve_template(tokenizer, InstructionSettings(template="tokenizer"))
    chat = {"name": template.name, "source": template.source, "end_of_turn": template.end_of_turn}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    info = {"task": "instruction", "method": "lora", "chat": chat}
    engine = Engine(
        PackagedModel(Path(folder), info, model, tokenizer), ServedVersion("real", "models:/real/1", "1", 0, {"real"})
    )

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(engine), log_level="warning", lifespan="off"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    request: dict[str, Any] = {"model": "real", "messages": QUESTION, "temperature": 0, "max_tokens": args.tokens}

    # model.generate alone: the same prompt, the same number of tokens
    ids = torch.tensor([chat_prompt_ids(tokenizer, chat, QUESTION)])
    direct = []
    for _ in range(args.repeats + 1):
        started = time.perf_counter()
        with torch.no_grad():
            model.generate(  # type: ignore[operator]
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens,
                min_new_tokens=args.tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        direct.append(args.tokens / (time.perf_counter() - started))
    first, rates, whole = [], [], []
    for number in range(args.repeats + 1):  # the first is a warm-up
        started = time.perf_counter()
        stream = client.chat.completions.create(
            **request, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}
        )
        arrived, tokens = None, 0
        for chunk in stream:
            if arrived is None and chunk.choices and chunk.choices[0].delta.content:
                arrived = time.perf_counter()
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        ended = time.perf_counter()
        started_plain = time.perf_counter()
        client.chat.completions.create(**request, extra_body={"ignore_eos": True})
        if number and arrived is not None:
            first.append(arrived - started)
            rates.append((tokens - 1) / (ended - arrived))
            whole.append(time.perf_counter() - started_plain)
    server.should_exit = True
    result = {
        "model": "builtin:smollm2-135m-instruct (fp32, CPU)",
        "torch_threads": torch.get_num_threads(),
        "prompt_tokens": int(ids.shape[1]),
        "tokens": args.tokens,
        "repeats": args.repeats,
        "first_token_seconds_median": round(statistics.median(first), 4),
        "stream_tokens_per_second_median": round(statistics.median(rates), 1),
        "non_streamed_request_seconds_median": round(statistics.median(whole), 3),
        "generate_alone_tokens_per_second_median": round(statistics.median(direct[1:]), 1),
        "first_token_seconds": [round(v, 4) for v in first],
        "stream_tokens_per_second": [round(v, 1) for v in rates],
        "generate_alone_tokens_per_second": [round(v, 1) for v in direct[1:]],
        "load": {"before": [round(v, 2) for v in load_before], "after": [round(v, 2) for v in os.getloadavg()]},
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    print(json.dumps(run(args.repeats, args.tokens), indent=2))


if __name__ == "__main__":
    main()
