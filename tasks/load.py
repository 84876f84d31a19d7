"""Load: the training and eval data from local files or the hub, with a content fingerprint for lineage."""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import math
import random
import shutil
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from datasets import Dataset, load_dataset, load_from_disk
from pydantic import BaseModel

from tasks.errors import UserInputError
from tasks.settings import DataSettings

if TYPE_CHECKING:  # the objectives read rows with this module's helpers: they sit above it
    from tasks.objectives.base import Objective

# file suffix -> (datasets builder, builder options)
FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".csv": ("csv", {}),
    # Raw TSV (SMS corpora and the like) contains stray quotes: read it without quote handling.
    ".tsv": ("csv", {"sep": "\t", "quoting": csv.QUOTE_NONE}),
    ".parquet": ("parquet", {}),
    ".txt": ("text", {}),
}

# What a file of each format must hold, for the message about an empty one.
EXPECTED = {
    ".jsonl": "one JSON object per line",
    ".json": "a JSON array of objects (or one object per line)",
    ".csv": "a header row, then one row per example",
    ".tsv": "a tab-separated header row, then one row per example",
    ".parquet": "a Parquet table with a row per example",
    ".txt": "one text per line",
}


class PreparedRows(NamedTuple):
    """What an objective's `prepare_rows` may return instead of the bare rows: the rows and numbers about them
    that the run logs (e.g. pairs dropped as unusable), summed over data.train and data.eval (`DataRef.metrics`)."""

    rows: Dataset
    metrics: dict[str, float]


def prepared(out: Dataset | PreparedRows) -> tuple[Dataset, dict[str, float]]:
    return (out.rows, out.metrics) if isinstance(out, PreparedRows) else (out, {})


class DataRef(BaseModel):
    """A reference to loaded data: train/eval splits saved as Arrow folders, plus their lineage."""

    train_dir: str
    eval_dir: str
    fingerprint: str
    text_column: str
    label_column: str | None
    train_rows: int
    eval_rows: int
    source: str
    metrics: dict[str, float] = {}  # what preparing the rows counted (`PreparedRows`), for the run to log

    def splits(self) -> tuple[Dataset, Dataset]:
        return load_from_disk(self.train_dir), load_from_disk(self.eval_dir)


def publish(folder: Path, write: Callable[[Path], object]) -> None:
    """Write into a private staging folder, then rename it into place: readers never see half a folder."""
    staging = folder.with_name(f"{folder.name}.partial-{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    try:
        write(staging)
        staging.rename(folder)
    except OSError:
        if not folder.exists():  # someone else publishing the same content first is fine
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _files(path: Path, key: str) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in FORMATS and p.is_file())
        if not files:
            raise UserInputError(f"{key}: folder {path} holds no data files ({' '.join(FORMATS)})")
        if len({p.suffix for p in files}) > 1:
            raise UserInputError(f"{key}: folder {path} mixes file formats; keep one format per folder")
        return files
    if path.suffix not in FORMATS:
        raise UserInputError(f"{key}: {path} has an unsupported format; expected one of {' '.join(FORMATS)}")
    return [path]


def _looks_like_path(value: str) -> bool:
    return value.startswith((".", "/", "~")) or Path(value).suffix in FORMATS or value.count("/") != 1


PEEKED_ROWS = 1000


def peek_columns(value: str) -> list[str] | None:
    """The columns of a local data file's first rows (the first file of a folder), read cheaply before any run
    opens (an objective's `check` detects the data's format with them). None for a hub id, a file that is not
    there or that does not parse: loading it names that problem."""
    path = Path(value).expanduser()
    try:
        file = _files(path, "data")[0] if path.exists() else None
    except UserInputError:
        return None
    try:
        if file is None or file.suffix == ".txt":
            return None
        if file.suffix == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(file).names)
        with file.open(encoding="utf-8", newline="") as handle:
            if file.suffix in (".csv", ".tsv"):
                return next(csv.reader(handle, delimiter="\t" if file.suffix == ".tsv" else ","), None)
            if handle.read(1024).lstrip().startswith("["):  # a JSON array: parsed whole
                handle.seek(0)
                rows = json.load(handle)[:PEEKED_ROWS]
            else:
                handle.seek(0)
                rows = [json.loads(line) for _, line in zip(range(PEEKED_ROWS), handle, strict=False) if line.strip()]
    except (OSError, ValueError, TypeError, ImportError):
        return None
    if not all(isinstance(row, dict) for row in rows):
        return None
    return sorted({key for row in rows for key in row})


