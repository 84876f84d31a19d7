"""The train stage on torchrun (issue 19): settings, DDP with gloo on CPU, a failing rank, no orphaned worker."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import mlflow
import psutil
import pytest
import torch
from conftest import SAMPLES, write_config
from mlflow.tracking import MlflowClient

from adapters_impl import METHODS
from flows.cli import main
from tasks.adapting import apply_method, take
from tasks.config import DistributedSettings, TrainSettings, validate_config
from tasks.distributed import check_device, launch_command, train_distributed
from tasks.errors import RunFailed, UserInputError
from tasks.evaluation import evaluate_model
from tasks.load import load_data
from tasks.modeling import load_tokenizer, resolve_model
from tasks.objectives import OBJECTIVES, tasks_of
from tasks.settings import ModelSettings
from tasks.tokenization import make_collator, tokenize_dataset
from tasks.tracking import RunRef
from tasks.training import distributed_arguments, train_model


@pytest.mark.parametrize(
    ("method", "distributed", "problem"),
    [
        ("lora", {"nproc_per_node": 2, "fsdp": {"shard": 1}}, "train.distributed.fsdp.shard: unknown key; allowed:"),
        ("lora", {"nnodes": 2}, "train.distributed.rdzv_endpoint: required when nnodes > 1"),
        ("lora", {"nnodes": 2, "rdzv_endpoint": "node0"}, "train.distributed.rdzv_endpoint: expected host:port"),
        ("lora", {"node_rank": 1}, "train.distributed.node_rank: 1 is not below nnodes (1)"),
        ("lora", {"nproc_per_node": 0}, "train.distributed.nproc_per_node: Input should be greater than or equal"),
        ("lora", {"strategy": "zero3"}, "train.distributed.strategy: Input should be 'ddp' or 'fsdp'"),
        ("ia3", {"nproc_per_node": 2, "strategy": "fsdp"}, "fsdp trains the methods full, lora; method.name is 'ia3'"),
        ("qlora", {"nproc_per_node": 2, "strategy": "fsdp"}, "fsdp with qlora is not supported"),
    ],
)
def test_distributed_settings_are_checked_before_anything_runs(method: str, distributed: dict, problem: str) -> None:
    with pytest.raises(UserInputError) as error:
        validate_config(
            {"data": {"train": "x.jsonl"}, "method": {"name": method}, "train": {"distributed": distributed}}
        )
    assert error.value.exit_code == 2 and problem in str(error.value)


def test_the_launcher_runs_one_node_standalone_and_nodes_at_a_static_rendezvous() -> None:
    spec = Path("spec.json")
    one = launch_command(TrainSettings(distributed=DistributedSettings(nproc_per_node=2)), spec)
    assert "--standalone" in one and "--nproc_per_node=2" in one and one[-2:] == ["tasks.train_worker", "spec.json"]
    two = DistributedSettings(nproc_per_node=2, nnodes=2, node_rank=1, rdzv_endpoint="10.0.0.1:29400")
    many = launch_command(TrainSettings(distributed=two), spec)
    node0 = launch_command(TrainSettings(distributed=two.model_copy(update={"node_rank": 0})), spec)
    assert [a for a in many if a.startswith("--rdzv_id")] == [a for a in node0 if a.startswith("--rdzv_id")]
    assert {"--nnodes=2", "--node_rank=1", "--rdzv_backend=static", "--rdzv_endpoint=10.0.0.1:29400"} <= set(many)
    assert "--standalone" not in many


SAMPLE_OF_TASK = {"causal_lm": "stories", "classification": "reviews", "instruction": "instructions"}


# Objectives with a loss of their own (`Objective.training`: preference) reach every trainable parameter through it;
# tests/test_preference_core.py checks that per method.
@pytest.mark.parametrize(
    ("name", "task"),
    [(n, t) for n, m in METHODS.items() for t in tasks_of(m) if n != "qlora" and OBJECTIVES[t].training is None],
)
def test_every_trainable_parameter_gets_a_gradient(name: str, task: str, tiny_model: str, tmp_path: Path) -> None:
    """What lets DDP skip its per-step search for parameters without a gradient (find_unused_parameters off):
    one step of every method x task reaches all of its trainable parameters. (QLoRA trains LoRA's.)"""
    lines = (SAMPLES / f"sample_{SAMPLE_OF_TASK[task]}.jsonl").read_text().splitlines()[:8]
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    config = validate_config(
        {"task": task, "data": {"train": str(tmp_path / "rows.jsonl"), "max_length": 32}, "method": {"name": name}}
    )
    source = resolve_model(ModelSettings(name_or_path=tiny_model))
    data = load_data(config.data, OBJECTIVES[task], tmp_path / "d")
    tokenized = tokenize_dataset(data, source, task, 32, tmp_path / "t", config.task_options())
    adapted = apply_method(source, config.method, task, tokenized, str(tmp_path / "run"), 0)
    model = take(adapted.adapter_dir)
    assert model is not None
    train, _ = tokenized.splits()
    batch = make_collator(load_tokenizer(source), task)([train[i] for i in range(4)])
    model.train()
    model(**batch).loss.backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_ddp_searches_for_parameters_without_a_gradient_only_in_a_mixture_of_experts(tiny_model: str) -> None:
    from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

    settings = TrainSettings(distributed=DistributedSettings(nproc_per_node=2))
    llama = AutoModelForCausalLM.from_pretrained(tiny_model)
    experts = MixtralForCausalLM(
        MixtralConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64, num_local_experts=4, num_experts_per_tok=1)
    )  # fmt: skip
    assert distributed_arguments(settings, llama)["ddp_find_unused_parameters"] is False
    assert distributed_arguments(settings, experts)["ddp_find_unused_parameters"] is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="FSDP runs on GPUs")
