"""Trainable embedding rows for the tokens a chat template added, for methods with no way of their own to train
them (IA3, bottleneck adapters, prefix and prompt tuning; the LoRA family uses peft's `trainable_token_indices`).

The rows' values live in a small module of their own (`TokenRows`, registered on the adapted model so that the
optimizer and DDP see it), put in place by forward hooks: on the input embedding (positions holding a new token
take its trained row) and on the output layer (the new tokens' logits come from their trained output rows, the
input rows when the two are tied). Nothing else in the model changes, so whoever calls the embedding (peft's
prompt learning keeps its own reference to it) gets the trained rows. They are saved beside the adapter
(`ROWS_FILE`, a few KB) and written into the weights when a mergeable method merges.

`with_token_rows(method)` (adapters_impl/__init__.py) gives a method this module's four steps around its own apply,
save, load and merge.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional

from adapters_impl.base import ApplyContext, ApplyFn, LoadFn, MergeFn, SaveFn

ROWS_FILE = "new_token_rows.safetensors"
MODULE_NAME = "new_token_rows"


def _weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _embeddings(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """The model's input embedding and output layer (transformers' accessors; peft forwards them)."""
    return model.get_input_embeddings(), model.get_output_embeddings()  # type: ignore[operator]


class TokenRows(nn.Module):
    """Trained rows of `token_ids` in the input embedding (and the untied output layer), in fp32."""

    token_ids: torch.Tensor

    def __init__(self, token_ids: Sequence[int], embedding: nn.Module, output: nn.Module | None) -> None:
        super().__init__()
        weight = _weight(embedding)
        ids = torch.tensor(sorted(token_ids), dtype=torch.long, device=weight.device)
        self.register_buffer("token_ids", ids)
        self.input_rows = nn.Parameter(weight.detach()[ids].float().clone())
        tied = output is None or _weight(output) is weight
        self.output_rows = None if tied else nn.Parameter(_weight(output).detach()[ids].float().clone())  # type: ignore[arg-type]
        self._hooks = [embedding.register_forward_hook(self._embed)]
        if output is not None:
            self._hooks.append(output.register_forward_hook(self._logits))

    def _embed(self, module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        ids = inputs[0]
        hit = torch.isin(ids, self.token_ids)
        position = torch.searchsorted(self.token_ids, ids).clamp(max=len(self.token_ids) - 1)
        return torch.where(hit.unsqueeze(-1), self.input_rows[position].to(output.dtype), output)

    def _logits(self, module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        hidden = inputs[0]
        rows = self.input_rows if self.output_rows is None else self.output_rows
        new = functional.linear(hidden, rows.to(hidden.dtype))
        return output.index_copy(-1, self.token_ids, new.to(output.dtype))

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def write_into(self, model: nn.Module) -> None:
        """Put the trained rows into the model's own weights (a merged model needs no hooks)."""
        embedding, output = _embeddings(model)
        with torch.no_grad():
            _weight(embedding)[self.token_ids] = self.input_rows.to(_weight(embedding).dtype)
            if output is not None and _weight(output) is not _weight(embedding):
                rows = self.input_rows if self.output_rows is None else self.output_rows
                _weight(output)[self.token_ids] = rows.to(_weight(output).dtype)


def attach(model: nn.Module, token_ids: Sequence[int]) -> TokenRows:
    rows = TokenRows(token_ids, *_embeddings(model))
    model.add_module(MODULE_NAME, rows)
    return rows


def rows_of(model: nn.Module) -> TokenRows | None:
    rows = getattr(model, "_modules", {}).get(MODULE_NAME)
    return rows if isinstance(rows, TokenRows) else None


# The four steps around a method's own (`with_token_rows` in adapters_impl/__init__.py puts them in place).
def apply(inner: ApplyFn, model: nn.Module, settings: Any, context: ApplyContext) -> nn.Module:
    adapted = inner(model, settings, context)
    token_ids = sorted({i for ids in context.new_token_rows.values() for i in ids})
    if token_ids:
        attach(adapted, token_ids)
    return adapted


def save(inner: SaveFn, model: nn.Module, directory: Path) -> None:
    rows = rows_of(model)
    if rows is None:
        inner(model, directory)
        return
    del model._modules[MODULE_NAME]  # the method saves its own weights only
    try:
        inner(model, directory)
    finally:
        model.add_module(MODULE_NAME, rows)
    tensors = {"token_ids": rows.token_ids, "input_rows": rows.input_rows}
    if rows.output_rows is not None:
        tensors["output_rows"] = rows.output_rows
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(directory / ROWS_FILE))


def load(inner: LoadFn, base: nn.Module, directory: Path, trainable: bool) -> nn.Module:
    model = inner(base, directory, trainable)
    if (directory / ROWS_FILE).is_file():
        saved = load_file(str(directory / ROWS_FILE))
        rows = attach(model, saved["token_ids"].tolist())
        with torch.no_grad():
            rows.input_rows.copy_(saved["input_rows"])
            if rows.output_rows is not None and "output_rows" in saved:
                rows.output_rows.copy_(saved["output_rows"])
        rows.requires_grad_(trainable)
    return model


def merge(inner: MergeFn, model: nn.Module, full_precision_base: Callable[[], nn.Module]) -> nn.Module:
    rows = rows_of(model)
    if rows is not None:
        rows.remove_hooks()
        del model._modules[MODULE_NAME]
    merged = inner(model, full_precision_base)
    if rows is not None:
        rows.write_into(merged)
    return merged
