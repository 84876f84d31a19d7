"""Instruction tuning core (tasks.instruction): one test per pitfall the peers are known for, plus bad input.

Fast and offline: the builtin tiny tokenizer (byte-level BPE, no chat template, no BOS added), a sentencepiece-style
tokenizer built here (leading-space Metaspace, BOS added by its post-processor, pad == eos, its own Llama-2-like chat
template that writes BOS and has no generation markers), and tiny Llama models built from a config.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from tasks.config import validate_config
from tasks.errors import UserInputError
from tasks.labels import IGNORE_INDEX as IGNORE
from tasks.modeling import resize_for_tokens
from tasks.objectives.base import Encoding
from tasks.objectives.instruction.chat import (
    ChatTemplate,
    encode_conversation,
    encode_prompt,
    prompt_for_generation,
    resolve_template,
    response_only,
    stop_token_ids,
    to_messages,
)
from tasks.objectives.instruction.objective import OBJECTIVE
from tasks.objectives.instruction.settings import InstructionDataSettings, InstructionSettings
from tasks.tokenization import make_collator

LLAMA2_LIKE = (  # the shape of Llama-2's template: BOS written by the template, no {% generation %} markers
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}<<SYS>> {{ m['content'] }} <</SYS>>"
    "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
NO_SYSTEM = (  # Gemma-style: rejects a system message
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    + LLAMA2_LIKE
)
CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue is one."},
    {"role": "user", "content": "And another?"},
    {"role": "assistant", "content": "Green."},
]


@pytest.fixture(scope="module")
def tiny_tok(tiny_model: str) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert tok.chat_template is None and tok("a")["input_ids"][0] != tok.bos_token_id  # no template, no BOS added
    return tok


def _spm_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    texts = [m["content"] for m in CONVERSATION] * 20 + ["Hello there, the quick brown fox says hi"] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = sorted(set("".join([*texts, LLAMA2_LIKE, "[]<>/:?!#\n"])))
    tok.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=alphabet)
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    fast.chat_template = LLAMA2_LIKE
    return fast


@pytest.fixture(scope="module")
def spm_tok() -> PreTrainedTokenizerFast:
    tok = _spm_tokenizer()
    assert tok("a")["input_ids"][0] == tok.bos_token_id and tok.pad_token_id == tok.eos_token_id
    return tok


def _template(tok: PreTrainedTokenizerBase, name: str = "tokenizer") -> ChatTemplate:
    return resolve_template(tok, InstructionSettings(template=name))


def _targets(tok: PreTrainedTokenizerBase, labels: list[int]) -> list[str]:
    """The trained stretches of a row, decoded with special tokens kept."""
    runs: list[list[int]] = [[]]
    for label in labels:
        if label == IGNORE:
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append(label)
    return [tok.decode(r) for r in runs if r]


def _tiny_llama(vocab: int, tie: bool = True, attn: str = "eager") -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config).eval()


def _encode(
    conversations: list[Any], tok: PreTrainedTokenizerBase, template: ChatTemplate, max_length: int = 256
) -> tuple[list[dict[str, list[int]]], int]:
    """Conversations through the instruction objective's encoder, the pipeline's one encode path: the encoded
    rows and how many were dropped (`sft_dropped_rows`)."""
    chat = {"name": template.name, "source": template.source, "end_of_turn": template.end_of_turn}
    settings: dict[str, Any] = {"chat": chat, "loss_on": "assistant"}
    encoding = Encoding()
    encode, _ = OBJECTIVE.encoder(tok, SimpleNamespace(eval_dir=""), None, None, max_length, settings, encoding)  # type: ignore[arg-type]
    out = encode({"messages": conversations})
    rows = [dict(zip(out, values, strict=True)) for values in zip(*out.values(), strict=True)]
    return rows, int(encoding.metrics["sft_dropped_rows"])


def _response_tokens(labels: torch.Tensor) -> int:
    """Predicted response tokens: labels after the first position that are not -100 (the Trainer's count for
    `num_items_in_batch`)."""
    return int(labels[..., 1:].ne(IGNORE).sum())


def _pad(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch, labels -100 on padding."""
    width = max(len(r["input_ids"]) for r in rows)

    def fill(key: str, value: int) -> torch.Tensor:
        return torch.tensor([r[key] + [value] * (width - len(r[key])) for r in rows])

    return {
        "input_ids": fill("input_ids", pad_id),
        "attention_mask": fill("attention_mask", 0),
        "labels": fill("labels", IGNORE),
    }


