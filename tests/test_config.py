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


BILLION_LAUGHS = """\
a: &a ["q", "q", "q", "q", "q", "q", "q", "q", "q", "q"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def test_yaml_alias_bombs_are_refused_at_once(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("anchors:\n" + _indent(BILLION_LAUGHS) + "data: {train: x.jsonl}\nmethod:\n  target_modules: *i\n")
    with pytest.raises(UserInputError, match="more than 100000 values once its aliases are expanded"):
        load_config(bomb)
    with pytest.raises(UserInputError, match=r"--set method.target_modules: refused: more than"):
        apply_overrides({}, ["method.target_modules=" + "{" + BILLION_LAUGHS.replace("\n", ", ") + "}"])
    recursive = tmp_path / "recursive.yaml"
    recursive.write_text("data: {train: x.jsonl}\nmethod:\n  target_modules: &r [*r]\n")
    with pytest.raises(UserInputError, match="refers to itself"):
        load_config(recursive)
    big = tmp_path / "big.yaml"
    big.write_text("data: {train: x.jsonl}\n" + "#" * (2 << 20))
    with pytest.raises(UserInputError, match="larger than"):
        load_config(big)
    deep = tmp_path / "deep.yaml"
    deep.write_text("data: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(UserInputError, match=f"{deep}"):
        load_config(deep)


def _indent(text: str) -> str:
    return "".join(f"  {line}\n" for line in text.splitlines())


@pytest.mark.parametrize("name", ["a/b", "..", ".", "a:b", "x%2Fy", " ", "a/../b", "./a", "a//b", "../x"])
def test_registry_names_follow_mlflow_rules(name: str) -> None:
    found = problems({"data": {"train": "x.jsonl"}, "registry": {"name": name}})
    assert len(found) == 1 and found[0].startswith("registry.name: not a valid MLflow registered model name")


def test_registry_name_rule_mirrors_mlflow() -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.store.model_registry.file_store import _validate_model_name

    from tasks.config import registered_model_name_problem

    names = [
        "adaptflow-model",
        "my model v2",
        "a.b_c",
        "a/b",
        "..",
        ".",
        "a:b",
        "x%2Fy",
        " ",
        "a\\b",
        "a/",
        "a.",
        "..a",
    ]
    for name in names:
        try:
            _validate_model_name(name)
            refused = False
        except MlflowException:
            refused = True
        assert (registered_model_name_problem(name) is not None) == refused, name
        if not refused:
            assert validate_config({"data": {"train": "x.jsonl"}, "registry": {"name": name}}).registry.name == name
