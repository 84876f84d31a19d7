"""The run configuration: one pydantic object, validated once at the edge, every problem reported at once."""

from __future__ import annotations

import math
import os
import posixpath
from collections.abc import Callable, Mapping
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Union, get_args

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, field_validator, model_validator

from adapters_impl import METHODS
from adapters_impl.lora import LowRankSettings
from tasks.errors import UserInputError
from tasks.objectives import OBJECTIVES, Objective
from tasks.objectives.base import GridDimension
from tasks.settings import BUILTIN_PREFIX, DataSettings, ModelSettings, ProbeSettings, RowLayout, Section
from tasks.yaml_files import config_file_problem, parse_yaml, read_yaml


class FsdpSettings(Section):
    """What `train.distributed.strategy: fsdp` shards and how (the HF Trainer's `fsdp` / `fsdp_config`)."""

    sharding: Literal["full_shard", "shard_grad_op", "hybrid_shard", "no_shard"] = Field(
        "full_shard", description="what each process keeps: full_shard = parameters, gradients, optimizer state"
    )
    auto_wrap: Literal["transformer", "size"] = Field(
        "transformer", description="wrap each decoder layer (transformer) or every block of min_num_params (size)"
    )
    min_num_params: int = Field(100_000_000, gt=0, description="block size of auto_wrap: size")
    cpu_offload: bool = Field(False, description="keep sharded parameters on the CPU between uses")
    activation_checkpointing: bool = False


class DistributedSettings(Section):
    """One run on several processes (torchrun): `batch_size` stays per process; global batch = it x world size."""

    nproc_per_node: int = Field(1, ge=1, description="processes on this node (one per GPU; on CPU, gloo)")
    nnodes: int = Field(1, ge=1, description="nodes in the run; each runs `adaptflow run` with its node_rank")
    node_rank: int = Field(0, ge=0, description="this node's rank, 0 .. nnodes-1 (rank 0 tracks and registers)")
    rdzv_endpoint: str | None = Field(None, description="host:port every node reaches (node 0's); null on one node")
    strategy: Literal["ddp", "fsdp"] = "ddp"
    fsdp: FsdpSettings = FsdpSettings()

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @model_validator(mode="after")
    def _nodes(self) -> DistributedSettings:
        if self.node_rank >= self.nnodes:
            raise ValueError(
                f"train.distributed.node_rank: {self.node_rank} is not below nnodes ({self.nnodes}); "
                "node ranks are 0 .. nnodes-1"
            )
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(
                "train.distributed.rdzv_endpoint: required when nnodes > 1: host:port of node 0 that every node "
                "reaches (e.g. 10.0.0.1:29400)"
            )
        if self.rdzv_endpoint is not None:
            host, sep, port = self.rdzv_endpoint.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(
                    f"train.distributed.rdzv_endpoint: expected host:port (e.g. 10.0.0.1:29400), got "
                    f"{self.rdzv_endpoint!r}"
                )
        return self


# --- evaluation while training (tasks/periodic_eval.py) ---
class BestSettings(Section):
    """Which evaluation's checkpoint a run keeps: the one evaluated at the end, merged, probed and registered."""

    metric: str = Field("eval_loss", description="an eval metric the objective reports at each evaluation")
    mode: Literal["min", "max"] = "min"


class EarlyStoppingSettings(Section):
    """Stop when train.best's metric has not improved by more than min_delta for `patience` evaluations."""

    patience: int = Field(3, ge=1, description="evaluations without improvement before training stops")
    min_delta: float = Field(0.0, ge=0, description="the smallest change that counts as an improvement")


# --- end evaluation while training ---


