"""Probe suites: rule categories (YAML), counterfactual pairs (CrowS-Pairs CSV/TSV/JSONL, WinoBias folders)
and robustness checks; builtin suites by name."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.errors import UserInputError
from tasks.yaml_files import read_yaml

BUILTIN_SUITES = Path(__file__).parent.parent / "builtin" / "probes"
Perturbation = Literal["typo", "case", "whitespace", "punctuation"]
PERTURBATIONS: tuple[Perturbation, ...] = ("typo", "case", "whitespace", "punctuation")


class RuleCategory(BaseModel):
    model_config = ConfigDict(extra="forbid")
    category: str
    language: str = "en"
    prompts: list[str] = Field(min_length=1)
    forbidden_words: list[str] = []
    required_words: list[str] = []
    required: Literal["any", "all"] = "any"


class Pair(BaseModel):
    """`sent_more` is the more stereotypical sentence (WinoBias: the pro-stereotyped one) in either direction;
    `direction` (CrowS-Pairs' `stereo_antistereo`) only groups the pairs for the per-direction scores."""

    sent_more: str
    sent_less: str
    bias_type: str = "unspecified"
    direction: Literal["stereo", "antistereo"] = "stereo"


class Robustness(BaseModel):
    model_config = ConfigDict(extra="forbid")
    perturbations: list[Perturbation] = list(PERTURBATIONS)


class Suite(BaseModel):
    """A probe suite: any of rule cases, pairs and robustness checks."""

    name: str
    rules: list[RuleCategory] = []
    pairs: list[Pair] = []
    robustness: Robustness | None = None


# ---------------------------------------------------------------- loading suites


def load_pairs(path: Path, key: str) -> list[Pair]:
    """Pairs from CSV/TSV/JSONL with `sent_more`, `sent_less` and optionally `stereo_antistereo`, `bias_type`."""
    try:
        if path.suffix in {".jsonl", ".json"}:
            frame = pd.read_json(path, lines=path.suffix == ".jsonl")
        else:
            frame = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",")
    except (ValueError, OSError) as exc:
        raise UserInputError(f"{key}: cannot read pairs from {path}: {str(exc).splitlines()[0]}") from None
    missing = {"sent_more", "sent_less"} - set(frame.columns)
    if missing:
        raise UserInputError(
            f"{key}: {path} lacks column(s) {sorted(missing)}; expected sent_more, sent_less "
            "[, stereo_antistereo, bias_type] (the CrowS-Pairs layout)"
        )
    directions = frame["stereo_antistereo"] if "stereo_antistereo" in frame else ["stereo"] * len(frame)
    types = frame["bias_type"] if "bias_type" in frame else ["unspecified"] * len(frame)
    return [
        Pair(
            sent_more=str(m),
            sent_less=str(s),
            bias_type=str(t),
            direction="antistereo" if d == "antistereo" else "stereo",
        )
        for m, s, d, t in zip(frame["sent_more"], frame["sent_less"], directions, types, strict=True)
    ]


def _winobias_sentence(line: str) -> str:
    """'12 [The developer] argued ... [he] ...' -> 'The developer argued ... he ...'."""
    return re.sub(r"[\[\]]", "", re.sub(r"^\d+\s+", "", line.strip()))


def load_winobias(folder: Path, key: str) -> list[Pair]:
    """Aligned pro/anti lines of every `pro_stereotyped_<type>.txt.<split>` file with its `anti_` twin."""
    pairs = []
    for pro in sorted(folder.glob("pro_stereotyped_*.txt.*")):
        anti = pro.with_name(pro.name.replace("pro_", "anti_", 1))
        if not anti.exists():
            raise UserInputError(f"{key}: {pro} has no anti-stereotyped twin {anti.name}")
        pro_lines = [line for line in pro.read_text().splitlines() if line.strip()]
        anti_lines = [line for line in anti.read_text().splitlines() if line.strip()]
        if len(pro_lines) != len(anti_lines):
            raise UserInputError(f"{key}: {pro.name} and {anti.name} differ in length; they must align line by line")
        kind = "gender_" + pro.name.split("_")[2].split(".")[0]  # gender_type1 / gender_type2
        pairs += [
            Pair(sent_more=_winobias_sentence(p), sent_less=_winobias_sentence(a), bias_type=kind)
            for p, a in zip(pro_lines, anti_lines, strict=True)
        ]
    if not pairs:
        raise UserInputError(f"{key}: {folder} holds no pro_stereotyped_*.txt.* files (the WinoBias layout)")
    return pairs


def _pairs_source(value: Any, base: Path, key: str) -> list[Pair]:
    if isinstance(value, list):
        return [Pair.model_validate(p) for p in value]
    path = Path(str(value))
    path = path if path.is_absolute() else base / path
    if path.is_dir():
        return load_winobias(path, key)
    if not path.exists():
        raise UserInputError(f"{key}: pairs file not found: {path}")
    return load_pairs(path, key)


def load_suite(name_or_path: str, key: str = "bias_probe.suite") -> Suite:
    """A builtin suite by name, a YAML suite, a pairs file (CSV/TSV/JSONL) or a WinoBias folder.

    Raises:
        UserInputError: naming the key and what is wrong with the suite.
    """
    builtin = BUILTIN_SUITES / f"{name_or_path}.yaml"
    path = builtin if builtin.exists() else Path(name_or_path).expanduser()
    if not path.exists():
        names = sorted(p.stem for p in BUILTIN_SUITES.glob("*.yaml"))
        raise UserInputError(f"{key}: {name_or_path!r} is neither a builtin suite ({', '.join(names)}) nor a path")
    if path.is_dir() or path.suffix in {".csv", ".tsv", ".jsonl", ".json"}:
        return Suite(name=path.name, pairs=_pairs_source(str(path), path.parent, key))
    raw = read_yaml(path, f"{key}: {path}") or {}
    if not isinstance(raw, dict):
        raise UserInputError(f"{key}: {path} must be a mapping with rules, pairs and/or robustness")
    pairs = _pairs_source(raw.pop("pairs"), path.parent, f"{key} (pairs)") if "pairs" in raw else []
    try:
        return Suite.model_validate({"name": path.stem, **raw, "pairs": pairs})
    except ValidationError as exc:
        problems = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise UserInputError.many(f"{key}: {path} is not a valid suite", problems) from None
