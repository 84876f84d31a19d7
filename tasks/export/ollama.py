"""`--format ollama`: a Modelfile beside the merged GGUF, its TEMPLATE translated from the training chat template;
`--format ollama-lora`: the LoRA-only form, `FROM ./base.gguf` + `ADAPTER ./adapter.gguf` (the files of `gguf-lora`).

Translation works on what the Jinja template renders, not on its source. Two shapes are recognised:

- role-wise: every message written as `prefix(role) + content + suffix(role)`, then a generation prompt when the
  model is to answer, and at most a default system message written when the conversation has none (SmolLM2's).
  That covers chatml, the plain `### Instruction` template, Zephyr- or Llama-3-style headers and the templates in
  tasks/objectives/instruction/chat.py. Its default system message becomes the Modelfile's SYSTEM (Ollama puts
  SYSTEM first when a request has no system message).
- system folded into the first user turn (Llama-2's `<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]`): user
  and assistant messages role-wise, and a leading system message written inside the first user message, between a
  fixed opening and closing.

Either becomes a Go template over `.Messages`. Anything else is refused with exit 2: write TEMPLATE by hand.

The emitted Go template is checked by rendering it with `render_go` (the subset this module writes: range, if /
else if, eq / ne, variables, string literals, `.Role` / `.Content`) against the Jinja template on sample
conversations.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.errors import UserInputError
from tasks.export.gguf_lora import ADAPTER_FILE, BASE_FILE, write_gguf_lora
from tasks.export.gguf_model import FILE_NAME, write_gguf
from tasks.export.source import SAMPLE_CONVERSATIONS, ExportSource

MODELFILE = "Modelfile"
ROLES = ("system", "user", "assistant")
# Contents that no template writes by itself, and that no template changes (letters only).
PROBE = {"system": "AdaptflowProbeSystem", "user": "AdaptflowProbeUser", "assistant": "AdaptflowProbeAnswer"}
END_TOKEN = re.compile(r"(end|eot|eos|</s>|im_end)", re.IGNORECASE)
COMPLETION_TEMPLATE = "{{ .Prompt }}"


class Untranslatable(UserInputError):
    """A chat template that is not role-wise: exit 2, the user writes TEMPLATE by hand."""


@dataclass(frozen=True)
class RoleWise:
    """A chat template as per-role prefixes and suffixes, a generation prompt and an optional default system; with
    `folded_system` (opening, closing), a leading system message is written inside the first user message instead
    (Llama-2), and `prefix`/`suffix` have no "system" entry."""

    prefix: dict[str, str]
    suffix: dict[str, str]
    generation: str
    default_system: str | None
    folded_system: tuple[str, str] | None = None

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """What this model of the template renders (used to check that the model explains the Jinja)."""
        if messages and messages[0]["role"] != "system" and self.default_system is not None:
            messages = [{"role": "system", "content": self.default_system}, *messages]
        if self.folded_system is not None and messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
            if not messages or messages[0]["role"] != "user":
                raise ValueError("a folded system message needs a user message after it")
            opening, closing = self.folded_system
            messages = [{"role": "user", "content": opening + system + closing + messages[0]["content"]}, *messages[1:]]
        text = "".join(self.prefix[m["role"]] + m["content"] + self.suffix[m["role"]] for m in messages)
        return text + (self.generation if add_generation_prompt else "")


def _between(text: str, start: str, end: str | None) -> str:
    """The text after `start`'s last occurrence up to `end` (or the end)."""
    tail = text[text.rindex(start) + len(start) :]
    return tail if end is None else tail[: tail.index(end)]