class TrainSettings(Section):
    max_steps: int | None = Field(200, gt=0)
    epochs: float | None = Field(None, gt=0)
    batch_size: int = Field(16, gt=0)
    eval_batch_size: int = Field(
        16, gt=0, description="batch size of every evaluation pass: base, tuned, merge, reports"
    )
    grad_accum: int = Field(1, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    seed: int = 0
    save_steps: int = Field(100, gt=0)
    keep_checkpoints: int = Field(
        1, ge=0, description="checkpoints the run folder keeps once the version is registered (the newest)"
    )
    logging_steps: int = Field(10, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16", "bf16-pure"] = Field(
        "auto", description="auto: bf16 on a bf16 GPU, fp32 on CPU; bf16-pure: method full without fp32 weights"
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: less memory")
    optim: str | None = Field(None, description="a Hugging Face optimizer name (adamw_torch_fused, ...); null: HF's")
    packing: bool = Field(False, description="several rows per sequence, rows kept apart (causal_lm, instruction)")
    output_dir: str = Field("runs", description="run folders (checkpoints, adapters, reports) and caches")
    memory_check: bool = Field(
        True, description="refuse a run whose planned peak memory exceeds the device's free memory (adaptflow plan)"
    )
    distributed: DistributedSettings | None = Field(
        None, description="null (or one process on one node): train in this process"
    )
    # --- evaluation while training (tasks/periodic_eval.py) ---
    eval_steps: int | None = Field(
        None, gt=0, description="evaluate on the eval split every N steps (null: at the end only)"
    )
    eval_generations: int = Field(
        8,
        ge=0,
        description="instruction: held-out prompts answered for ROUGE-L/exact match at each evaluation (0: loss only)",
    )
    best: BestSettings | None = Field(None, description="keep the checkpoint with the best metric (needs eval_steps)")
    early_stopping: EarlyStoppingSettings | None = Field(
        None, description="stop when train.best's metric stops improving (needs eval_steps)"
    )

    def best_tracking(self) -> BestSettings | None:
        """What picks the best checkpoint: train.best, else eval_loss (min) when early stopping is on."""
        return self.best or (BestSettings() if self.early_stopping is not None else None)

    # --- end evaluation while training ---

    @field_validator("optim")
    @classmethod
    def _hf_optimizer(cls, name: str | None) -> str | None:
        from transformers.training_args import OptimizerNames

        known = [o.value for o in OptimizerNames]
        if name is not None and name not in known:
            raise ValueError(f"unknown optimizer {name!r}; Hugging Face's names are: {', '.join(known)}")
        return name

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainSettings:
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set train.max_steps or train.epochs")
        # --- evaluation while training ---
        for key in ("best", "early_stopping"):
            if getattr(self, key) is not None and self.eval_steps is None:
                raise ValueError(f"train.{key}: needs train.eval_steps (how often to evaluate), e.g. eval_steps: 50")
        if self.eval_steps is not None and self.max_steps is not None and self.eval_steps > self.max_steps:
            raise ValueError(
                f"train.eval_steps: {self.eval_steps} is larger than train.max_steps ({self.max_steps}): "
                "training would never evaluate; choose at most max_steps"
            )
        if self.eval_steps is not None and self.distributed is not None and self.distributed.world_size > 1:
            raise ValueError(
                "train.eval_steps: evaluation while training runs in one process; remove train.distributed "
                "or train.eval_steps"
            )
        # --- end evaluation while training ---
        return self


class TrackingSettings(Section):
    uri: str | None = Field(None, description="null: MLFLOW_TRACKING_URI, else the embedded SQLite store")
    experiment: str = "adaptflow"


# What every run reports besides its objective's metrics (`Objective.metric_names`): training's measurements
# (TrainedRef.metrics) and evaluation's time, which grid trials report too, then the merge checks of registration.
TRAINING_METRICS = (
    "trainable_params",
    "total_params",
    "train_seconds",
    "train_tokens_per_second",
    "checkpoint_seconds",
    "peak_memory_mb",
    "eval_seconds",
)
MERGE_METRICS = ("merge_max_abs_diff", "merge_tolerance", "merged_eval_loss", "merge_eval_loss_gap")


class PromoteSettings(Section):
    metric: str = "eval_loss"
    mode: Literal["min", "max"] = "min"
    min_delta: float = Field(0.0, ge=0)


def registered_model_name_problem(name: str) -> str | None:
    """Why MLflow would refuse `name` as a registered model name, or None.

    Mirrors MLflow 3's checks (`mlflow.utils.validation._validate_model_name` plus the file store's
    `_validate_model_name`, the strictest store), so a name fails here, not after training; importing MLflow
    for this would put its import on every config load. tests/test_config.py checks the mirror against MLflow.
    """
    if not name.strip():
        return "must not be empty"
    if "/" in name or ":" in name:
        return "must not contain '/' or ':'"
    norm = posixpath.normpath(name)
    if norm != name or norm == "." or norm.startswith(("..", "/")):
        return f"must not read as a file path that resolves to another name (it resolves to {norm!r})"
    if any(sep in name for sep in (os.sep, os.altsep) if sep):
        return "must not contain a path separator"
    if "%" in name:
        return "must not contain '%'"
    return None


class RegistrySettings(Section):
    name: str = Field("adaptflow-model", min_length=1, description="registered model name (MLflow's rules)")
    merged: bool = Field(
        False, description="also store the merged model (in the base's dtype) with each version of a mergeable method"
    )
    promote: PromoteSettings = PromoteSettings()

    @field_validator("name")
    @classmethod
    def _mlflow_name(cls, name: str) -> str:
        problem = registered_model_name_problem(name)
        if problem:
            raise ValueError(f"not a valid MLflow registered model name: {problem}")
        return name


ExportFormat = Literal["hf-merged", "gguf", "gguf-lora", "ollama", "ollama-lora", "vllm-check"]


class ExportSettings(Section):
    """Export after registration (tasks/export): each format verified against the version, logged on it as tags."""

    formats: list[ExportFormat] = Field(
        default_factory=lambda: list[ExportFormat](["gguf"]), min_length=1, description="serving formats to write"
    )
    quant: Literal["f32", "f16", "bf16", "q8_0"] | None = Field(
        None, description="weight type (null: f16 for GGUF, f32 for hf-merged)"
    )
    gate: bool = Field(False, description="keep a version whose export fails verification out of @champion")
    path: str | None = Field(None, description="folder for exports (null: train.output_dir/exports)")
    store: bool = Field(False, description="also log the exported files into the tracking store (large)")


class SelectSettings(Section):
    metric: str = Field("eval_loss", description="the trial metric that picks the best")
    mode: Literal["min", "max"] = "min"


def _default_target_sets() -> list[list[str] | Literal["all-linear"]]:
    return [["q_proj", "v_proj"], "all-linear"]


# The low-rank methods (their settings have r, alpha, target_modules): the ones a grid over those applies to.
GRID_METHODS = tuple(name for name, m in METHODS.items() if issubclass(m.settings, LowRankSettings))
GridMethod: Any = Literal[GRID_METHODS]  # type: ignore[valid-type]


class PruneSettings(Section):
    """Successive halving over the grid's trials: all train to the first rung, the best 1/eta go on, and so on."""

    strategy: Literal["halving"] = "halving"
    eta: int = Field(3, ge=2, description="keep the best 1/eta of the trials at each rung")
    min_steps: int | None = Field(
        None, gt=0, description="steps of the first rung (null: train.max_steps / eta^k, the last rung max_steps)"
    )
    metric: str | None = Field(None, description="the metric that ranks trials at a rung (null: grid.select's)")
    mode: Literal["min", "max"] | None = Field(None, description="min or max of `metric` is best (null: grid.select's)")


# What the objectives add to the grid (`Objective.grid_dimensions`): `grid.<name>`, read by their tasks only.
GRID_DIMENSIONS: dict[str, GridDimension] = {d.name: d for o in OBJECTIVES.values() for d in o.grid_dimensions}


def dimension_readers(name: str) -> list[str]:
    """The tasks whose objective declares grid dimension `name`."""
    return [o.name for o in OBJECTIVES.values() if any(d.name == name for d in o.grid_dimensions)]


class GridSettings(Section):
    """The comparison grid: every combination of these, one trial each (and of the objective's own dimensions,
    e.g. grid.beta for task preference)."""

    r: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [4, 8, 16], min_length=1)
    alpha: list[Annotated[float, Field(gt=0)]] = Field(default_factory=lambda: [8.0, 16.0, 32.0], min_length=1)
    target_modules: list[list[str] | Literal["all-linear"]] = Field(
        default_factory=lambda: _default_target_sets(), min_length=1
    )
    method: list[GridMethod] | None = Field(None, description="low-rank methods to compare (null: the config's method)")
    select: SelectSettings = SelectSettings()
    runner: Literal["local", "dask"] = "local"
    max_parallel: int = Field(2, ge=1, description="trials at once (local processes or Dask workers)")
    dask_address: str | None = Field(None, description="scheduler address to join; null: start a LocalCluster")
    prune: PruneSettings | None = Field(
        None, description="stop losing trials early (null: every trial runs to the end)"
    )

    def objective_values(self) -> dict[str, list[Any]]:
        """The objectives' dimensions this grid lists (`grid.beta: [0.1, 0.5]`), by name, in declaration order."""
        return {name: list(values) for name in GRID_DIMENSIONS if (values := getattr(self, name, None))}

    @property
    def size(self) -> int:
        size = len(self.r) * len(self.alpha) * len(self.target_modules) * len(self.method or [None])
        return math.prod((len(v) for v in self.objective_values().values()), start=size)


if not TYPE_CHECKING:  # the objectives' dimensions as optional lists (`grid.beta`), declared by the objectives
    GridSettings = create_model(
        "GridSettings",
        __base__=GridSettings,
        __module__=__name__,
        __doc__=GridSettings.__doc__,
        **{
            d.name: (
                list[d.item] | None,
                Field(
                    None, min_length=1, description=f"task {' or '.join(dimension_readers(d.name))}: {d.description}"
                ),
            )
            for d in GRID_DIMENSIONS.values()
        },
    )


# `task:` names an objective from their registry (tasks/objectives).
TaskName: Any = Literal[tuple(OBJECTIVES)]  # type: ignore[valid-type]

# The method section is a union discriminated by `name`, built from the registry of methods.
MethodConfig: Any = Annotated[
    Union[tuple(m.settings for m in METHODS.values())],  # type: ignore[valid-type]  # noqa: UP007
    Field(discriminator="name"),
]


class RunConfig(Section):
    """Everything one pipeline run needs. Method flows narrow `method` to their own settings (subclasses)."""

    default_method: ClassVar[str] = "lora"

    model: ModelSettings = ModelSettings()
    task: TaskName = "causal_lm"
    data: DataSettings
    method: MethodConfig = Field(default_factory=lambda: METHODS["lora"].settings(name="lora"))
    train: TrainSettings = TrainSettings()
    tracking: TrackingSettings = TrackingSettings()
    registry: RegistrySettings = RegistrySettings()
    bias_probe: ProbeSettings = ProbeSettings()
    grid: GridSettings | None = None
    export: ExportSettings | None = Field(None, description="export the registered version (null: no export)")
    # Each objective's own section (`instruction:`) is added below from the registry (`Objective.section`).

    @property
    def objective(self) -> Objective:
        """The objective `task:` names: resolved here, at the edge, and handed to the stages."""
        return OBJECTIVES[self.task]

    @model_validator(mode="before")
    @classmethod
    def _default_method_name(cls, values: Any) -> Any:
        if isinstance(values, dict) and isinstance(values.get("method"), dict):
            values = {**values, "method": {"name": cls.default_method, **values["method"]}}
        return values

    @model_validator(mode="after")
    def _method_fits_task(self) -> RunConfig:
        method, objective = METHODS[self.method.name], self.objective
        if not objective.supports(method):
            raise ValueError(
                f"method.name: '{method.name}' cannot do task '{self.task}': {method.unsupported[objective.head.kind]}"
            )
        problem = self._task_settings_problem() or self._metric_problem()
        if problem:
            raise ValueError(problem)
        distributed = self.train.distributed
        fsdp = distributed is not None and distributed.world_size > 1 and distributed.strategy == "fsdp"
        if fsdp and method.fsdp_problem:
            raise ValueError(
                f"train.distributed.strategy: fsdp with {method.name} is not supported: {method.fsdp_problem} "
                "(use strategy: ddp)"
            )
        if fsdp and not method.fsdp:
            sharded = ", ".join(name for name, m in METHODS.items() if m.fsdp)
            raise ValueError(
                f"train.distributed.strategy: fsdp trains the methods {sharded}; "
                f"method.name is '{method.name}' (use strategy: ddp)"
            )
        if self.train.gradient_checkpointing and method.checkpointing_problem:
            raise ValueError(
                f"train.gradient_checkpointing: not supported with method {method.name}: {method.checkpointing_problem}"
            )
        if self.grid and not self.grid.method and self.method.name not in GRID_METHODS:
            raise ValueError(
                f"grid: a grid over rank, alpha and target modules needs a low-rank method "
                f"({', '.join(GRID_METHODS)}); method.name is '{self.method.name}' (set method.name or grid.method)"
            )
        prune = self.grid.prune if self.grid else None
        if prune is not None:
            if self.train.max_steps is None:
                raise ValueError("grid.prune: pruning trains to step counts; set train.max_steps (not train.epochs)")
            if prune.min_steps is not None and prune.min_steps >= self.train.max_steps:
                raise ValueError(
                    f"grid.prune.min_steps: must be below train.max_steps ({self.train.max_steps}) "
                    f"(got {prune.min_steps})"
                )
            if self.train.distributed is not None and self.train.distributed.world_size > 1:
                raise ValueError(
                    "grid.prune: pruned trials stop and continue at rungs in one process each; "
                    "remove train.distributed or grid.prune"
                )
        return self

    def _task_settings_problem(self) -> str | None:
        """Settings the chosen objective does not read, set anyway (a config meant for another task), and the
        objective's own checks of the data keys it reads."""
        objective = self.objective
        for other in OBJECTIVES.values():
            if other.section and other.section != objective.section and getattr(self, other.section) is not None:
                return f"{other.section}: only task {other.name} reads this section (task is '{self.task}')"
        own = {d.name for d in objective.grid_dimensions}
        for name in self.grid.objective_values() if self.grid else {}:
            if name not in own:
                return f"grid.{name}: only task {' or '.join(dimension_readers(name))} reads it (task is '{self.task}')"
        layout = {key: getattr(self.data, key) for key in RowLayout.model_fields}
        if objective.row_layout is None:
            for key, value in layout.items():
                if value != RowLayout.model_fields[key].get_default(call_default_factory=True):
                    readers = [o.name for o in OBJECTIVES.values() if o.row_layout is not None]
                    return f"data.{key}: only task {' or '.join(readers)} reads it (task is '{self.task}')"
        else:
            try:
                objective.row_layout.model_validate(layout)
            except ValidationError as exc:
                error = exc.errors()[0]
                message = error["msg"].removeprefix("Value error, ")
                key = f"data.{'.'.join(str(p) for p in error['loc'])}"
                return message if message.startswith("data.") else f"{key}: {message} (got {error.get('input')!r})"
        if self.train.packing:
            if objective.packing_problem:
                return f"train.packing: {objective.packing_problem}; set train.packing: false"
            method = METHODS[self.method.name]
            if method.virtual_tokens:
                return (
                    f"train.packing: not supported with method {method.name}: its virtual tokens are prepended once "
                    "to the whole packed sequence, so only the first row would see them at the right positions; "
                    "set train.packing: false or choose another method"
                )
        return None

    def with_section(self, values: Mapping[str, Any]) -> RunConfig:
        """This config with keys of the objective's own section set (a grid trial's own dimensions), validated."""
        objective = self.objective
        if not values or not objective.section or objective.settings is None:
            return self
        section = getattr(self, objective.section) or objective.settings()
        updated = objective.settings.model_validate({**section.model_dump(by_alias=True), **values})
        return self.model_copy(update={objective.section: updated})

    def grid_variants(self) -> list[dict[str, Any]]:
        """Every combination of the objective's grid dimensions this grid lists ([{}] when it lists none)."""
        values = self.grid.objective_values() if self.grid else {}
        return [dict(zip(values, combination, strict=True)) for combination in product(*values.values())]

    def _in_every_trial(self, metrics: Callable[[RunConfig], tuple[str, ...]]) -> tuple[str, ...]:
        """The metrics every grid trial's config reports (the objective's dimensions can change them: a grid over
        losses), in this config's order; without a grid, this config's."""
        reported = [metrics(self.with_section(v)) for v in self.grid_variants()]
        return tuple(m for m in reported[0] if all(m in r for r in reported[1:]))

    def trial_metrics(self) -> tuple[str, ...]:
        """The metrics every run and grid trial of this config reports: its objective's, then training's."""
        return (*self.objective.metric_names(self), *TRAINING_METRICS)

    def registered_metrics(self) -> tuple[str, ...]:
        """The metrics a registered version of this config carries: the trials', the base's, the report's and
        the merge check's."""
        objective = self.objective
        evaluated = (*objective.metric_names(self), *objective.report_metrics)
        return (*evaluated, *(f"base_{m}" for m in objective.metric_names(self)), *TRAINING_METRICS, *MERGE_METRICS)

    def periodic_metrics(self) -> tuple[str, ...]:
        """The metrics each evaluation while training reports: an objective whose section generates answers
        (`eval_generations`, e.g. instruction's) generates train.eval_generations of them there."""
        objective, config = self.objective, self
        name, settings = objective.section, objective.settings
        if name and settings and "eval_generations" in settings.model_fields:
            section = (getattr(self, name) or settings()).model_copy(
                update={"eval_generations": self.train.eval_generations}
            )
            config = self.model_copy(update={name: section})
        return objective.metric_names(config)

    def _metric_problem(self) -> str | None:
        """A promotion, selection or pruning metric that no run of this config reports: it would be found only
        after training (a version that can never become champion, a grid whose every trial "failed")."""
        registered = self._in_every_trial(RunConfig.registered_metrics)
        checks = [("registry.promote.metric", self.registry.promote.metric, registered)]
        best = self.train.best_tracking()  # evaluation while training: a metric each evaluation reports
        if best is not None:
            periodic = self._in_every_trial(RunConfig.periodic_metrics)
            checks.append(("train.best.metric", best.metric, periodic))
        if self.grid is not None:
            trial_metrics = self._in_every_trial(RunConfig.trial_metrics)
            checks.append(("grid.select.metric", self.grid.select.metric, trial_metrics))
            if self.grid.prune is not None and self.grid.prune.metric is not None:
                checks.append(("grid.prune.metric", self.grid.prune.metric, trial_metrics))
        for key, metric, reported in checks:
            if metric not in reported:
                hint = self.objective.metric_hint(metric, key)
                who = f"task {self.task}" if len(self.grid_variants()) == 1 else "every trial of this grid"
                return f"{key}: '{metric}' is not a metric this run reports{hint}; {who} reports {', '.join(reported)}"
        return None

    def task_options(self) -> dict[str, Any]:
        """The objective's settings from this config, for its encoder (`Objective.options`)."""
        return self.objective.options(self)

    def flat(self) -> dict[str, Any]:
        """The resolved config as dotted keys, for MLflow params."""
        return flatten(self.model_dump(mode="json"))


if not TYPE_CHECKING:  # each objective's own section, declared by the objective: one package adds a task
    RunConfig = create_model(
        "RunConfig",
        __base__=RunConfig,
        __module__=__name__,
        __doc__=RunConfig.__doc__,
        **{
            o.section: (o.settings | None, Field(None, description=f"task {o.name}: {o.summary}"))
            for o in OBJECTIVES.values()
            if o.section and o.settings
        },
    )


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--set a.b=VALUE` overrides (VALUE parsed as YAML) to a raw config mapping."""
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"--set {item!r}: expected KEY=VALUE, e.g. --set method.r=16")
            continue
        try:
            value = parse_yaml(text, f"--set {key}") if text.strip() else None
        except UserInputError as exc:
            problems.append(str(exc))
            continue
        node = raw
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                parent = ".".join(parts[: i + 1])
                problems.append(f"--set {key}: '{parent}' is a value, not a section")
                break
            node = child
        else:
            node[parts[-1]] = value
    if problems:
        raise UserInputError.many("invalid --set overrides:", problems)
    return raw


def _describe(error: Any) -> str:
    loc = [str(p) for p in error["loc"]]
    # Drop the union tag pydantic adds after "method" (method.lora.r -> method.r).
    if len(loc) > 1 and loc[0] == "method" and loc[1] in METHODS:
        loc = [loc[0], *loc[2:]]
    key = ".".join(loc) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{key}: unknown key"
    if kind == "union_tag_invalid":
        got = error.get("ctx", {}).get("tag")
        return f"method.name: unknown method {got!r}; expected one of: {', '.join(METHODS)}"
    if kind == "missing":
        return f"{key}: required"
    message = error["msg"].removeprefix("Value error, ")
    if message.startswith("@"):  # a section's own key (ConfigSection): "@max_steps: ..." -> "train.max_steps: ..."
        field, _, rest = message[1:].partition(": ")
        return f"{key}.{field}: {rest}" if loc else f"{field}: {rest}"
    sections = tuple(o.section for o in OBJECTIVES.values() if o.section)
    if message.startswith(("method.", "train.", "data.", "grid.", "registry.", *sections)):
        return message
    shown = error.get("input")
    got = "" if isinstance(shown, dict) else f" (got {shown!r})"
    return f"{key}: {message}{got}"


def _allowed_keys(problem: str) -> str:
    """For an unknown key, the keys its section allows."""
    key = problem.split(":", 1)[0]
    parts = key.split(".")
    model: type[BaseModel] = RunConfig
    for part in parts[:-1]:
        field = model.model_fields.get(part)
        if field is None:
            return problem
        if part == "method":
            return problem + " (see `adaptflow methods` for each method's settings)"
        # An optional section (`distributed: ... | None`) names its section model among the union's members.
        annotation = next((a for a in get_args(field.annotation) if isinstance(a, type)), field.annotation)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return problem
        model = annotation
    own = [k for k in model.model_fields if k in vars(model).get("__annotations__", {})]  # before inherited keys
    return problem + f"; allowed: {', '.join([*own, *(k for k in model.model_fields if k not in own)])}"


def validate_config(raw: Any, source: str = "config") -> RunConfig:
    """Validate a raw mapping; every problem is reported at once, with its dotted key.

    Raises:
        UserInputError: the config is invalid.
    """
    if not isinstance(raw, dict):
        raise UserInputError(f"{source}: expected a YAML mapping of sections (model, task, data, method, ...)")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            problem = _describe(error)
            if error["type"] == "extra_forbidden":
                problem = _allowed_keys(problem)
            problems.append(problem)
        raise UserInputError.many(f"{source}: invalid configuration", problems) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (safe loading), apply `--set` overrides, resolve relative paths, validate.

    Relative paths (data files, a local model folder) are looked up from the working directory first,
    then from the config file's folder.
    """
    path = Path(path)
    problem = config_file_problem(path)
    if problem:
        raise UserInputError(problem)
    raw = read_yaml(path) or {}
    raw = apply_overrides(raw, overrides or [])
    config = validate_config(raw, str(path))
    return resolve_paths(config, path.parent)


def _resolve(value: str, base: Path) -> str:
    candidate = Path(value).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return str(candidate.resolve()) if candidate.exists() else value
    beside_config = base / candidate
    return str(beside_config.resolve()) if beside_config.exists() else value


def resolve_paths(config: RunConfig, base: Path) -> RunConfig:
    """Make existing relative data, model and template paths absolute (looked up from the working directory, then
    beside the config), so stages do not depend on the cwd."""
    data = config.data.model_copy(
        update={
            "train": _resolve(config.data.train, base),
            "eval": _resolve(config.data.eval, base) if config.data.eval else None,
        }
    )
    model = config.model
    if not model.name_or_path.startswith(BUILTIN_PREFIX) and not model.registered:
        model = model.model_copy(update={"name_or_path": _resolve(model.name_or_path, base)})
    update: dict[str, Any] = {"data": data, "model": model}
    for objective in OBJECTIVES.values():  # files an objective's section names (a chat template)
        name = objective.section
        section = getattr(config, name) if name else None
        if name and section is not None:
            update[name] = section.with_paths(lambda value: _resolve(value, base))
    return config.model_copy(update=update)


def dump_config(config: RunConfig) -> str:
    """The resolved config as YAML (logged with every run)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