# ---------------------------------------------------------------- formats


def test_formats_normalise_to_messages() -> None:
    alpaca = [
        {"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be exact."},
        {"instruction": "Greet", "input": "", "output": "Hi", "system": None},
    ]
    fmt, rows = to_messages(alpaca, InstructionDataSettings())
    assert fmt == "alpaca"
    assert rows[0] == [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "Add\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    assert rows[1] == [{"role": "user", "content": "Greet"}, {"role": "assistant", "content": "Hi"}]

    fmt, rows = to_messages([{"prompt": "Q?", "completion": "A."}], InstructionDataSettings())
    assert (fmt, rows) == (
        "prompt_completion",
        [[{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]],
    )

    fmt, rows = to_messages([{"messages": CONVERSATION}], InstructionDataSettings())
    assert (fmt, rows) == ("messages", [CONVERSATION])

    renamed = [{"question": "Q?", "answer": "A."}]
    settings = InstructionDataSettings(columns={"prompt": "question", "completion": "answer"})
    assert to_messages(renamed, settings)[1][0][1] == {"role": "assistant", "content": "A."}


def test_sharegpt_roles_mapped() -> None:
    row = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "Q"},
            {"from": "bot", "value": "A"},
        ]
    }
    with pytest.raises(UserInputError, match=r"row 1: unknown 'from' value 'bot'.*data.role_map"):
        to_messages([row], InstructionDataSettings())
    fmt, rows = to_messages([row], InstructionDataSettings(role_map={"bot": "assistant"}))
    assert fmt == "sharegpt"
    assert [m["role"] for m in rows[0]] == ["system", "user", "assistant"]
    with pytest.raises(ValidationError, match="roles must be one of"):
        InstructionDataSettings(role_map={"bot": "robot"})


def test_missing_column_names_column_and_format() -> None:
    with pytest.raises(UserInputError, match=r"no column 'output', which format alpaca needs \(data.format\)"):
        to_messages([{"instruction": "x", "answer": "y"}], InstructionDataSettings(format="alpaca"))
    with pytest.raises(UserInputError, match=r"row 1 is in no instruction format; expected one of: messages"):
        to_messages([{"text": "x"}], InstructionDataSettings())


def test_mixed_formats_name_the_row() -> None:
    rows = [
        {"instruction": "a", "output": "b"},
        {"instruction": "c", "output": "d"},
        {"prompt": "e", "completion": "f"},
    ]
    with pytest.raises(UserInputError, match=r"row 3 is in format prompt_completion but the file is alpaca"):
        to_messages(rows, InstructionDataSettings())


def test_empty_response_names_the_row() -> None:
    with pytest.raises(UserInputError, match=r"row 2 has an empty response"):
        to_messages(
            [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": ""}], InstructionDataSettings()
        )
    convo = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]
    with pytest.raises(UserInputError, match=r"row 1: message 2 \(assistant\) is an empty response"):
        to_messages([{"messages": convo}], InstructionDataSettings())


@pytest.mark.parametrize(
    ("roles", "message"),
    [
        (["user", "assistant", "user"], "the last message is 'user'"),
        (["assistant", "user", "assistant"], "message 1 is 'assistant'"),
        (["user", "user", "assistant"], "message 2 is 'user'"),
        (["user", "system", "assistant"], "message 2 is 'system'"),
        (["system"], "no conversation"),
    ],
)
def test_bad_role_sequences_name_the_row(roles: list[str], message: str) -> None:
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    bad = {"messages": [{"role": r, "content": "x"} for r in roles]}
    with pytest.raises(UserInputError, match=rf"row 2: {message}.*ending with assistant"):
        to_messages([good, bad], InstructionDataSettings())


