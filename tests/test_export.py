"""adaptflow export: every format of a LoRA version of a tiny SentencePiece Llama and of the builtin byte-level BPE
tiny Llama (with chatml's added tokens), each verified by reading it back with another reader (transformers' GGUF
loader, gguf's reader, peft, a Go-template renderer); bad input exits 2 naming what works; a failed verification
exits 1 and is recorded. Packages are built in the registered layout (adaptflow.json + tokenizer + peft adapter +
pinned base); the slow test exports a version a real `adaptflow run` registered, with the pipeline's export stage."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SAMPLES, write_config
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from adapters_impl.packaged import INFO_FILE, fit_embeddings, folder_fingerprint
from flows.cli import main
from tasks.errors import UserInputError
from tasks.export.ollama import Untranslatable, analyse, go_template, ollama_messages, render_go
from tasks.export.source import SAMPLE_CONVERSATIONS
from tasks.objectives.instruction.chat import CHATML_TEMPLATE, CHATML_TOKENS, PLAIN_TEMPLATE

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set rest = messages[1:] %}{% set sys = messages[0]['content'] %}"
    "{% else %}{% set rest = messages %}{% set sys = false %}{% endif %}{% for m in rest %}"
    "{% if loop.index0 == 0 and sys != false %}{% set c = '<<SYS>>\\n' + sys + '\\n<</SYS>>\\n\\n' + m['content'] %}"
    "{% else %}{% set c = m['content'] %}{% endif %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + c + "
    "' [/INST]' }}{% else %}{{ ' ' + c + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# meta-llama/Llama-2-13b-chat-hf's tokenizer_config.json chat template (system folded into the first user turn).
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# Position-dependent: numbers the turns, which no fixed prefix per role can write.
NUMBERED_TEMPLATE = "{% for m in messages %}{{ loop.index }}. {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
# Ollama's documented Modelfile instructions (docs/modelfile.md); the format is not case sensitive.
MODELFILE_INSTRUCTIONS = ("FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE")


def last_json(text: str) -> dict[str, Any]:
    return dict(json.loads(text.strip().splitlines()[-1]))


def _texts() -> list[str]:
    return [json.loads(line)["text"] for line in (SAMPLES / "sample_stories.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def spm_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with a SentencePiece BPE tokenizer (byte fallback) trained on the sample stories."""
    import sentencepiece

    folder = tmp_path_factory.mktemp("spm-llama")
    model_file = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_texts()), model_writer=model_file, vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False,  # Llama's: llama.cpp normalizes nothing
    )  # fmt: skip
    (folder / "tokenizer.model").write_bytes(model_file.getvalue())
    # legacy=False: no space piece after a special token, as transformers' GGUF reader rebuilds SentencePiece
    tokenizer = AutoTokenizer.from_pretrained(folder, tokenizer_class="LlamaTokenizer", legacy=False)
    (folder / "tokenizer.model").unlink()
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def make_package(
    folder: Path, base: Path, chat: dict[str, str] | None, added: tuple[str, ...] = (), method: str = "lora"
) -> Path:
    """A LoRA version's package as `adaptflow run` registers it, with random (non-zero) LoRA matrices."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    if added:
        tokenizer.add_tokens(list(added), special_tokens=True)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    fit_embeddings(model, tokenizer)
    rows = {"embed_tokens": tokenizer.convert_tokens_to_ids(list(added))} if added else None
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=LINEAR, init_lora_weights=False, use_dora=method == "dora",
        trainable_token_indices=rows, task_type="CAUSAL_LM",
    )  # fmt: skip
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # random B of a size a few training steps give, so the merge changes the logits
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    folder.mkdir(parents=True)
    peft_model.save_pretrained(str(folder / "adapter"))
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    base_pin = {
        "kind": "tracking", "fingerprint": folder_fingerprint(base), "run_id": "-", "path": "base",
        "logged_from": str(base), "local_path": str(base),
    }  # fmt: skip
    info: dict[str, Any] = {
        "task": "instruction" if chat else "causal_lm", "method": method, "label_names": None,
        "generation": {"max_new_tokens": 8}, "weights": None, "tokenizer": "tokenizer", "adapter": "adapter",
        "base": base_pin, "allow_pickle": False,
    }  # fmt: skip
    if chat:
        info["chat"] = chat
    (folder / INFO_FILE).write_text(json.dumps(info))
    return folder


@pytest.fixture(scope="module")
def spm_package(spm_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    chat = {"name": "plain", "source": PLAIN_TEMPLATE, "end_of_turn": "</s>"}
    return make_package(tmp_path_factory.mktemp("pkg") / "spm", spm_base, chat)


@pytest.fixture(scope="module")
def chatml_package(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    chat = {"name": "chatml", "source": CHATML_TEMPLATE, "end_of_turn": "<|im_end|>"}
    return make_package(tmp_path_factory.mktemp("pkg") / "chatml", Path(tiny_model), chat, CHATML_TOKENS)


def export(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    code = main(["export", *args, "--json"])
    return code, last_json(capsys.readouterr().out)


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, value) pairs as Ollama's docs/modelfile.md defines the format: `# comment` lines, one
    `INSTRUCTION arguments` per line, a value in triple quotes spanning lines; an unknown instruction fails."""
    pairs: list[tuple[str, str]] = []
    lines = iter(text.splitlines())
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        instruction, _, value = line.partition(" ")
        assert instruction.upper() in MODELFILE_INSTRUCTIONS, f"not a Modelfile instruction: {line!r}"
        if value.startswith('"""'):
            value = value[3:]
            while not value.endswith('"""'):
                value += "\n" + next(lines)
            value = value[:-3]
        pairs.append((instruction.upper(), value))
    return pairs