def test_fsdp_without_gpus_is_refused_before_launching() -> None:
    settings = TrainSettings(distributed=DistributedSettings(nproc_per_node=2, strategy="fsdp"))
    with pytest.raises(UserInputError, match="fsdp needs CUDA GPUs"):
        check_device(settings)
    check_device(TrainSettings(distributed=DistributedSettings(nproc_per_node=2)))  # ddp with gloo is fine


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU processes")
def test_more_cpu_processes_than_cores_are_refused_by_run_and_plan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from conftest import write_config

    from flows.cli import main

    cores = len(os.sched_getaffinity(0))
    with pytest.raises(UserInputError, match=f"999 CPU processes, but this node has {cores} core"):
        check_device(TrainSettings(distributed=DistributedSettings(nproc_per_node=999)))
    config = write_config(
        tmp_path / "c.yaml", data={"train": "x.jsonl"}, train={"distributed": {"nproc_per_node": 999}}
    )
    assert main(["plan", str(config)]) == 2
    assert "train.distributed.nproc_per_node: 999 CPU processes" in capsys.readouterr().err
    fsdp = ["--set", "train.distributed.nproc_per_node=2", "--set", "train.distributed.strategy=fsdp"]
    assert main(["plan", str(config), *fsdp]) == 2
    assert "fsdp needs CUDA GPUs" in capsys.readouterr().err


class Stage:
    """The train stage called directly (no Prefect) on the tiny model, dropout off so that ranks compute alike;
    a tiny LoRA on stories unless `sections` say otherwise (sections of a run config: task, data, method)."""

    def __init__(self, tmp_path: Path, tiny_model: str, data_file: Path, name: str, **sections: Any) -> None:
        method = {"name": "lora", "r": 4, "dropout": 0.0, "target_modules": "all-linear"}
        config = validate_config({"data": {"train": str(data_file), "max_length": 48}, "method": method, **sections})
        self.config = config
        source = resolve_model(ModelSettings(name_or_path=tiny_model))
        data = load_data(config.data, config.objective, tmp_path / "cache" / "d")
        self.tokenized = tokenize_dataset(
            data, source, config.task, 48, tmp_path / "cache" / "t", config.task_options()
        )
        self.run_dir = tmp_path / name
        self.adapted = apply_method(source, config.method, config.task, self.tokenized, str(self.run_dir), 0)
        client = MlflowClient()
        experiment = client.get_experiment_by_name("d") or client.get_experiment(client.create_experiment("d"))
        run_id = client.create_run(experiment.experiment_id).info.run_id
        self.run = RunRef(
            run_id=run_id,
            experiment_id=experiment.experiment_id,
            tracking_uri=mlflow.get_tracking_uri(),
            run_dir=str(self.run_dir),
        )

    def settings(self, nproc: int, global_batch: int = 8, max_steps: int = 6, save_steps: int = 3) -> TrainSettings:
        distributed = DistributedSettings(nproc_per_node=nproc) if nproc > 1 else None
        return TrainSettings(
            max_steps=max_steps,
            save_steps=save_steps,
            batch_size=global_batch // nproc,
            learning_rate=3e-3,
            logging_steps=1,
            distributed=distributed,
        )