def test_settings_are_strict() -> None:
    with pytest.raises(ValidationError, match="extra"):
        InstructionSettings(templat="plain")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match=r"ending in \.jinja"):
        InstructionSettings(template="mistral")
    with pytest.raises(ValidationError, match="unknown column"):
        InstructionDataSettings(columns={"answer": "output"})


# ---------------------------------------------------------------- templates


def test_tokenizer_template_falls_back_to_plain(
    tiny_tok: PreTrainedTokenizerBase, spm_tok: PreTrainedTokenizerFast
) -> None:
    assert _template(tiny_tok).name == "plain"  # the tiny tokenizer has no chat template
    assert _template(spm_tok).name == "tokenizer"
    assert _template(spm_tok).end_of_turn == "</s>"
    before = len(tiny_tok)
    assert _template(tiny_tok, "plain").added_tokens == () and len(tiny_tok) == before  # plain adds no tokens


def test_jinja_file_template(tiny_tok: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    path = tmp_path / "mine.jinja"
    path.write_text(LLAMA2_LIKE)
    template = _template(tiny_tok, str(path))
    assert template.name == "file:mine.jinja" and template.end_of_turn == "</s>"
    with pytest.raises(UserInputError, match=r"instruction\.template: cannot read"):
        _template(tiny_tok, str(tmp_path / "missing.jinja"))
    assert template.added_tokens == ()  # its markers are text the tokenizer already splits: none added
    path.write_text(
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' }}{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    fresh = AutoTokenizer.from_pretrained(tiny_tok.name_or_path)  # this one gains tokens
    template = _template(fresh, str(path))
    assert template.added_tokens == ("<|end|>", "<|assistant|>") and template.end_of_turn == "<|end|>"
    assert len(fresh) == len(tiny_tok) + 2 and fresh.tokenize("<|end|>") == ["<|end|>"]  # one token each
    path.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")  # nothing ends a response
    with pytest.raises(UserInputError, match=r"instruction\.template: .* writes nothing after a response"):
        _template(tiny_tok, str(path))


def test_template_that_rejects_system_names_the_key(spm_tok: PreTrainedTokenizerFast) -> None:
    spm_tok = _spm_tokenizer()
    spm_tok.chat_template = NO_SYSTEM
    template = _template(spm_tok)
    assert encode_conversation(CONVERSATION[1:], spm_tok, template, "assistant", 256) is not None
    with pytest.raises(UserInputError, match=r"instruction.template: .*roles \['system'.*System role not supported"):
        encode_conversation(CONVERSATION, spm_tok, template, "assistant", 256)


def test_chatml_adds_tokens_and_trainable_rows(tiny_model: str) -> None:
    for tie in (True, False):
        tok = AutoTokenizer.from_pretrained(tiny_model)
        model = _tiny_llama(len(tok), tie=tie)
        template = _template(tok, "chatml")
        rows = resize_for_tokens(model, tok, template.added_tokens)
        assert rows.token_ids == tuple(tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]))
        assert model.get_input_embeddings().weight.shape[0] == len(tok)
        assert rows.modules == (("model.embed_tokens",) if tie else ("model.embed_tokens", "lm_head"))
        assert tok.tokenize("<|im_end|>") == ["<|im_end|>"]  # one special token, not pieces
    weights = model.get_input_embeddings().weight
    assert resize_for_tokens(model, tok, template.added_tokens) == rows  # the same rows, grown once: never twice
    assert model.get_input_embeddings().weight is weights
    assert resize_for_tokens(model, tok, ()).token_ids == ()


# ---------------------------------------------------------------- encoding pitfalls


