"""Peak training memory, planned before anything is loaded: `adaptflow plan` and the pre-flight of `run` and `grid`.

The model is built from its config on the meta device (no weights, no allocation) and adapted by the method's own
`apply`, as the run does. One forward pass of a one-row batch records the bytes autograd saves for backward
(the activations; they grow linearly with the batch), per decoder layer, which also gives them under activation
checkpointing (each layer keeps only its input, and one layer's activations are rebuilt at a time). Weights,
gradients and optimizer state follow from the parameter counts and the dtypes the run will use.

    peak = weights + reference + optimizer state + max(activations, gradients) + workspace

The objective says what its training holds beyond one sequence per row (`Objective.shape`): a preference pair is
two sequences (chosen and rejected) through the model, and a frozen reference copy of the starting model (method
full) is held beside it.

Backward frees activations layer by layer as the gradients appear, so the two do not peak together; its first
step holds a gradient of the largest saved tensor (the logits) and of its input at once: workspace = twice that
tensor (with checkpointing, or one layer's rebuilt activations if larger). Checked against measured peaks in
tests/test_memory_plan.py and benchmarks/memory_plan.py.
"""

from __future__ import annotations

import logging
import math
import re
import unittest.mock
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel
from torch import nn

from adapters_impl import get_method
from adapters_impl.base import ApplyContext, MethodSettingsError
from tasks.config import RunConfig, apply_overrides, validate_config
from tasks.errors import UserInputError
from tasks.modeling import ModelSource, base_load_dtype, compute_dtype, resolve_model
from tasks.process_cache import ProcessCache

log = logging.getLogger("adaptflow")
# Planned peak against free memory: the allocator's fragmentation, the CUDA context and the process's own
# libraries need the rest.
HEADROOM = 0.9
# bitsandbytes 4-bit: half a byte per weight, plus one 8-bit constant per 64 weights (double quantization: the
# constants' own fp32 constants, one per 256 of them); without double quantization an fp32 constant per 64.
NF4_BYTES = {True: 0.5 + 1 / 64 + 4 / (64 * 256), False: 0.5 + 4 / 64}


@dataclass(frozen=True)
class Device:
    """Where training runs: `free` bytes of it available to this run."""

    kind: Literal["cpu", "cuda"]
    name: str
    free: int
    bf16: bool

    @property
    def cuda(self) -> bool:
        return self.kind == "cuda"


def this_device() -> Device:
    """GPU 0 when there is one (its free memory), else this machine's available RAM."""
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(0)
        return Device("cuda", torch.cuda.get_device_name(0), int(free), torch.cuda.is_bf16_supported())
    import psutil

    return Device("cpu", "cpu", int(psutil.virtual_memory().available), False)


def parse_bytes(text: str) -> int:
    """`80GB`, `80GiB`, `512M`, `1e9` -> bytes (decimal and binary units alike are read as binary: GB = GiB)."""
    found = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)i?[bB]?\s*", text)
    if not found:
        raise UserInputError(f"--memory: expected a size such as 80GiB or 24GB, got {text!r}")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[found.group(2).lower()]
    return int(float(found.group(1)) * scale)


