"""The README's commands work as pasted from the checkout's root: every `.venv/bin/adaptflow` line parses, names
files a fresh clone has and a config that validates with its --set overrides; the MLflow serve command is told the
project's store; the reference config validates."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from flows.cli import build_parser
from tasks.config import load_config, validate_config
from tasks.tracking import embedded_store

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def commands(block: str) -> list[list[str]]:
    """The block's command lines (continuations joined), split as the shell would, comments dropped."""
    joined = block.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip()]


ADAPTFLOW = [words for block in blocks("bash") for words in commands(block) if words[:1] == [".venv/bin/adaptflow"]]


def test_the_readme_has_adaptflow_commands_to_check() -> None:
    assert len(ADAPTFLOW) >= 10


@pytest.mark.parametrize("words", ADAPTFLOW, ids=[" ".join(w[1:3]) for w in ADAPTFLOW])
def test_every_adaptflow_command_parses_and_its_config_is_in_the_checkout(
    words: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = build_parser().parse_args(words[1:])
    config = getattr(args, "config", None)
    if config is not None:
        monkeypatch.chdir(ROOT)
        assert (ROOT / config).is_file(), f"{config} is not in the checkout"
        load_config(config, args.set)  # the overrides apply and the result validates


def test_the_serve_command_is_told_the_projects_store(monkeypatch: pytest.MonkeyPatch) -> None:
    serving = [block for block in blocks("bash") if "mlflow models serve" in block]
    assert serving
    for block in serving:
        before = block.split("mlflow models serve")[0]
        match = re.search(r"export MLFLOW_TRACKING_URI=sqlite:///(\S+)", before)
        assert match, "the block must point mlflow at the project's store before serving"
        monkeypatch.delenv("ADAPTFLOW_MLFLOW_DIR", raising=False)
        assert (ROOT / match.group(1)).resolve() == embedded_store() / "mlflow.db"


def test_the_reference_config_validates(monkeypatch: pytest.MonkeyPatch) -> None:
    (reference,) = [b for b in blocks("yaml") if "name_or_path: builtin:tiny" in b and "grid:" in b]
    raw = yaml.safe_load(reference)
    monkeypatch.chdir(ROOT)
    assert Path(raw["data"]["train"]).is_file()
    raw["instruction"] = None  # task causal_lm: the instruction section is documented beside it
    raw["data"] = {k: v for k, v in raw["data"].items() if k not in ("format", "columns", "role_map")}
    validate_config(raw)