def gguf_fields(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def test_every_format_of_a_lora_on_a_sentencepiece_llama_is_written_and_verified(
    spm_package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    formats = ["hf-merged", "gguf", "gguf-lora", "ollama", "vllm-check"]
    out = tmp_path / "out"
    code, result = export([str(spm_package), *[a for f in formats for a in ("--format", f)], "--out", str(out)], capsys)
    assert code == 0, result
    by_format = {e["format"]: e for e in result["exports"]}
    assert sorted(by_format) == sorted(formats) and all(e["verified"] and not e["failed"] for e in by_format.values())
    for fmt, entry in by_format.items():  # the verdict is recorded beside each artifact
        recorded = json.loads((out / fmt / "verification.json").read_text())
        assert recorded["verified"] and recorded["checks"] == entry["checks"]

    gguf = by_format["gguf"]["checks"]
    assert gguf["same_token_ids"] and gguf["greedy_match"] and gguf["chat_template_match"]
    assert 0 < gguf["max_abs_logit_diff"] <= gguf["logit_tolerance"]
    fields = gguf_fields(out / "gguf" / "model.gguf")
    assert fields["tokenizer.ggml.model"] == "llama" and fields["general.architecture"] == "llama"
    assert fields["tokenizer.chat_template"] == PLAIN_TEMPLATE and fields["llama.context_length"] == 256
    assert fields["tokenizer.ggml.eos_token_id"] == 2 and len(fields["tokenizer.ggml.scores"]) == 400

    lora = by_format["gguf-lora"]["checks"]
    assert lora["adapter_layout"] and lora["weights_rebuilt"] and lora["adapted_weights"] == 2 * len(LINEAR)
    adapter = gguf_fields(out / "gguf-lora" / "adapter.gguf")
    assert adapter["general.type"] == "adapter" and adapter["adapter.type"] == "lora"
    assert adapter["adapter.lora.alpha"] == 8.0 and lora["base_same_token_ids"] and lora["base_greedy_match"]

    modelfile = (out / "ollama" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.gguf\nTEMPLATE") and 'PARAMETER stop "</s>"' in modelfile
    assert by_format["ollama"]["checks"]["template_renders_same"]

    vllm = by_format["vllm-check"]["checks"]
    report = vllm["report"]
    assert report["servable_as_lora"] and report["rank"] == 4 and report["max_lora_rank"] == 8
    assert vllm["adapter_logits_within_tolerance"] and "--enable-lora --lora-modules" in report["command"]
    assert json.loads((out / "vllm-check" / "report.json").read_text())["refused"] == []


def test_a_chatml_version_exports_its_added_tokens_and_refuses_a_lora_gguf(
    chatml_package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ollama"
    code, result = export([str(chatml_package), "--format", "ollama", "--quant", "bf16", "--out", str(out)], capsys)
    assert code == 0, result
    checks = result["exports"][0]["checks"]
    assert checks["same_token_ids"] and checks["chat_template_match"] and checks["template_renders_same"]
    fields = gguf_fields(out / "model.gguf")
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert all(types[tokens.index(t)] == 3 for t in CHATML_TOKENS)  # control tokens, kept whole
    modelfile = (out / "Modelfile").read_text()
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'PARAMETER stop "</s>"' in modelfile
    assert '{{ "<|im_start|>assistant\\n" }}' in modelfile

    # llama.cpp's LoRA adapters cannot carry the trained rows of the added tokens: exit 2, naming the way out.
    code, result = export([str(chatml_package), "--format", "gguf-lora", "--out", str(tmp_path / "l")], capsys)
    assert code == 2 and "trained embedding rows" in result["error"] and "--format gguf" in result["error"]
    assert not (tmp_path / "l").exists()
    code, result = export([str(chatml_package), "--format", "vllm-check", "--out", str(tmp_path / "v")], capsys)
    report = result["exports"][0]["checks"]["report"]
    assert code == 0 and not report["servable_as_lora"] and "hf-merged" in report["command"]
    assert any("trained embedding rows" in r for r in report["refused"])


def test_bad_input_exits_2_and_writes_nothing(
    spm_package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    code, result = export([str(spm_package), "--format", "gguf", "--out", str(taken)], capsys)
    assert code == 2 and "not empty" in result["error"] and "--force" in result["error"]
    assert (taken / "keep.txt").read_text() == "mine"
    code, result = export([str(spm_package), "--format", "gguf", "--out", str(taken), "--force"], capsys)
    assert code == 0 and not (taken / "keep.txt").exists() and (taken / "model.gguf").is_file()
    code, result = export(["--format", "gguf", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "--name" in result["error"]
    code, result = export(
        [str(spm_package), "--format", "hf-merged", "--quant", "q8_0", "--out", str(tmp_path / "h")], capsys
    )
    assert code == 2 and "q8_0 is for --format gguf" in result["error"]


def test_gguf_lora_of_a_dora_version_and_an_untranslatable_template_exit_2(
    spm_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dora = make_package(tmp_path / "dora", spm_base, None, method="dora")
    code, result = export([str(dora), "--format", "gguf-lora", "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and "'dora'" in result["error"] and "--format gguf (the merged model)" in result["error"]
    code, result = export([str(dora), "--format", "ollama-lora", "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and "--format ollama-lora: method 'dora'" in result["error"]
    assert "--format ollama (the merged model)" in result["error"] and not (tmp_path / "a").exists()
    chat = {"name": "numbered", "source": NUMBERED_TEMPLATE, "end_of_turn": "</s>"}
    numbered = make_package(tmp_path / "numbered", spm_base, chat)
    code, result = export([str(numbered), "--format", "ollama", "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and "'numbered'" in result["error"] and "write TEMPLATE by hand" in result["error"]
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b-*"))


def test_an_architecture_the_writer_does_not_know_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "pkg"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=384)).save_pretrained(folder / "model")
    from tasks.modeling import builtin_model_path

    AutoTokenizer.from_pretrained(builtin_model_path("tiny")).save_pretrained(folder / "tokenizer")
    info = {"task": "causal_lm", "method": "full", "label_names": None, "generation": {}, "weights": "model",
            "tokenizer": "tokenizer", "adapter": None, "base": None}  # fmt: skip
    (folder / INFO_FILE).write_text(json.dumps(info))
    code, result = export([str(folder), "--format", "gguf", "--out", str(tmp_path / "g")], capsys)
    assert code == 2 and "'gpt2'" in result["error"] and "--format hf-merged" in result["error"]
    code, result = export([str(folder), "--format", "gguf-lora", "--out", str(tmp_path / "g")], capsys)
    assert code == 2 and "'full'" in result["error"]


def test_a_failed_verification_exits_1_and_is_recorded(
    spm_package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.export import verify

    monkeypatch.setitem(verify.LOGIT_TOLERANCE, "q8_0", 0.0)  # 8-bit weights cannot match float32 logits exactly
    out = tmp_path / "q8"
    code, result = export([str(spm_package), "--format", "gguf", "--quant", "q8_0", "--out", str(out)], capsys)
    assert code == 1 and "verification failed" in result["error"] and "logits_within_tolerance" in result["error"]
    recorded = json.loads((out / "verification.json").read_text())
    assert recorded["verified"] is False and recorded["failed"] == ["logits_within_tolerance"]
    assert result["exports"][0]["checks"]["max_abs_logit_diff"] > 0


@pytest.mark.parametrize("name", ["chatml", "plain", "default-system"])
def test_role_wise_templates_translate_to_go_templates_that_render_the_same(tiny_model: str, name: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    default_system = (
        "{% for m in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
        "Be kind.<|im_end|>\\n' }}{% endif %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    source = {"chatml": CHATML_TEMPLATE, "plain": PLAIN_TEMPLATE, "default-system": default_system}[name]

    def render(messages: list[dict[str, str]], generation: bool) -> str:
        return str(tokenizer.apply_chat_template(messages, chat_template=source, tokenize=False,
                                                 add_generation_prompt=generation))  # fmt: skip

    model = analyse(render, name)
    assert model.default_system == ("Be kind." if name == "default-system" else None)
    template = go_template(model)
    for conversation in SAMPLE_CONVERSATIONS:
        asks = conversation[-1]["role"] != "assistant"
        found = render_go(template, {"Messages": ollama_messages(conversation, model.default_system)})
        assert found == render(conversation, asks)
    with pytest.raises(Untranslatable):
        analyse(lambda m, g: tokenizer.apply_chat_template(m, chat_template=NUMBERED_TEMPLATE, tokenize=False), "n")


@pytest.mark.parametrize("source", [LLAMA2_CHAT_TEMPLATE, LLAMA2_TEMPLATE], ids=["llama-2-chat", "llama-2-like"])
def test_llama2_templates_fold_the_system_message_into_the_first_user_turn(tiny_model: str, source: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)

    def render(messages: list[dict[str, str]], generation: bool) -> str:
        return str(tokenizer.apply_chat_template(messages, chat_template=source, tokenize=False,
                                                 add_generation_prompt=generation))  # fmt: skip

    model = analyse(render, "llama2")
    assert model.folded_system == ("<<SYS>>\n", "\n<</SYS>>\n\n") and model.default_system is None
    assert model.prefix["user"] == "<s>[INST] " and model.suffix["assistant"] == " </s>"
    template = go_template(model)
    system_led = [{"role": "system", "content": "Answer in French."}]
    system_led += [{"role": r, "content": c} for r, c in [("user", "Hi"), ("assistant", "Salut"), ("user", "Bye?")]]
    for conversation in [*SAMPLE_CONVERSATIONS, system_led]:
        asks = conversation[-1]["role"] != "assistant"
        found = render_go(template, {"Messages": ollama_messages(conversation, model.default_system)})
        assert found == render(conversation, asks)
    # Only the first user turn carries it: "[INST] <<SYS>>" once, whatever the length.
    assert render_go(template, {"Messages": system_led}).count("<<SYS>>") == 1


def test_ollama_lora_writes_from_base_and_adapter_in_ollamas_modelfile_syntax(
    spm_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The LoRA-only Ollama form on a Llama-2-chat version: FROM the base GGUF, ADAPTER the LoRA GGUF (paths
    relative to the Modelfile, as Ollama's docs define ADAPTER), the Llama-2 TEMPLATE, stops; all verified."""
    chat = {"name": "llama-2-chat", "source": LLAMA2_CHAT_TEMPLATE, "end_of_turn": "</s>"}
    package = make_package(tmp_path / "pkg", spm_base, chat)
    out = tmp_path / "out"
    code, result = export([str(package), "--format", "ollama-lora", "--out", str(out)], capsys)
    assert code == 0, result
    checks = result["exports"][0]["checks"]
    assert checks["weights_rebuilt"] and checks["adapter_layout"] and checks["template_renders_same"]
    assert checks["base_greedy_match"] and checks["base_same_token_ids"]
    pairs = parse_modelfile((out / "Modelfile").read_text())
    instructions = [name for name, _ in pairs]
    assert instructions[:3] == ["FROM", "ADAPTER", "TEMPLATE"] and "SYSTEM" not in instructions
    values = dict(pairs[:3])
    base, adapter = out / values["FROM"], out / values["ADAPTER"]
    assert values["FROM"] == "./base.gguf" and values["ADAPTER"] == "./adapter.gguf"
    assert gguf_fields(adapter)["general.type"] == "adapter" and "adapter.type" not in gguf_fields(base)
    assert ("PARAMETER", 'stop "</s>"') in pairs
    conversation = SAMPLE_CONVERSATIONS[1]
    rendered = render_go(values["TEMPLATE"], {"Messages": conversation})
    tokenizer = AutoTokenizer.from_pretrained(package / "tokenizer")
    expected = tokenizer.apply_chat_template(conversation, chat_template=LLAMA2_CHAT_TEMPLATE, tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
    assert rendered == expected and "<<SYS>>\nYou answer briefly.\n<</SYS>>\n\nName a colour." in rendered


def test_real_model_exports_verify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SmolLM2-135M-Instruct (BPE, its own chat template with a default system message): every format verifies
    (ollama's merged GGUF, ollama-lora's base and LoRA GGUFs, the vLLM check, the merged HF folder). Slow
    (minutes); skipped when the model cannot be obtained."""
    import os

    from tasks.modeling import builtin_model_path

    # The user's cache, as tests/test_real_model.py does: the model is fetched once per machine.
    user_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "adaptflow"
    monkeypatch.setenv("ADAPTFLOW_CACHE", os.environ.get("ADAPTFLOW_REAL_MODEL_CACHE", str(user_cache)))
    try:
        base = builtin_model_path("smollm2-135m-instruct")
    except UserInputError as exc:
        pytest.skip(f"builtin:smollm2-135m-instruct cannot be obtained: {exc}")
    template = AutoTokenizer.from_pretrained(base).chat_template
    package = make_package(
        tmp_path / "pkg", base, {"name": "tokenizer", "source": template, "end_of_turn": "<|im_end|>"}
    )
    out = tmp_path / "out"
    formats = ["ollama", "ollama-lora", "vllm-check", "hf-merged"]  # ollama's include gguf's and gguf-lora's files
    code, result = export([str(package), *(f"--format={f}" for f in formats), "--out", str(out)], capsys)
    assert code == 0, result
    assert sorted(e["format"] for e in result["exports"]) == sorted(formats)
    assert all(e["verified"] for e in result["exports"])
    system = 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""'
    modelfile = (out / "ollama" / "Modelfile").read_text()
    assert system in modelfile
    lora_modelfile = (out / "ollama-lora" / "Modelfile").read_text()
    assert "ADAPTER ./adapter.gguf" in lora_modelfile and system in lora_modelfile
    assert gguf_fields(out / "ollama-lora" / "adapter.gguf")["general.type"] == "adapter"
    assert gguf_fields(out / "ollama" / "model.gguf")["tokenizer.ggml.pre"] == "gpt-2"
    shutil.rmtree(out)


test_real_model_exports_verify = pytest.mark.slow(test_real_model_exports_verify)


@pytest.mark.slow
def test_a_registered_run_exports_in_the_pipeline_and_the_gate_holds_back_a_failed_export(
    tmp_path: Path, tiny_model: str, stories_file: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from mlflow.tracking import MlflowClient

    from tasks.export import verify

    config = write_config(
        tmp_path / "run.yaml",
        model={"name_or_path": tiny_model},
        data={"train": str(stories_file), "max_length": 48, "eval_fraction": 0.2},
        method={"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
        train={"max_steps": 4, "batch_size": 8, "learning_rate": 3e-3, "save_steps": 4},
        bias_probe={"suite": None},
        registry={"name": "exported"},
        export={"formats": ["gguf", "ollama"], "quant": "q8_0", "gate": True},
    )
    tolerance = verify.LOGIT_TOLERANCE["q8_0"]
    monkeypatch.setitem(verify.LOGIT_TOLERANCE, "q8_0", 0.0)  # this version's export fails its verification
    assert main(["run", str(config), "--json"]) == 0
    result = last_json(capsys.readouterr().out)
    assert result["aliases"] == [] and "export verification failed" in result["promotion"]
    # The run's JSON lists the exports as `adaptflow export --json` does, with the verdict.
    listed = result["export"]
    assert listed["status"] == "failed" and listed["gate"] is True and "gguf" in listed["reason"]
    assert [e["format"] for e in listed["exports"]] == ["gguf", "ollama"]
    gguf_entry = listed["exports"][0]
    assert gguf_entry["verified"] is False and gguf_entry["failed"] == ["logits_within_tolerance"]
    assert (
        gguf_entry["quant"] == "q8_0" and Path(gguf_entry["path"], "model.gguf").stat().st_size == gguf_entry["bytes"]
    )
    assert listed["exports"][1]["verified"] is False and Path(listed["exports"][1]["path"], "Modelfile").is_file()
    version = MlflowClient().get_model_version("exported", result["model_version"])
    assert version.tags["export.status"] == "failed" and version.tags["export.gguf.verified"] == "false"
    assert float(version.tags["export.gguf.max_abs_logit_diff"]) > 0
    assert Path(version.tags["export.ollama.path"], "Modelfile").is_file()

    monkeypatch.setitem(verify.LOGIT_TOLERANCE, "q8_0", tolerance)
    out = tmp_path / "cli"
    args = [f"models:/exported/{result['model_version']}", "--format", "gguf-lora", "--format", "hf-merged"]
    code, exported = export([*args, "--out", str(out)], capsys)
    assert code == 0 and all(e["verified"] for e in exported["exports"]), exported
    code, exported = export(["--name", "exported", "--format", "gguf", "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and "champion" in exported["error"]  # held back: there is no champion to export