@dataclass(frozen=True)
class Profile:
    """What the meta pass of one method on one model measured, in bytes, for a one-row batch."""

    parameters: int
    trainable: int
    weight_bytes: int  # frozen and trainable parameters, in the dtypes the run loads them in
    grad_bytes: int  # one gradient per trainable parameter, in its dtype
    row_activations: int  # saved for backward, without checkpointing
    row_layer_activations: tuple[int, ...]  # the part saved inside each decoder layer
    row_layer_inputs: int  # the decoder layers' inputs: what checkpointing keeps of them
    row_largest: int  # the largest saved tensor
    layer_weights: int  # the largest decoder layer's weights (FSDP gathers one whole layer at a time)
    sequences: int = 1  # sequences each batch row puts through the model with gradients (a preference pair: 2)
    reference_bytes: int = 0  # a frozen copy of the starting model held beside it (preference's reference)

    def activations(self, rows: int, checkpointing: bool) -> int:
        """What stays saved through the forward pass: with checkpointing, each layer's input instead of its
        activations (rebuilt one layer at a time in backward: see `workspace`)."""
        saved = self.row_activations
        if checkpointing and self.row_layer_activations:
            saved = saved - sum(self.row_layer_activations) + self.row_layer_inputs
        return saved * rows

    def workspace(self, rows: int, checkpointing: bool) -> int:
        """Backward's transient memory: the gradients of the largest saved tensor and of its input at its start;
        with checkpointing, later, one layer's rebuilt activations if those are larger."""
        rebuilt = max(self.row_layer_activations, default=0) if checkpointing else 0
        return max(2 * self.row_largest, rebuilt) * rows


class Footprint(BaseModel):
    """Estimated bytes of one training process at its peak, by kind."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    workspace: int
    reference: int = 0  # a frozen copy of the model training starts from (the objective's `TrainingShape`)

    @property
    def peak(self) -> int:
        return self.weights + self.reference + self.optimizer + max(self.activations, self.gradients) + self.workspace


class MemoryPlan(BaseModel):
    """What `adaptflow plan --json` prints under `plan`, and what the pre-flight decides on."""

    device: str
    device_kind: str
    free_bytes: int
    processes_on_device: int  # training processes sharing this device's memory (CPU: every local rank)
    parameters: int
    trainable: int
    settings: dict[str, Any]
    footprint: Footprint
    peak_bytes: int  # one process
    needed_bytes: int  # every process that shares the device
    fits: bool
    suggestions: list[list[str]] = []  # --set overrides that would fit, best first

    def describe(self) -> str:
        """One line: the estimate against what the device has."""
        parts = ", ".join(f"{k} {gib(v)}" for k, v in self.footprint.model_dump().items())
        shared = f" x {self.processes_on_device} processes" if self.processes_on_device > 1 else ""
        return (
            f"estimated peak {gib(self.peak_bytes)}{shared} ({parts}) against {gib(self.free_bytes)} free on "
            f"{self.device} ({HEADROOM:.0%} usable)"
        )


def gib(n: int | float) -> str:
    """Bytes for people: GiB, or MiB below one GiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def optimizer_state_bytes(optim: str | None) -> int:
    """Bytes of optimizer state per trainable parameter for a Hugging Face optimizer name (None: AdamW)."""
    name = (optim or "adamw_torch").lower()
    if "8bit" in name:
        return 1 if "lion" in name else 2
    if name.startswith(("sgd", "adafactor")):  # no momentum by default / factored second moments
        return 0 if name.startswith("sgd") else 4
    if "lion" in name or "rmsprop" in name:
        return 4
    return 8  # Adam-family: two fp32 moments


# ---------------------------------------------------------------- the meta pass


def _meta_model(config: RunConfig, source: ModelSource, dtype: torch.dtype) -> nn.Module:
    """The run's adapted model, without weights: built from its config on the meta device, method applied."""
    from transformers import AutoConfig

    head = config.objective.head
    hf_config = AutoConfig.from_pretrained(source.name_or_path, **source.kwargs())
    for key, value in head.options(["a", "b"] if head.labelled else None).items():
        setattr(hf_config, key, value)  # the head's size hardly matters; the labels are read with the data
    method = get_method(config.method.name)
    with torch.device("meta"):
        model = head.auto_class().from_config(hf_config, dtype=dtype)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = 0
        try:
            model = method.apply(model, config.method, ApplyContext(task=config.task, model_path=source.name_or_path))
        except MethodSettingsError as exc:
            raise UserInputError(str(exc)) from None
    from transformers import PreTrainedModel

    for module in model.modules():  # checkpointing is accounted for by layer, not run
        if isinstance(module, PreTrainedModel) and module.is_activation_checkpointing:
            module.activation_checkpointing_disable()
    return model.train()


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