def analyse(render: Any, name: str) -> RoleWise:
    """Model a Jinja template (`render(messages, add_generation_prompt) -> str`) as role-wise, else as role-wise
    with the system message folded into the first user turn.

    Raises:
        Untranslatable: it is neither (naming the template and the way out).
    """
    refuse = Untranslatable(
        f"--format ollama: chat template {name!r} cannot be translated to an Ollama TEMPLATE (it does not write "
        "each message as a fixed prefix, the content and a fixed suffix per role, nor fold the system message into "
        "the first user turn as Llama-2's does); write TEMPLATE by hand in the Modelfile, or use --format gguf, "
        "which carries the Jinja template itself"
    )
    for shape in (_role_wise, _folded):
        model = shape(render)
        if model is not None and _explains(model, render):
            return model
    raise refuse


def _explains(model: RoleWise, render: Any) -> bool:
    """Whether the model renders every sample conversation as the template does (else the template does
    something position-dependent that the model misses)."""
    conversations = [*SAMPLE_CONVERSATIONS, _long_conversation(), _long_conversation(system=True)]
    for conversation in conversations:
        for generation in (True, False):
            try:
                expected = render(conversation, generation)
            except Exception:
                continue  # a conversation the template refuses is none of the model's business
            try:
                found = model.render(conversation, generation)
            except ValueError:
                return False
            if found != expected:
                return False
    return True


def _folded(render: Any) -> RoleWise | None:
    """The template as user/assistant prefixes and suffixes, a leading system message written inside the first
    user message between a fixed opening and closing (None: it is not that)."""
    p = PROBE
    try:
        user_only = render([{"role": "user", "content": p["user"]}], False)
        user_prompt = render([{"role": "user", "content": p["user"]}], True)
        answered = render([{"role": "user", "content": p["user"]}, {"role": "assistant", "content": p["assistant"]}],
                          False)  # fmt: skip
        folded = render([{"role": "system", "content": p["system"]}, {"role": "user", "content": p["user"]}], False)
        user_head, user_tail = user_only.split(p["user"])
        between = _between(answered, p["user"], p["assistant"])
        assistant_tail = _between(answered, p["assistant"], None)
    except Exception:  # the template refuses a probe, or a probe is missing or written twice: not this shape
        return None
    if not (user_prompt.startswith(user_only) and answered.startswith(user_only) and between.startswith(user_tail)):
        return None
    if not (folded.startswith(user_head) and folded.endswith(p["user"] + user_tail) and p["system"] in folded):
        return None
    inner = folded[len(user_head) : len(folded) - len(p["user"] + user_tail)]
    if inner.count(p["system"]) != 1:
        return None
    opening, closing = inner.split(p["system"])
    prefix = {"user": user_head, "assistant": between[len(user_tail) :]}
    suffix = {"user": user_tail, "assistant": assistant_tail}
    return RoleWise(prefix, suffix, user_prompt[len(user_only) :], None, (opening, closing))


def _role_wise(render: Any) -> RoleWise | None:
    """The template as per-role prefixes and suffixes (None: it is not role-wise)."""
    p = PROBE
    try:
        full = render(
            [
                {"role": "system", "content": p["system"]},
                {"role": "user", "content": p["user"]},
                {"role": "assistant", "content": p["assistant"]},
            ],
            False,
        )
        user_only = render([{"role": "user", "content": p["user"]}], False)
        user_prompt = render([{"role": "user", "content": p["user"]}], True)
        system_only = render([{"role": "system", "content": p["system"]}], False)
    except Exception:
        return None
    if not all(p[r] in full for r in ROLES) or not user_prompt.startswith(user_only):
        return None
    try:
        suffix = {
            "assistant": _between(full, p["assistant"], None),
            "user": _between(user_only, p["user"], None),
            "system": _between(system_only, p["system"], None),
        }
        system_head = full[: full.index(p["system"])]
        between_su = _between(full, p["system"], p["user"])
        between_ua = _between(full, p["user"], p["assistant"])
    except ValueError:  # a probe's content is missing where a role-wise template writes it
        return None
    if not (between_su.startswith(suffix["system"]) and between_ua.startswith(suffix["user"])):
        return None
    prefix = {
        "system": system_head,
        "user": between_su[len(suffix["system"]) :],
        "assistant": between_ua[len(suffix["user"]) :],
    }
    head = user_only[: user_only.index(p["user"])]
    if not head.endswith(prefix["user"]):
        return None
    default = head[: len(head) - len(prefix["user"])]
    default_system = None
    if default:  # the template writes a system message of its own when there is none
        if not (default.startswith(prefix["system"]) and default.endswith(suffix["system"])):
            return None
        default_system = default[len(prefix["system"]) : len(default) - len(suffix["system"])]
    return RoleWise(prefix, suffix, user_prompt[len(user_only) :], default_system)


