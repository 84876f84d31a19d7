"""`--format ollama`: a Modelfile beside the merged GGUF, its TEMPLATE translated from the training chat template.

Translation works on what the Jinja template renders, not on its source: rendered on probe conversations it must
be role-wise — every message written as `prefix(role) + content + suffix(role)`, then a generation prompt when the
model is to answer, and at most a default system message written when the conversation has none (SmolLM2's). That
covers chatml, the plain `### Instruction` template, Zephyr- or Llama-3-style headers and the templates in
tasks/objectives/instruction/chat.py. Such a template becomes a Go template over `.Messages`, its default system message the
Modelfile's SYSTEM (Ollama puts SYSTEM first when a request has no system message). Anything else (Llama-2's
`[INST] <<SYS>>` folds the system message into the first user turn) is refused with exit 2: write TEMPLATE by hand.

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
    """A chat template as per-role prefixes and suffixes, a generation prompt and an optional default system."""

    prefix: dict[str, str]
    suffix: dict[str, str]
    generation: str
    default_system: str | None

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """What this model of the template renders (used to check that the model explains the Jinja)."""
        if messages and messages[0]["role"] != "system" and self.default_system is not None:
            messages = [{"role": "system", "content": self.default_system}, *messages]
        text = "".join(self.prefix[m["role"]] + m["content"] + self.suffix[m["role"]] for m in messages)
        return text + (self.generation if add_generation_prompt else "")


def _between(text: str, start: str, end: str | None) -> str:
    """The text after `start`'s last occurrence up to `end` (or the end)."""
    tail = text[text.rindex(start) + len(start) :]
    return tail if end is None else tail[: tail.index(end)]


def analyse(render: Any, name: str) -> RoleWise:
    """Model a Jinja template (`render(messages, add_generation_prompt) -> str`) as role-wise.

    Raises:
        Untranslatable: it is not (naming the template and the way out).
    """
    refuse = Untranslatable(
        f"--format ollama: chat template {name!r} cannot be translated to an Ollama TEMPLATE (it does not write "
        "each message as a fixed prefix, the content and a fixed suffix per role); write TEMPLATE by hand in the "
        "Modelfile, or use --format gguf, which carries the Jinja template itself"
    )
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
        raise refuse from None
    if not all(p[r] in full for r in ROLES) or not user_prompt.startswith(user_only):
        raise refuse
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
        raise refuse from None
    if not (between_su.startswith(suffix["system"]) and between_ua.startswith(suffix["user"])):
        raise refuse
    prefix = {
        "system": system_head,
        "user": between_su[len(suffix["system"]) :],
        "assistant": between_ua[len(suffix["user"]) :],
    }
    head = user_only[: user_only.index(p["user"])]
    if not head.endswith(prefix["user"]):
        raise refuse
    default = head[: len(head) - len(prefix["user"])]
    default_system = None
    if default:  # the template writes a system message of its own when there is none
        if not (default.startswith(prefix["system"]) and default.endswith(suffix["system"])):
            raise refuse
        default_system = default[len(prefix["system"]) : len(default) - len(suffix["system"])]
    model = RoleWise(prefix, suffix, user_prompt[len(user_only) :], default_system)
    # The model must explain every sample conversation, or the template does something else (position-dependent).
    for conversation in [*SAMPLE_CONVERSATIONS, _long_conversation()]:
        for generation in (True, False):
            try:
                expected = render(conversation, generation)
            except Exception:
                continue  # a conversation the template refuses is none of the model's business
            if model.render(conversation, generation) != expected:
                raise refuse
    return model


def _long_conversation() -> list[dict[str, str]]:
    turns = [("user", "First question?"), ("assistant", "First answer."), ("user", "Second question?")]
    turns += [("assistant", "Second answer."), ("user", "Third one.")]
    return [{"role": role, "content": content} for role, content in turns]


def go_string(text: str) -> str:
    """A Go string literal (JSON's escapes are a subset of Go's)."""
    return json.dumps(text, ensure_ascii=False)


def go_template(model: RoleWise) -> str:
    """The Go template Ollama renders for a role-wise chat template. Every literal is a quoted action, so the
    trim markers that lay the template out never eat a newline of the prompt."""
    lines = ['{{- $role := "" }}', "{{- range .Messages }}"]
    for index, role in enumerate(ROLES):
        keyword = "if" if index == 0 else "else if"
        lines.append(
            f'{{{{- {keyword} eq .Role "{role}" }}}}{{{{ {go_string(model.prefix[role])} }}}}{{{{ .Content }}}}'
            f"{{{{ {go_string(model.suffix[role])} }}}}"
        )
    lines += ["{{- end }}", "{{- $role = .Role }}", "{{- end }}"]
    lines.append(f'{{{{- if ne $role "assistant" }}}}{{{{ {go_string(model.generation)} }}}}{{{{- end }}}}')
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