@contextmanager
def _saved_tensors(layers: list[nn.Module]) -> Iterator[dict[str, Any]]:
    """Record the storages autograd saves for backward (size, and the decoder layer saving it, if any)."""
    found: dict[str, Any] = {"saved": {}, "inputs": 0, "layer": None}

    def enter(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        found["layer"] = layers.index(module)
        hidden = args[0] if args else kwargs["hidden_states"]
        found["inputs"] += hidden.untyped_storage().nbytes()

    def leave(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        found["layer"] = None

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        found["saved"].setdefault(storage._cdata, (storage.nbytes(), found["layer"]))
        return tensor

    handles = [layer.register_forward_pre_hook(enter, with_kwargs=True) for layer in layers]
    handles += [layer.register_forward_hook(leave, with_kwargs=True) for layer in layers]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield found
    finally:
        for handle in handles:
            handle.remove()


def _fused_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """`scaled_dot_product_attention` as a fused kernel computes it, on the meta device too (where torch would
    take the math path and save the whole attention matrix, which no real run keeps): it saves the inputs, the
    output and a log-sum-exp per query."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, dim=-3), value.repeat_interleave(repeat, dim=-3)
    out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
    )
    return out


def _parameter_bytes(model: nn.Module, config: RunConfig, base_dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(parameters, trainable, weight bytes, gradient bytes) as the run will hold them."""
    method = get_method(config.method.name)
    quantization = method.base_loading(config.method).get("quantization_config")
    skipped = set(getattr(quantization, "llm_int8_skip_modules", None) or [])
    quantized = set()
    if quantization is not None:  # bitsandbytes quantizes every linear layer's weight but the skipped ones
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and not skipped & set(name.split(".")):
                quantized.add(id(module.weight))
    nf4 = NF4_BYTES[bool(getattr(quantization, "bnb_4bit_use_double_quant", True))]
    pure = config.train.precision == "bf16-pure" and method.whole_model
    trainable_size = 2 if pure else 4  # trainable parameters stay fp32 (upcast_trainable) but for bf16-pure
    parameters = trainable = weights = 0
    for param in model.parameters():
        n = param.numel()
        parameters += n
        if param.requires_grad:
            trainable += n
            weights += n * trainable_size
        elif id(param) in quantized:
            weights += math.ceil(n * nf4)
        else:
            weights += n * base_dtype.itemsize
    return parameters, trainable, weights, trainable * trainable_size


def profile(config: RunConfig, source: ModelSource, device: Device) -> Profile:
    """One meta forward pass of the run's adapted model on a one-row batch of `data.max_length` tokens.

    Activations are measured in the dtype training computes in (autocast's bf16 on a bf16 GPU, fp32 on a CPU).
    """
    method = get_method(config.method.name)
    quantized = "quantization_config" in method.base_loading(config.method)
    precision = config.train.precision
    compute = compute_dtype(precision, device.cuda, device.bf16)
    base = base_load_dtype(precision, method.whole_model, quantized, device.cuda, device.bf16)
    model = _meta_model(config, source, compute)
    parameters, trainable, weights, grads = _parameter_bytes(model, config, base)
    layers = _decoder_layers(model)
    ids = torch.zeros(1, config.data.max_length, dtype=torch.long, device="meta")
    labels = torch.zeros(1, dtype=torch.long, device="meta") if config.objective.head.labelled else ids
    # Fake inputs: transformers skips its data-dependent mask checks on traced tensors, as under torch.compile.
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with (
        _saved_tensors(layers) as found,
        fake,
        unittest.mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _fused_attention),
    ):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        # The weights autograd saves are the parameters (met as the fake tensors the pass made of them): counted above.
        tensors = [*model.parameters(), *model.buffers()]
        owned = {t.untyped_storage()._cdata for t in tensors} | {
            fake.from_tensor(t).untyped_storage()._cdata for t in tensors
        }
    saved = [entry for key, entry in found["saved"].items() if key not in owned]
    by_layer = tuple(sum(size for size, layer in saved if layer == i) for i in range(len(layers)))
    layer_weights = max((sum(p.numel() * compute.itemsize for p in layer.parameters()) for layer in layers), default=0)
    shape = config.objective.shape(config, model)
    return Profile(
        sequences=shape.sequences,
        # The copy is loaded as the run loads its base (`load_adapted`), frozen: every parameter in that dtype.
        reference_bytes=parameters * base.itemsize if shape.frozen_copy else 0,
        parameters=parameters,
        trainable=trainable,
        weight_bytes=weights,
        grad_bytes=grads,
        row_activations=sum(size for size, _ in saved),
        row_layer_activations=by_layer,
        row_layer_inputs=found["inputs"],
        row_largest=max((size for size, _ in saved), default=0),
        layer_weights=layer_weights,
    )


def checkpointing(config: RunConfig) -> bool:
    """Whether the run recomputes activations: `train.gradient_checkpointing`, or the method's own setting."""
    return config.train.gradient_checkpointing or bool(getattr(config.method, "gradient_checkpointing", False))


def footprint(config: RunConfig, measured: Profile) -> Footprint:
    """One process's bytes at its peak for the config's batch, checkpointing, optimizer and distribution."""
    train = config.train
    rows = train.batch_size * measured.sequences
    state = measured.trainable * optimizer_state_bytes(train.optim)
    weights, grads = measured.weight_bytes, measured.grad_bytes
    distributed = train.distributed
    if distributed is not None and distributed.world_size > 1:
        if distributed.strategy == "fsdp":  # sharded; one layer gathered whole at a time
            shards = distributed.world_size
            weights, grads, state = weights // shards + measured.layer_weights, grads // shards, state // shards
        else:  # DDP's gradient buckets: a second copy of the gradients
            weights += grads
    return Footprint(
        weights=weights,
        gradients=grads,
        optimizer=state,
        activations=measured.activations(rows, checkpointing(config)),
        workspace=measured.workspace(rows, checkpointing(config)),
        reference=measured.reference_bytes,
    )


def _processes_on_device(config: RunConfig, device: Device) -> int:
    distributed = config.train.distributed
    return distributed.nproc_per_node if distributed and not device.cuda else 1


def _assess(config: RunConfig, measured: Profile, device: Device) -> MemoryPlan:
    estimate = footprint(config, measured)
    processes = _processes_on_device(config, device)
    return MemoryPlan(
        device=device.name,
        device_kind=device.kind,
        free_bytes=device.free,
        processes_on_device=processes,
        parameters=measured.parameters,
        trainable=measured.trainable,
        settings={
            "method": config.method.name,
            "task": config.task,
            "batch_size": config.train.batch_size,
            "grad_accum": config.train.grad_accum,
            "max_length": config.data.max_length,
            "precision": config.train.precision,
            "gradient_checkpointing": checkpointing(config),
            "optim": config.train.optim,
        },
        footprint=estimate,
        peak_bytes=estimate.peak,
        needed_bytes=estimate.peak * processes,
        fits=estimate.peak * processes <= device.free * HEADROOM,
    )


def _as_set(overrides: dict[str, Any]) -> list[str]:
    """Overrides as the `--set KEY=VALUE` items a user would type."""
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in overrides.items()]