def _long_conversation(system: bool = False) -> list[dict[str, str]]:
    turns = [("system", "Be kind.")] if system else []
    turns += [("user", "First question?"), ("assistant", "First answer."), ("user", "Second question?")]
    turns += [("assistant", "Second answer."), ("user", "Third one.")]
    return [{"role": role, "content": content} for role, content in turns]


def go_string(text: str) -> str:
    """A Go string literal (JSON's escapes are a subset of Go's)."""
    return json.dumps(text, ensure_ascii=False)


def go_template(model: RoleWise) -> str:
    """The Go template Ollama renders for a translated chat template. Every literal is a quoted action, so the
    trim markers that lay the template out never eat a newline of the prompt. A folded system message is held in
    `$system` and written inside the next user message."""

    def literal(text: str) -> str:
        return f"{{{{ {go_string(text)} }}}}"

    def role_line(keyword: str, role: str) -> str:
        return f'{{{{- {keyword} eq .Role "{role}" }}}}{literal(model.prefix[role])}{{{{ .Content }}}}' + literal(
            model.suffix[role]
        )

    lines = ['{{- $role := "" }}']
    if model.folded_system is None:
        lines.append("{{- range .Messages }}")
        lines += [role_line("if" if index == 0 else "else if", role) for index, role in enumerate(ROLES)]
    else:
        opening, closing = model.folded_system
        lines += [
            '{{- $system := "" }}',
            "{{- range .Messages }}",
            '{{- if eq .Role "system" }}{{- $system = .Content }}',
        ]
        lines.append(
            f'{{{{- else if eq .Role "user" }}}}{literal(model.prefix["user"])}{{{{- if $system }}}}{literal(opening)}'
            f'{{{{ $system }}}}{literal(closing)}{{{{- $system = "" }}}}{{{{- end }}}}{{{{ .Content }}}}'
            + literal(model.suffix["user"])
        )
        lines.append(role_line("else if", "assistant"))
    lines += ["{{- end }}", "{{- $role = .Role }}", "{{- end }}"]
    lines.append(f'{{{{- if ne $role "assistant" }}}}{literal(model.generation)}{{{{- end }}}}')
    return "\n".join(lines)


# ---------------------------------------------------------------- a Go template renderer for the subset above

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.DOTALL)
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\(|\)|[^\s()]+')


def _parse(source: str) -> list[Any]:
    """Go template text -> nested nodes: ("text", s), ("out", expr), ("set", var, expr), ("range", expr, body),
    ("if", [(cond, body), ...], else_body)."""
    items: list[tuple[str, str]] = []
    position = 0
    for match in _ACTION.finditer(source):
        text = source[position : match.start()]
        if match.group(1):
            text = text.rstrip()
        if items and items[-1][0] == "trim-right":
            items.pop()
            text = text.lstrip()
        if text:
            items.append(("text", text))
        items.append(("action", match.group(2)))
        if match.group(3):
            items.append(("trim-right", ""))
        position = match.end()
    tail = source[position:]
    if items and items[-1][0] == "trim-right":
        items.pop()
        tail = tail.lstrip()
    if tail:
        items.append(("text", tail))

    def block(index: int) -> tuple[list[Any], int, str]:
        nodes: list[Any] = []
        while index < len(items):
            kind, body = items[index]
            index += 1
            if kind == "text":
                nodes.append(("text", body))
                continue
            words = body.split(None, 1)
            head = words[0] if words else ""
            if head in ("end", "else"):
                return nodes, index, body
            if head == "range":
                inner, index, _ = block(index)
                nodes.append(("range", words[1], inner))
            elif head == "if":
                inner, index, closer = block(index)
                branches: list[tuple[str, list[Any]]] = [(words[1], inner)]
                otherwise: list[Any] = []
                while closer.startswith("else"):
                    rest = closer[4:].strip()
                    inner, index, next_closer = block(index)
                    if rest.startswith("if "):
                        branches.append((rest[3:], inner))
                    else:
                        otherwise = inner
                    closer = next_closer
                nodes.append(("if", branches, otherwise))
            elif re.match(r"^\$\w+\s*:?=", body):
                name, expr = re.split(r"\s*:?=\s*", body, maxsplit=1)
                nodes.append(("set", name, expr))
            else:
                nodes.append(("out", body))
        return nodes, index, ""

    nodes, _, _ = block(0)
    return nodes


