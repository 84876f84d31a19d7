"""End to end, as a user runs it: real Prefect (temporary server), real MLflow (SQLite store + registry)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
import pytest
from conftest import write_config
from mlflow.tracking import MlflowClient

from adapters_impl.packaged import download_registered
from flows.cli import main


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def tiny_run_config(path: Path, model: str, train_file: Path, **train: object) -> Path:
    return write_config(
        path,
        model={"name_or_path": model},
        data={"train": str(train_file), "max_length": 48, "eval_fraction": 0.2},
        method={"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
        train={
            "max_steps": 12,
            "batch_size": 8,
            "learning_rate": 3e-3,
            "logging_steps": 2,
            "save_steps": 6,
            **train,
        },
        registry={"name": "e2e"},
    )


def task_run_states(name: str, flow_runs: list[str]) -> list[str]:
    """The states of the task runs called `name` in these flow runs (not other tests' on the same server)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId, TaskRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(
                name=TaskRunFilterName(like_=name),
                flow_run_id=TaskRunFilterFlowRunId(any_=[uuid.UUID(run) for run in flow_runs]),
            )
        )
    return sorted(run.state.name for run in runs if run.state)


@pytest.mark.slow
def test_run_registers_a_loadable_champion_and_a_worse_run_stays_challenger(
    tmp_path: Path, tiny_model: str, stories_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny_run_config(tmp_path / "run.yaml", tiny_model, stories_file)
    assert main(["run", str(config), "--json"]) == 0
    result = last_json(capsys.readouterr().out)

    assert result["command"] == "run" and result["status"] == "ok"
    assert (result["method"], result["task"], result["model_name"]) == ("lora", "causal_lm", "e2e")
    metrics = result["metrics"]
    for key in (
        "eval_loss",
        "eval_perplexity",
        "base_eval_loss",
        "base_eval_perplexity",
        "trainable_params",
        "total_params",
        "train_seconds",
        "train_tokens_per_second",
        "peak_memory_mb",
        "merge_max_abs_diff",
    ):
        assert key in metrics, key
    assert metrics["eval_loss"] < metrics["base_eval_loss"]
    assert metrics["merge_max_abs_diff"] < 1e-4
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    assert result["aliases"] == ["champion"] and result["mergeable"] is True

    client = MlflowClient()
    champion = client.get_model_version_by_alias("e2e", "champion")
    assert str(champion.version) == result["model_version"]
    for tag in ("base_model", "method", "task", "data_fingerprint", "git_commit", "prefect_flow_run_id"):
        assert champion.tags.get(tag), f"version tag {tag} missing"
    assert champion.tags["base_model"] == tiny_model

    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["method.r"] == "4"
    assert run.data.tags["adaptflow.prefect_flow_run_id"] == champion.tags["prefect_flow_run_id"]
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) >= 3  # streamed while training
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "config.yaml", "reports"} <= artifacts
    adapter = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= adapter
    reports = {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
    assert {"reports/metrics.json", "reports/loss_curve.png"} <= reports
    assert (tmp_path / "artifacts").is_dir() and not (tmp_path / "mlruns").exists(), "artifacts beside the store"

    pyfunc = mlflow.pyfunc.load_model("models:/e2e@champion")
    predictions = pyfunc.predict(["Once upon a time", "The cat"])
    assert len(predictions) == 2 and all(isinstance(p, str) and p for p in predictions)
    signature = pyfunc.metadata.signature  # texts in, text out, predict's length a param; with an input example
    assert signature.inputs.to_dict() == [{"type": "string", "required": True}] == signature.outputs.to_dict()
    assert [(p.name, p.default) for p in signature.params.params] == [("max_new_tokens", 40)]
    assert pyfunc.metadata.saved_input_example_info is not None
    # The version ships only what loading needs (adapters_impl), and the public loader reads the same package.
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/e2e@champion"))
    assert sorted(p.name for p in (local / "code").iterdir()) == ["adapters_impl"]
    packaged = download_registered("models:/e2e@champion")
    assert packaged.task == "causal_lm" and packaged.tokenizer.pad_token is not None

    # A deliberately worse run: registered, aliased challenger, champion unchanged, tokenization cached.
    assert main(["run", str(config), "--set", "train.max_steps=1", "--set", "train.learning_rate=1e-7", "--json"]) == 0
    worse = last_json(capsys.readouterr().out)
    assert worse["aliases"] == ["challenger"]
    assert worse["model_version"] != result["model_version"]
    assert str(client.get_model_version_by_alias("e2e", "champion").version) == result["model_version"]
    assert "does not beat" in client.get_model_version("e2e", worse["model_version"]).tags["promotion"]
    flow_runs = [
        client.get_model_version("e2e", r["model_version"]).tags["prefect_flow_run_id"] for r in (result, worse)
    ]
    assert task_run_states("tokenize", flow_runs) == ["Cached", "Completed"]
    # Prefect, as its users expect it (issue 31 item 10): named, tagged, and a summary artifact on the flow run.
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect:
        flow_run = prefect.read_flow_run(uuid.UUID(flow_runs[0]))
        artifacts = prefect.read_artifacts()
    assert flow_run.name.startswith("lora r=4 alpha=") and flow_run.name.endswith("→ e2e")
    assert {"adaptflow", "method:lora", "task:causal_lm", "model:e2e"} <= set(flow_run.tags)
    (summary,) = [a for a in artifacts if a.flow_run_id == flow_run.id and a.key == "adaptflow-e2e"]
    assert f"`models:/e2e/{result['model_version']}` → @champion" in str(summary.data)
    assert "| eval_loss |" in str(summary.data) and result["run_id"] in str(summary.data)

    assert main(["predict", "models:/e2e@champion", "--text", "Once upon", "--json"]) == 0
    predicted = last_json(capsys.readouterr().out)
    assert predicted["command"] == "predict" and len(predicted["predictions"]) == 1


BAD_INPUTS = [
    (["--set", "data.train=missing.jsonl"], "data.train: file not found"),
    (["--set", "method.name=magic"], "method.name: unknown method 'magic'"),
    (["--set", "train.learning_rate=0"], "train.learning_rate: Input should be greater than 0"),
    (["--set", "model.name_or_path=./no/such/model"], "model.name_or_path: folder not found"),
    (["--set", "train.colour=blue"], "train.colour: unknown key"),
    (["--set", "data.text_column=body"], "data.text_column: column 'body' not found"),
    (["--set", "method.target_modules=[q_proj, qkv]"], "method.target_modules: 'qkv' is not a linear module"),
]


@pytest.mark.slow
def test_bad_input_exits_2_naming_the_key_and_registers_nothing(
    tmp_path: Path, tiny_model: str, stories_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny_run_config(tmp_path / "run.yaml", tiny_model, stories_file)
    for overrides, expected in BAD_INPUTS:
        assert main(["run", str(config), *overrides, "--json"]) == 2, overrides
        captured = capsys.readouterr()
        assert expected in captured.err, (overrides, captured.err[-2000:])
        assert "Traceback" not in captured.err
        assert last_json(captured.out)["status"] == "error"
    assert MlflowClient().search_registered_models() == []


def test_cli_exit_code_and_message_from_the_installed_command(tmp_path: Path) -> None:
    config = write_config(tmp_path / "bad.yaml", data={"train": "x.jsonl"}, method={"r": -3})
    command = Path(sys.executable).with_name("adaptflow")
    done = subprocess.run([str(command), "run", str(config)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "method.r: Input should be greater than 0 (got -3)" in done.stderr
    listing = subprocess.run([str(command), "methods", "--json"], capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0
    methods = json.loads(listing.stdout.strip().splitlines()[-1])["methods"]
    assert [m["name"] for m in methods] == [
        "full",
        "head",
        "lora",
        "dora",
        "qlora",
        "ia3",
        "adapter",
        "prefix",
        "prompt",
    ]
    lora = next(m for m in methods if m["name"] == "lora")
    assert lora["flow"] == "lora_finetune" and {"key": "method.r", "default": 8} in [
        {k: s[k] for k in ("key", "default")} for s in lora["settings"]
    ]


@pytest.mark.slow
def test_classification_with_string_labels_predicts_label_names(
    tmp_path: Path, tiny_model: str, reviews_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(
        tmp_path / "cls.yaml",
        model={"name_or_path": tiny_model},
        task="classification",
        data={"train": str(reviews_file), "max_length": 32, "eval_fraction": 0.25},
        method={"name": "lora", "r": 4, "target_modules": "all-linear"},
        train={"max_steps": 40, "batch_size": 8, "learning_rate": 5e-3, "logging_steps": 10, "save_steps": 40},
        registry={"name": "reviews"},
    )
    assert main(["run", str(config), "--json"]) == 0
    result = last_json(capsys.readouterr().out)
    metrics = result["metrics"]
    assert {"eval_accuracy", "eval_f1_macro", "base_eval_accuracy", "eval_loss"} <= set(metrics)
    assert metrics["eval_accuracy"] > metrics["base_eval_accuracy"]
    assert result["aliases"] == ["champion"]
    model = mlflow.pyfunc.load_model("models:/reviews@champion")
    assert model.metadata.signature.outputs.to_dict() == [{"type": "string", "required": True}]  # label names
    assert set(model.predict(["The movie was wonderful. Everyone smiled.", "The meal was awful. Never again."])) <= {
        "negative",
        "positive",
    }


def flow_run_names() -> list[str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        flows = {f.id: f.name for f in client.read_flows()}
        return [flows[run.flow_id] for run in client.read_flow_runs()]


# One of each kind: our own bottleneck adapters and a pooled prefix classifier (adapter-only, loaded through the
# code shipped with the model), prompt tuning for generation, and QLoRA (merged into a full-precision base).
METHOD_RUNS = [
    ("adapter", "classification", {"bottleneck_size": 8}, 1e-3),
    ("prefix", "classification", {"num_virtual_tokens": 4}, 3e-2),
    ("prompt", "causal_lm", {"num_virtual_tokens": 4, "init_text": "Once upon a time"}, 3e-2),
    ("qlora", "causal_lm", {"r": 4, "target_modules": "all-linear"}, 3e-3),
]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "task", "settings", "lr"), METHOD_RUNS, ids=[m[0] for m in METHOD_RUNS])
def test_each_kind_of_method_runs_registers_and_predicts(
    method: str,
    task: str,
    settings: dict,
    lr: float,
    tmp_path: Path,
    tiny_model: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from conftest import _sample

    data = _sample(tmp_path, "stories" if task == "causal_lm" else "reviews", 60)
    config = write_config(
        tmp_path / "run.yaml",
        model={"name_or_path": tiny_model},
        task=task,
        data={"train": str(data), "max_length": 32, "eval_fraction": 0.2},
        method={"name": method, **settings},
        train={"max_steps": 10, "batch_size": 8, "learning_rate": lr, "logging_steps": 5, "save_steps": 10},
        registry={"name": f"m-{method}"},
    )
    assert main(["run", str(config), "--json"]) == 0
    result = last_json(capsys.readouterr().out)
    metrics = result["metrics"]
    assert result["method"] == method and result["aliases"] == ["champion"]
    assert all(isinstance(v, (int, float)) and v == v for v in metrics.values()), metrics  # finite, no NaN
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    assert f"{method}_finetune" in flow_run_names()
    mergeable = method == "qlora"
    assert result["mergeable"] is mergeable and ("merge_max_abs_diff" in metrics) is mergeable
    if method == "qlora":
        assert {"merged_eval_loss", "merge_eval_loss_gap"} <= set(metrics)
        assert abs(metrics["merge_eval_loss_gap"]) < 0.5

    model = mlflow.pyfunc.load_model(f"models:/m-{method}@champion")
    predictions = model.predict(["Once upon a time", "The food was great."])
    assert len(predictions) == 2
    if task == "classification":
        assert set(predictions) <= {"negative", "positive"}
    else:
        assert all(isinstance(p, str) for p in predictions)


@pytest.mark.slow
def test_input_error_inside_a_flow_prints_no_traceback(tmp_path: Path, tiny_model: str) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")  # passes the preflight (it exists), fails in the load task
    config = tiny_run_config(tmp_path / "run.yaml", tiny_model, empty)
    command = Path(sys.executable).with_name("adaptflow")
    done = subprocess.run([str(command), "run", str(config)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    before, clean, _ = done.stderr.partition(f"adaptflow: error: data.train: {empty} is empty")
    assert clean, done.stderr[-3000:]
    # Only the server's own shutdown noise may follow the message (it is not about this error).
    assert "Traceback" not in before and "tasks.errors.UserInputError" not in done.stderr, done.stderr[-3000:]
