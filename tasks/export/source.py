"""What an export starts from: a registered version's package, loaded (merged model, tokenizer, chat template)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters_impl import get_method
from adapters_impl.packaged import INFO_FILE, PackagedModel, load_packaged, resolve_base
from tasks.errors import UserInputError

# Sample texts every verification tokenizes and scores (besides conversations rendered with the template).
SAMPLE_TEXTS = [
    "Once upon a time, a little fox found a shiny red ball in the garden.",
    "The weather today is sunny with a light breeze.  Numbers: 3.14, 2026, 42!",
    "Questions? Ask\nthe teacher: she knows\tthe answer.",
]
SAMPLE_CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
    ],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. How can I help?"},
    ],
]


@dataclass
class ExportSource:
    """A loaded package: `model` is the merged (or whole) float32 causal LM, `info` the package's adaptflow.json."""

    uri: str
    folder: Path
    info: dict[str, Any]
    model: nn.Module
    tokenizer: Any
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> Any:
        """The merged model's transformers config."""
        return self.model.config

    @property
    def method(self) -> str:
        return str(self.info["method"])

    @property
    def chat(self) -> dict[str, Any] | None:
        """The chat template the version was trained with ({name, source, end_of_turn}), if it is a chat model."""
        chat = self.info.get("chat")
        return dict(chat) if chat else None

    @property
    def template(self) -> str | None:
        """The Jinja chat template to ship: the training template, else the tokenizer's own."""
        if self.chat:
            return str(self.chat["source"])
        own = getattr(self.tokenizer, "chat_template", None)
        return own if isinstance(own, str) else None

    @property
    def tokenizer_dir(self) -> Path:
        return self.folder / self.info["tokenizer"]

    @property
    def adapter_dir(self) -> Path | None:
        return self.folder / self.info["adapter"] if self.info.get("adapter") else None

    @cached_property
    def base_model(self) -> nn.Module:
        """The pinned base the adapter was trained on, float32, with the embedding rows the tokenizer needs."""
        from transformers import AutoModelForCausalLM

        from adapters_impl.packaged import fit_embeddings

        where, revision = resolve_base(self.info["base"])
        model = AutoModelForCausalLM.from_pretrained(where, revision=revision, dtype=torch.float32)
        fit_embeddings(model, self.tokenizer)
        return model.eval()

    @property
    def base_location(self) -> str:
        """Where the base loads from (a hub id or a local folder), for commands printed to users."""
        return resolve_base(self.info["base"])[0]

    def conversations(self) -> list[list[dict[str, str]]]:
        """Sample conversations as text (rendered with the template), for scoring and tokenizing."""
        return SAMPLE_CONVERSATIONS if self.template else []

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        text = self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return str(text)

    def sample_texts(self) -> list[str]:
        """Texts the checks use: plain samples, and conversations rendered with the template."""
        rendered = [self.render(c, add_generation_prompt=True) for c in self.conversations()]
        return [*SAMPLE_TEXTS, *rendered]


def require_merged(source: ExportSource, fmt: str) -> None:
    """Raises UserInputError when the method's weights cannot be folded into the base (prefix, prompt, adapters)."""
    method = get_method(source.method)
    if not (method.whole_model or method.mergeable):
        raise UserInputError(
            f"--format {fmt}: method {source.method!r} adds modules that cannot be merged into the base weights, so "
            f"there is no plain model to write; use --format vllm-check to see how it can be served, or train with "
            f"a mergeable method (lora, dora, qlora, ia3, full)"
        )


def from_packaged(uri: str, packaged: PackagedModel) -> ExportSource:
    """An export source from a loaded package; classifiers are refused (the formats carry causal LMs)."""
    if packaged.head.output != "text":
        raise UserInputError(
            f"MODEL_URI: {uri} is a {packaged.head.kind.replace('_', ' ')} model (task {packaged.task}); export "
            "writes causal language models (generate and chat)"
        )
    return ExportSource(
        uri=uri, folder=packaged.folder, info=packaged.info, model=packaged.model, tokenizer=packaged.tokenizer
    )


def load_source(uri: str) -> ExportSource:
    """A `models:/` or `runs:/` URI's package, downloaded and loaded; a local package folder is read in place."""
    from mlflow.exceptions import MlflowException

    from adapters_impl.packaged import download_registered

    local = Path(uri)
    if (local / INFO_FILE).is_file():
        return from_packaged(uri, load_packaged(local))
    try:
        packaged = download_registered(uri)
    except MlflowException as exc:
        raise UserInputError(f"MODEL_URI: cannot load {uri!r}: {str(exc).splitlines()[0][:500]}") from None
    return from_packaged(uri, packaged)


def adapter_config(source: ExportSource) -> dict[str, Any]:
    """The peft adapter_config.json of a LoRA-family version."""
    folder = source.adapter_dir
    if folder is None or not (folder / "adapter_config.json").is_file():
        raise UserInputError(f"MODEL_URI: {source.uri} has no peft adapter (method {source.method})")
    return dict(json.loads((folder / "adapter_config.json").read_text()))
