"""Houlsby bottleneck adapters after the attention and the MLP block of every decoder layer (our own; peft has none).

Each adapter is `h + up(act(down(h)))` on the block's output, before the residual add. `up` starts at zero, so the
untrained adapted model equals the base exactly. Adapters attach with forward hooks and live as submodules of the
decoder layer (`adapter_attention`, `adapter_mlp`): the base's own modules and weight names stay untouched, and
`generate()` with the KV cache works unchanged. Saved as safetensors + JSON, loaded onto a fresh base.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters_impl._weights import freeze_all_but, is_classifier, load_trained, output_head, read_config, save_trainable
from adapters_impl.adapter import AdapterSettings, Location
from adapters_impl.base import ApplyContext, MethodSettingsError

ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}
# What transformers calls a decoder layer's two blocks, across architectures.
BLOCK_NAMES: dict[Location, tuple[str, ...]] = {
    "attention": ("self_attn", "attention", "attn"),
    "mlp": ("mlp", "feed_forward", "ffn"),
}
SETTINGS_ATTR = "adaptflow_adapter"


class Bottleneck(nn.Module):
    """A residual bottleneck; zero-initialised up-projection, so it starts as the identity."""

    def __init__(self, hidden_size: int, settings: AdapterSettings) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, settings.bottleneck_size)
        self.act = ACTIVATIONS[settings.activation]()
        self.dropout = nn.Dropout(settings.dropout)
        self.up = nn.Linear(settings.bottleneck_size, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.to(self.down.weight.dtype)  # adapters stay fp32 under a bf16 base
        return hidden + self.up(self.dropout(self.act(self.down(x)))).to(hidden.dtype)

    def adapt_output(self, module: nn.Module, args: Any, output: Any) -> Any:
        """Forward hook: the block's output through the adapter (its first element when it returns a tuple)."""
        if isinstance(output, tuple):
            return (self(output[0]), *output[1:])
        return self(output)


def _block(layer: nn.Module, location: Location) -> nn.Module | None:
    for name in BLOCK_NAMES[location]:
        block = getattr(layer, name, None)
        if isinstance(block, nn.Module):
            return block
    return None


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules that hold both an attention and an MLP block: the decoder layers."""
    return [m for m in model.modules() if _block(m, "attention") is not None and _block(m, "mlp") is not None]


def apply(model: nn.Module, settings: AdapterSettings, context: ApplyContext) -> nn.Module:
    """Insert adapters; only they (and a classification head) train."""
    layers = decoder_layers(model)
    if not layers:
        raise MethodSettingsError(
            f"method.name: 'adapter' found no decoder layers with attention and MLP blocks in {type(model).__name__}"
        )
    if hasattr(model, SETTINGS_ATTR):
        raise ValueError("this model already has bottleneck adapters; load them onto a fresh base")
    hidden_size = int(model.config.hidden_size)  # type: ignore[union-attr,arg-type]
    adapters: list[nn.Module] = []
    for layer in layers:
        for location in settings.locations:
            adapter = Bottleneck(hidden_size, settings)
            layer.add_module(f"adapter_{location}", adapter)
            block = _block(layer, location)
            assert block is not None
            block.register_forward_hook(adapter.adapt_output)
            adapters.append(adapter)
    if is_classifier(model):
        adapters.append(output_head(model))
    freeze_all_but(model, adapters)
    setattr(model, SETTINGS_ATTR, {"settings": settings.model_dump(mode="json"), "task": context.task})
    return model


def save(model: nn.Module, directory: Path) -> None:
    description = getattr(model, SETTINGS_ATTR)
    save_trainable(model, directory, {"method": "adapter", "hidden_size": model.config.hidden_size, **description})  # type: ignore[union-attr]


def load(base: nn.Module, directory: Path, trainable: bool) -> nn.Module:
    """Insert adapters as saved, then load their weights (and the head's)."""
    saved = read_config(directory)
    settings = AdapterSettings.model_validate(saved["settings"])
    model = apply(base, settings, ApplyContext(task=saved["task"], model_path=""))
    load_trained(model, directory)
    if not trainable:
        model.requires_grad_(False)
    return model