def workers_of(folder: Path) -> list[psutil.Process]:
    """Live processes whose command line names the run folder (the launcher and its workers)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(str(folder) in part for part in proc.info["cmdline"] or []):
                found.append(proc)
    return found


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(
    tmp_path: Path, tiny_model: str, stories_file: Path
) -> None:
    one = Stage(tmp_path, tiny_model, stories_file, "one")
    alone = train_model(one.adapted, one.tokenized, one.settings(1), one.run)
    two = Stage(tmp_path, tiny_model, stories_file, "two")
    together = train_model(two.adapted, two.tokenized, two.settings(2), two.run)

    assert together.steps == alone.steps == 6 and together.world_size == 2
    assert together.train_loss == pytest.approx(alone.train_loss, rel=0.03)
    assert together.loss_history[-1][1] == pytest.approx(alone.loss_history[-1][1], rel=0.03)
    eval_one = evaluate_model(alone, one.tokenized, one.run)["eval_loss"]
    eval_two = evaluate_model(together, two.tokenized, two.run)["eval_loss"]
    assert eval_two == pytest.approx(eval_one, rel=0.03)
    # Rank 0 alone tracked and saved: the loss streamed once per step, checkpoints and adapter in the run folder.
    client = MlflowClient()
    steps = [[m.step for m in client.get_metric_history(r.run_id, "train_loss")] for r in (one.run, two.run)]
    assert steps[1] == steps[0] and len(steps[1]) >= 6
    logged = client.get_run(two.run.run_id).data.metrics
    assert logged["world_size"] == 2 and logged["global_batch_size"] == 8
    assert sorted(p.name for p in (two.run_dir / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-6"]
    assert (two.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert not workers_of(two.run_dir)

    # --resume with the same world size: killed after checkpoint-3, the run continues there and ends alike.
    shutil.rmtree(two.run_dir / "checkpoints" / "checkpoint-6")
    shutil.rmtree(two.run_dir / "adapter")
    resumed = train_model(two.adapted, two.tokenized, two.settings(2), two.run)
    assert resumed.resumed_from_step == 3 and resumed.steps == 6 and resumed.world_size == 2
    assert [step for step, _ in resumed.loss_history] == [1, 2, 3, 4, 5, 6]  # steps 1-3 from checkpoint-3
    assert [loss for _, loss in resumed.loss_history] == pytest.approx([loss for _, loss in together.loss_history])
    assert (two.run_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.fixture
def instructions_file(tmp_path: Path) -> Path:
    """60 sample instructions (alpaca format) as JSONL."""
    lines = (SAMPLES / "sample_instructions.jsonl").read_text().splitlines()[:60]
    path = tmp_path / "instructions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


# Methods besides full and lora (tested above and end to end) on a task each, so that each task trains under DDP
# once: virtual tokens (prefix, prompt) on the pooled classifier and on the chat template, and dora's magnitude
# vectors. ia3 and the bottleneck adapter passed too (2 processes within 3% of 1) and were left out for the suite's
# time: a torchrun launch costs ~20 s of imports on 2 cores.
DDP_CASES = [
    ("prefix", "classification", {"name": "prefix", "num_virtual_tokens": 4}),
    ("prompt", "instruction", {"name": "prompt", "num_virtual_tokens": 4}),
    ("dora", "instruction", {"name": "dora", "r": 4, "dropout": 0.0, "target_modules": "all-linear"}),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "task", "method"), DDP_CASES, ids=[f"{n}-{t}" for n, t, _ in DDP_CASES])
def test_every_method_and_task_trains_on_two_processes_like_on_one(
    tmp_path: Path, tiny_model: str, request: pytest.FixtureRequest, name: str, task: str, method: dict
) -> None:
    data = {"causal_lm": "stories_file", "classification": "reviews_file", "instruction": "instructions_file"}[task]
    sections = {"task": task, "method": method, "instruction": {"eval_generations": 2, "max_new_tokens": 4}}
    if task != "instruction":
        del sections["instruction"]
    data_file = request.getfixturevalue(data)
    one = Stage(tmp_path, tiny_model, data_file, "one", **sections)
    alone = train_model(one.adapted, one.tokenized, one.settings(1, max_steps=2, save_steps=2), one.run)
    two = Stage(tmp_path, tiny_model, data_file, "two", **sections)
    together = train_model(two.adapted, two.tokenized, two.settings(2, max_steps=2, save_steps=2), two.run)

    assert together.steps == 2 and together.world_size == 2
    assert together.train_loss == pytest.approx(alone.train_loss, rel=0.03)
    # Rank 0's saved adapter loads in this process with the method's own `load` and evaluates like one process's.
    eval_one = evaluate_model(alone, one.tokenized, one.run)["eval_loss"]
    eval_two = evaluate_model(together, two.tokenized, two.run)["eval_loss"]
    assert eval_two == pytest.approx(eval_one, rel=0.03)


def test_a_classification_loss_counts_once_with_gradient_accumulation(
    tmp_path: Path, tiny_model: str, reviews_file: Path
) -> None:
    # The same root as a mean loss doubled on 2 processes: the Trainer scaled it by grad_accum as well.
    stage = Stage(tmp_path, tiny_model, reviews_file, "whole", task="classification")
    whole = train_model(stage.adapted, stage.tokenized, stage.settings(1, max_steps=2), stage.run)
    stage = Stage(tmp_path, tiny_model, reviews_file, "accumulated", task="classification")
    settings = stage.settings(1, max_steps=2).model_copy(update={"batch_size": 4, "grad_accum": 2})
    accumulated = train_model(stage.adapted, stage.tokenized, settings, stage.run)
    assert accumulated.train_loss == pytest.approx(whole.train_loss, rel=0.03)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_two_nodes_on_localhost_train_as_one_run(tmp_path: Path, tiny_model: str, stories_file: Path) -> None:
    # Two launches of one process each, node ranks 0 and 1, meeting at node 0's static rendezvous: as the CLI
    # runs them on two machines (node 1's own folder, its rank without tracking).
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [
        Stage(
            tmp_path,
            tiny_model,
            stories_file,
            f"node{rank}",
            train={"distributed": {"nnodes": 2, "node_rank": rank, "rdzv_endpoint": endpoint}},
        )
        for rank in (0, 1)
    ]
    settings = [
        node.settings(1).model_copy(update={"batch_size": 4, "distributed": node.config.train.distributed})
        for node in nodes
    ]
    nodes[1].run = nodes[1].run.model_copy(update={"run_id": "", "experiment_id": ""})
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(train_distributed, nodes[1].adapted, nodes[1].tokenized, settings[1], nodes[1].run, None)
        trained = train_model(nodes[0].adapted, nodes[0].tokenized, settings[0], nodes[0].run)
        assert other.result(timeout=120) is None
    one = Stage(tmp_path, tiny_model, stories_file, "one")
    alone = train_model(one.adapted, one.tokenized, one.settings(1), one.run)

    assert trained.steps == 6 and trained.world_size == 2 and trained.global_batch_size == 8
    assert trained.train_loss == pytest.approx(alone.train_loss, rel=0.03)
    assert MlflowClient().get_run(nodes[0].run.run_id).data.metrics["world_size"] == 2
    assert (nodes[0].run_dir / "checkpoints" / "checkpoint-6").is_dir()
    # Rank 1 saved no weights: in one node's folder it would write the same files as rank 0 at the same time.
    assert (
        not list(nodes[1].run_dir.glob("checkpoints/*/*.safetensors")) and not (nodes[1].run_dir / "adapter").exists()
    )


@pytest.mark.slow
def test_a_full_fine_tune_on_two_processes_merges_registers_and_predicts(
    tmp_path: Path, tiny_model: str, stories_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The whole model trains under DDP; the later stages run in this process on rank 0's saved weights.
    config = write_config(
        tmp_path / "run.yaml",
        model={"name_or_path": tiny_model},
        data={"train": str(stories_file), "max_length": 48},
        method={"name": "full"},
        train={"max_steps": 4, "batch_size": 4, "save_steps": 4, "distributed": {"nproc_per_node": 2}},
        registry={"name": "ddp-full", "merged": True},
        bias_probe={"max_new_tokens": 4},
    )
    assert main(["run", str(config), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = result["metrics"]
    assert result["status"] == "ok" and result["mergeable"] is True and result["aliases"] == ["champion"]
    assert metrics["world_size"] == 2 and metrics["global_batch_size"] == 8
    assert metrics["merge_max_abs_diff"] <= metrics["merge_tolerance"]
    assert metrics["eval_loss"] < metrics["base_eval_loss"]
    assert result["bias_probe"]
    predictions = mlflow.pyfunc.load_model("models:/ddp-full@champion").predict(["Once upon a time"])
    assert len(predictions) == 1 and isinstance(predictions[0], str)


def when_rank_one_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, statement: str) -> None:
    """Make rank 1 of the next torchrun run `statement` instead of training: a sitecustomize on its path."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, signal\n"
        "if os.environ.get('RANK') == '1':\n"
        "    from tasks import training\n"
        "    def instead(*args, **kwargs):\n"
        f"        {statement}\n"
        "    training.train_loaded = instead\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))