def _evaluate(expr: str, dot: Any, variables: dict[str, Any]) -> Any:
    tokens = _TOKEN.findall(expr)

    def value(token: str) -> Any:
        if token.startswith('"'):
            return json.loads(token)
        if token.startswith("$"):
            return variables[token]
        if token.startswith("."):
            # Ollama's fields are capitalised (.Role, .Content); our messages' keys are not
            field = token[1:]
            return dot.get(field, dot.get(field.lower(), "")) if isinstance(dot, dict) else ""
        raise ValueError(f"unsupported Go template term {token!r}")

    functions: dict[str, Callable[..., Any]] = {
        "eq": lambda a, b: a == b,
        "ne": lambda a, b: a != b,
        "not": lambda a: not a,
        "and": lambda a, b: bool(a and b),
        "or": lambda a, b: bool(a or b),
    }
    if tokens and tokens[0] in functions:
        return functions[tokens[0]](*(value(t) for t in tokens[1:]))
    if len(tokens) != 1:
        raise ValueError(f"unsupported Go template expression {expr!r}")
    return value(tokens[0])


def _run(nodes: list[Any], dot: Any, variables: dict[str, Any], out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "out":
            out.append(str(_evaluate(node[1], dot, variables)))
        elif node[0] == "set":
            variables[node[1]] = _evaluate(node[2], dot, variables)
        elif node[0] == "range":
            for item in _evaluate(node[1], dot, variables) or []:
                _run(node[2], item, variables, out)
        elif node[0] == "if":
            for condition, body in node[1]:
                if _evaluate(condition, dot, variables):
                    _run(body, dot, variables, out)
                    break
            else:
                _run(node[2], dot, variables, out)


def render_go(template: str, values: dict[str, Any]) -> str:
    """Render the Go template subset this module writes (and `{{ .Prompt }}`) with `values` as the dot."""
    out: list[str] = []
    _run(_parse(template), values, {}, out)
    return "".join(out)


def ollama_messages(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    """The messages Ollama hands the template: the Modelfile's SYSTEM first when the request has no system message."""
    if system is not None and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system}, *messages]
    return messages


# ---------------------------------------------------------------- the Modelfile


def stop_tokens(source: ExportSource, model: RoleWise | None) -> list[str]:
    """Every end-of-turn and end-of-text token: the template's end of turn, EOS, and the special tokens that end a
    turn or a text (by name: end, eot, eos, </s>) that the tokenizer knows."""
    tokenizer = source.tokenizer
    stops: list[str] = []
    if source.chat and source.chat.get("end_of_turn"):
        stops.append(str(source.chat["end_of_turn"]))
    if tokenizer.eos_token:
        stops.append(str(tokenizer.eos_token))
    if model is not None:  # special tokens the template writes after an answer
        stops += [t for t in tokenizer.all_special_tokens if t in model.suffix["assistant"]]
    stops += [t for t in tokenizer.all_special_tokens if END_TOKEN.search(t)]
    return list(dict.fromkeys(s for s in stops if s.strip()))


