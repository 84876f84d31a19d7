"""Apply-method: wrap the base model with the configured method; hand the live model from stage to stage."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn
from transformers import PreTrainedModel, set_seed

from adapters_impl import ApplyContext, MethodSettings, MethodSettingsError, count_parameters, get_method
from tasks.errors import UserInputError
from tasks.modeling import (
    ModelSource,
    base_load_dtype,
    load_base_model,
    load_tokenizer,
    resize_for_tokens,
    upcast_trainable,
)
from tasks.objectives import get_objective
from tasks.process_cache import on_drop
from tasks.tokenization import TokenizedRef

# Written instead of weights into the untrained adapter's folder of a whole-model method that initialised nothing.
INIT_IS_BASE = "init-is-base"


class LiveModel:
    """The model the previous stage saved, handed to the next stage in this process instead of loaded again.

    Stages pass folders, not models; loading a model is most of a short stage's time. The contract:
    - `remember(folder, model)`: the stage that has just saved `model` to `folder` (or read it from there and
      left it unchanged) hands it on; the cache now owns it. One model at a time: the one held before is dropped.
    - `take(folder)`: the next stage gets the model and owns it: it may change it (train, merge); it hands it on
      again only after saving it. Taking empties the cache.
    - The key is the folder and a stamp of its files (name, inode, size, modification time), taken when it is
      remembered: a folder written again since (a retry, a resumed run, another process) does not match, and
      its model is loaded from disk instead.
    - Dropped when taken, when another model is remembered, and with the other process caches at the end of a
      pipeline run (`tasks.process_cache.drop_all`).
    In another process (Dask worker, Prefect retry in a fresh process) the cache is empty: stages load from disk.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # grid trials may run in threads of one process
        self._held: tuple[str, tuple[tuple[str, int, int, int], ...], nn.Module] | None = None

    def remember(self, folder: str | Path, model: nn.Module) -> None:
        key, stamp = _key(folder), _stamp(folder)
        with self._lock:
            self._held = (key, stamp, model) if stamp else None  # nothing saved there: nothing to match later

    def take(self, folder: str | Path) -> nn.Module | None:
        key = _key(folder)
        with self._lock:
            if self._held is None or self._held[0] != key:
                return None
            _, stamp, model = self._held
            self._held = None
        return model if _stamp(folder) == stamp else None  # saved again since: the live model is stale

    def forget(self) -> None:
        with self._lock:
            self._held = None


def _key(folder: str | Path) -> str:
    return str(Path(folder).resolve())


def _stamp(folder: str | Path) -> tuple[tuple[str, int, int, int], ...]:
    """What the folder's saved files look like now (empty: no folder or no files)."""
    try:
        files = [(p.name, p.stat()) for p in Path(folder).iterdir() if p.is_file()]
    except FileNotFoundError:
        return ()
    return tuple(sorted((name, st.st_ino, st.st_size, st.st_mtime_ns) for name, st in files))


_LIVE = LiveModel()
on_drop(_LIVE.forget)
remember, take, forget = _LIVE.remember, _LIVE.take, _LIVE.forget


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
    """Load the base (in half precision when frozen on a bf16/fp16 GPU; grown to the tokens the encoding added to
    the tokenizer), apply the method (seeded) with those tokens' rows trainable, save the untrained adapter, report
    parameter counts. The returned source carries the added tokens: every later load adds the same.

    Raises:
        UserInputError: the settings do not fit this model (e.g. an unknown target module).
    """
    method, objective = get_method(settings.name), get_objective(task)
    source = tokenized.model_source(source)
    set_seed(seed)
    tokenizer = load_tokenizer(source)
    loading = method.base_loading(settings)
    dtype = training_base_dtype(settings.name, precision, "quantization_config" in loading)
    base = load_base_model(source, objective.head, tokenizer, tokenized.label_names, **{"dtype": dtype, **loading})
    assert isinstance(base, PreTrainedModel)
    rows = resize_for_tokens(base, tokenizer, source.added_tokens).by_module()  # grown on load: rows only
    context = ApplyContext(task=task, model_path=source.name_or_path, new_token_rows=rows)
    try:
        model = method.apply(base, settings, context)  # type: ignore[arg-type]
    except MethodSettingsError as exc:
        raise UserInputError(str(exc)) from None
    upcast_trainable(model)
    trainable, total = count_parameters(model)
    folder = Path(run_dir) / "adapter-init"
    if method.whole_model and not source.added_tokens and not objective.head.options(tokenized.label_names):
        # Nothing was initialised (no new head, no new rows): the untrained model is the base as loaded, and a
        # second copy of the whole base (28 GB at 7B in fp32) would be written for nothing.
        folder.mkdir(parents=True, exist_ok=True)
        (folder / INIT_IS_BASE).write_text(f"{source.display_name}\n")
    else:
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
    base = load_base_model(adapted.source, get_objective(adapted.task).head, tokenizer, adapted.label_names, **loading)
    if (Path(folder) / INIT_IS_BASE).is_file():  # a whole-model method's untrained model: the base itself
        return upcast_trainable(base.requires_grad_(trainable))
    return upcast_trainable(method.load(base, Path(folder), trainable))


def load_full_precision_base(adapted: AdaptedRef) -> nn.Module:
    """A fresh, unquantized base for this run's task (what QLoRA merges into)."""
    tokenizer = load_tokenizer(adapted.source)
    return load_base_model(adapted.source, get_objective(adapted.task).head, tokenizer, adapted.label_names)
