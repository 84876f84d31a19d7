"""Real-size models without a GPU: the precision decision, optimizer names, activation checkpointing for every
method, and versions whose pinned base cannot be resolved."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import write_config

from adapters_impl import METHODS, ApplyContext
from adapters_impl.model_heads import CAUSAL_LM
from adapters_impl.packaged import INFO_FILE, BaseUnavailable, load_packaged
from tasks.config import validate_config
from tasks.errors import UserInputError
from tasks.modeling import base_load_dtype, load_base_model, load_tokenizer, resolve_model, upcast_trainable
from tasks.objectives import OBJECTIVES
from tasks.training import enable_activation_checkpointing

FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16


@pytest.mark.parametrize(
    ("precision", "whole_model", "quantized", "cuda", "bf16", "expected"),
    [
        ("auto", False, False, True, True, BF16),  # frozen base on a bf16 GPU: half precision
        ("auto", True, False, True, True, FP32),  # full: fp32 master weights under autocast
        ("bf16-pure", True, False, True, True, BF16),
        ("auto", False, True, True, True, FP32),  # QLoRA: its quantization config decides
        ("auto", False, False, True, False, FP32),  # a GPU without bf16: auto is fp32
        ("fp16", False, False, True, False, FP16),
        ("fp32", False, False, True, True, FP32),
        ("auto", False, False, False, False, FP32),  # CPU stays fp32, whatever is asked
        ("bf16", False, False, False, False, FP32),
        ("bf16-pure", True, False, False, False, FP32),
    ],
)
def test_frozen_base_dtype(
    precision: str, whole_model: bool, quantized: bool, cuda: bool, bf16: bool, expected: torch.dtype
) -> None:
    assert base_load_dtype(precision, whole_model, quantized, cuda, bf16) == expected


def test_trainable_parameters_stay_fp32_on_a_half_precision_base(tiny_model: str) -> None:
    source = resolve_model(validate_config({"data": {"train": "x"}, "model": {"name_or_path": tiny_model}}).model)
    tokenizer = load_tokenizer(source)
    base = load_base_model(source, CAUSAL_LM, tokenizer, dtype=BF16)
    settings = METHODS["lora"].settings(name="lora")
    model = upcast_trainable(METHODS["lora"].apply(base, settings, ApplyContext("causal_lm", tiny_model)))
    dtypes = {(p.requires_grad, p.dtype) for p in model.parameters()}
    assert dtypes == {(True, FP32), (False, BF16)}


def test_optim_takes_hugging_face_names_only() -> None:
    assert validate_config({"data": {"train": "x"}, "train": {"optim": "adamw_torch_fused"}}).train.optim == (
        "adamw_torch_fused"
    )
    with pytest.raises(UserInputError) as caught:
        validate_config({"data": {"train": "x"}, "train": {"optim": "adamw_fast"}})
    assert any(p.startswith("train.optim:") and "adamw_torch_fused" in p for p in caught.value.problems)


def test_prefix_refuses_activation_checkpointing_by_name() -> None:
    raw = {"data": {"train": "x"}, "method": {"name": "prefix"}, "train": {"gradient_checkpointing": True}}
    with pytest.raises(UserInputError) as caught:
        validate_config(raw)
    assert any("train.gradient_checkpointing: not supported with method prefix" in p for p in caught.value.problems)


@pytest.mark.parametrize(
    ("method", "task"),
    [("lora", "causal_lm"), ("full", "causal_lm"), ("prompt", "classification"), ("ia3", "classification")],
)
def test_activation_checkpointing_reaches_the_transformer_inside_every_wrapper(
    tiny_model: str, method: str, task: str
) -> None:
    source = resolve_model(validate_config({"data": {"train": "x"}, "model": {"name_or_path": tiny_model}}).model)
    tokenizer = load_tokenizer(source)
    labels = ["neg", "pos"] if task == "classification" else None
    base = load_base_model(source, OBJECTIVES[task].head, tokenizer, labels)
    model = METHODS[method].apply(base, METHODS[method].settings(name=method), ApplyContext(task, tiny_model))
    enable_activation_checkpointing(model)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    model.train()
    batch = tokenizer(["a short text", "another one"], return_tensors="pt", padding=True)
    if task == "classification":
        loss = model(**batch, labels=torch.tensor([0, 1])).loss
    else:
        loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def write_package(folder: Path, tiny_model: str, base: dict) -> Path:
    """A LoRA package whose base is pinned by `base` (the adapter itself is never reached)."""
    load_tokenizer(
        resolve_model(validate_config({"data": {"train": "x"}, "model": {"name_or_path": tiny_model}}).model)
    ).save_pretrained(str(folder / "tokenizer"))
    info = {"task": "causal_lm", "method": "lora", "label_names": None, "tokenizer": "tokenizer", "adapter": "adapter"}
    (folder / INFO_FILE).write_text(json.dumps({**info, "weights": None, "base": base}))
    return folder


def test_a_base_that_cannot_be_resolved_is_named_with_how_it_was_pinned(tmp_path: Path, tiny_model: str) -> None:
    logged = {
        "kind": "tracking",
        "fingerprint": "0" * 32,
        "run_id": "f" * 32,
        "path": "base",
        "logged_from": "/models/gone",
        "local_path": str(tmp_path / "gone"),
    }
    with pytest.raises(BaseUnavailable) as caught:
        load_packaged(write_package(tmp_path / "a", tiny_model, logged))
    message = str(caught.value)
    assert "'/models/gone' (local folder" in message and "f" * 32 in message and "cannot be downloaded" in message

    hub = {"kind": "hub", "name": "adaptflow-tests/no-such-model", "revision": "a" * 40}
    with pytest.raises(BaseUnavailable) as caught:
        load_packaged(write_package(tmp_path / "b", tiny_model, hub))
    assert "'adaptflow-tests/no-such-model' (hub id, pinned to revision " + "a" * 40 in str(caught.value)


FRESH_LOAD = """
import sys, mlflow
print(mlflow.pyfunc.load_model(sys.argv[1]).predict(["Once upon a time"])[0])
"""


def package_of(model_uri: str) -> Path:
    """The downloaded package folder of a registered version (where its MLmodel says the pyfunc keeps it)."""
    from mlflow.models import Model

    local = Path(mlflow.artifacts.download_artifacts(model_uri))
    return local / Model.load(str(local)).flavors["python_function"]["artifacts"]["model"]["path"]


def fresh_process_predict(uri: str, cache: Path) -> subprocess.CompletedProcess[str]:
    """Load a registered model with the pyfunc in a new process with an empty adaptflow cache."""
    env = {**os.environ, "ADAPTFLOW_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-c", FRESH_LOAD, uri], capture_output=True, text=True, env=env)


@pytest.mark.slow
def test_versions_store_the_adapter_and_a_base_logged_once(
    tmp_path: Path, tiny_model: str, stories_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow.tracking import MlflowClient

    from flows.cli import main

    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    config = write_config(
        tmp_path / "run.yaml",
        model={"name_or_path": str(base)},
        data={"train": str(stories_file), "max_length": 48, "eval_fraction": 0.2},
        method={"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
        train={"max_steps": 4, "batch_size": 8, "learning_rate": 3e-3, "save_steps": 1, "logging_steps": 2},
        bias_probe={"suite": None},
        registry={"name": "real"},
    )
    versions = []
    for overrides in ([], ["--set", "train.learning_rate=1e-3", "--set", "registry.merged=true"]):
        assert main(["run", str(config), *overrides, "--json"]) == 0
        versions.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    first, second = versions
    # fp32's 1e-4, scaled by the logits' magnitude when it is above 1 (rounding error is relative)
    assert first["metrics"]["merge_tolerance"] >= 1e-4 and first["metrics"]["merge_max_abs_diff"] < 1e-4

    # One base run for both versions; the versions hold the adapter, not the base.
    client = MlflowClient()
    bases = client.search_runs([client.get_experiment_by_name("adaptflow-bases").experiment_id])
    assert len(bases) == 1 and bases[0].info.status == "FINISHED"
    base_bytes = sum(p.stat().st_size for p in base.iterdir())
    package = package_of(first["model_uri"])
    info = json.loads((package / "adaptflow.json").read_text())
    assert info["base"]["run_id"] == bases[0].info.run_id and info["base"]["kind"] == "tracking"
    assert sorted(p.name for p in package.iterdir()) == ["adapter", "adaptflow.json", "tokenizer"]
    assert sum(p.stat().st_size for p in package.rglob("*") if p.is_file()) < base_bytes / 2
    merged = package_of(second["model_uri"]) / "merged"
    assert (merged / "model.safetensors").exists()

    # The run folder keeps adapter, reports and the last checkpoint only.
    run_dir = Path(first["run_dir"])
    assert not {"merged", "package", "adapter-init"} & {p.name for p in run_dir.iterdir()}
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["checkpoint-4"]

    # A fresh process on another machine (no base folder, empty cache) downloads the base once from the store.
    shutil.rmtree(base)
    loaded = fresh_process_predict("models:/real/1", tmp_path / "fresh-cache")
    assert loaded.returncode == 0 and loaded.stdout.strip(), loaded.stderr[-2000:]
    cached = tmp_path / "fresh-cache" / "bases" / info["base"]["fingerprint"]
    assert (cached / "config.json").exists()

    # The cached copy modified (same size): predict refuses it, naming both fingerprints and the fix.
    weights = cached / "model.safetensors"
    changed = bytearray(weights.read_bytes())
    changed[-8:] = bytes(8)
    weights.write_bytes(bytes(changed))
    env = {**os.environ, "ADAPTFLOW_CACHE": str(tmp_path / "fresh-cache")}
    command = [str(Path(sys.executable).with_name("adaptflow")), "predict", "models:/real/1", "--text", "Once"]
    refused = subprocess.run(command, capture_output=True, text=True, env=env)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "the cached copy of the base" in refused.stderr and info["base"]["fingerprint"] in refused.stderr
    assert f"Remove the folder {cached}" in refused.stderr and "Traceback" not in refused.stderr
    shutil.rmtree(cached)  # the fix the message gives: downloaded again, checked, loads
    assert fresh_process_predict("models:/real/1", tmp_path / "fresh-cache").returncode == 0

    # The base's artifacts gone: loading names the base and how it was pinned.
    client.delete_run(bases[0].info.run_id)
    failed = fresh_process_predict("models:/real/1", tmp_path / "empty-cache")
    assert failed.returncode != 0
    assert f"base model '{base}' (local folder, stored once in the tracking store as run" in failed.stderr
    assert "that run was deleted" in failed.stderr

    # A new version of the same base whose stored copy's files are gone logs the base again instead of pinning
    # itself to files that no longer exist.
    shutil.copytree(tiny_model, base)
    stored = client.get_run(bases[0].info.run_id).info.artifact_uri.removeprefix("file://")
    client.restore_run(bases[0].info.run_id)
    shutil.rmtree(Path(stored) / "base")
    assert main(["run", str(config), "--set", "train.seed=1", "--json"]) == 0
    third = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    pin = json.loads((package_of(third["model_uri"]) / "adaptflow.json").read_text())["base"]
    assert pin["fingerprint"] == info["base"]["fingerprint"] and pin["run_id"] != bases[0].info.run_id
    shutil.rmtree(base)
    again = fresh_process_predict(third["model_uri"], tmp_path / "third-cache")
    assert again.returncode == 0, again.stderr[-2000:]
