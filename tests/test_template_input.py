"""Chat templates from users (hostile round two): a template that drops the response, ignores the generation
prompt, is empty, raises or recurses is named (`instruction.template`) instead of training on a placeholder or
ending in a traceback; a relative template is found beside the config, before anything opens."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import write_config
from mlflow.tracking import MlflowClient

from flows.cli import main
from tasks.errors import UserInputError
from tasks.modeling import load_tokenizer, resolve_model
from tasks.objectives.instruction.chat import resolve_template
from tasks.objectives.instruction.settings import InstructionSettings

ROLE_TURNS = "{% for m in messages %}<{{ m['role'] }}>{{ CONTENT }}</s>{% endfor %}"
GENERATION = "{% if add_generation_prompt %}<assistant>{% endif %}"


@pytest.fixture
def tokenizer(tiny_model: str):  # type: ignore[no-untyped-def]
    from tasks.settings import ModelSettings

    return load_tokenizer(resolve_model(ModelSettings(name_or_path=tiny_model)))


def resolved(tokenizer, tmp_path: Path, source: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "t.jinja"
    path.write_text(source)
    return resolve_template(tokenizer, InstructionSettings(template=str(path)))


def test_a_template_that_never_writes_the_response_is_refused(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    redacted = ROLE_TURNS.replace(
        "{{ CONTENT }}", "{% if m['role'] == 'assistant' %}[redacted]{% else %}{{ m['content'] }}{% endif %}"
    )
    with pytest.raises(UserInputError) as refused:
        resolved(tokenizer, tmp_path, redacted + GENERATION)
    assert "instruction.template" in str(refused.value) and "does not write the assistant's message" in str(
        refused.value
    )
    # Writing it is enough: the end of turn is what follows the response, not a guess from the question.
    template = resolved(tokenizer, tmp_path, ROLE_TURNS.replace("{{ CONTENT }}", "{{ m['content'] }}") + GENERATION)
    assert template.end_of_turn == "</s>"


def test_a_template_that_ignores_the_generation_prompt_is_warned_about(
    tokenizer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    with caplog.at_level(logging.WARNING, logger="adaptflow.instruction"):
        resolved(tokenizer, tmp_path, ROLE_TURNS.replace("{{ CONTENT }}", "{{ m['content'] }}"))
    assert "ignores add_generation_prompt" in caplog.text and "assistant's header" in caplog.text


@pytest.mark.parametrize(
    ("source", "said"),
    [
        ("{{ 1 / 0 }}", "division by zero"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursion"),
        ("{{ messages[0]['missing'] }}{{ raise_exception('no system turn') }}", "no system turn"),
    ],
)
def test_a_template_that_raises_or_recurses_is_named(tokenizer, tmp_path: Path, source: str, said: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UserInputError) as refused:
        resolved(tokenizer, tmp_path, source)
    assert str(refused.value).startswith("instruction.template: template file:t.jinja cannot render")
    assert said in str(refused.value)


def test_a_relative_template_is_found_beside_the_config_and_a_missing_or_empty_one_is_named_at_once(
    tmp_path: Path, tiny_model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "data.jsonl").write_text('{"instruction": "Hi", "output": "Hello"}\n' * 4)
    config = write_config(
        folder / "c.yaml",
        model={"name_or_path": tiny_model},
        task="instruction",
        data={"train": "data.jsonl"},
        instruction={"template": "chat.jinja"},
    )
    from tasks.config import load_config

    (folder / "chat.jinja").write_text(ROLE_TURNS.replace("{{ CONTENT }}", "{{ m['content'] }}") + GENERATION)
    assert load_config(config).instruction.template == str(folder / "chat.jinja")  # type: ignore[union-attr]

    (folder / "chat.jinja").write_text("  \n")
    assert main(["run", str(config)]) == 2
    assert "chat.jinja is empty; it must be a Jinja chat template" in capsys.readouterr().err
    (folder / "chat.jinja").unlink()
    assert main(["run", str(config)]) == 2
    assert "instruction.template: file not found: chat.jinja" in capsys.readouterr().err
    client = MlflowClient()
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_sharegpt_turns_whose_from_is_not_a_string_are_named(tmp_path: Path) -> None:
    from tasks.objectives.instruction.chat import to_messages
    from tasks.settings import DataSettings

    rows = [{"conversations": [{"from": ["human"], "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}]
    with pytest.raises(UserInputError) as refused:
        to_messages(rows, DataSettings(train="x"), "data.train (x.jsonl)")
    assert "'from' must be a string, got list" in str(refused.value) and "row 1" in str(refused.value)


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ('[{"role": "assistant", "content": "Hi"}]', "no user turn for the model to answer"),
        ('[{"role": "robot", "content": "Hi"}]', "unknown role(s) ['robot']"),
    ],
)
def test_predict_messages_without_a_user_turn_is_named(value: str, said: str) -> None:
    from flows.cli import _conversation_arg

    with pytest.raises(UserInputError, match=r"^--messages: ") as refused:
        _conversation_arg(value)
    assert said in str(refused.value)


@pytest.mark.parametrize(
    ("section", "said"),
    [
        ({"train": {"learning_rate": float("inf")}}, "train.learning_rate: Input should be a finite number"),
        ({"train": {"max_steps": None, "epochs": float("inf")}}, "train.epochs: Input should be a finite number"),
        ({"train": {"max_steps": True}}, "train.max_steps: expected a number, got true"),
        ({"train": {"max_steps": 10**20}}, "train.max_steps: 100000000000000000000 is too large"),
        ({"method": {"r": True}}, "method.r: expected a number, got true"),
        (
            {"bias_probe": {"gate": {"max_stereotype_rise": float("nan")}}},
            "max_stereotype_rise: Input should be a finite",
        ),
    ],
)
def test_numbers_that_are_not_numbers_are_refused_by_key(section: dict, said: str) -> None:
    from tasks.config import validate_config

    with pytest.raises(UserInputError) as refused:
        validate_config({"data": {"train": "x"}, **section})
    assert said in str(refused.value)


def test_all_linear_on_a_model_without_linear_layers_is_a_named_error() -> None:
    from torch import nn

    from adapters_impl import MethodSettingsError
    from adapters_impl._peft import resolve_target_modules

    with pytest.raises(MethodSettingsError, match=r"method\.target_modules: all-linear, but this model has no linear"):
        resolve_target_modules(nn.Sequential(nn.Embedding(4, 2)), "all-linear", "method.target_modules")


def test_a_tokenizer_without_a_chat_template_gets_plain_with_a_notice(
    tokenizer, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    assert not tokenizer.chat_template
    with caplog.at_level(logging.WARNING, logger="adaptflow.instruction"):
        template = resolve_template(tokenizer, InstructionSettings())
    assert template.name == "plain" and "the tokenizer has no chat template; using plain" in caplog.text


def test_cli_small_gaps(capsys: pytest.CaptureFixture[str]) -> None:
    """--version, probe's default suite, and predict's --max-new-tokens checked as a number above 0."""
    from flows.cli import build_parser

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("adaptflow ")
    assert build_parser().parse_args(["probe", "models:/m@champion"]).suite == "default"
    assert build_parser().parse_args(["predict", "m", "--text", "x", "--max-new-tokens", "7"]).max_new_tokens == 7
    with pytest.raises(SystemExit):
        build_parser().parse_args(["predict", "m", "--text", "x", "--max-new-tokens", "0"])
    assert "expected a number above 0, got 0" in capsys.readouterr().err