@pytest.mark.slow
def test_a_failing_rank_fails_the_stage_with_its_rank_and_message(
    tmp_path: Path, tiny_model: str, stories_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rank 1 raises when it starts training: a real worker process, failed through a sitecustomize on its path.
    when_rank_one_trains(tmp_path, monkeypatch, "raise ValueError('rank one cannot go on')")
    stage = Stage(tmp_path, tiny_model, stories_file, "failing")
    started = time.monotonic()
    with pytest.raises(RunFailed) as failure:
        train_model(stage.adapted, stage.tokenized, stage.settings(2), stage.run)
    message = str(failure.value)
    assert "failed on rank 1 of 2: ValueError: rank one cannot go on" in message
    assert time.monotonic() - started < 90, "rank 0 was left waiting for its peer"
    assert not (stage.run_dir / "distributed" / "trained.json").exists()
    assert not workers_of(stage.run_dir)


@pytest.mark.slow
def test_a_rank_killed_by_sigkill_is_named_as_torchrun_names_it(
    tmp_path: Path, tiny_model: str, stories_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 1 SIGKILLed (the out-of-memory killer, an operator): the error named rank 0's lost connection."""
    when_rank_one_trains(tmp_path, monkeypatch, "os.kill(os.getpid(), signal.SIGKILL)")
    stage = Stage(tmp_path, tiny_model, stories_file, "killed")
    with pytest.raises(RunFailed) as failure:
        train_model(stage.adapted, stage.tokenized, stage.settings(2), stage.run)
    assert "distributed training failed: rank 1 by SIGKILL (of 2; torchrun's report)" in str(failure.value)
    assert not workers_of(stage.run_dir)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the launcher's death signal is Linux's")
def test_killing_the_cli_leaves_no_worker(tmp_path: Path, tiny_model: str, stories_file: Path) -> None:
    config = write_config(
        tmp_path / "run.yaml",
        model={"name_or_path": tiny_model},
        data={"train": str(stories_file), "max_length": 48},
        method={"name": "full"},
        train={"max_steps": 500, "batch_size": 4, "save_steps": 2, "distributed": {"nproc_per_node": 2}},
        bias_probe={"suite": None},
    )
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-child")}
    log = (tmp_path / "cli.log").open("w")
    command = [str(Path(sys.executable).with_name("adaptflow")), "run", str(config)]
    child = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    runs = tmp_path / "runs"
    try:
        deadline = time.monotonic() + 240
        while not any(runs.glob("*/checkpoints/checkpoint-*")):  # the workers are training
            assert child.poll() is None and time.monotonic() < deadline, (tmp_path / "cli.log").read_text()[-3000:]
            time.sleep(0.2)
        assert len(workers_of(runs)) >= 3  # the launcher and two workers
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    output = (tmp_path / "cli.log").read_text()
    assert child.returncode == 143, output[-3000:]
    assert "adaptflow: interrupted (SIGTERM)" in output
    assert not workers_of(runs), [p.cmdline() for p in workers_of(runs)]
    (run,) = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("adaptflow").experiment_id])
    assert run.info.status == "KILLED"


def test_a_rank_killed_by_a_signal_is_read_from_torchruns_own_report() -> None:
    """Rank 1 SIGKILLed: the error named rank 0's lost connection; torchrun's report (its own formatter here)
    names the rank and the signal."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from tasks.distributed import killed_ranks

    failures = {
        1: ProcessFailure(local_rank=1, pid=4242, exitcode=-9, error_file="/nonexistent"),
        0: ProcessFailure(local_rank=0, pid=4241, exitcode=1, error_file="/nonexistent"),
    }
    report = ChildFailedError("tasks.train_worker", failures).format_msg().splitlines()
    assert killed_ranks(report) == [(1, "SIGKILL")]
    assert killed_ranks(["  rank      : 0 (local_rank: 0)", "  exitcode  : 1 (pid: 7)"]) == []
