"""Task instruction's chat data: rows in any common format -> messages -> ids with labels on responses only.

Formats -> one normal form (a list of `{"role", "content"}` messages per row)
    `detect_format(columns, rows, settings)`, `to_messages(rows, settings)`: alpaca, prompt_completion, messages
    (OpenAI), sharegpt. Errors name the column and format, or the 1-based row and what is expected.

Templates
    `resolve_template(tokenizer, settings) -> ChatTemplate`: the tokenizer's own chat template, the builtin `plain`
    one (plain-text headers, the tokenizer's EOS after each response, no new tokens), `chatml` (adds
    `<|im_start|>`/`<|im_end|>`, whose embedding rows the stages grow and train: `modeling.resize_for_tokens`) or
    a user `.jinja` file. `ChatTemplate.source` is the Jinja text to save with the model.

Encoding (labels on responses only)
    `encode_conversation(messages, tokenizer, template, loss_on, max_length) -> EncodedRow | None`, the one encode
    path (the objective's encoder calls it per row and counts the dropped rows as `sft_dropped_rows`). The whole
    conversation is rendered and tokenized once; response spans come from incremental rendering (the prompt
    rendered with its generation prompt must be a prefix of the whole text) mapped to tokens by character offsets,
    so leading-space tokenizers cannot shift them. The end-of-turn token of each response is labelled (it is
    located in the text, not by id, so pad == eos does not matter); exactly one BOS; label 0 is always -100, so
    "labels != -100" counts exactly the predicted tokens. Over-long rows lose the oldest prompt tokens first; a row
    whose last response does not fit whole is dropped; no row is emitted without a target token.

Generation
    `prompt_for_generation`, `encode_prompt`, `fitting_prompt`, `stop_token_ids`, `response_only`,
    `split_reference`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jinja2
from transformers import PreTrainedTokenizerBase

from adapters_impl.packaged import response_only as packaged_response_only
from adapters_impl.packaged import stop_ids, tokenize_with_one_bos
from tasks.errors import UserInputError, capped
from tasks.labels import IGNORE_INDEX as IGNORE
from tasks.objectives.instruction.settings import REQUIRED, InstructionSettings, LossOn
from tasks.settings import RowLayout

log = logging.getLogger("adaptflow.instruction")

Message = dict[str, str]
Format = Literal["alpaca", "prompt_completion", "messages", "sharegpt"]

PLAIN_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{ m['content'] + '\\n\\n' }}"
    "{%- elif m['role'] == 'user' -%}{{ '### Instruction:\\n' + m['content'] + '\\n\\n' }}"
    "{%- else -%}{{ '### Response:\\n' + m['content'] + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Response:\\n' }}{%- endif -%}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
# Contents used to find what a template writes after a response (its end of turn).
# Neither content contains the other: a template that drops the response must not find it in the question.
_PROBE = [{"role": "user", "content": "adaptflow-probe-question"}, {"role": "assistant", "content": "adaptflow-answer"}]


# ---------------------------------------------------------------- formats


def _present(row: Mapping[str, Any], column: str) -> bool:
    value = row.get(column)
    return value is not None and value != "" and value != []


def row_formats(row: Mapping[str, Any], settings: RowLayout) -> list[str]:
    """The formats whose required columns this row fills."""
    return [fmt for fmt, cols in REQUIRED.items() if all(_present(row, settings.column(c)) for c in cols)]


def _fields(fmt: str, settings: RowLayout) -> str:
    return f"{fmt} ({', '.join(settings.column(c) for c in REQUIRED[fmt])})"


def detect_format(columns: Sequence[str], rows: Sequence[Mapping[str, Any]], settings: RowLayout, source: str) -> str:
    """The file's one format: `data.format` when set, else the format of its first row; every row must match it.

    Raises:
        UserInputError: a required column is missing (names the column and format), no format fits, several fit
            the first row, or a row is in another format (names the row, 1-based).
    """
    if settings.format != "auto":
        fmt: str = settings.format
        for canonical in REQUIRED[fmt]:
            if settings.column(canonical) not in columns:
                raise UserInputError(
                    f"{source}: no column '{settings.column(canonical)}', which format {fmt} needs "
                    f"(data.format); columns: {capped(list(columns))}; rename with data.columns"
                )
    else:
        expected = "; ".join(_fields(f, settings) for f in REQUIRED)
        if not rows:
            raise UserInputError(f"{source}: no rows")
        first = row_formats(rows[0], settings)
        if not first:
            raise UserInputError(
                f"{source}: row 1 is in no instruction format; expected one of: {expected} "
                f"(columns: {capped(list(columns))}; rename with data.columns or set data.format)"
            )
        if len(first) > 1:
            raise UserInputError(f"{source}: row 1 fits formats {first}; choose one with data.format")
        fmt = first[0]
    for number, row in enumerate(rows, start=1):
        if all(_present(row, settings.column(c)) for c in REQUIRED[fmt]):
            continue
        others = [f for f in row_formats(row, settings) if f != fmt]
        if others:
            raise UserInputError(
                f"{source}: row {number} is in format {others[0]} but the file is {fmt} (mixed formats in one "
                f"file); expected every row in {_fields(fmt, settings)}"
            )
        missing = [settings.column(c) for c in REQUIRED[fmt] if not _present(row, settings.column(c))]
        what = "an empty response" if settings.column(_response_column(fmt)) in missing else f"no {missing}"
        raise UserInputError(f"{source}: row {number} has {what}; expected {_fields(fmt, settings)} filled")
    return fmt


def _response_column(fmt: str) -> str:
    return {"alpaca": "output", "prompt_completion": "completion"}.get(fmt, REQUIRED[fmt][0])


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    return value


def _turns(value: Any, role_key: str, content_key: str, roles: Mapping[str, str] | None) -> list[Message]:
    if isinstance(value, str):  # a JSON string in a csv cell
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError("expected a list of turns, got a string that is not JSON") from None
    if not isinstance(value, list):
        raise ValueError(f"expected a list of turns, got {type(value).__name__}")
    out = []
    for turn in value:
        if not isinstance(turn, Mapping) or role_key not in turn or content_key not in turn:
            raise ValueError(f"every turn needs '{role_key}' and '{content_key}', got {str(turn)[:80]}")
        role = turn[role_key]
        if not isinstance(role, str):  # a list or number would also fail as a dict key, with a TypeError
            raise ValueError(f"'{role_key}' must be a string, got {type(role).__name__} {str(role)[:40]}")
        if roles is not None:
            if role not in roles:
                raise ValueError(f"unknown '{role_key}' value {role!r}; map it to a role with data.role_map")
            role = roles[role]
        out.append({"role": role, "content": _text(turn[content_key], f"the {role} content")})
    return out


def row_to_messages(row: Mapping[str, Any], fmt: str, settings: RowLayout) -> list[Message]:
    """One row as messages (not yet validated; see `validate_messages`). Raises ValueError with the reason."""
    col = settings.column
    if fmt == "messages":
        return _turns(row[col("messages")], "role", "content", None)
    if fmt == "sharegpt":
        return _turns(row[col("conversations")], "from", "value", settings.roles())
    if fmt == "prompt_completion":
        prompt, completion = row[col("prompt")], row[col("completion")]
        head = (
            _turns(prompt, "role", "content", None)
            if isinstance(prompt, list)
            else [{"role": "user", "content": _text(prompt, col("prompt"))}]
        )
        tail = (
            _turns(completion, "role", "content", None)
            if isinstance(completion, list)
            else [{"role": "assistant", "content": _text(completion, col("completion"))}]
        )
        return head + tail
    instruction = _text(row[col("instruction")], col("instruction"))
    extra = row.get(col("input"))
    user = f"{instruction}\n\n{_text(extra, col('input'))}" if extra else instruction
    system = row.get(col("system"))
    head = [{"role": "system", "content": _text(system, col("system"))}] if system else []
    return [
        *head,
        {"role": "user", "content": user},
        {"role": "assistant", "content": _text(row[col("output")], col("output"))},
    ]


def validate_messages(messages: Sequence[Mapping[str, str]]) -> None:
    """An optional system message, then user/assistant alternating from user, ending with a non-empty assistant.

    Raises:
        ValueError: what is wrong and what is expected.
    """
    expected = "expected an optional system message, then user and assistant alternating, ending with assistant"
    skip = 1 if messages and messages[0]["role"] == "system" else 0
    body = list(messages[skip:])
    if not body:
        raise ValueError(f"no conversation; {expected}")
    for i, message in enumerate(body):
        want, number = ("user" if i % 2 == 0 else "assistant"), skip + i + 1
        if message["role"] != want:
            raise ValueError(f"message {number} is {message['role']!r}; {expected}")
        if not message["content"].strip():
            what = "an empty response" if want == "assistant" else "empty"
            raise ValueError(f"message {number} ({want}) is {what}; expected text")
    if body[-1]["role"] != "assistant":
        raise ValueError(f"the last message is {body[-1]['role']!r}; {expected}")


def to_messages(
    rows: Sequence[Mapping[str, Any]], settings: RowLayout, source: str = "data.train"
) -> tuple[str, list[list[Message]]]:
    """Every row as messages, and the format found. Every bad row is reported at once (1-based row numbers).

    Raises:
        UserInputError: see `detect_format`; bad turns, roles or an empty response name their rows.
    """
    columns = sorted({key for row in rows[:1000] for key in row})
    fmt = detect_format(columns, rows, settings, source)
    problems, out = [], []
    for number, row in enumerate(rows, start=1):
        try:
            messages = row_to_messages(row, fmt, settings)
            validate_messages(messages)
            out.append(messages)
        except ValueError as exc:
            problems.append(f"row {number}: {exc}")
    if problems:
        shown = problems[:10] + ([f"… {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise UserInputError.many(f"{source}: {len(problems)} row(s) are not valid {fmt} rows:", shown)
    return fmt, out


# ---------------------------------------------------------------- templates


@dataclass(frozen=True)
class ChatTemplate:
    """A resolved template: `name` (the run's `sft.template` param), its Jinja `source` (saved with the model),
    and `end_of_turn`, the text it writes after each response (the piece that must be trained and stops generation).
    """

    name: str
    source: str
    end_of_turn: str
    added_tokens: tuple[str, ...] = ()

    def render(
        self, tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool
    ) -> str:
        """The conversation as text. Raises UserInputError naming instruction.template when it cannot render."""
        try:
            text = tokenizer.apply_chat_template(
                [dict(m) for m in messages],
                chat_template=self.source,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except (jinja2.TemplateError, ArithmeticError, LookupError, TypeError, ValueError, RecursionError) as exc:
            # a template is the user's code: any error of its own is bad input, named
            roles = [m["role"] for m in messages]
            raise UserInputError(
                f"instruction.template: template {self.name} cannot render a conversation with roles {roles}: "
                f"{exc}; choose another template (plain, chatml) or change the data"
            ) from None
        if not isinstance(text, str):
            raise UserInputError(f"instruction.template: template {self.name} did not render text")
        return text


def _end_of_turn(tokenizer: PreTrainedTokenizerBase, name: str, source: str) -> str:
    """What the template writes after a response; checks that it writes the response at all, and warns when it
    ignores `add_generation_prompt`."""
    template = ChatTemplate(name=name, source=source, end_of_turn="")
    text = template.render(tokenizer, _PROBE, add_generation_prompt=False)
    answer = _PROBE[1]["content"]
    if answer not in text:
        raise UserInputError(
            f"instruction.template: template {name} does not write the assistant's message (a conversation "
            "rendered with it lacks the response's text), so there is nothing to train on; write "
            "{{ message['content'] }} for every role, or choose plain or chatml"
        )
    question = _PROBE[:1]
    if template.render(tokenizer, question, True) == template.render(tokenizer, question, False):
        log.warning(
            "instruction.template: template %s ignores add_generation_prompt: a prompt ends with the user's turn, "
            "so the model must write the assistant's header itself before answering in evaluation and serving",
            name,
        )
    after = text[text.rindex(answer) + len(answer) :].split()
    if not after:
        raise UserInputError(
            f"instruction.template: template {name} writes nothing after a response, so the model could not "
            "learn to stop; end assistant turns with {{ eos_token }} or choose plain or chatml"
        )
    return after[0]


# Role markers as chat templates write them: <|im_start|>, <|eot_id|>, <|user|>, <|end|>...
MARKER_TOKEN = re.compile(r"<\|[A-Za-z0-9_.:-]{1,48}\|>")


def marker_tokens_missing(tokenizer: PreTrainedTokenizerBase, source: str) -> tuple[str, ...]:
    """The `<|...|>` markers a template's text uses that the tokenizer has no token for, in order of use."""
    vocabulary = tokenizer.get_vocab()
    return tuple(t for t in dict.fromkeys(MARKER_TOKEN.findall(source)) if t not in vocabulary)


def resolve_template(tokenizer: PreTrainedTokenizerBase, settings: InstructionSettings) -> ChatTemplate:
    """The template `settings.template` names, checked against this tokenizer.

    `chatml`, and a `.jinja` file whose `<|...|>` markers the tokenizer lacks, add those tokens to the tokenizer
    as special tokens (see `resize_for_tokens`): one token each, trained as new rows, as TRL and Axolotl do.

    Raises:
        UserInputError: naming instruction.template (missing file, template that cannot render, no end of turn)
            or model.name_or_path (plain needs an EOS token; offsets need a fast tokenizer).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise UserInputError(
            "model.name_or_path: task instruction needs a fast tokenizer (character offsets locate the responses)"
        )
    choice = settings.template
    added: tuple[str, ...]
    if choice == "tokenizer" and isinstance(tokenizer.chat_template, str):
        name, source, added = "tokenizer", tokenizer.chat_template, ()
    elif choice in ("tokenizer", "plain"):
        if choice == "tokenizer":
            log.warning(
                "instruction.template: the tokenizer has no chat template; using plain (### Instruction / "
                "### Response, EOS after each response). Set instruction.template to chatml or a .jinja file for "
                "another"
            )
        if tokenizer.eos_token is None:
            raise UserInputError(
                "model.name_or_path: the tokenizer has no EOS token, which the plain template writes after each "
                "response; set instruction.template: chatml"
            )
        name, source, added = "plain", PLAIN_TEMPLATE, ()
    elif choice == "chatml":
        tokenizer.add_tokens(list(CHATML_TOKENS), special_tokens=True)
        name, source, added = "chatml", CHATML_TEMPLATE, CHATML_TOKENS
    else:
        path = Path(choice).expanduser()
        try:
            source = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserInputError(f"instruction.template: cannot read {path}: {exc}") from None
        if not source.strip():
            raise UserInputError(f"instruction.template: {path} is empty; it must be a Jinja chat template")
        name, added = f"file:{path.name}", marker_tokens_missing(tokenizer, source)
        tokenizer.add_tokens(list(added), special_tokens=True)
    return ChatTemplate(name=name, source=source, end_of_turn=_end_of_turn(tokenizer, name, source), added_tokens=added)


# ---------------------------------------------------------------- encoding


@dataclass(frozen=True)
class EncodedRow:
    input_ids: list[int]
    labels: list[int]

    def as_dict(self) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids, "attention_mask": [1] * len(self.input_ids), "labels": self.labels}


def response_spans(
    tokenizer: PreTrainedTokenizerBase, template: ChatTemplate, messages: Sequence[Mapping[str, str]]
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant response, end of turn included.

    A span starts where the prompt rendered with its generation prompt ends, and ends after the end-of-turn text
    (trailing whitespace after it is not a target). Each prompt must be a prefix of the whole text; a template that
    rewrites earlier turns fails this and is refused rather than guessed at.
    """
    full = template.render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = template.render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = template.render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(prompt) and full.startswith(upto) and len(upto) > len(prompt)):
            raise UserInputError(
                f"instruction.template: template {template.name} renders a conversation's earlier turns differently "
                "once later turns follow, so its responses cannot be located safely; choose plain or chatml"
            )
        start, end = len(prompt), len(upto)
        eot = full.rfind(template.end_of_turn, start, end)
        end = eot + len(template.end_of_turn) if eot >= 0 else start + len(full[start:end].rstrip())
        spans.append((start, end))
    return full, spans


