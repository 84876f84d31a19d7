"""Apply-method: wrap the base model with the configured method; keep live models between stages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn
from transformers import set_seed

from adapters_impl import ApplyContext, MethodSettings, MethodSettingsError, count_parameters, get_method
from tasks.errors import UserInputError
from tasks.modeling import ModelSource, base_load_dtype, load_base_model, load_tokenizer, upcast_trainable
from tasks.tokenization import TokenizedRef

# Stages pass folders, not models. In one process, the model a stage saved to a folder is kept here,
# so the next stage does not load it again; in another process (Dask worker, retry) it loads from disk.
_LIVE: dict[str, nn.Module] = {}


def remember(folder: str | Path, model: nn.Module) -> None:
    _LIVE.clear()  # one live model at a time: a run's stages hand it down, nothing accumulates
    _LIVE[str(folder)] = model


def take(folder: str | Path) -> nn.Module | None:
    """The live model saved to `folder`, handed over (forgotten here: the caller may change it)."""
    return _LIVE.pop(str(folder), None)


def peek(folder: str | Path) -> nn.Module | None:
    return _LIVE.get(str(folder))


class AdaptedRef(BaseModel):
    """The base model with the method applied, as saved before training."""

    source: ModelSource
    method: dict[str, Any]
    task: str
    label_names: list[str] | None
    adapter_dir: str
    trainable_params: int
    total_params: int
    mergeable: bool
    base_dtype: str = "float32"  # what the base is loaded in for this run (bf16 when frozen on a bf16 GPU)

    @property
    def method_name(self) -> str:
        return str(self.method["name"])


def training_base_dtype(method_name: str, precision: str, quantized: bool) -> torch.dtype:
    """`base_load_dtype` for this method on this machine."""
    cuda = torch.cuda.is_available()
    whole = get_method(method_name).whole_model
    return base_load_dtype(precision, whole, quantized, cuda, cuda and torch.cuda.is_bf16_supported())


def apply_method(
    source: ModelSource,
    settings: MethodSettings,
    task: str,
    tokenized: TokenizedRef,
    run_dir: str,
    seed: int,
    precision: str = "auto",
) -> AdaptedRef:
    """Load the base (in half precision when frozen on a bf16/fp16 GPU), apply the method (seeded), save the
    untrained adapter, report parameter counts.

    Raises:
        UserInputError: the settings do not fit this model (e.g. an unknown target module).
    """
    method = get_method(settings.name)
    set_seed(seed)
    tokenizer = load_tokenizer(source)
    loading = method.base_loading(settings)
    dtype = training_base_dtype(settings.name, precision, "quantization_config" in loading)
    base = load_base_model(source, task, tokenizer, tokenized.label_names, **{"dtype": dtype, **loading})
    try:
        model = method.apply(base, settings, ApplyContext(task=task, model_path=source.name_or_path))  # type: ignore[arg-type]
    except MethodSettingsError as exc:
        raise UserInputError(str(exc)) from None
    upcast_trainable(model)
    trainable, total = count_parameters(model)
    folder = Path(run_dir) / "adapter-init"
    method.save(model, folder)
    remember(folder, model)
    return AdaptedRef(
        source=source,
        method=settings.model_dump(mode="json"),
        task=task,
        label_names=tokenized.label_names,
        adapter_dir=str(folder),
        trainable_params=trainable,
        total_params=total,
        mergeable=method.mergeable,
        base_dtype=str(dtype).removeprefix("torch."),
    )


def load_adapted(adapted: AdaptedRef, folder: str | Path, trainable: bool = False) -> nn.Module:
    """The adapted model saved in `folder`: the live one if this process has it, else loaded from disk."""
    live = take(folder)
    if live is not None:
        return live
    method = get_method(adapted.method_name)
    settings = method.settings.model_validate(adapted.method)
    tokenizer = load_tokenizer(adapted.source)
    loading = {"dtype": getattr(torch, adapted.base_dtype), **method.base_loading(settings)}
    base = load_base_model(adapted.source, adapted.task, tokenizer, adapted.label_names, **loading)
    return upcast_trainable(method.load(base, Path(folder), trainable))


def load_full_precision_base(adapted: AdaptedRef) -> nn.Module:
    """A fresh, unquantized base for this run's task (what QLoRA merges into)."""
    tokenizer = load_tokenizer(adapted.source)
    return load_base_model(adapted.source, adapted.task, tokenizer, adapted.label_names)
