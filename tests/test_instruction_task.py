"""`task: instruction` as a run: config rules, the answer metrics against their sources, generation that stops at
the end of turn, and end to end (real Prefect, MLflow store and registry, `mlflow models serve`)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import write_config
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from tasks.config import RunConfig, validate_config
from tasks.errors import UserInputError
from tasks.generation import generate_from_ids
from tasks.objectives import OBJECTIVES
from tasks.objectives.instruction.objective import answer_scores

BIN = Path(sys.executable).parent

CONVERSATIONS = [
    [
        {"role": "system", "content": "You answer about pets."},
        {"role": "user", "content": f"Which pet does {name} have?"},
        {"role": "assistant", "content": f"{name} has a {pet}."},
        {"role": "user", "content": "Where do they play?"},
        {"role": "assistant", "content": f"In the {place}."},
    ]
    for name, pet, place in [
        (n, p, pl)
        for n in ("Lily", "Tom", "Mia", "Ben", "Sara")
        for p in ("cat", "dog", "bird")
        for pl in ("park", "garden")
    ]
]


def config(**sections: object) -> RunConfig:
    return validate_config({"data": {"train": "x.jsonl"}, **sections})


def test_instruction_settings_are_refused_for_other_tasks_and_packing_where_it_cannot_work() -> None:
    assert config(task="instruction").task_options()["template"] == "tokenizer"
    cases = {
        "data.format: only task instruction or preference reads it": {"data": {"train": "x.jsonl", "format": "alpaca"}},
        "instruction: only task instruction reads this section": {"instruction": {"loss_on": "last"}},
        "train.packing: not supported with method prefix": {
            "task": "instruction",
            "method": {"name": "prefix"},
            "train": {"packing": True},
        },
        "train.packing: a classifier scores one row": {"task": "classification", "train": {"packing": True}},
        "method.name: 'head' cannot do task 'instruction'": {"task": "instruction", "method": {"name": "head"}},
    }
    for expected, sections in cases.items():
        with pytest.raises(UserInputError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            config(**sections)
    assert config(task="instruction", train={"packing": True}).train.packing


def test_rouge_l_and_exact_match_against_a_hand_worked_example() -> None:
    # ROUGE-L F1 as rouge-score defines it: tokens lower-cased, punctuation dropped, no stemming.
    # "the cat sat" vs "the cat sat on the mat": LCS 3, precision 3/3, recall 3/6, F1 = 2*1*0.5/1.5 = 2/3.
    # "A kind bird." vs "a kind  bird": LCS 3 of 3 and 3, F1 = 1. Mean: (2/3 + 1) / 2 = 5/6.
    # Exact match compares whitespace-collapsed text: only the second pair ("A kind  bird." = "A kind bird.").
    scores = answer_scores(["the cat sat", "A kind bird."], ["the cat sat on the mat", "A kind  bird."])
    assert scores["eval_rouge_l"] == pytest.approx(5 / 6)
    assert scores["eval_exact_match"] == pytest.approx(0.5)
    assert answer_scores([], []) == {}


@pytest.mark.parametrize(
    "answer",
    ["猫坐在垫子上。", "القطة جلست على الحصيرة", "Η γάτα κάθισε στο χαλί.", "बिल्ली चटाई पर बैठी", "ねこがすわった"],
)
def test_an_exact_answer_in_any_script_scores_rouge_l_one(answer: str) -> None:
    assert answer_scores([answer], [answer]) == {"eval_rouge_l": 1.0, "eval_exact_match": 1.0}
    half = answer_scores([answer[: len(answer) // 2]], [answer])["eval_rouge_l"]
    assert 0.0 < half < 1.0  # a partial answer scores part, not 0 (rouge-score's own tokenizer gave 0 to all)


def test_rouge_l_tokens_are_rouge_scores_own_on_ascii_text() -> None:
    from rouge_score import rouge_scorer, tokenize

    from tasks.objectives.instruction.objective import WordTokens

    texts = ["It's 3 o'clock, Mr. Smith_Jones!", "the CAT sat -- on the mat...", "x2y snake_case  tabs\tand\nlines"]
    reference = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    for text in texts:
        assert WordTokens().tokenize(text) == tokenize.tokenize(text, None)
        pred = text.split()[0] + " " + text
        assert answer_scores([pred], [text])["eval_rouge_l"] == reference.score(text, pred)["rougeL"].fmeasure


def test_generation_stops_at_the_end_of_turn_token_batched_and_left_padded(tiny_model: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    word, eos = 10, int(tokenizer.eos_token_id)
    script = [word, word, eos, word]  # the answer the model is made to give: two words, end of turn, one more

    def scripted(module: torch.nn.Module, inputs: object, logits: torch.Tensor) -> torch.Tensor:
        step = scripted.calls  # type: ignore[attr-defined]
        scripted.calls += 1  # type: ignore[attr-defined]
        forced = torch.full_like(logits, -1e4)
        forced[:, -1, script[min(step, len(script) - 1)]] = 0.0
        return forced

    scripted.calls = 0  # type: ignore[attr-defined]
    model.lm_head.register_forward_hook(scripted)
    prompts = [[1, 20, 21, 22], [1, 23]]  # different lengths: the second is left-padded
    out = generate_from_ids(model, int(tokenizer.pad_token_id), prompts, max_new_tokens=10, stop_ids=[eos])
    assert out == [[word, word, eos], [word, word, eos]], "each answer ends at its first end-of-turn token"
    assert scripted.calls == 3, "generation stops once every row has ended"  # type: ignore[attr-defined]


def adaptflow(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it (its own process: MLflow, Prefect and logging set up as in real use)."""
    return subprocess.run([str(BIN / "adaptflow"), *args], capture_output=True, text=True, timeout=900)