def check_source(value: str, key: str) -> None:
    """Fail early when a local data path is missing or of an unknown format (hub ids are checked on load)."""
    path = Path(value).expanduser()
    if path.exists():
        _files(path, key)
    elif _looks_like_path(value):
        raise UserInputError(f"{key}: file not found: {value}")


def _hash_checked(file: Path, key: str, digest: Any) -> None:
    """Feed a data file to `digest`, refusing an empty file and, for text formats, one that is not UTF-8.

    The datasets builders report either without naming the file, the encoding or where the bad byte is.
    """
    text = file.suffix != ".parquet"
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, blank = 0, True
    with file.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            blank = blank and not block.strip()
            if text:
                pending = len(decoder.getstate()[0])  # bytes of a character split across blocks
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as exc:
                    _not_utf8(file, key, offset - pending + exc.start)
            offset += len(block)
    if text:
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            _not_utf8(file, key, offset - len(exc.object) + exc.start)
    empty = blank if text else offset == 0
    if empty:
        raise UserInputError(f"{key}: {file} is empty; expected {EXPECTED[file.suffix]}")


def _check_json(file: Path, key: str) -> None:
    """Parse JSON / JSON Lines with Python's own parser before pyarrow's reader sees it: malformed input gets a
    message with its line, and never reaches the reader's native code (a hypothesis test crashed it with a
    segmentation fault on garbage text)."""
    text = file.read_text(encoding="utf-8")
    if file.suffix == ".json" and text.lstrip().startswith(("[", "{")):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            if not (text.lstrip().startswith("{") and exc.msg == "Extra data"):  # else: one object per line
                raise UserInputError(f"{key}: {file}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        else:
            rows = value if isinstance(value, list) else [value]
            if not all(isinstance(row, dict) for row in rows):
                raise UserInputError(f"{key}: {file}: expected {EXPECTED['.json']}")
            return
    for number, line in enumerate(text.splitlines(), start=1):  # JSON Lines (also a .json written that way)
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserInputError(f"{key}: {file}: line {number} is not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise UserInputError(f"{key}: {file}: line {number} is not a JSON object; expected {EXPECTED[file.suffix]}")


def _not_utf8(file: Path, key: str, offset: int) -> None:
    raise UserInputError(
        f"{key}: {file}: not UTF-8 text (invalid byte at byte offset {offset}); data files must be UTF-8 "
        "(re-save the file as UTF-8)"
    )


def read_table(value: str, key: str) -> tuple[Dataset, str]:
    """A file, a folder of files, or a hub dataset id as one Dataset, with a fingerprint of its content.

    Raises:
        UserInputError: the file is missing, unreadable or of an unknown format.
    """
    path = Path(value).expanduser()
    if path.exists():
        files = _files(path, key)
        builder, options = FORMATS[files[0].suffix]
        digest = hashlib.sha256()
        for file in files:
            _hash_checked(file, key, digest)
            if file.suffix in (".jsonl", ".json"):
                _check_json(file, key)
        try:
            table = load_dataset(builder, data_files=[str(f) for f in files], split="train", **options)
        except Exception as exc:  # the builders raise many kinds of parse errors
            raise UserInputError(f"{key}: cannot read {path} as {files[0].suffix}: {exc}") from None
        return table, digest.hexdigest()
    if _looks_like_path(value):
        raise UserInputError(f"{key}: file not found: {value}")
    try:
        table = load_dataset(value, split="train")
    except Exception as exc:
        raise UserInputError(
            f"{key}: {value!r} is not a local file and could not be loaded from the hub "
            f"({exc.__class__.__name__}: {str(exc)[:200]})"
        ) from None
    return table, hashlib.sha256(f"{value}:{table._fingerprint}".encode()).hexdigest()


def text_rows(table: Dataset, settings: DataSettings, label_column: str | None, key: str, value: str) -> Dataset:
    """The text (and label) column of the rows that have a text (and a label); how most objectives read rows.

    Raises:
        UserInputError: a column is missing (the message names the config key and lists the file's columns).
    """
    _check_columns(table, settings, label_column, key, value)
    return _clean(table, settings.text_column, label_column)


def _check_columns(table: Dataset, settings: DataSettings, label_column: str | None, key: str, value: str) -> None:
    columns = table.column_names
    wanted = [("data.text_column", settings.text_column)]
    if label_column:
        wanted.append(("data.label_column", label_column))
    for column_key, column in wanted:
        if column not in columns:
            raise UserInputError(
                f"{column_key}: column {column!r} not found in {key} ({value}); its columns are: {', '.join(columns)}"
            )


def _clean(table: Dataset, text_column: str, label_column: str | None) -> Dataset:
    keep = [text_column] + ([label_column] if label_column else [])
    table = table.select_columns(keep)
    texts = table[text_column]
    labels = table[label_column] if label_column else [""] * len(texts)
    # Rows picked here, not with Dataset.filter: that would hash a Python function with dill (a disassembly of it)
    # for its cache fingerprint, for a one-pass selection.
    usable = [
        i
        for i, (t, y) in enumerate(zip(texts, labels, strict=True))
        if isinstance(t, str) and t.strip() and y is not None
    ]
    return table if len(usable) == len(table) else table.select(usable)


def stratified_split(labels: list[str], fraction: float, seed: int) -> tuple[list[int], list[int]] | None:
    """Train and eval row indices, each class in proportion and every eval class also in train.

    None when there is nothing to stratify (no labels) or a class has fewer than 2 rows (it cannot be in both).
    Eval gets ceil(fraction * rows) rows, as `Dataset.train_test_split` gives, unless keeping a row of every
    class in train leaves fewer. Deterministic for a seed; rows shuffled like the random split's.
    """
    rows: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        rows[label].append(i)
    if not rows or min(len(r) for r in rows.values()) < 2:
        return None
    rng = random.Random(seed)
    wanted = math.ceil(fraction * len(labels))
    classes = list(rows)
    rng.shuffle(classes)  # the seed, not the label order, breaks ties below
    quota = {c: len(rows[c]) * wanted / len(labels) for c in classes}
    take = {c: min(math.floor(quota[c]), len(rows[c]) - 1) for c in classes}
    order = sorted(classes, key=lambda c: quota[c] - math.floor(quota[c]), reverse=True)  # largest remainder first
    while (missing := wanted - sum(take.values())) > 0:
        room = [c for c in order if take[c] < len(rows[c]) - 1]
        if not room:
            break
        for c in room[:missing]:
            take[c] += 1
    held_out = {i for c in classes for i in rng.sample(rows[c], take[c])}
    shuffled = rng.sample(range(len(labels)), len(labels))
    return [i for i in shuffled if i not in held_out], [i for i in shuffled if i in held_out]


def load_data(settings: DataSettings, objective: Objective, cache_dir: Path) -> DataRef:
    """Read train (and eval) data, split off eval when no eval file is given, and save both splits.

    The splits land in `cache_dir/<fingerprint>`, so the same data and split settings give the same folder.

    Raises:
        UserInputError: a file or column is missing, or a split is empty.
    """
    label_column = settings.label_column if objective.uses_labels else None
    train, train_digest = read_table(settings.train, "data.train")
    train, counted = prepared(objective.prepare_rows(train, settings, label_column, "data.train", settings.train))
    digests = {"train": train_digest}
    if settings.eval:
        eval_, digests["eval"] = read_table(settings.eval, "data.eval")
        eval_, eval_counted = prepared(
            objective.prepare_rows(eval_, settings, label_column, "data.eval", settings.eval)
        )
        counted = {k: counted.get(k, 0.0) + eval_counted.get(k, 0.0) for k in {**counted, **eval_counted}}
    else:
        if len(train) < 2:
            raise UserInputError(f"data.train: {settings.train} has {len(train)} usable rows; need at least 2")
        strata = stratified_split(
            [str(y) for y in train[label_column]] if label_column else [], settings.eval_fraction, settings.split_seed
        )
        if strata is None:
            split = train.train_test_split(test_size=settings.eval_fraction, seed=settings.split_seed)
            train, eval_ = split["train"], split["test"]
            digests["split"] = f"{settings.eval_fraction}:{settings.split_seed}"
        else:
            train, eval_ = train.select(strata[0]), train.select(strata[1])
            digests["split"] = f"{settings.eval_fraction}:{settings.split_seed}:stratified"
    for name, table, key in (("train", train, "data.train"), ("eval", eval_, "data.eval")):
        if len(table) == 0:
            raise UserInputError(f"{key}: the {name} split has no usable rows (empty text is dropped)")
    if objective.data_key(settings):  # settings that change the rows (e.g. an instruction file's format)
        digests["rows"] = objective.data_key(settings)
    fingerprint = hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()[:16]
    text_column = objective.row_column or settings.text_column
    folder = cache_dir / f"{fingerprint}-{text_column}-{label_column or ''}"
    if not folder.exists():
        publish(
            folder,
            lambda staging: (
                train.save_to_disk(str(staging / "train")),
                eval_.save_to_disk(str(staging / "eval")),
            ),
        )
    return DataRef(
        train_dir=str(folder / "train"),
        eval_dir=str(folder / "eval"),
        fingerprint=fingerprint,
        text_column=text_column,
        label_column=label_column,
        train_rows=len(train),
        eval_rows=len(eval_),
        source=settings.train,
        metrics=counted,
    )
