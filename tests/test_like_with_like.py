"""Promotion compares like with like, and identity is content (issue 32, with the stale-identity items of the
hostile round two): a champion evaluated under other settings is re-evaluated under the challenger's; a resume on
changed content is refused unless allowed; a metric no run reports, or two columns read from one, are refused at
once; an edited template or a replaced base is a change, not "the same run"."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import write_config
from mlflow.tracking import MlflowClient

from flows.cli import main
from tasks.config import PromoteSettings, RunConfig, validate_config
from tasks.errors import UserInputError
from tasks.identity import run_identity
from tasks.load import DataRef
from tasks.modeling import resolve_model
from tasks.promotion import promote_version
from tasks.tokenization import tokenize_key
from tasks.tracking import record_identity, restore_status, start_run

DATA = DataRef(train_dir="t", eval_dir="e", fingerprint="fp1", text_column="text", label_column=None,
               train_rows=1, eval_rows=1, source="x.jsonl")  # fmt: skip


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def problem(raw: dict) -> str:
    with pytest.raises(UserInputError) as error:
        validate_config(raw)
    return str(error.value)


def test_a_metric_no_run_reports_is_refused_naming_the_key_and_the_metrics_it_will_report() -> None:
    message = problem(
        {"data": {"train": "x"}, "task": "instruction", "registry": {"promote": {"metric": "eval_rougel"}}}
    )
    assert "registry.promote.metric: 'eval_rougel' is not a metric this run reports" in message
    assert "eval_rouge_l" in message and "eval_token_accuracy" in message
    no_answers = {"data": {"train": "x"}, "task": "instruction", "instruction": {"eval_generations": 0}}
    message = problem(no_answers | {"grid": {"select": {"metric": "eval_rouge_l", "mode": "max"}}})
    assert "grid.select.metric: 'eval_rouge_l'" in message and "instruction.eval_generations" in message
    message = problem({"data": {"train": "x"}, "train": {"max_steps": 30}, "grid": {"prune": {"metric": "eval_acc"}}})
    assert "grid.prune.metric: 'eval_acc'" in message and "eval_perplexity" in message
    # What each objective reports is accepted, the report's and the base's too.
    validate_config(
        {"data": {"train": "x"}, "task": "classification", "registry": {"promote": {"metric": "eval_f1_weighted"}}}
    )
    validate_config({"data": {"train": "x"}, "registry": {"promote": {"metric": "base_eval_perplexity"}}})
    validate_config({"data": {"train": "x"}, "grid": {"select": {"metric": "train_seconds"}}})


def test_two_canonical_columns_read_from_one_file_column_are_refused() -> None:
    raw = {"data": {"train": "x", "columns": {"output": "instruction"}}, "task": "instruction"}
    message = problem(raw)
    assert "data.columns: instruction and output would both read the file's column 'instruction'" in message
    # A column of another format may share a name: prompt_completion reads `instruction` as its prompt.
    validate_config({"data": {"train": "x", "columns": {"prompt": "instruction"}}, "task": "instruction"})


def test_an_edited_template_file_is_a_change_of_tokens_and_identity(tmp_path: Path, tiny_model: str) -> None:
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    config = RunConfig.model_validate(
        {"data": {"train": "x"}, "task": "instruction", "instruction": {"template": str(template)}}
    )
    source = resolve_model(config.model)
    before = (tokenize_key(DATA, source, "instruction", 64, config.task_options()), run_identity(config, DATA, source))
    template.write_text("{% for m in messages %}<{{ m.role }}> {{ m.content }}\n{% endfor %}")  # same path
    after = (tokenize_key(DATA, source, "instruction", 64, config.task_options()), run_identity(config, DATA, source))
    assert before[0] != after[0], "the tokenization cache must not hand back the old template's tokens"
    assert before[1]["instruction.template"] != after[1]["instruction.template"]


def test_a_base_folder_whose_weights_were_replaced_is_another_base(tmp_path: Path, tiny_model: str) -> None:
    folder = tmp_path / "base"
    shutil.copytree(tiny_model, folder)
    config = RunConfig.model_validate({"data": {"train": "x"}, "model": {"name_or_path": str(folder)}})
    before = run_identity(config, DATA, resolve_model(config.model))
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)  # the last weights zeroed: same path, same config, same size
    weights.write_bytes(bytes(data))
    after = run_identity(config, DATA, resolve_model(config.model))
    assert before["data"] == after["data"] and before["model.name_or_path"] != after["model.name_or_path"]


def test_a_resume_on_changed_content_is_refused_unless_allowed_and_the_lineage_records_both(tmp_path: Path) -> None:
    config = RunConfig.model_validate({"data": {"train": "x.jsonl"}, "train": {"output_dir": str(tmp_path)}})
    first = start_run(config)
    record_identity(first, {"data": "fp1", "model.name_or_path": "base1"})
    client = MlflowClient()
    client.set_terminated(first.run_id, "KILLED")

    resumed = start_run(config, resume=True)
    assert resumed.run_id == first.run_id and resumed.previous_status == "KILLED"
    assert record_identity(resumed, {"data": "fp1", "model.name_or_path": "base1"}) == {}  # unchanged: goes on
    with pytest.raises(UserInputError) as refused:
        record_identity(resumed, {"data": "fp2", "model.name_or_path": "base1"})
    message = str(refused.value)
    assert "data.train/data.eval (fingerprint fp1 -> fp2)" in message and "--allow-changed" in message
    restore_status(resumed)
    assert client.get_run(first.run_id).info.status == "KILLED"  # refused: left as --resume found it

    again = start_run(config, resume=True)
    lineage = record_identity(again, {"data": "fp2", "model.name_or_path": "base1"}, allow_changed=True)
    changed = json.loads(lineage["changed_on_resume"])
    assert changed == {"data": {"before": "fp1", "after": "fp2"}}
    tags = client.get_run(first.run_id).data.tags
    assert json.loads(tags["adaptflow.changed_on_resume"]) == changed
    assert json.loads(tags["adaptflow.identity"])["data"] == "fp2"


def _version(client: MlflowClient, tmp_path: Path, eval_loss: float, settings: dict) -> str:
    if not client.search_registered_models(filter_string="name = 'm'"):
        client.create_registered_model("m")
    run = client.create_run("0")
    client.log_metric(run.info.run_id, "eval_loss", eval_loss)
    tags = {"data_fingerprint": settings["data"], "eval_settings": json.dumps(settings)}
    source = (tmp_path / "weights").as_uri()
    return str(client.create_model_version("m", source=source, run_id=run.info.run_id, tags=tags).version)


def test_a_champion_measured_under_other_settings_is_re_evaluated_or_not_compared(tmp_path: Path) -> None:
    client = MlflowClient()
    rule = PromoteSettings(metric="eval_loss", mode="min")
    assistant = {"data": "fp", "data.max_length": 256, "instruction.loss_on": "assistant"}
    champion = _version(client, tmp_path, 5.69, assistant)
    assert promote_version(client, "m", champion, rule).promoted

    every_token = {**assistant, "instruction.loss_on": "all"}
    # Lower on paper (every token counts, the template's easy ones too), worse on one yardstick.
    challenger = _version(client, tmp_path, 5.67, every_token)
    scored: list[str] = []

    def under_all_tokens(version) -> float:  # the champion's loss over every token
        scored.append(str(version.version))
        return 5.60

    decision = promote_version(client, "m", challenger, rule, reevaluate=under_all_tokens)
    assert scored == [champion] and not decision.promoted and decision.alias == "challenger"
    assert "re-evaluated under this version's evaluation settings (instruction.loss_on differed)" in decision.reason
    assert "instruction.loss_on all" in decision.reason  # the yardstick both numbers were measured on

    # Nothing to re-evaluate with (a decision without the data at hand): not compared, not promoted.
    third = _version(client, tmp_path, 1.0, {**assistant, "data.max_length": 64})
    decision = promote_version(client, "m", third, rule)
    assert not decision.promoted and "not comparable with champion" in decision.reason
    assert "data.max_length (256 -> 64)" in decision.reason


def test_a_version_is_never_its_own_challenger(tmp_path: Path) -> None:
    client = MlflowClient()
    rule = PromoteSettings(metric="eval_loss", mode="min")
    first = _version(client, tmp_path, 2.0, {"data": "fp"})
    reason = promote_version(client, "m", first, rule).reason
    again = promote_version(client, "m", first, rule)  # `adaptflow promote` after a grid, or an identical re-run
    assert again.promoted and again.alias == "champion"
    version = client.get_model_version("m", first)
    assert version.aliases == ["champion"] and version.tags["promotion"] == reason  # its decision is kept


@pytest.mark.slow
def test_promotion_after_a_change_of_loss_on_compares_on_the_challengers_yardstick(
    tmp_path: Path, tiny_model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Real runs: the same data and base, `loss_on: assistant` then `loss_on: all`."""
    data = tmp_path / "alpaca.jsonl"
    rows = [{"instruction": f"Name a colour number {i}.", "output": f"Colour {i} is blue."} for i in range(24)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = write_config(
        tmp_path / "instruct.yaml",
        model={"name_or_path": tiny_model},
        task="instruction",
        data={"train": str(data), "max_length": 64, "eval_fraction": 0.25},
        instruction={"eval_generations": 0},
        method={"name": "lora", "r": 4, "alpha": 8},
        train={"max_steps": 4, "batch_size": 8, "learning_rate": 5e-3, "save_steps": 4, "logging_steps": 2},
        registry={"name": "yardstick"},
        bias_probe={"suite": None},
    )
    assert main(["run", str(config), "--json"]) == 0
    first = last_json(capsys.readouterr().out)
    # MLflow as its users expect it (issue 31 item 9).
    client = MlflowClient()
    run = client.get_run(first["run_id"])
    assert run.data.metrics["base_eval_loss"] == first["metrics"]["base_eval_loss"]
    assert run.info.run_name.startswith("lora r=4 alpha=8 · instruction · ") and run.info.run_name.endswith("yardstick")
    assert run.data.tags["mlflow.source.git.commit"] == run.data.tags["adaptflow.git_commit"]
    contexts = sorted(d.tags[0].value for d in run.inputs.dataset_inputs)
    assert contexts == ["eval", "train"] and run.inputs.dataset_inputs[0].dataset.name.startswith("alpaca.jsonl:")
    description = client.get_model_version("yardstick", first["model_version"]).description
    assert (
        description.startswith("lora (instruction) on ") and "eval_loss" in description and "(base) ->" in description
    )
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert main(["run", str(config), "--set", "instruction.loss_on=all", "--json"]) == 0
    second = last_json(capsys.readouterr().out)
    assert second["model_version"] != first["model_version"]
    reason = MlflowClient().get_model_version("yardstick", second["model_version"]).tags["promotion"]
    assert "re-evaluated under this version's evaluation settings (instruction.loss_on differed)" in reason, reason
    assert "instruction.loss_on all" in reason

    # The first config again, on the same content: its version is reported before anything is trained.
    client = MlflowClient()
    runs_before = len(client.search_runs([client.get_experiment_by_name("adaptflow").experiment_id]))
    assert main(["run", str(config), "--json"]) == 0
    again = last_json(capsys.readouterr().out)
    assert again["model_version"] == first["model_version"] and again["run_id"] == first["run_id"]
    assert "reported without training (--force trains and registers anew)" in again["warnings"][0]
    assert len(client.search_runs([client.get_experiment_by_name("adaptflow").experiment_id])) == runs_before
    assert main(["run", str(config), "--force", "--json"]) == 0
    forced = last_json(capsys.readouterr().out)
    assert forced["run_id"] != first["run_id"] and int(forced["model_version"]) == int(second["model_version"]) + 1


def test_the_resume_hint_repeats_the_command_with_its_overrides_and_nothing_to_resume_is_exit_2(
    tmp_path: Path,
) -> None:
    from flows.cli import build_parser, resume_command

    args = build_parser().parse_args(["run", "my run.yaml", "--set", "train.seed=1", "--set", "method.r=16"])
    assert resume_command(args) == "adaptflow run 'my run.yaml' --set train.seed=1 --set method.r=16 --resume"
    config = RunConfig.model_validate({"data": {"train": "x.jsonl"}, "train": {"output_dir": str(tmp_path)}})
    with pytest.raises(UserInputError, match="--resume: no unfinished run of this config"):
        start_run(config, resume=True)


def test_the_trainers_run_average_loss_is_not_a_last_point_of_the_loss_curve(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from tasks.training import MlflowStreamCallback

    config = RunConfig.model_validate({"data": {"train": "x.jsonl"}, "train": {"output_dir": str(tmp_path)}})
    run = start_run(config)
    callback = MlflowStreamCallback(run)
    for step, loss in ((10, 2.0), (20, 1.0)):
        callback.on_log(None, SimpleNamespace(global_step=step), None, logs={"loss": loss, "learning_rate": 1e-3})
    summary = {"train_runtime": 3.0, "train_loss": 1.5, "train_samples_per_second": 9.0}
    callback.on_log(None, SimpleNamespace(global_step=20), None, logs=summary)
    client = MlflowClient()
    curve = [(m.step, m.value) for m in client.get_metric_history(run.run_id, "train_loss")]
    assert sorted(curve) == [(10, 2.0), (20, 1.0)]
    assert client.get_run(run.run_id).data.metrics["train_loss_mean"] == 1.5


def test_a_missing_or_unreadable_config_is_named_before_anything_heavy_starts(tmp_path: Path) -> None:
    """`adaptflow run nonexist.yaml` took 15-21 s: the Prefect server started and torch was imported first."""
    import subprocess
    import sys

    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    probe = (
        "import sys; from flows.cli import main; codes = [main(['run', 'nonexist.yaml']), main(['grid', 'bad.yaml'])];"
        "print(codes, 'torch' in sys.modules, 'prefect' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.stdout.strip().endswith("[2, 2] False False"), done.stdout + done.stderr
    assert "nonexist.yaml: config file not found" in done.stderr and "bad.yaml: not valid YAML" in done.stderr


def test_a_typo_in_a_config_key_is_named_before_torch_or_the_server_starts(tmp_path: Path) -> None:
    """A misspelt key, an unknown section or a bad value (with --set too) exits 2 naming the key, from the config's
    schema alone: neither torch, peft, trl, transformers, datasets nor Prefect (its server) was imported."""
    import subprocess
    import sys

    (tmp_path / "typo.yaml").write_text("data: {train: x.jsonl}\ntrain: {lerning_rate: 1e-4}\n")
    (tmp_path / "section.yaml").write_text("data: {train: x.jsonl}\ntask: instruction\nmodl: {}\n")
    (tmp_path / "ok.yaml").write_text("data: {train: x.jsonl}\ntask: preference\nmethod: {name: qlora}\n")
    probe = (
        "import json, sys; from flows.cli import main;"
        "codes = [main(['run', 'typo.yaml']), main(['grid', 'section.yaml']),"
        " main(['run', 'ok.yaml', '--set', 'preference.beta=0', '--set', 'method.r=0'])];"
        "heavy = {'torch', 'peft', 'trl', 'transformers', 'datasets', 'prefect', 'mlflow'};"
        "print(json.dumps([codes, sorted(heavy & {m.split('.')[0] for m in sys.modules})]))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [[2, 2, 2], []], done.stdout + done.stderr
    assert "train.lerning_rate: unknown key; allowed: max_steps" in done.stderr
    assert "modl: unknown key" in done.stderr
    assert "preference.beta: Input should be greater than 0" in done.stderr
    assert "method.r: Input should be greater than 0" in done.stderr


@pytest.mark.slow
def test_a_run_says_what_each_stage_did_and_nothing_users_cannot_act_on(tmp_path: Path, tiny_model: str) -> None:
    """Instead of 18 lines of "Finished in state Completed()", a bytecode disassembly (datasets hashing a function,
    echoed by log_prints) and deprecation and type-hint warnings: one line per stage with its key result."""
    import subprocess
    import sys

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": f"{i}."}) + "\n" for i in range(16)))
    config = write_config(
        tmp_path / "c.yaml",
        model={"name_or_path": tiny_model},
        task="instruction",
        data={"train": str(data), "max_length": 48, "eval_fraction": 0.25},
        instruction={"eval_generations": 2, "max_new_tokens": 4},
        train={"max_steps": 2, "batch_size": 4, "save_steps": 2, "logging_steps": 1},
        registry={"name": "said"},
        bias_probe={"suite": None},
    )
    command = [str(Path(sys.executable).with_name("adaptflow")), "run", str(config), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stderr
    for stage in ("load: 12 train / 4 eval rows", "tokenize: ", "apply-method: ", "train: 2 steps", "evaluate: "):
        assert f"adaptflow.stages: {stage}" in log, stage
    assert "adaptflow.stages: register: models:/said/1" in log and "promote: @champion" in log
    for noise in (
        "Finished in state Completed",
        "LOAD_GLOBAL",
        "is_gradient_checkpointing",
        "Add type hints",
        "Hook '",
    ):
        assert noise not in log, noise