def test_template_without_generation_markers_never_all_masked(
    tiny_tok: PreTrainedTokenizerBase, spm_tok: PreTrainedTokenizerFast
) -> None:
    # LLAMA2_LIKE has no {% generation %} block: transformers' assistant mask is all zero (a warning, not an error).
    naive = spm_tok.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    assert not any(naive["assistant_masks"])
    for tok, name in ((spm_tok, "tokenizer"), (tiny_tok, "plain"), (tiny_tok, "chatml")):
        template = _template(tok, name)
        for messages in (CONVERSATION, CONVERSATION[1:3], CONVERSATION[1:]):
            row = encode_conversation(messages, tok, template, "assistant", 256)
            assert row is not None and any(label != IGNORE for label in row.labels), (name, messages)


def test_end_of_turn_labelled_with_pad_equal_eos(
    spm_tok: PreTrainedTokenizerFast, tiny_tok: PreTrainedTokenizerBase
) -> None:
    assert spm_tok.pad_token_id == spm_tok.eos_token_id
    row = encode_conversation(CONVERSATION, spm_tok, _template(spm_tok), "assistant", 256)
    assert row is not None
    assert [t.strip() for t in _targets(spm_tok, row.labels)] == ["Blue is one.</s>", "Green.</s>"]
    assert row.labels[-1] == spm_tok.eos_token_id
    chatml = _template(tiny_tok, "chatml")
    row = encode_conversation(CONVERSATION, tiny_tok, chatml, "assistant", 256)
    assert row is not None and _targets(tiny_tok, row.labels) == ["Blue is one.<|im_end|>", "Green.<|im_end|>"]


def test_exactly_one_bos(spm_tok: PreTrainedTokenizerFast, tiny_tok: PreTrainedTokenizerBase) -> None:
    bos = spm_tok.bos_token_id
    # The template writes BOS and the tokenizer adds one: naive tokenization doubles it.
    text = spm_tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert spm_tok(text)["input_ids"][:2] == [bos, bos]
    for name in ("tokenizer", "plain"):  # plain writes no BOS: the tokenizer's convention adds one
        row = encode_conversation(CONVERSATION, spm_tok, _template(spm_tok, name), "assistant", 256)
        assert row is not None and row.input_ids[0] == bos and row.input_ids.count(bos) == 1
        assert encode_prompt(CONVERSATION[:2], spm_tok, _template(spm_tok, name)).count(bos) == 1
    row = encode_conversation(CONVERSATION, tiny_tok, _template(tiny_tok, "plain"), "assistant", 256)
    assert row is not None and tiny_tok.bos_token_id not in row.input_ids  # a tokenizer that adds none gets none


def test_prompt_prefix_equals_full_sequence_prefix(spm_tok: PreTrainedTokenizerFast) -> None:
    template = _template(spm_tok)
    prompt_text = prompt_for_generation(CONVERSATION[:2], spm_tok, template)
    # The leading-space pitfall is real here: tokenizing the response alone prepends "▁" unlike in context.
    naive = spm_tok(prompt_text)["input_ids"] + spm_tok("Blue is one.", add_special_tokens=False)["input_ids"]
    whole = spm_tok(spm_tok.apply_chat_template(CONVERSATION[:3], tokenize=False), add_special_tokens=False)[
        "input_ids"
    ]
    assert naive[: len(whole) - 1] != whole[:-1]
    for k in (2, 4):  # each assistant turn: the generation prompt is the row's prefix, targets start right after it
        row = encode_conversation(CONVERSATION[: k + 1], spm_tok, template, "last", 256)
        prompt = encode_prompt(CONVERSATION[:k], spm_tok, template)
        assert row is not None and row.input_ids[: len(prompt)] == prompt
        assert row.labels[: len(prompt)] == [IGNORE] * len(prompt) and row.labels[len(prompt)] != IGNORE
        assert row.input_ids == whole if k == 2 else True


