from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tasks.config import apply_overrides, load_config, validate_config
from tasks.errors import UserInputError

PRESETS = sorted(
    p for p in (Path(__file__).resolve().parent.parent / "deployments").glob("*.yaml") if p.name != "prefect.yaml"
)


def problems(raw: dict) -> list[str]:
    with pytest.raises(UserInputError) as caught:
        validate_config(raw)
    return caught.value.problems


def test_defaults_follow_the_contract() -> None:
    config = validate_config({"data": {"train": "x.jsonl"}})
    assert config.task == "causal_lm"
    assert config.method.name == "lora"
    assert config.method.r == 8 and config.method.alpha == 16
    assert config.method.target_modules == ["q_proj", "v_proj"]
    assert config.train.learning_rate == 2e-4 and config.train.max_steps == 200
    assert config.registry.promote.metric == "eval_loss"
    assert config.model.trust_remote_code is False


def test_every_problem_is_reported_at_once_with_its_dotted_key() -> None:
    found = problems(
        {
            "data": {"train": "x", "colour": 1},
            "method": {"name": "lora", "r": 0},
            "train": {"learning_rate": -1},
            "extra": True,
        }
    )
    assert len(found) == 4
    assert any(p.startswith("data.colour: unknown key; allowed: train,") for p in found)
    assert any(p.startswith("method.r:") and "greater than 0" in p for p in found)
    assert any(p.startswith("train.learning_rate:") and "greater than 0" in p for p in found)
    assert any(p.startswith("extra: unknown key") for p in found)


def test_unknown_method_lists_the_known_ones() -> None:
    (problem,) = problems({"data": {"train": "x"}, "method": {"name": "magic"}})
    assert problem == (
        "method.name: unknown method 'magic'; expected one of: full, head, lora, dora, qlora, ia3, adapter, prefix, prompt"
    )


def test_missing_data_section_is_named() -> None:
    assert problems({}) == ["data: required"]


def test_overrides_take_yaml_values_and_create_sections() -> None:
    raw = apply_overrides(
        {"data": {"train": "x"}},
        [
            "method.r=16",
            "method.target_modules=[q_proj, k_proj]",
            "train.learning_rate=1e-3",
            "registry.name=abc",
        ],
    )
    config = validate_config(raw)
    assert config.method.r == 16
    assert config.method.target_modules == ["q_proj", "k_proj"]
    assert config.train.learning_rate == pytest.approx(1e-3)
    assert config.registry.name == "abc"


def test_bad_overrides_are_user_errors() -> None:
    with pytest.raises(UserInputError, match="expected KEY=VALUE"):
        apply_overrides({}, ["method.r"])
    with pytest.raises(UserInputError, match="'task' is a value, not a section"):
        apply_overrides({"task": "causal_lm"}, ["task.x=1"])


def test_load_config_resolves_paths_beside_the_config(tmp_path: Path) -> None:
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "train.jsonl").write_text('{"text": "hi"}\n')
    path = tmp_path / "cfg" / "run.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": "train.jsonl"}}))
    config = load_config(path, ["method.r=4"])
    assert config.data.train == str((tmp_path / "cfg" / "train.jsonl").resolve())
    assert config.method.r == 4


def test_load_config_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(UserInputError, match="not valid YAML"):
        load_config(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just text\n")
    with pytest.raises(UserInputError, match="expected a YAML mapping"):
        load_config(scalar)


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    evil = tmp_path / "evil.yaml"
    evil.write_text("data: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserInputError, match="not valid YAML"):
        load_config(evil)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads_and_opens_with_its_command(preset: Path) -> None:
    first = preset.read_text().splitlines()[0]
    assert first.startswith("# adaptflow "), f"{preset.name} must open with the command that runs it"
    config = load_config(preset)
    assert Path(config.data.train).exists()
