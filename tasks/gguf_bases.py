"""GGUF bases: a `.gguf` file dequantized once into a cached safetensors folder, keyed by the file's content.

transformers reads GGUF (`from_pretrained(dir, gguf_file=...)`, with the `gguf` package) by dequantizing every
tensor to float, and takes the tokenizer and chat template from the file's metadata. That costs seconds per load
and cannot be `save_pretrained` as it is loaded, so adaptflow converts a file once into a plain model folder under
`ADAPTFLOW_CACHE/gguf/<sha256>`; from then on the folder is a local base like any other (fingerprinted, pinned
and stored in the registry, see tasks/registry.py), and the GGUF file is only hashed again when it changes.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from adapters_impl.packaged import cache_home
from tasks.errors import UserInputError
from tasks.load import publish

GGUF_SUFFIX = ".gguf"
# Written beside the converted model; hidden, so it is no part of the folder's fingerprint (packaged.model_files).
SOURCE_FILE = ".adaptflow-gguf.json"


def is_gguf(value: str) -> bool:
    """Whether `model.name_or_path` names a GGUF file."""
    return value.lower().endswith(GGUF_SUFFIX)


def file_sha256(file: Path) -> str:
    """The sha256 of a file, remembered per file state (path, size, modification time) so a large file is read
    once, not on every command."""
    stat = file.stat()
    state = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo = cache_home() / "fingerprints" / f"sha256-{hashlib.sha256(state.encode()).hexdigest()}"
    if memo.exists():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(digest.hexdigest())
    return digest.hexdigest()


def converted_folder(sha256: str) -> Path:
    """Where the converted model of the GGUF file with this content lives (it may not exist yet)."""
    return cache_home() / "gguf" / sha256


def is_converted(sha256: str) -> bool:
    """Whether a GGUF file with this content has been converted (a folder is published whole, or not at all)."""
    return (converted_folder(sha256) / "config.json").exists()


def gguf_architecture(file: Path, key: str = "model.name_or_path") -> str:
    """The file's `general.architecture`, read with the gguf package's reader, which also maps every tensor in the
    table onto the file: a truncated or corrupt file fails here, before transformers is asked.

    Raises:
        UserInputError: the file is not a readable GGUF file (naming it and why).
    """
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(file))
        field = reader.fields["general.architecture"]
        return str(field.contents())
    except KeyError:
        reason = "no general.architecture in its metadata"
    except Exception as exc:  # the reader raises whatever numpy or struct raise on a short or garbled file
        reason = f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}" if str(exc) else exc.__class__.__name__
    raise UserInputError(
        f"{key}: {file} is not a readable GGUF file (truncated or corrupt: {reason}); download it again"
    ) from None


def readable_architectures() -> list[str]:
    """The GGUF architectures this transformers reads, for messages only: transformers itself decides, on load.
    Both lists are transformers internals (its older reader's and its newer one's), so either may be missing."""
    names: set[str] = set()
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        names |= set(GGUF_SUPPORTED_ARCHITECTURES)
    except ImportError:
        pass
    try:
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS

        names |= set(GGUF_CONFIG_ARCHS)
    except ImportError:
        pass
    return sorted(names - {"general", "tokenizer"})


def _load_gguf(file: Path, architecture: str, key: str) -> tuple[Any, Any]:
    """The dequantized float32 causal LM and the tokenizer (with its chat template) of a checked GGUF file.

    Raises:
        UserInputError: transformers cannot read this architecture, or the file's content.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where, name = str(file.parent), file.name
    try:
        AutoConfig.from_pretrained(where, gguf_file=name)
    except (ValueError, NotImplementedError, KeyError) as exc:
        # The structure read fine (gguf_architecture): what transformers refuses is the architecture.
        raise UserInputError(
            f"{key}: {file}: transformers cannot read GGUF architecture {architecture!r} "
            f"({str(exc).splitlines()[0][:200]}); it reads: {', '.join(readable_architectures()) or 'see its docs'}"
        ) from None
    try:
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    except (ValueError, NotImplementedError, KeyError, IndexError, RuntimeError, OSError) as exc:
        raise UserInputError(
            f"{key}: {file}: cannot be loaded as a {architecture!r} causal LM "
            f"({exc.__class__.__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
        ) from None
    return model, tokenizer


def _save_converted(model: Any, tokenizer: Any, folder: Path, source: dict[str, Any]) -> None:
    """Save a model loaded from GGUF as plain safetensors: transformers refuses to save it while it is marked as
    quantized with gguf, though its weights are already dequantized floats."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    (folder / SOURCE_FILE).write_text(json.dumps(source, indent=1))


def gguf_base(file: Path, key: str = "model.name_or_path", sha256: str | None = None) -> Path:
    """The local model folder for a GGUF file, converted on first use (checked, dequantized, saved as safetensors
    with its tokenizer and chat template) and cached by the file's sha256.

    Args:
        file: the `.gguf` file.
        key: the config key (or argument) that named it, for messages.
        sha256: the file's content hash when the caller has already checked it (a builtin model).

    Raises:
        UserInputError: the file is missing, truncated or corrupt, or of an architecture transformers cannot read;
            nothing is cached then.
    """
    if not file.is_file():
        raise UserInputError(f"{key}: GGUF file not found: {file}")
    sha256 = sha256 or file_sha256(file)
    folder = converted_folder(sha256)
    if is_converted(sha256):
        return folder
    started = time.monotonic()
    print(
        f"adaptflow: first use of {file.name}: checking and converting it to safetensors (once) ...",
        file=sys.stderr,
        flush=True,
    )
    architecture = gguf_architecture(file, key)
    model, tokenizer = _load_gguf(file, architecture, key)
    from transformers import __version__ as transformers_version

    source = {"file": file.name, "sha256": sha256, "architecture": architecture, "transformers": transformers_version}
    folder.parent.mkdir(parents=True, exist_ok=True)
    publish(folder, lambda staging: _save_converted(model, tokenizer, staging, source))
    seconds = time.monotonic() - started
    print(f"adaptflow: converted {file.name} in {seconds:.1f} s into {folder}", file=sys.stderr, flush=True)
    return folder