def _quoted(text: str) -> str:
    """A Modelfile value in triple quotes (Ollama's multi-line form)."""
    if '"""' in text:
        raise UserInputError('--format ollama: the template text contains """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile(weights: str, template: str, system: str | None, stops: list[str], adapter: str | None = None) -> str:
    lines = [f"FROM ./{weights}"]
    if adapter:
        lines.append(f"ADAPTER ./{adapter}")
    lines.append(f"TEMPLATE {_quoted(template)}")
    if system is not None:
        lines.append(f"SYSTEM {_quoted(system)}")
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in stops]
    return "\n".join(lines) + "\n"


def template_for(source: ExportSource) -> tuple[str, RoleWise | None]:
    """The Go template for this version (a plain completion template for a model without a chat template)."""
    if not source.template:
        return COMPLETION_TEMPLATE, None
    name = (source.chat or {}).get("name", "the tokenizer's")
    model = analyse(lambda messages, generation: source.render(messages, generation), str(name))
    return go_template(model), model


def verify_template(source: ExportSource, template: str, model: RoleWise | None) -> dict[str, Any]:
    """The Go template, rendered as Ollama would (SYSTEM placed first when absent), against the Jinja template."""
    if model is None:
        rendered = render_go(template, {"Prompt": "Once upon a time"})
        return {"template_renders_same": rendered == "Once upon a time", "template_conversations": 1}
    conversations = [*SAMPLE_CONVERSATIONS, _long_conversation()]
    mismatched = 0
    for conversation in conversations:
        # Ollama adds the generation prompt unless the last message is the assistant's (then it continues it).
        expected = source.render(conversation, add_generation_prompt=conversation[-1]["role"] != "assistant")
        found = render_go(template, {"Messages": ollama_messages(conversation, model.default_system)})
        mismatched += found != expected
    return {"template_renders_same": mismatched == 0, "template_conversations": len(conversations)}


def write_ollama(source: ExportSource, staging: Path, quant: str | None) -> tuple[dict[str, Any], list[str]]:
    """Modelfile + model.gguf (the merged model, verified as --format gguf is)."""
    template, model = template_for(source)  # first: an untranslatable template writes nothing
    system = model.default_system if model else None
    stops = stop_tokens(source, model)
    checks, notes = write_gguf(source, staging, quant)
    (staging / MODELFILE).write_text(modelfile(FILE_NAME, template, system, stops))
    checks |= verify_template(source, template, model)
    checks["stop"] = stops
    notes.append(f"ollama create NAME -f {MODELFILE}   (run in this folder)")
    return checks, notes


def write_ollama_lora(source: ExportSource, staging: Path, quant: str | None) -> tuple[dict[str, Any], list[str]]:
    """Modelfile (`FROM ./base.gguf`, `ADAPTER ./adapter.gguf`) + the two files of --format gguf-lora, verified as
    gguf-lora's are; the TEMPLATE as --format ollama's."""
    template, model = template_for(source)  # first: an untranslatable template writes nothing
    system = model.default_system if model else None
    stops = stop_tokens(source, model)
    try:
        checks, notes = write_gguf_lora(source, staging, quant)
    except UserInputError as exc:  # gguf-lora's refusals, named for this format and its merged counterpart
        said = (
            str(exc).replace("--format gguf-lora", "--format ollama-lora").replace("--format gguf", "--format ollama")
        )
        raise UserInputError(said) from None
    (staging / MODELFILE).write_text(modelfile(BASE_FILE, template, system, stops, adapter=ADAPTER_FILE))
    checks |= verify_template(source, template, model)
    checks["stop"] = stops
    notes = [n for n in notes if not n.startswith("llama.cpp:")]
    notes.append(f"ollama create NAME -f {MODELFILE}   (run in this folder; Ollama applies {ADAPTER_FILE} to "
                 f"{BASE_FILE})")  # fmt: skip
    return checks, notes