def served(port: int, request: dict) -> tuple[int, str]:
    """POST a request to a model server: (HTTP status, body)."""
    post = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(request).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(post, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_probe_asks_an_instruction_model_each_rule_prompt_as_a_user_turn(
    tiny_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A base model continues "The nurse said"; an instruction model is asked it, in its template, and its answer
    # ends at the end of turn. Pairs are sentence likelihoods either way (CrowS-Pairs' scoring).
    from tasks import generation
    from tasks.objectives import get_objective
    from tasks.probe.suites import RuleCategory, Suite
    from tasks.settings import ProbeSettings

    seen: list[tuple[str, list[int]]] = []
    real = generation.generate

    def recording(model, tokenizer, prompts, settings, sample, style=generation.RAW_TEXT):  # type: ignore[no-untyped-def]
        assert style.encode is not None, "raw text reached an instruction model"
        seen.extend((tokenizer.decode(style.encode(p)), list(style.stop_ids)) for p in prompts)
        return real(model, tokenizer, prompts, settings, sample, style)

    monkeypatch.setattr("tasks.probe.scoring.generate", recording)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    suite = Suite(name="s", rules=[RuleCategory(category="c", prompts=["The nurse said"], forbidden_words=["x"])])
    settings = ProbeSettings(max_new_tokens=4)
    result = get_objective("instruction").probe(model, tokenizer, suite, settings, None, None, {"template": "plain"})
    ((text, stops),) = seen
    assert text.endswith("### Instruction:\nThe nurse said\n\n### Response:\n") and text.count("<s>") <= 1
    assert stops == [tokenizer.eos_token_id]
    assert result["rules"]["cases"] == 1


@pytest.mark.slow
def test_messages_data_trains_registers_predicts_and_serves_chat(
    tmp_path: Path, tiny_model: str, mlflow_store: str
) -> None:
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    run_config = write_config(
        tmp_path / "instruct.yaml",
        model={"name_or_path": tiny_model},
        task="instruction",
        data={"train": str(data), "max_length": 96, "eval_fraction": 0.2},
        instruction={"eval_generations": 4, "max_new_tokens": 12},
        method={"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
        train={"max_steps": 8, "batch_size": 8, "learning_rate": 5e-3, "save_steps": 8, "logging_steps": 4},
        registry={"name": "chat"},
    )
    done = adaptflow("run", str(run_config), "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["task"] == "instruction"
    metrics = result["metrics"]
    for key in ("eval_loss", "base_eval_loss", "eval_token_accuracy", "eval_rouge_l", "base_eval_rouge_l"):
        assert isinstance(metrics[key], float), key
    assert metrics["eval_loss"] < metrics["base_eval_loss"]
    assert metrics["sft_dropped_rows"] == 0
    run = MlflowClient().get_run(result["run_id"])
    assert run.data.params["sft.template"] == "plain"  # the tiny tokenizer has no chat template of its own
    predictions = [json.loads(line) for line in (Path(result["run_dir"]) / "reports" / "predictions.jsonl").open()]
    assert len(predictions) == 4 and {"prompt", "reference", "base", "tuned"} <= set(predictions[0])
    assert predictions[0]["prompt"].endswith("### Response:\n")

    question = json.dumps(CONVERSATIONS[0][:2])
    done = adaptflow("predict", "models:/chat@champion", "--messages", question, "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])["predictions"][0]
    assert "###" not in answer and "</s>" not in answer, "predict returns the response only"
    shown = adaptflow("predict", "models:/chat@champion", "--messages", question, "--max-new-tokens", "2")
    assert shown.returncode == 0, shown.stderr[-3000:]
    printed = shown.stdout.strip().splitlines()  # the answer as text (2 tokens may be blank), not a repr
    assert printed[0] == f"> {json.loads(question)[-1]['content']}" and " -> " not in shown.stdout

    # The logged model's signature (shown in MLflow's UI) takes what the README documents, through MLflow's
    # enforcement of it: a chat request, a DataFrame of prompts; predict's length is its param's default.
    import mlflow
    import pandas as pd
    from mlflow.models import Model

    signature = Model.load("models:/chat@champion").signature
    assert signature.inputs.input_names() == ["messages", "prompt", "max_tokens"]
    assert [(p.name, p.default) for p in signature.params.params] == [("max_new_tokens", 12)]
    pyfunc = mlflow.pyfunc.load_model("models:/chat@champion")
    completion = pyfunc.predict({"messages": CONVERSATIONS[0][:2]})
    assert completion["object"] == "chat.completion" and completion["choices"][0]["message"]["content"] == answer
    prompts = pyfunc.predict(pd.DataFrame({"prompt": [CONVERSATIONS[0][1]["content"]]}), {"max_new_tokens": 2})
    assert isinstance(prompts, list) and len(prompts) == 1 and isinstance(prompts[0], str)

    port, log = free_port(), (tmp_path / "serve.log").open("w")
    # The server starts uvicorn from PATH, as in an activated environment.
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env["ADAPTFLOW_SERVE_MAX_TOKENS"] = "16"  # the server's bound on any request
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", "models:/chat@champion", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        request = {"messages": CONVERSATIONS[0][:2], "max_tokens": 12}  # predict's length (instruction.max_new_tokens)
        deadline, reply = time.monotonic() + 240, None
        while reply is None:
            try:
                post = urllib.request.Request(
                    f"http://127.0.0.1:{port}/invocations",
                    data=json.dumps(request).encode(),
                    headers={"Content-Type": "application/json"},
                )
                reply = json.loads(urllib.request.urlopen(post, timeout=60).read())
            except OSError:
                started = server.poll() is None and time.monotonic() < deadline
                assert started, f"mlflow models serve did not start: {(tmp_path / 'serve.log').read_text()[-3000:]}"
                time.sleep(2)
        bounded = served(port, {"messages": CONVERSATIONS[0][:2], "max_tokens": 1_000_000_000})
        refusals = [
            served(port, {"messages": CONVERSATIONS[0][:2], "max_tokens": 0}),
            served(port, {"messages": CONVERSATIONS[0][:2], "max_tokens": -3}),
            served(port, {"messages": "not a conversation"}),  # refused by MLflow's enforcement of the signature
            served(port, {"messages": [{"role": "assistant", "content": "Hi"}]}),
        ]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
            server.wait(30)
    assert bounded[0] == 200 and json.loads(bounded[1])["usage"]["completion_tokens"] <= 16
    for (status, body), reason in zip(
        refusals,
        ["max_tokens must be a positive integer, got 0", "got -3", "Expected data to be list", "no user turn"],
        strict=True,
    ):
        assert status == 400 and reason in body, body[:500]
        assert "Traceback" not in body and "stack_trace" not in body
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": answer}, "served = predicted"
    assert 0 < reply["usage"]["completion_tokens"] <= 12

    # A row without a response: exit 2 naming the file and the row, and nothing registered.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        "".join(json.dumps({"instruction": f"Say {i}.", "output": str(i) if i != 3 else ""}) + "\n" for i in range(8))
    )
    done = adaptflow("run", str(run_config), "--set", f"data.train={bad}", "--set", "registry.name=chat-bad")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "row 4 has an empty response" in done.stderr
    assert not MlflowClient().search_registered_models("name = 'chat-bad'")


def test_held_out_prompts_are_cut_and_dropped_as_training_cuts_its_rows(tmp_path: Path, tiny_model: str) -> None:
    """A held-out prompt longer than data.max_length was generated whole (minutes of eval; past the model's
    context, a crash) and scored although the loss dropped its row."""
    from datasets import load_from_disk

    from tasks.load import load_data
    from tasks.modeling import load_tokenizer, resolve_model
    from tasks.objectives.instruction.chat import encode_prompt
    from tasks.objectives.instruction.objective import _prompt, held_out, template_of
    from tasks.settings import DataSettings, ModelSettings
    from tasks.tokenization import tokenize_dataset

    words = " ".join(f"word{i}" for i in range(120))
    rows = [
        {"instruction": "Say hi.", "output": "Hi."},
        {"instruction": f"Read this: {words}. Say hi.", "output": "Hi."},  # long prompt: cut, kept
        {"instruction": "Say many words.", "output": words},  # long answer: dropped, as from the loss
        {"instruction": "Say bye.", "output": "Bye."},
    ]
    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:1] + rows[3:]))
    evaluation.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = resolve_model(ModelSettings(name_or_path=tiny_model))
    settings = DataSettings(train=str(train), eval=str(evaluation), max_length=48)
    data = load_data(settings, OBJECTIVES["instruction"], tmp_path / "data")
    options = {"template": "plain", "loss_on": "assistant", "eval_generations": 8, "max_new_tokens": 8}
    tokenized = tokenize_dataset(data, source, "instruction", 48, tmp_path / "tok", options)
    tokenizer = load_tokenizer(source)

    kept = held_out(tokenized, tokenizer)
    everything = list(load_from_disk(data.eval_dir)["messages"])
    assert len(everything) == 4 and len(kept) == 3
    assert all(words not in c[-1]["content"] for c in kept), "the row training drops is not scored"
    template = template_of(tokenizer, tokenized.options)
    for conversation in kept:
        prompt = _prompt(conversation, tokenizer, tokenized)
        assert prompt is not None and len(prompt) < 48
        if words in conversation[0]["content"]:
            assert len(encode_prompt(conversation, tokenizer, template)) > 48  # whole, it would not have fit


def test_a_max_length_beyond_the_models_context_is_named_before_anything_opens(
    tmp_path: Path, tiny_model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "Hi", "output": "Hello"}) + "\n")
    config = write_config(
        tmp_path / "c.yaml",
        model={"name_or_path": tiny_model},
        task="instruction",
        data={"train": str(data), "max_length": 4096},
    )
    assert main(["run", str(config), "--json"]) == 2
    err = capsys.readouterr().err
    assert "data.max_length: 4096 is beyond the context of model" in err and "max_position_embeddings 512" in err
    client = MlflowClient()
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
