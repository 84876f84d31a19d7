"""`--format gguf`: the merged model as one GGUF file for llama.cpp (Llama family), written with the gguf package.

What llama.cpp's convert_hf_to_gguf.py writes for a LlamaForCausalLM, reproduced with gguf-py's own pieces
(`GGUFWriter`, `TensorNameMap`, `SpecialVocab`, `quants`): tensor names, the q/k row permutation llama.cpp's rope
expects, the hyperparameters (context length, rope), the vocabulary — byte-level BPE (`gpt2`: tokens, merges and
the pre-tokenizer name) or SentencePiece-style BPE with byte fallback (`llama`: tokens, scores, token types) —
with the tokens a chat template added, the special token ids and the chat template the version was trained with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tasks.errors import UserInputError
from tasks.export.source import ExportSource, require_merged

# transformers model types written as GGUF architecture "llama" (convert_hf_to_gguf.py's LlamaModel covers these).
LLAMA_FAMILY = ("llama", "mistral")
FILE_NAME = "model.gguf"
DEFAULT_QUANT = "f16"

# The GPT-2 regex as a byte-level pre-tokenizer (ByteLevel with use_regex) applies it; llama.cpp calls it "gpt-2".
# SmolLM's tokenizer splits digits first ("smollm"); Llama 3's splits with its own regex ("llama-bpe").
LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+"
    "|\\s+(?!\\S)|\\s+"
)


def qtype_for(quant: str, tensor: np.ndarray) -> Any:
    """The GGML type a tensor is stored in: 1-D tensors (norms) stay F32 as llama.cpp keeps them; Q8_0 needs rows
    of a multiple of 32 values, else F16 (llama.cpp's fallback too)."""
    import gguf

    types = gguf.GGMLQuantizationType
    if tensor.ndim < 2 or quant == "f32":
        return types.F32
    if quant == "q8_0":
        block = gguf.GGML_QUANT_SIZES[types.Q8_0][0]
        return types.Q8_0 if tensor.shape[-1] % block == 0 else types.F16
    return {"f16": types.F16, "bf16": types.BF16}[quant]


def add_tensor(writer: Any, name: str, tensor: np.ndarray, quant: str) -> None:
    """Quantize with gguf.quants and add under `name`."""
    import gguf

    qtype = qtype_for(quant, tensor)
    data = gguf.quants.quantize(np.ascontiguousarray(tensor, dtype=np.float32), qtype)
    raw = None if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else qtype
    writer.add_tensor(name, data, raw_dtype=raw)


def file_type(quant: str) -> int:
    import gguf

    kinds = gguf.LlamaFileType
    return int(
        {"f32": kinds.ALL_F32, "f16": kinds.MOSTLY_F16, "bf16": kinds.MOSTLY_BF16, "q8_0": kinds.MOSTLY_Q8_0}[quant]
    )


def permute_rows(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's order of q/k rows (convert_hf_to_gguf.py LlamaModel.permute): each head's two rotary halves
    interleaved, as its rope implementation reads them."""
    rows = weights.shape[0]
    return weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def unpermute_rows(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `permute_rows` (what a GGUF reader applies)."""
    rows = weights.shape[0]
    return weights.reshape(heads, rows // heads // 2, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def check_architecture(config: Any, fmt: str) -> None:
    """Raises UserInputError for a model the writer does not know, naming it and what works instead."""
    model_type = getattr(config, "model_type", None)
    problem = None
    if model_type not in LLAMA_FAMILY:
        problem = f"architecture {model_type!r} ({', '.join(getattr(config, 'architectures', None) or [])})"
    elif getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problem = f"{model_type} with bias terms in its linear layers"
    else:
        rope = rope_settings(config)
        if rope["type"] not in ("default", "linear"):
            problem = f"rope scaling {rope['type']!r}"
    if problem:
        raise UserInputError(
            f"--format {fmt}: the GGUF writer knows the Llama family ({', '.join(LLAMA_FAMILY)} without biases, rope "
            f"default or linear), not {problem}; use --format hf-merged and llama.cpp's convert_hf_to_gguf.py on it"
        )


def rope_settings(config: Any) -> dict[str, Any]:
    """Rope theta, type and factor from a transformers 5 config (`rope_parameters`) or an older one."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    return {"theta": float(theta), "type": kind, "factor": params.get("factor")}


def head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def add_hparams(writer: Any, config: Any, vocab_size: int) -> None:
    """llama.* keys as convert_hf_to_gguf.py writes them for a Llama."""
    import gguf

    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(config.num_key_value_heads or config.num_attention_heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    dim = head_dim(config)
    writer.add_rope_dimension_count(dim)
    if dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    rope = rope_settings(config)
    writer.add_rope_freq_base(rope["theta"])
    if rope["type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_vocab_size(vocab_size)


def _tokenizer_json(folder: Path) -> dict[str, Any]:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UserInputError(
            f"MODEL_URI: the version's tokenizer ({folder}) has no tokenizer.json to read the vocabulary from"
        )
    return dict(json.loads(path.read_text()))


def _pre_tokenizers(spec: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not spec:
        return []
    return list(spec.get("pretokenizers", [])) if spec.get("type") == "Sequence" else [spec]


def bpe_pre_name(spec: dict[str, Any]) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer.json, from its pre-tokenizer.

    Raises:
        UserInputError: a pre-tokenizer llama.cpp has no name for here (it would split text differently).
    """
    parts = _pre_tokenizers(spec.get("pre_tokenizer"))
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and parts[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT:
        return "llama-bpe"
    raise UserInputError(
        f"--format gguf: the tokenizer's pre-tokenizer ({json.dumps(spec.get('pre_tokenizer'))[:300]}) is not one "
        "this writer can name for llama.cpp (gpt-2, smollm, llama-bpe); use --format hf-merged and llama.cpp's "
        "convert_hf_to_gguf.py"
    )


def spm_scores(spec: dict[str, Any], tokens: list[str]) -> list[float]:
    """SentencePiece scores for a BPE tokenizer.json: a merged piece scores minus its merge's rank (the order
    llama.cpp's SPM tokenizer and a reader rebuilding merges from scores apply them); other pieces score below
    every merge, in id order; special and byte tokens 0 (what sentencepiece's own model files hold)."""
    merges = spec["model"].get("merges") or []
    rank: dict[str, int] = {}
    for index, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, index)
    scores = []
    singles = 0
    for token in tokens:
        if token in rank:
            scores.append(-float(rank[token]))
        elif token.startswith("<") and token.endswith(">"):
            scores.append(0.0)
        else:
            scores.append(-float(len(merges) + singles))
            singles += 1
    return scores


def vocabulary(tokenizer: Any, folder: Path, n_vocab: int) -> dict[str, Any]:
    """The `tokenizer.ggml.*` metadata for the version's tokenizer, padded to the model's `n_vocab` rows.

    Raises:
        UserInputError: a tokenizer that is neither byte-level BPE nor SentencePiece-style BPE, or larger than the
            model's embedding.
    """
    import gguf

    spec = _tokenizer_json(folder)
    model = spec.get("model", {})
    decoder = spec.get("decoder") or {}
    vocab = tokenizer.get_vocab()
    if len(vocab) > n_vocab:
        raise UserInputError(f"--format gguf: the tokenizer has {len(vocab)} tokens, the model's embedding {n_vocab}")
    by_id = {index: token for token, index in vocab.items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    added = {int(i): t for i, t in tokenizer.added_tokens_decoder.items()}
    types = gguf.TokenType
    byte_level = model.get("type") == "BPE" and not model.get("byte_fallback") and decoder.get("type") == "ByteLevel"
    sentencepiece = model.get("type") == "BPE" and bool(model.get("byte_fallback"))
    if not (byte_level or sentencepiece):
        raise UserInputError(
            f"--format gguf: the tokenizer is a {model.get('type')} model (byte_fallback={model.get('byte_fallback')}, "
            f"decoder {decoder.get('type')}); the writer knows byte-level BPE and SentencePiece-style BPE; use "
            "--format hf-merged and llama.cpp's convert_hf_to_gguf.py"
        )
    token_types = []
    for i, token in enumerate(tokens):
        if i not in by_id:
            token_types.append(types.UNUSED)
        elif i in added:
            is_unk = sentencepiece and i == tokenizer.unk_token_id
            token_types.append(types.UNKNOWN if is_unk else types.CONTROL if added[i].special else types.USER_DEFINED)
        elif sentencepiece and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            token_types.append(types.BYTE)
        else:
            token_types.append(types.NORMAL)
    meta: dict[str, Any] = {"tokens": tokens, "token_types": [int(t) for t in token_types]}
    if byte_level:
        meta |= {"model": "gpt2", "pre": bpe_pre_name(spec)}
        meta["merges"] = gguf.SpecialVocab(folder, load_merges=True).merges
    else:
        meta |= {"model": "llama", "pre": "default", "scores": spm_scores(spec, tokens)}
        prepend = [
            p.get("prepend_scheme") for p in _pre_tokenizers(spec.get("pre_tokenizer")) if p.get("type") == "Metaspace"
        ]
        meta["add_space_prefix"] = bool(prepend) and prepend[0] in ("first", "always")
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    meta["add_bos"] = bos is not None and probe[:1] == [bos]
    meta["add_eos"] = eos is not None and probe[-1:] == [eos]
    meta["special"] = {
        "bos": bos,
        "eos": eos,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
    }
    return meta


def add_vocabulary(writer: Any, meta: dict[str, Any], template: str | None) -> None:
    writer.add_tokenizer_model(meta["model"])
    writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["token_types"])
    if "scores" in meta:
        writer.add_token_scores(meta["scores"])
    if meta.get("merges"):
        writer.add_token_merges(meta["merges"])
    if "add_space_prefix" in meta:
        writer.add_add_space_prefix(meta["add_space_prefix"])
    ids = meta["special"]
    for kind, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):  # fmt: skip
        if ids.get(kind) is not None:
            add(int(ids[kind]))
    writer.add_add_bos_token(meta["add_bos"])
    writer.add_add_eos_token(meta["add_eos"])
    if template:
        writer.add_chat_template(template)


def write_model_gguf(
    path: Path, model: nn.Module, tokenizer: Any, tokenizer_dir: Path, template: str | None, quant: str, name: str
) -> dict[str, int]:
    """Write a Llama-family causal LM with its tokenizer as one GGUF file; returns the count of tensors per GGML
    type written."""
    import gguf

    config: Any = model.config
    check_architecture(config, "gguf")
    n_vocab = int(model.get_input_embeddings().weight.shape[0])  # type: ignore[operator]
    meta = vocabulary(tokenizer, tokenizer_dir, n_vocab)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    add_hparams(writer, config, n_vocab)
    writer.add_file_type(file_type(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocabulary(writer, meta, template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config.num_hidden_layers))
    heads, kv_heads = int(config.num_attention_heads), int(config.num_key_value_heads or config.num_attention_heads)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    counts: dict[str, int] = {}
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when there is no output tensor
        new_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise UserInputError(f"--format gguf: no GGUF name for tensor {hf_name!r} of {config.model_type}")
        data = tensor.detach().to(torch.float32)
        if hf_name.endswith("self_attn.q_proj.weight"):
            data = permute_rows(data, heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            data = permute_rows(data, kv_heads)
        array = data.numpy()
        add_tensor(writer, new_name, array, quant)
        kind = qtype_for(quant, array).name
        counts[kind] = counts.get(kind, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def version_name(source: ExportSource) -> str:
    return (
        source.uri.removeprefix("models:/").replace("/", "-v", 1) if source.uri.startswith("models:/") else "adaptflow"
    )


def write_gguf(source: ExportSource, staging: Path, quant: str | None) -> tuple[dict[str, Any], list[str]]:
    """model.gguf (the merged model), verified through transformers' GGUF loader."""
    from tasks.export.verify import verify_gguf

    require_merged(source, "gguf")
    quant = quant or DEFAULT_QUANT
    path = staging / FILE_NAME
    counts = write_model_gguf(
        path, source.model, source.tokenizer, source.tokenizer_dir, source.template, quant, version_name(source)
    )
    checks = verify_gguf(source, path, quant)
    checks["tensor_types"] = counts
    checks["quant"] = quant
    return checks, []
