"""The config sections every floor reads: the model, the data, the bias probe.

They sit below the objectives and the stages (which read them) and know neither: the run's whole configuration,
with each objective's own section, is assembled above them in tasks/config.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Self

from pydantic import Field, field_validator, model_validator

from adapters_impl.base import ConfigSection

BUILTIN_PREFIX = "builtin:"
REGISTERED_PREFIX = "models:/"
REGISTERED_FORMS = "models:/NAME@ALIAS or models:/NAME/VERSION"


def parse_registered(value: str) -> tuple[str, str | None, str | None]:
    """(name, alias, version) of a registry URI `models:/NAME@ALIAS` or `models:/NAME/VERSION` (one of alias and
    version is None).

    Raises:
        ValueError: not a registry URI of either form (the message gives both).
    """
    rest = value.removeprefix(REGISTERED_PREFIX)
    name, alias, version = rest, None, None
    if "@" in rest:
        name, alias = rest.split("@", 1)
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
    if (
        rest == value
        or not name
        or "/" in name
        or not (alias or (version and version.isdigit()))
        or (alias is not None and not alias.replace("-", "").replace("_", "").isalnum())
    ):
        raise ValueError(f"expected {REGISTERED_FORMS} (a registered model)")
    return name, alias, version


# The roles of a conversation, for every objective that reads chat data.
ROLES = ("system", "user", "assistant")
DEFAULT_ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class Section(ConfigSection):
    def with_paths(self, resolve: Callable[[str], str]) -> Self:
        """The section with the files it names made absolute by `resolve` (relative to the config); most name
        none."""
        return self


class ModelSettings(Section):
    name_or_path: str = Field(
        "builtin:tiny",
        description="hub id, local folder, .gguf file, builtin:tiny, builtin:smollm2-135m-instruct, or a "
        "registered model to start from: models:/NAME@ALIAS (resolved once, when the run starts) or models:/NAME/VERSION",
    )
    revision: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = Field(
        False, description="also load pickle weights (pytorch_model.bin); unpickling a file can run code"
    )

    @field_validator("name_or_path")
    @classmethod
    def _registered(cls, value: str) -> str:
        if value.startswith(REGISTERED_PREFIX):
            parse_registered(value)
        elif value.startswith("runs:/"):
            raise ValueError(f"a run's artifacts are not a base; register the run and give {REGISTERED_FORMS}")
        return value

    @model_validator(mode="after")
    def _registered_revision(self) -> Self:
        if self.revision is not None and self.name_or_path.startswith(REGISTERED_PREFIX):
            raise ValueError(
                "@revision: a registered model is pinned by its version; give models:/NAME/VERSION instead"
            )
        return self

    @property
    def registered(self) -> bool:
        """The base is a registered model (`models:/...`), resolved through the tracking store."""
        return self.name_or_path.startswith(REGISTERED_PREFIX)


class RowLayout(Section):
    """How a file's rows are laid out, for the objectives that read structured rows (chat data): part of every
    `data:` section. An objective that reads them names its formats and columns (`Objective.row_layout`, which
    checks these keys); the others refuse them set."""

    format: str = Field("auto", description="the rows' format (task instruction: alpaca, messages, ...); auto: detect")
    columns: dict[str, str] = Field(
        default_factory=dict, description="the format's column name -> the file's column name, e.g. {output: answer}"
    )
    role_map: dict[str, str] = Field(
        default_factory=dict, description="sharegpt `from` value -> role, added to human/gpt/system"
    )

    @field_validator("role_map")
    @classmethod
    def _role_map(cls, value: dict[str, str]) -> dict[str, str]:
        bad = {k: v for k, v in value.items() if v not in ROLES}
        if bad:
            raise ValueError(f"roles must be one of {list(ROLES)}, got {bad}")
        return value

    def column(self, canonical: str) -> str:
        """The file's name for a format's canonical column."""
        return self.columns.get(canonical, canonical)

    def roles(self) -> dict[str, str]:
        """The sharegpt `from` -> role map: the defaults with `role_map` on top."""
        return {**DEFAULT_ROLE_MAP, **self.role_map}

    def layout(self) -> dict[str, object]:
        return {key: getattr(self, key) for key in RowLayout.model_fields}


class DataSettings(RowLayout):
    train: str = Field(..., description="a file (.jsonl .json .csv .tsv .parquet .txt), a folder of them, or a hub id")
    eval: str | None = None
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    split_seed: int = Field(0, description="seed of the train/eval split, fixed so that runs compare")
    text_column: str = "text"
    label_column: str = "label"
    max_length: int = Field(256, gt=1)


class GateSettings(Section):
    """Thresholds that keep a tuned model out of @champion; null skips a check."""

    max_stereotype_rise: float | None = Field(
        10.0, description="largest allowed rise of the pairs' stereotype score over the base model, in points"
    )
    min_rule_pass_rate: float | None = Field(None, ge=0, le=1, description="lowest pass rate of any rule category")
    min_consistency: float | None = Field(
        None, ge=0, le=1, description="lowest prediction consistency under perturbation (classification)"
    )


class ProbeSettings(Section):
    """The bias and robustness probe: a builtin suite name or a path (YAML suite, pairs CSV/JSONL, WinoBias dir)."""

    suite: str | None = Field("default", description="builtin suite name or path; null: no probe")
    gate: GateSettings = GateSettings()
    samples: int = Field(1, ge=1, description="generations per rule prompt: 1 = greedy, more = seeded sampling")
    max_new_tokens: int = Field(20, gt=0)
    seed: int = 0
    batch_size: int = Field(16, gt=0)