def test_multi_turn_assistant_trains_every_turn_last_only_the_last(tiny_tok: PreTrainedTokenizerBase) -> None:
    template = _template(tiny_tok, "plain")
    every = encode_conversation(CONVERSATION, tiny_tok, template, "assistant", 256)
    last = encode_conversation(CONVERSATION, tiny_tok, template, "last", 256)
    everything = encode_conversation(CONVERSATION, tiny_tok, template, "all", 256)
    assert every is not None and last is not None and everything is not None
    assert _targets(tiny_tok, every.labels) == ["Blue is one.</s>", "Green.</s>"]
    assert _targets(tiny_tok, last.labels) == ["Green.</s>"]
    assert everything.labels[1:] == everything.input_ids[1:] and everything.labels[0] == IGNORE
    assert every.input_ids == last.input_ids == everything.input_ids


def test_system_message_present_or_absent(tiny_tok: PreTrainedTokenizerBase, spm_tok: PreTrainedTokenizerFast) -> None:
    for tok, name in ((tiny_tok, "plain"), (tiny_tok, "chatml"), (spm_tok, "tokenizer")):
        template = _template(tok, name)
        with_system = encode_conversation(CONVERSATION[:3], tok, template, "assistant", 256)
        without = encode_conversation(CONVERSATION[1:3], tok, template, "assistant", 256)
        assert with_system is not None and without is not None
        assert "You answer briefly." in tok.decode(with_system.input_ids)
        assert "You answer briefly." not in tok.decode(without.input_ids)
        # the system text is context, never a target; the response is trained the same either way
        assert _targets(tok, with_system.labels) == _targets(tok, without.labels)
        assert all("briefly" not in t for t in _targets(tok, with_system.labels))


def test_truncation_drops_or_raises_never_nan(tiny_model: str, tiny_tok: PreTrainedTokenizerBase) -> None:
    template = _template(tiny_tok, "plain")
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    long_prompt = [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "Fine."}]
    long_answer = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "word " * 80}]
    rows, dropped = _encode([short, long_prompt, long_answer], tiny_tok, template, 40)
    assert dropped == 1 and len(rows) == 2
    kept = rows[1]  # the long prompt lost its oldest tokens; its response is whole with its EOS
    assert len(kept["input_ids"]) == 40 and _targets(tiny_tok, kept["labels"]) == ["Fine.</s>"]
    for row in rows:
        assert sum(label != IGNORE for label in row["labels"]) > 0
    model = LlamaForCausalLM.from_pretrained(tiny_model)
    loss = model(**_pad(rows, tiny_tok.pad_token_id)).loss
    assert torch.isfinite(loss) and loss.item() > 0
    assert _encode([short, long_prompt, long_answer], tiny_tok, template, 5) == ([], 3)


# ---------------------------------------------------------------- packing and loss


def test_packing_refused_for_virtual_token_methods() -> None:
    def config(name: str) -> dict[str, Any]:
        return {
            "task": "instruction",
            "data": {"train": "x.jsonl"},
            "method": {"name": name},
            "train": {"packing": True},
        }

    for name in ("prefix", "prompt"):
        with pytest.raises(UserInputError, match=rf"train.packing: not supported with method {name}"):
            validate_config(config(name))
    for name in ("full", "lora", "qlora", "ia3"):
        validate_config(config(name))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packing_masks_row_boundaries_and_matches_unpacked_logits(tiny_tok: PreTrainedTokenizerBase, attn: str) -> None:
    template = _template(tiny_tok, "plain")
    rows, _ = _encode([CONVERSATION, CONVERSATION[1:3], CONVERSATION[3:]], tiny_tok, template)
    model = _tiny_llama(len(tiny_tok), attn=attn)
    packed = make_collator(tiny_tok, "instruction", packing=True)(rows)
    assert packed["position_ids"][0].tolist() == [i for r in rows for i in range(len(r["input_ids"]))]
    starts = [0, len(rows[0]["input_ids"]), len(rows[0]["input_ids"]) + len(rows[1]["input_ids"])]
    assert all(packed["labels"][0, s].item() == IGNORE for s in starts)
    assert packed["use_cache"] is False and "attention_mask" not in packed
    with torch.no_grad():
        packed_logits = model(**packed).logits[0]
        alone = [model(input_ids=torch.tensor([r["input_ids"]])).logits[0] for r in rows]
        torch.testing.assert_close(packed_logits, torch.cat(alone), atol=1e-5, rtol=1e-4)
        # changing the first row leaves the later rows' logits untouched: no attention across rows
        changed = {**packed, "input_ids": packed["input_ids"].clone()}
        changed["input_ids"][0, 1 : starts[1]] = 5
        torch.testing.assert_close(model(**changed).logits[0, starts[1] :], packed_logits[starts[1] :])
        # why the collator sends use_cache=False: with a cache (the config default) rows attend across boundaries
        assert model.config.use_cache
        leaky = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        assert not torch.allclose(leaky[starts[1] :], packed_logits[starts[1] :], atol=1e-3)
    assert packed["labels"].ne(IGNORE).sum().item() == sum(_response_tokens(torch.tensor(r["labels"])) for r in rows)