def _with(config: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """The config with the overrides applied and validated exactly as the user's `--set` would be."""
    return validate_config(apply_overrides(config.model_dump(mode="json"), _as_set(overrides)), "memory plan")


def _alternatives(config: RunConfig) -> list[list[dict[str, Any]]]:
    """Groups of settings that need less memory, least disruptive group first; within a group, larger batches
    first. Smaller batches keep the global batch (more accumulation); then activation checkpointing; then, for
    `full`, an 8-bit optimizer or LoRA; for the low-rank methods a 4-bit base."""
    train, method = config.train, get_method(config.method.name)
    batches: list[dict[str, Any]] = [{}]
    rows = train.batch_size
    while rows > 1:
        rows //= 2
        batches.append({"train.batch_size": rows, "train.grad_accum": train.grad_accum * train.batch_size // rows})
    checkpoint: list[dict[str, Any]] = [{}]
    if not checkpointing(config) and not method.checkpointing_problem:  # the config refuses it and says why
        checkpoint.append({"train.gradient_checkpointing": True})
    methods: list[dict[str, Any]] = [{}, *(dict(change) for change in method.lighter)]
    return [
        [{**change, **ckpt, **batch} for batch in batches if change or ckpt or batch]
        for change in methods
        for ckpt in checkpoint
    ]


def plan(config: RunConfig, device: Device | None = None, suggest: int = 3) -> MemoryPlan:
    """The run's planned peak memory on `device` (default: this machine's), with up to `suggest` sets of
    overrides that would fit when it does not (the largest batch that fits of each kind of change).

    Raises:
        UserInputError: the method's settings do not fit the model (naming the key).
    """
    device = device or this_device()
    source = resolve_model(config.model)
    profiles: dict[str, Profile] = {}

    def assess(candidate: RunConfig) -> MemoryPlan:
        name = candidate.method.name
        if name not in profiles:  # batch, checkpointing and optimizer need no new pass
            profiles[name] = profile(candidate, source, device)
        return _assess(candidate, profiles[name], device)

    result = assess(config)
    if result.fits or not suggest:
        return result
    found: list[list[str]] = []
    for group in _alternatives(config):
        for overrides in group:
            try:
                candidate = _with(config, overrides)
            except UserInputError:  # e.g. a method that does not do this task
                break
            if assess(candidate).fits:
                found.append(_as_set(overrides))
                break
        if len(found) == suggest:
            break
    return result.model_copy(update={"suggestions": found})


def refusal(result: MemoryPlan, what: str = "the run") -> str:
    """The message of a run that would not fit, naming the settings that would."""
    hint = (
        "; these would fit: " + " | ".join(" ".join(f"--set {s}" for s in option) for option in result.suggestions)
        if result.suggestions
        else "; no smaller batch, checkpointing or 4-bit base fits either: choose a smaller model or more memory"
    )
    return (
        f"train.batch_size / data.max_length / method.name: {what} would not fit in memory: {result.describe()}"
        f"{hint} (train.memory_check: false skips this check)"
    )


def preflight_plan(config: RunConfig) -> MemoryPlan | None:
    """The plan the pre-flight decides on: this machine's device, no suggestions. None when `train.memory_check`
    is off or the model cannot be planned (one transformers cannot build on the meta device): the plan is advice,
    and such a run trains as before.

    Raises:
        UserInputError: the method's settings do not fit the model (naming the key).
    """
    if not config.train.memory_check:
        return None
    device = this_device()
    # With the objective's own section: its settings can change the shape (a reference-free preference loss).
    included = {
        "model",
        "method",
        "task",
        "data",
        "train",
        *([config.objective.section] if config.objective.section else []),
    }
    key = (config.model_dump_json(include=included), device.kind, device.bf16)
    try:
        if key not in _PROFILES:
            _PROFILES[key] = profile(config, resolve_model(config.model), device)
    except UserInputError:
        raise
    except Exception as exc:
        log.info("memory plan skipped: %s: %s", type(exc).__name__, exc)
        return None
    return _assess(config, _PROFILES[key], device)


# The meta pass of each config already planned in this process (the grid's pre-flight, then its flow).
_PROFILES: ProcessCache[tuple[str, str, bool], Profile] = ProcessCache()


def check_fits(config: RunConfig) -> None:
    """The run's pre-flight: refuse it before anything is loaded when its planned peak exceeds the device's free
    memory, naming settings that would fit.

    Raises:
        UserInputError: it would not fit.
    """
    result = preflight_plan(config)
    if result is not None and not result.fits:
        raise UserInputError(refusal(plan(config)))