def encode_conversation(
    messages: Sequence[Mapping[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate,
    loss_on: LossOn,
    max_length: int,
) -> EncodedRow | None:
    """One validated conversation as ids and labels; None when its last response does not fit in `max_length`.

    Labels: the tokens overlapping a trained response span (every assistant turn, the last, or all tokens), else
    -100; label 0 is always -100 (it is never predicted). Too long: the oldest tokens after BOS go first; the row is
    dropped when that would reach the last response or leave nothing before it.

    Raises:
        UserInputError: naming instruction.template when no response token can be located.
    """
    text, spans = response_spans(tokenizer, template, messages)
    ids, offsets = tokenize_with_one_bos(tokenizer, text)
    trained = spans if loss_on == "assistant" else spans[-1:]
    # A token is a target when its characters overlap a span (a leading space merged into it belongs to the response).
    target = [loss_on == "all" or (e > b and any(e > s0 and b < s1 for s0, s1 in trained)) for b, e in offsets]
    last_start, last_end = spans[-1]
    in_last = [i for i, (b, e) in enumerate(offsets) if e > last_start and b < last_end and e > b]
    if not in_last or not any(target[1:]):
        raise UserInputError(
            f"instruction.template: template {template.name} left no response token to train in a conversation; "
            "choose plain or chatml"
        )
    if len(ids) > max_length:
        keep = 1 if ids[0] == tokenizer.bos_token_id else 0
        cut = len(ids) - max_length
        if keep + cut >= in_last[0]:
            return None
        ids, target = ids[:keep] + ids[keep + cut :], target[:keep] + target[keep + cut :]
    labels = [tok if is_target else IGNORE for tok, is_target in zip(ids, target, strict=True)]
    labels[0] = IGNORE
    return EncodedRow(ids, labels)


# ---------------------------------------------------------------- generation


def split_reference(messages: Sequence[Mapping[str, str]]) -> tuple[list[Message], str]:
    """A conversation as (the prompt messages, the last assistant response) for eval generations."""
    *prompt, last = messages
    return [dict(m) for m in prompt], last["content"]


def prompt_for_generation(
    messages: Sequence[Mapping[str, str]], tokenizer: PreTrainedTokenizerBase, template: ChatTemplate
) -> str:
    """The text up to where the assistant's response starts (a trailing assistant message is left out)."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return template.render(tokenizer, messages, add_generation_prompt=True)


def encode_prompt(
    messages: Sequence[Mapping[str, str]], tokenizer: PreTrainedTokenizerBase, template: ChatTemplate
) -> list[int]:
    """The generation prompt's ids, with the same single BOS as training rows."""
    return tokenize_with_one_bos(tokenizer, prompt_for_generation(messages, tokenizer, template))[0]


def fitting_prompt(
    messages: Sequence[Mapping[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate,
    loss_on: LossOn,
    max_length: int,
) -> list[int] | None:
    """A held-out conversation's generation prompt as training would see it: None when training drops the
    conversation (its last response does not fit in `max_length`), else the prompt less the oldest tokens after
    BOS that training cuts. Evaluation then scores the rows the loss counts, at the length the model was tuned for.
    """
    if encode_conversation(messages, tokenizer, template, loss_on, max_length) is None:
        return None
    prompt = encode_prompt(messages, tokenizer, template)
    text, _ = response_spans(tokenizer, template, messages)
    cut = len(tokenize_with_one_bos(tokenizer, text)[0]) - max_length
    if cut > 0:
        keep = 1 if prompt[:1] == [tokenizer.bos_token_id] else 0
        prompt = prompt[:keep] + prompt[keep + cut :]
    return prompt


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, template: ChatTemplate) -> list[int]:
    """Ids that end a generated response: the template's end-of-turn token (when it is one token) and EOS."""
    return stop_ids(tokenizer, template.end_of_turn)


def response_only(text: str, tokenizer: PreTrainedTokenizerBase, template: ChatTemplate) -> str:
    """A generated continuation (decoded with special tokens kept) cut at the first end of turn or EOS."""
    return packaged_response_only(text, template.end_of_turn, tokenizer.eos_token)
