"""A registered model as a run's base (`model.name_or_path: models:/NAME@ALIAS | models:/NAME/VERSION`): URI checks
in the config, resolution against a real MLflow registry (what exists is named; an alias is pinned once), and the
SFT champion -> DPO challenger chain end to end through the CLI (lineage tags, predict in a fresh process, an
unknown alias exiting 2 with nothing registered)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_config
from mlflow.tracking import MlflowClient
from test_preference import PAIRS, adaptflow, write_rows
from transformers import AutoModelForCausalLM

from adapters_impl.packaged import download_registered
from flows.pipeline import pin_parent
from tasks.config import validate_config
from tasks.errors import UserInputError
from tasks.parents import PINNED_VARIABLE, check_parent, resolve_version
from tasks.settings import parse_registered
from tasks.tracking import resumed_parent_version, start_run


def test_registry_uris_parse_and_bad_ones_name_the_key() -> None:
    assert parse_registered("models:/chat@champion") == ("chat", "champion", None)
    assert parse_registered("models:/chat/3") == ("chat", None, "3")
    config = validate_config({"model": {"name_or_path": "models:/chat@champion"}, "data": {"train": "x.jsonl"}})
    assert config.model.registered
    for bad in ("models:/chat", "models:/chat/latest", "models:/@champion", "models:/a/b/3"):
        with pytest.raises(UserInputError, match=r"model\.name_or_path: expected models:/NAME@ALIAS or models:/NAME"):
            validate_config({"model": {"name_or_path": bad}, "data": {"train": "x.jsonl"}})
    with pytest.raises(UserInputError, match=r"model\.name_or_path: a run's artifacts are not a base"):
        validate_config({"model": {"name_or_path": "runs:/abc/model"}, "data": {"train": "x.jsonl"}})
    with pytest.raises(UserInputError, match=r"model\.revision: a registered model is pinned by its version"):
        validate_config({"model": {"name_or_path": "models:/chat/1", "revision": "main"}, "data": {"train": "x"}})


def test_resolution_names_what_exists_and_pins_an_alias_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PINNED_VARIABLE, raising=False)
    client = MlflowClient()
    with pytest.raises(UserInputError, match=r"model\.name_or_path: models:/chat@champion: .*registered: none"):
        resolve_version("models:/chat@champion")
    client.create_registered_model("chat")
    run = client.create_run(client.create_experiment("e")).info.run_id
    for _ in range(2):
        client.create_model_version("chat", str(tmp_path), run_id=run)
    client.set_registered_model_alias("chat", "champion", "1")
    with pytest.raises(
        UserInputError, match=r"no alias @best; chat has versions 1, 2 and aliases @champion \(version 1"
    ):
        resolve_version("models:/chat@best")
    with pytest.raises(UserInputError, match=r"models:/chat/7: no version 7; chat has versions 1, 2"):
        resolve_version("models:/chat/7")
    with pytest.raises(UserInputError, match=r"no registered model named 'chats'; registered: chat"):
        resolve_version("models:/chats/1")
    assert str(resolve_version("models:/chat@champion").version) == "1"
    client.set_registered_model_alias("chat", "champion", "2")  # promoted while the run goes on
    assert str(resolve_version("models:/chat@champion").version) == "1", "resolved once per run"
    config = validate_config({"model": {"name_or_path": "models:/chat@champion"}, "data": {"train": "x.jsonl"}})
    pin_parent(config, resume=False)  # the next run (a served deployment runs many in one process)
    assert str(resolve_version("models:/chat@champion").version) == "2"
    assert str(resolve_version("models:/chat/2").version) == "2"


def test_a_resume_continues_on_the_version_its_run_started_from(tmp_path: Path) -> None:
    raw = {"model": {"name_or_path": "models:/chat@champion"}, "data": {"train": "x.jsonl"}}
    config = validate_config({**raw, "train": {"output_dir": str(tmp_path / "runs")}})
    assert resumed_parent_version(config) is None  # nothing to resume
    run = start_run(config)
    client = MlflowClient()
    client.set_tag(run.run_id, "parent_model_uri", "models:/chat/1")
    client.set_terminated(run.run_id, "KILLED")
    assert resumed_parent_version(config) == "1"  # whatever @champion says now
    pinned = config.model_copy(update={"model": config.model.model_copy(update={"name_or_path": "models:/chat/2"})})
    assert resumed_parent_version(pinned) is None  # a version URI needs no pin


def test_a_chat_objective_on_a_parent_without_a_chat_template_is_named() -> None:
    from tasks.parents import Parent

    parent = Parent("models:/lm@champion", "lm", "4", "r", "0", "causal_lm", "lora", "f", False, "/x")
    problems = check_parent(parent, "preference", "tokenizer", "preference")
    assert problems and "models:/lm/4 is a causal_lm model without a chat template" in problems[0]
    assert "preference.template" in problems[0]
    assert check_parent(parent, "preference", "chatml", "preference") == []
    assert check_parent(parent, "causal_lm", None, None) == []


@pytest.mark.slow
def test_sft_champion_to_dpo_challenger_records_its_lineage(tmp_path: Path, tiny_model: str) -> None:
    chats = [
        {"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["chosen"]}]}
        for p in PAIRS
    ]
    sft_config = write_config(
        tmp_path / "sft.yaml",
        model={"name_or_path": tiny_model},
        task="instruction",
        data={"train": str(write_rows(tmp_path / "chats.jsonl", chats)), "max_length": 64, "eval_fraction": 0.25},
        instruction={"eval_generations": 2, "max_new_tokens": 8},
        method={"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
        train={"max_steps": 6, "batch_size": 4, "learning_rate": 5e-3, "save_steps": 6, "logging_steps": 3},
        registry={"name": "sft"},
    )
    done = adaptflow("run", str(sft_config), "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    sft = json.loads(done.stdout.strip().splitlines()[-1])
    assert sft["model_version"] == "1" and sft["aliases"] == ["champion"]

    dpo_config = write_config(
        tmp_path / "dpo.yaml",
        model={"name_or_path": "models:/sft@champion"},
        task="preference",
        data={"train": str(write_rows(tmp_path / "pairs.jsonl", PAIRS)), "max_length": 64, "eval_fraction": 0.25},
        preference={"loss": "sigmoid", "beta": 0.1, "max_new_tokens": 8},
        method={"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
        train={"max_steps": 6, "batch_size": 4, "learning_rate": 5e-3, "save_steps": 6, "logging_steps": 3},
        registry={"name": "dpo", "promote": {"metric": "eval_reward_accuracy", "mode": "max"}},
    )
    done = adaptflow("run", str(dpo_config), "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    dpo = json.loads(done.stdout.strip().splitlines()[-1])
    client = MlflowClient()
    # The run's base (and so its reference: the new adapter disabled) is the SFT model: v1's adapter merged into
    # the tiny base answers as v1 does, and not as the tiny base.
    parents = Path(os.environ["ADAPTFLOW_CACHE"]) / "parents"
    merged = AutoModelForCausalLM.from_pretrained(parents / f"{sft['run_id']}-sft-v1", dtype=torch.float32)
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        served = download_registered("models:/sft/1").model(ids).logits
        assert torch.allclose(merged(ids).logits, served, atol=1e-4)
        tiny = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        assert (tiny(ids).logits - served).abs().max() > 1e-3
    version = client.get_model_version("dpo", dpo["model_version"])
    expected = {"parent_model_uri": "models:/sft/1", "parent_run_id": sft["run_id"]}
    assert {k: version.tags.get(k) for k in expected} == expected
    assert sft["run_id"] in version.tags["parent_run_link"]
    assert "Started from models:/sft/1" in (version.description or "")
    run = client.get_run(dpo["run_id"])
    assert {k: run.data.tags.get(k) for k in expected} == expected
    assert "models:/sft/1" in run.data.tags["mlflow.note.content"]
    identity = json.loads(version.tags["identity"])
    assert identity["model.parent"].startswith("models:/sft/1@")
    assert run.data.params["pref.template"] == "tokenizer"  # the parent's template, carried by its tokenizer

    # Self-contained: the merged SFT base is in the tracking store, not only in this machine's cache.
    shutil.rmtree(parents)
    shutil.rmtree(Path(os.environ["ADAPTFLOW_CACHE"]) / "bases", ignore_errors=True)
    question = json.dumps([{"role": "user", "content": PAIRS[0]["prompt"]}])
    done = adaptflow("predict", f"models:/dpo/{dpo['model_version']}", "--messages", question, "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])["predictions"][0]
    assert isinstance(answer, str) and "###" not in answer

    sets = ["--set", "model.name_or_path=models:/sft@best", "--set", "registry.name=dpo-bad"]
    done = adaptflow("run", str(dpo_config), *sets)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "model.name_or_path: models:/sft@best: no alias @best; sft has versions 1" in done.stderr
    assert "Traceback" not in done.stderr
    assert not client.search_registered_models("name = 'dpo-bad'")
    assert len(client.search_runs([run.info.experiment_id])) == 2, "no run opened for the bad alias"

    # An instruction run may start from a version too (pinned by number), re-made from the store.
    sets = ["--set", "model.name_or_path=models:/sft/1", "--set", "registry.name=sft-again"]
    done = adaptflow("run", str(sft_config), *sets, "--set", "train.max_steps=2", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    again = json.loads(done.stdout.strip().splitlines()[-1])
    tags = client.get_model_version("sft-again", again["model_version"]).tags
    assert (tags["parent_model_uri"], tags["parent_run_id"]) == ("models:/sft/1", sft["run_id"])


def test_plan_and_run_name_an_unknown_parent_before_any_run_opens(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.cli import main

    data = write_rows(tmp_path / "pairs.jsonl", PAIRS)
    config = write_config(
        tmp_path / "c.yaml",
        model={"name_or_path": "models:/nope@champion"},
        task="preference",
        data={"train": str(data)},
    )
    expected = "model.name_or_path: models:/nope@champion: no alias @champion; no registered model named 'nope'"
    for command in ("plan", "run"):
        assert main([command, str(config)]) == 2
        assert expected in capsys.readouterr().err
    client = MlflowClient()
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