def test_gradient_accumulation_normalises_by_response_tokens(tiny_tok: PreTrainedTokenizerBase) -> None:
    template = _template(tiny_tok, "plain")
    long_answer = [{"role": "user", "content": "Tell"}, {"role": "assistant", "content": "a long story " * 6}]
    conversations = [CONVERSATION[1:3], long_answer, CONVERSATION[3:], CONVERSATION]
    batch = _pad(_encode(conversations, tiny_tok, template)[0], tiny_tok.pad_token_id)
    model = _tiny_llama(len(tiny_tok))
    with torch.no_grad():
        full = model(**batch).loss
        micro = [{k: v[i : i + 2] for k, v in batch.items()} for i in (0, 2)]
        total = sum(_response_tokens(b["labels"]) for b in micro)
        assert total == _response_tokens(batch["labels"])
        # Each micro-batch's summed token loss over the step's count (what the Trainer passes causal LMs as
        # `num_items_in_batch`) adds up to the whole batch's mean.
        accumulated = sum(model(**b, num_items_in_batch=torch.tensor(total)).loss for b in micro)
        torch.testing.assert_close(accumulated, full)
        mean_of_means = sum(model(**b).loss for b in micro) / 2  # what a per-micro-batch mean would train on
        assert abs(mean_of_means.item() - full.item()) > 1e-3


# ---------------------------------------------------------------- generation


def _train_until_it_stops(tok: PreTrainedTokenizerBase, template: ChatTemplate, messages: Any) -> LlamaForCausalLM:
    """A tiny model fitted to one conversation, so it writes the response and then the end of turn."""
    model = _tiny_llama(len(tok))
    batch = _pad(_encode([messages], tok, template)[0], tok.pad_token_id)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(80):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    return model.eval()


def test_generation_stops_at_end_of_turn_and_returns_only_the_response(tiny_tok: PreTrainedTokenizerBase) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_tok.name_or_path)
    template = _template(tok, "chatml")
    messages = CONVERSATION[1:3]
    model = _train_until_it_stops(tok, template, messages)
    prompt = torch.tensor([encode_prompt(messages, tok, template)])
    stops = stop_token_ids(tok, template)
    assert stops == [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    with torch.no_grad():
        out = model.generate(
            prompt, max_new_tokens=40, do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id
        )
    new = out[0, prompt.shape[1] :].tolist()
    assert new[-1] == stops[0] and len(new) < 40  # stopped at the end of turn, not at max_new_tokens
    text = tok.decode(new, skip_special_tokens=False)
    assert text.endswith("<|im_end|>")
    assert response_only(text, tok, template) == "Blue is one."
    # a continuation that runs on into another turn is cut at the end of turn
    assert response_only("Blue.<|im_end|>\n<|im_start|>user\nmore", tok, template) == "Blue."
    plain = _template(tok, "plain")
    assert response_only("Blue.</s>### Instruction:\nmore", tok, plain) == "Blue."
