"""Preference rows in any common format -> one normal form (prompt, chosen and rejected messages; or prompt,
completion and a boolean label for unpaired rows).

Formats (detected from the file's columns, or `data.format`; `data.columns` renames, `data.role_map` maps sharegpt
`from` values as for instruction data):

- `explicit`: `prompt`, `chosen`, `rejected`, each a string or a message list;
- `implicit`: `chosen` and `rejected` only, whole dialogues sharing a prefix: message lists, HH-RLHF text
  ("\\n\\nHuman: … \\n\\nAssistant: …") or plain text (the prompt is the shared text, cut at a word boundary);
- `sharegpt`: `conversations` (the prompt turns, `from`/`value`) plus `chosen`/`rejected` (one turn or a list);
- `unpaired` (KTO): `messages` (the last assistant turn is the completion) or `prompt` + `completion`, and a
  boolean `label`.

Prompt extraction uses TRL's (`trl.data_utils.maybe_extract_prompt`, `is_conversational`) and the turn parsing and
checks of instruction data (tasks/instruction.py), so the same rows mean the same conversations in both objectives.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from trl.data_utils import extract_prompt, maybe_extract_prompt

from tasks.errors import UserInputError, capped
from tasks.objectives.instruction.chat import _turns, validate_messages
from tasks.objectives.preference.settings import CANONICAL
from tasks.settings import DEFAULT_ROLE_MAP

Message = dict[str, str]
Format = Literal["explicit", "implicit", "sharegpt", "unpaired"]
FORMATS: tuple[Format, ...] = get_args(Format)
PAIRED: tuple[Format, ...] = ("explicit", "implicit", "sharegpt")

# The canonical columns each format reads (data.columns renames them); checked in this order when detecting.
REQUIRED: dict[Format, tuple[str, ...]] = {
    "sharegpt": ("conversations", "chosen", "rejected"),
    "explicit": ("prompt", "chosen", "rejected"),
    "implicit": ("chosen", "rejected"),
    "unpaired": ("label",),  # plus `messages`, or `prompt` and `completion`
}
DESCRIBED = (
    "explicit (prompt, chosen, rejected), implicit (chosen, rejected: whole dialogues sharing their prompt), "
    "sharegpt (conversations, chosen, rejected), unpaired for KTO (messages, or prompt and completion, plus a "
    "boolean label)"
)
# HH-RLHF's turn markers.
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass(frozen=True)
class DataOptions:
    """The `data:` keys that shape preference rows: `format` (auto or one of FORMATS), `columns` (canonical ->
    file column) and `role_map` (sharegpt `from` value -> role, on top of human/gpt/system)."""

    format: str = "auto"
    columns: Mapping[str, str] = field(default_factory=dict)
    role_map: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, settings: Any) -> DataOptions:
        """From any object with those attributes (the run's `DataSettings`)."""
        return cls(
            format=getattr(settings, "format", "auto"),
            columns=dict(getattr(settings, "columns", {}) or {}),
            role_map=dict(getattr(settings, "role_map", {}) or {}),
        )

    def column(self, canonical: str) -> str:
        return self.columns.get(canonical, canonical)

    def roles(self) -> dict[str, str]:
        return {**DEFAULT_ROLE_MAP, **self.role_map}

    def problems(self) -> list[str]:
        """What is wrong with these keys for preference data, each naming its key."""
        out = []
        if self.format != "auto" and self.format not in FORMATS:
            out.append(
                f"data.format: {self.format!r} is not a preference format; expected auto or one of {list(FORMATS)}"
            )
        unknown = sorted(set(self.columns) - set(CANONICAL))
        if unknown:
            out.append(
                f"data.columns: unknown column(s) {unknown}; the preference formats' columns are {list(CANONICAL)}"
            )
        return out


@dataclass(frozen=True)
class Normalized:
    """A file's rows in the normal form, its format, and the pairs dropped because chosen equals rejected.

    Pair rows: {"prompt": [messages], "chosen": [messages], "rejected": [messages]}; unpaired rows:
    {"prompt": [messages], "completion": [messages], "label": bool}. Completions start with an assistant turn.
    """

    format: Format
    rows: list[dict[str, Any]]
    equal_dropped: int = 0

    @property
    def paired(self) -> bool:
        return self.format in PAIRED


def _present(row: Mapping[str, Any], column: str) -> bool:
    value = row.get(column)
    return value is not None and value != "" and value != []


def _unpaired_columns(columns: Sequence[str], options: DataOptions) -> tuple[str, ...] | None:
    """The unpaired format's text columns this file has: messages, or prompt and completion."""
    if options.column("messages") in columns:
        return ("messages",)
    if options.column("prompt") in columns and options.column("completion") in columns:
        return ("prompt", "completion")
    return None


def detect_format(columns: Sequence[str], options: DataOptions, source: str) -> Format:
    """The file's format: `data.format` when set (its columns checked), else the first whose columns it has.

    Raises:
        UserInputError: a required column is missing, naming it and the formats.
    """
    fmt = options.format
    if fmt != "auto":
        if fmt not in FORMATS:
            raise UserInputError(
                f"data.format: {fmt!r} is not a preference format; expected auto or one of {list(FORMATS)}"
            )
        needed = [options.column(c) for c in REQUIRED[fmt]]  # type: ignore[index]
        missing = [c for c in needed if c not in columns]
        if fmt == "unpaired" and _unpaired_columns(columns, options) is None:
            missing.append(
                f"{options.column('messages')} (or {options.column('prompt')} and {options.column('completion')})"
            )
        if missing:
            raise UserInputError(
                f"{source}: no column {', '.join(repr(m) for m in missing)}, which format {fmt} needs (data.format); "
                f"columns: {capped(list(columns))}; rename with data.columns"
            )
        return fmt  # type: ignore[return-value]
    for candidate in REQUIRED:
        if all(options.column(c) in columns for c in REQUIRED[candidate]) and (
            candidate != "unpaired" or _unpaired_columns(columns, options) is not None
        ):
            return candidate
    has_pair = [options.column(c) for c in ("chosen", "rejected") if options.column(c) in columns]
    if has_pair:
        lacking = next(options.column(c) for c in ("chosen", "rejected") if options.column(c) not in columns)
        what = f"a {lacking!r} column beside {has_pair[0]!r}"
    elif options.column("label") in columns:
        what = f"{options.column('messages')!r} (or {options.column('prompt')!r} and {options.column('completion')!r}) beside 'label'"
    else:
        what = f"{options.column('chosen')!r} and {options.column('rejected')!r} columns (pairs) or a {options.column('label')!r} column (unpaired, KTO)"
    raise UserInputError(
        f"{source}: no preference data: expected {what}; columns: {capped(list(columns))}. The formats: {DESCRIBED}; "
        "rename columns with data.columns or set data.format"
    )


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, Mapping) else value


