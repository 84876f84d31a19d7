"""What the peft-backed methods share: save, load onto a fresh base, merge, target-module checks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from peft import PeftConfig, PeftModel, TaskType, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from adapters_impl._classifier import LastTokenClassifier
from adapters_impl._weights import HEAD_NAMES, is_classifier, output_head
from adapters_impl.base import ApplyContext, MethodSettingsError

ALL_LINEAR = "all-linear"
# Output layers are never adapted: they map to the vocabulary or the labels.
_OUTPUT_LAYERS = {"lm_head", *HEAD_NAMES}
HEAD_FILE = "head.safetensors"
# What peft saves with safe_serialization; without it, peft would load adapter_model.bin with torch.load.
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct leaf names of the model's linear layers, output layers excluded (`q_proj`, ...)."""
    names = set()
    for full_name, module in model.named_modules():
        if isinstance(module, nn.Linear) or module.__class__.__name__ in {"Linear4bit", "Linear8bitLt"}:
            leaf = full_name.rsplit(".", 1)[-1]
            if leaf not in _OUTPUT_LAYERS:
                names.add(leaf)
    return sorted(names)


def resolve_target_modules(model: nn.Module, requested: list[str] | str, key: str) -> list[str]:
    """Check the requested module names against the model; `all-linear` means every linear layer.

    Raises:
        MethodSettingsError: a requested name is not a linear layer of this model (the message lists them).
    """
    available = linear_module_names(model)
    if requested == ALL_LINEAR:
        if not available:  # peft itself would raise NoMatchingPeftModuleError, a traceback
            raise MethodSettingsError(f"{key}: all-linear, but this model has no linear layer besides its output")
        return available
    names = [requested] if isinstance(requested, str) else list(requested)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise MethodSettingsError(
            f"{key}: {', '.join(repr(n) for n in unknown)} is not a linear module of this model; "
            f"its linear modules are: {', '.join(available)} (or use 'all-linear')"
        )
    return names


def apply_prompt_learning(
    model: nn.Module, make_config: Callable[[TaskType], PeftConfig], context: ApplyContext
) -> nn.Module:
    """Prefix or prompt tuning: on the causal LM, or on the backbone of a classifier under our pooled head."""
    if not is_classifier(model):
        return get_peft_model(model, make_config(TaskType.CAUSAL_LM))  # type: ignore[arg-type]
    head = output_head(model)
    backbone = get_peft_model(model.base_model, make_config(TaskType.FEATURE_EXTRACTION))  # type: ignore[arg-type]
    head.requires_grad_(True)
    return LastTokenClassifier(backbone, head, model.config)


def save_peft(model: nn.Module, directory: Path) -> None:
    """Adapter weights as safetensors plus adapter_config.json (and the head, for our pooled classifier)."""
    if isinstance(model, LastTokenClassifier):
        model.backbone.save_pretrained(str(directory), safe_serialization=True)  # type: ignore[operator]
        save_file({k: v.contiguous() for k, v in model.score.state_dict().items()}, str(directory / HEAD_FILE))
        return
    assert isinstance(model, PeftModel)
    # Not the whole resized embedding matrices: the trainable-token rows are saved, and loaders grow a fresh base
    # to the tokenizer's size first (`fit_embeddings`).
    model.save_pretrained(str(directory), safe_serialization=True, save_embedding_layers=False)


def load_peft(base: nn.Module, directory: Path, trainable: bool) -> nn.Module:
    """The saved adapter on a fresh base model (from safetensors only: peft would fall back to a pickle)."""
    if not (directory / ADAPTER_WEIGHTS).exists():
        raise FileNotFoundError(f"{directory}: no {ADAPTER_WEIGHTS}; adaptflow loads saved weights only as safetensors")
    # peft refuses to load prompt learning (prefix, prompt) as trainable. Loaded for inference, their saved
    # prompt embeddings are used as they are (a prefix's projection MLP is not saved: its output is) and train
    # directly: a resumed run or a distributed worker goes on from the same values.
    prompt_learning = PeftConfig.from_pretrained(str(directory)).is_prompt_learning
    peft_trainable = trainable and not prompt_learning
    if (directory / HEAD_FILE).exists():
        head = output_head(base)
        head.load_state_dict(load_file(str(directory / HEAD_FILE)))
        backbone = PeftModel.from_pretrained(base.base_model, str(directory), is_trainable=peft_trainable)  # type: ignore[arg-type]
        model: nn.Module = LastTokenClassifier(backbone, head, base.config)
    else:
        backbone = model = PeftModel.from_pretrained(base, str(directory), is_trainable=peft_trainable)  # type: ignore[arg-type]
    if not trainable:  # peft leaves prompt encoders trainable even then
        model.requires_grad_(False)
    elif prompt_learning:
        for encoder in backbone.prompt_encoder.values():
            encoder.embedding.requires_grad_(True)
    return model


def merge_peft(model: nn.Module, full_precision_base: Callable[[], nn.Module]) -> nn.Module:
    """Fold the adapter into the base weights and drop the peft wrappers (exact for LoRA, DoRA, IA3)."""
    assert isinstance(model, PeftModel)
    return model.merge_and_unload()


def peft_task(model: nn.Module) -> TaskType:
    """peft's task type for the model's head: a sequence classifier's, else a causal LM's."""
    return TaskType.SEQ_CLS if is_classifier(model) else TaskType.CAUSAL_LM
