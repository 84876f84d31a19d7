"""YAML files from users (configs, --set values, probe suites, deployments), read safely: bounded in size and
alias expansion. Imports nothing heavy, so the CLI can check a config file before it starts anything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tasks.errors import UserInputError

# Bounds on any YAML the CLI reads: configs, --set values, probe suites are a few kB and a few hundred values.
# Aliases share nodes, so a small file can stand for billions of values ("billion laughs"); validating it would
# expand them all.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_VALUES = 100_000


class _YamlTooBig(Exception):
    pass


def _count_values(root: yaml.Node) -> int:
    """The number of values `root` stands for with every alias expanded; stops past MAX_YAML_VALUES.

    Shared nodes are counted once per reference (memoized, so the walk is linear in the file), cycles raise.
    """
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:  # iterative: a deeply nested file must not exhaust the Python stack here
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        if children_done:
            on_path.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(node)] > MAX_YAML_VALUES:
                raise _YamlTooBig(f"more than {MAX_YAML_VALUES} values once its aliases are expanded")
            continue
        if id(node) in on_path:
            raise _YamlTooBig("an alias refers to itself (a recursive structure)")
        on_path.add(id(node))
        stack.append((node, True))
        for child in children:
            if id(child) in on_path:
                raise _YamlTooBig("an alias refers to itself (a recursive structure)")
            stack.append((child, False))
    return sizes[id(root)]


def parse_yaml(text: str, source: str) -> Any:
    """Safe-load YAML text, bounded in size and alias expansion.

    Raises:
        UserInputError: "{source}: ..." when the text is not valid YAML, too large, or expands too far.
    """
    if len(text) > MAX_YAML_BYTES:
        raise UserInputError(f"{source}: larger than {MAX_YAML_BYTES >> 20} MiB; a config is a few kB")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _count_values(node)
        return loader.construct_document(node)
    except _YamlTooBig as exc:
        raise UserInputError(f"{source}: refused: {exc} (nested YAML aliases?)") from None
    except yaml.YAMLError as exc:
        raise UserInputError(f"{source}: not valid YAML: {exc}") from None
    except RecursionError:
        raise UserInputError(f"{source}: refused: YAML nested too deeply") from None
    finally:
        loader.dispose()


def read_yaml(path: Path, source: str | None = None) -> Any:
    """A YAML file through `parse_yaml`; its size is checked before it is read.

    Raises:
        UserInputError: naming `source` (default: the path).
    """
    source = source or str(path)
    if path.stat().st_size > MAX_YAML_BYTES:
        raise UserInputError(f"{source}: larger than {MAX_YAML_BYTES >> 20} MiB; a config is a few kB")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserInputError(f"{source}: not UTF-8 text (invalid byte at offset {exc.start})") from None
    return parse_yaml(text, source)


def config_file_problem(path: Path) -> str | None:
    """What is wrong with a config file before its content is validated: missing, not YAML, not a mapping."""
    if not path.is_file():
        return f"{path}: config file not found"
    try:
        raw = read_yaml(path)
    except UserInputError as exc:
        return str(exc)
    if raw is not None and not isinstance(raw, dict):
        return f"{path}: expected a YAML mapping of sections (model, task, data, method, ...)"
    return None