def _messages(value: Any, what: str, default_role: str, roles: Mapping[str, str] | None = None) -> list[Message]:
    """A string (one `default_role` turn) or a list of turns (role/content, or from/value with `roles`)."""
    if isinstance(value, str):
        try:  # a message list as JSON text (a csv cell)
            parsed = json.loads(value) if value.lstrip().startswith(("[", "{")) else None
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, list | dict):
            return [{"role": default_role, "content": value}]
        value = parsed
    value = _as_list(value)
    if roles is not None:
        return _turns(value, "from", "value", roles)
    try:
        return _turns(value, "role", "content", None)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None


def hh_messages(text: str) -> list[Message] | None:
    """HH-RLHF text ("\\n\\nHuman: … \\n\\nAssistant: …") as messages; None when it is not in that form."""
    parts = HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    return [{"role": HH_ROLES[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2], strict=True)]


def _shared_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """TRL's `extract_prompt` (the longest shared prefix: characters of text, turns of a conversation), guarded
    against its edge cases: nothing shared, or one side a prefix of the other (no response left to compare)."""
    split = extract_prompt({"chosen": chosen, "rejected": rejected})
    prompt, size = split["prompt"], len(split["prompt"])
    if not size or chosen[:size] != prompt or rejected[:size] != prompt:
        raise ValueError("chosen and rejected share no prompt (they differ from the start); give a prompt column")
    if len(chosen) <= size or len(rejected) <= size or chosen[: len(rejected)] == rejected[: len(chosen)]:
        raise ValueError("one of chosen and rejected is the start of the other: no two responses to compare")
    return prompt, split["chosen"], split["rejected"]


def _split_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Plain-text pairs: the shared prefix, cut back to a word boundary so that no word is split between prompt and
    response."""
    shared = str(_shared_prompt(chosen, rejected)[0])
    cut = len(shared)
    if not shared[-1:].isspace() and not chosen[cut : cut + 1].isspace():
        cut = max(shared.rfind(" "), shared.rfind("\n"), 0)
    if not chosen[:cut].strip():
        raise ValueError("chosen and rejected share no prompt (not one whole word); give a prompt column")
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _implicit(chosen: Any, rejected: Any) -> tuple[list[Message], list[Message], list[Message]]:
    if isinstance(chosen, str) and isinstance(rejected, str):
        hh_chosen, hh_rejected = hh_messages(chosen), hh_messages(rejected)
        if hh_chosen is None or hh_rejected is None:
            prompt, c, r = _split_text(chosen, rejected)
            return ([{"role": "user", "content": prompt.strip()}], [{"role": "assistant", "content": c.strip()}],
                    [{"role": "assistant", "content": r.strip()}])  # fmt: skip
        turns_c, turns_r = hh_chosen, hh_rejected
    else:
        turns_c, turns_r = _messages(chosen, "chosen", "assistant"), _messages(rejected, "rejected", "assistant")
    shared, rest_c, rest_r = _shared_prompt(turns_c, turns_r)  # whole turns
    return list(shared), list(rest_c), list(rest_r)


def _pair(
    row: Mapping[str, Any], fmt: Format, options: DataOptions
) -> tuple[list[Message], list[Message], list[Message]]:
    col = options.column
    if fmt == "sharegpt":
        roles = options.roles()
        prompt = _messages(row[col("conversations")], "conversations", "user", roles)
        return (prompt, _messages(row[col("chosen")], "chosen", "assistant", roles),
                _messages(row[col("rejected")], "rejected", "assistant", roles))  # fmt: skip
    if fmt == "implicit":
        return _implicit(row[col("chosen")], row[col("rejected")])
    example = {"prompt": row[col("prompt")], "chosen": row[col("chosen")], "rejected": row[col("rejected")]}
    if isinstance(example["chosen"], list | Mapping):
        example["chosen"], example["rejected"] = _as_list(example["chosen"]), _as_list(example["rejected"])
        if isinstance(example["prompt"], list | Mapping):
            example["prompt"] = _as_list(example["prompt"])
    chosen = example["chosen"]
    whole = (
        isinstance(chosen, list)
        and chosen[:1]
        and isinstance(chosen[0], Mapping)
        and chosen[0].get("role") != "assistant"
    )
    if whole and maybe_extract_prompt(example) is not example:  # TRL: a text prompt beside whole dialogues is ignored
        return _implicit(example["chosen"], example["rejected"])
    return (_messages(example["prompt"], "prompt", "user"), _messages(example["chosen"], "chosen", "assistant"),
            _messages(example["rejected"], "rejected", "assistant"))  # fmt: skip


def _check_pair(prompt: list[Message], completion: list[Message], what: str) -> None:
    if not completion or completion[0]["role"] != "assistant":
        role = completion[0]["role"] if completion else "nothing"
        raise ValueError(f"the {what} response starts with {role!r}; the prompt must end with the user's turn")
    try:
        validate_messages([*prompt, *completion])
    except ValueError as exc:
        raise ValueError(f"prompt + {what}: {exc}") from None


def _label(value: Any, column: str) -> bool:
    if isinstance(value, bool):
        return value
    if type(value).__name__ == "bool_":  # numpy's, from parquet or pandas
        return bool(value)
    raise ValueError(f"'{column}' must be true or false (a boolean), got {type(value).__name__} {str(value)[:40]!r}")


def _unpaired(row: Mapping[str, Any], options: DataOptions, columns: tuple[str, ...]) -> dict[str, Any]:
    col = options.column
    label = _label(row.get(col("label")), col("label"))
    if columns == ("messages",):
        messages = _messages(row[col("messages")], "messages", "user")
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("the last message must be the assistant's answer that the label judges")
        cut = len(messages) - 1
        while cut > 0 and messages[cut - 1]["role"] == "assistant":
            cut -= 1
        prompt, completion = messages[:cut], messages[cut:]
    else:
        prompt = _messages(row[col("prompt")], "prompt", "user")
        completion = _messages(row[col("completion")], "completion", "assistant")
    _check_pair(prompt, completion, "completion")
    return {"prompt": prompt, "completion": completion, "label": label}


def normalize(rows: Sequence[Mapping[str, Any]], options: DataOptions, source: str = "data.train") -> Normalized:
    """Every row in the normal form; pairs whose chosen equals rejected are dropped and counted.

    Raises:
        UserInputError: no preference columns (naming them and the formats), or bad rows, each named by its
            1-based number (no shared prefix, non-boolean label, a prompt that does not end with the user's turn…).
    """
    if not rows:
        raise UserInputError(f"{source}: no rows")
    columns = sorted({key for row in rows[:1000] for key in row})
    fmt = detect_format(columns, options, source)
    unpaired_columns = _unpaired_columns(columns, options) if fmt == "unpaired" else None
    problems: list[str] = []
    out: list[dict[str, Any]] = []
    equal = 0
    for number, row in enumerate(rows, start=1):
        try:
            if unpaired_columns is not None:
                out.append(_unpaired(row, options, unpaired_columns))
                continue
            missing = [options.column(c) for c in REQUIRED[fmt] if not _present(row, options.column(c))]
            if missing:
                raise ValueError(f"empty {missing}")
            if row[options.column("chosen")] == row[options.column("rejected")]:
                equal += 1
                continue
            prompt, chosen, rejected = _pair(row, fmt, options)
            if chosen == rejected:
                equal += 1
                continue
            _check_pair(prompt, chosen, "chosen")
            _check_pair(prompt, rejected, "rejected")
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        except ValueError as exc:
            problems.append(f"row {number}: {exc}")
    if problems:
        shown = problems[:10] + ([f"… {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise UserInputError.many(f"{source}: {len(problems)} row(s) are not valid {fmt} preference rows:", shown)
    if not out:
        raise UserInputError(f"{source}: no usable pair: in all {equal} rows chosen equals rejected")
    return Normalized(fmt, out, equal)


PAIR_LOSSES = ("sigmoid", "ipo", "hinge", "simpo", "orpo")
UNPAIRED_LOSSES = ("kto",)


def loss_format_problem(loss: str, fmt: Format, source: str = "data.train", key: str = "preference.loss") -> str | None:
    """Why `preference.loss` (or the config `key` naming the loss) cannot train on rows of format `fmt` (None when
    it can)."""
    if (loss in UNPAIRED_LOSSES) == (fmt == "unpaired"):
        return None
    if loss in UNPAIRED_LOSSES:
        return (
            f"{key}: {loss} takes unpaired rows (messages, or prompt and completion, plus a boolean label); "
            f"{source} holds pairs (format {fmt}). The pair losses {', '.join(PAIR_LOSSES)} take pairs"
        )
    return (
        f"{key}: {loss} takes pairs (formats explicit, implicit, sharegpt: a chosen and a rejected "
        f"response); {source} holds unpaired labelled rows (format unpaired), which loss kto takes"
    )
