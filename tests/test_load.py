from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tasks.errors import UserInputError
from tasks.load import load_data, peek_columns
from tasks.objectives import OBJECTIVES
from tasks.settings import DataSettings

ROWS = [{"text": f"sentence number {i}", "label": "spam" if i % 3 == 0 else "ham"} for i in range(30)]


def write(path: Path) -> Path:
    frame = pd.DataFrame(ROWS)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif path.suffix == ".json":
        path.write_text(json.dumps(ROWS))
    elif path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".tsv":
        # raw TSV with a stray quote, as real SMS corpora have
        path.write_text("label\ttext\n" + "".join(f'{r["label"]}\t{r["text"]} "quoted\n' for r in ROWS))
    elif path.suffix == ".parquet":
        frame.to_parquet(path)
    elif path.suffix == ".txt":
        path.write_text("".join(r["text"] + "\n" for r in ROWS))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt"])
def test_every_format_loads_with_a_fixed_split(tmp_path: Path, suffix: str) -> None:
    path = write(tmp_path / f"data{suffix}")
    task = "causal_lm" if suffix == ".txt" else "classification"
    settings = DataSettings(train=str(path), eval_fraction=0.2)
    ref = load_data(settings, OBJECTIVES[task], tmp_path / "cache")
    assert (ref.train_rows, ref.eval_rows) == (24, 6)
    train, eval_ = ref.splits()
    assert set(train["text"]).isdisjoint(eval_["text"])
    if task == "classification":
        assert set(train["label"]) <= {"ham", "spam"}
    again = load_data(settings, OBJECTIVES[task], tmp_path / "cache2")
    assert again.fingerprint == ref.fingerprint
    assert again.splits()[1]["text"] == eval_["text"]


def test_fingerprint_follows_content(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl")
    first = load_data(DataSettings(train=str(path)), OBJECTIVES["causal_lm"], tmp_path / "c").fingerprint
    path.write_text(path.read_text() + json.dumps({"text": "one more"}) + "\n")
    assert load_data(DataSettings(train=str(path)), OBJECTIVES["causal_lm"], tmp_path / "c").fingerprint != first


def test_eval_file_is_used_as_is(tmp_path: Path) -> None:
    train = write(tmp_path / "train.jsonl")
    eval_ = tmp_path / "eval.jsonl"
    eval_.write_text(json.dumps({"text": "held out", "label": "ham"}) + "\n")
    ref = load_data(DataSettings(train=str(train), eval=str(eval_)), OBJECTIVES["classification"], tmp_path / "c")
    assert (ref.train_rows, ref.eval_rows) == (30, 1)


def test_missing_file_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=r"data.train: file not found: .*absent.jsonl"):
        load_data(DataSettings(train=str(tmp_path / "absent.jsonl")), OBJECTIVES["causal_lm"], tmp_path)


def test_wrong_columns_list_the_real_ones(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl")
    with pytest.raises(UserInputError, match=r"data.text_column: column 'body' not found .* columns are: text, label"):
        load_data(DataSettings(train=str(path), text_column="body"), OBJECTIVES["causal_lm"], tmp_path)
    with pytest.raises(UserInputError, match=r"data.label_column: column 'y' not found"):
        load_data(DataSettings(train=str(path), label_column="y"), OBJECTIVES["classification"], tmp_path)


def test_unsupported_format_and_empty_data(tmp_path: Path) -> None:
    odd = tmp_path / "data.xml"
    odd.write_text("<a/>")
    with pytest.raises(UserInputError, match="unsupported format"):
        load_data(DataSettings(train=str(odd)), OBJECTIVES["causal_lm"], tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "  "}) + "\n" + json.dumps({"text": "x"}) + "\n")
    with pytest.raises(UserInputError, match="usable rows"):
        load_data(DataSettings(train=str(empty)), OBJECTIVES["causal_lm"], tmp_path)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv", ".txt", ".parquet"])
def test_an_empty_file_is_called_empty(tmp_path: Path, suffix: str) -> None:
    empty = tmp_path / f"empty{suffix}"
    empty.write_bytes(b"" if suffix == ".parquet" else b"\n  \n")
    with pytest.raises(UserInputError, match=rf"data.train: {empty} is empty; expected .+") as caught:
        load_data(DataSettings(train=str(empty)), OBJECTIVES["causal_lm"], tmp_path / "c")
    assert not str(caught.value).endswith(": ")


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv", ".txt"])
def test_invalid_utf8_names_file_encoding_and_offset(tmp_path: Path, suffix: str) -> None:
    bad = tmp_path / f"bad{suffix}"
    head = {".jsonl": b'{"text": "ok"}\n{"text": "caf', ".json": b'[{"text": "caf', ".csv": b"text\ncaf"}
    prefix = head.get(suffix, b"text\ncaf" if suffix == ".tsv" else b"ok\ncaf")
    bad.write_bytes(
        prefix + b"\xe9 au lait" + (b'"}]' if suffix == ".json" else b'"}\n' if suffix == ".jsonl" else b"\n")
    )
    with pytest.raises(UserInputError, match=rf"data.train: {bad}: not UTF-8 .*byte offset {len(prefix)}"):
        load_data(DataSettings(train=str(bad)), OBJECTIVES["causal_lm"], tmp_path / "c")


def test_many_labels_split_stratified(tmp_path: Path) -> None:
    from tasks.objectives.classification import label_names_of

    rows = [{"text": f"row {i} of class {c}", "label": f"class-{c}"} for c in range(200) for i in range(2 + c % 3)]
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ref = load_data(DataSettings(train=str(path), eval_fraction=0.2), OBJECTIVES["classification"], tmp_path / "c")
    train, eval_ = ref.splits()
    assert set(eval_["label"]) <= set(train["label"]) and len(set(train["label"])) == 200
    assert abs(ref.eval_rows - 0.2 * len(rows)) <= 1 and ref.train_rows + ref.eval_rows == len(rows)
    assert set(train["text"]).isdisjoint(eval_["text"])
    assert (
        load_data(
            DataSettings(train=str(path), eval_fraction=0.2), OBJECTIVES["classification"], tmp_path / "d"
        ).splits()[1]["text"]
        == eval_["text"]
    )
    assert len(label_names_of(train, eval_, "label")) == 200


def test_label_lists_in_messages_are_capped(tmp_path: Path) -> None:
    from datasets import Dataset

    from tasks.objectives.classification import label_names_of

    train = Dataset.from_dict({"label": [f"a{i}" for i in range(100)]})
    eval_ = Dataset.from_dict({"label": [f"b{i}" for i in range(100)]})
    with pytest.raises(UserInputError) as caught:
        label_names_of(train, eval_, "label")
    message = str(caught.value)
    assert "… 80 more" in message and message.count("'a") == 20 and message.count("'b") == 20


def test_malformed_json_is_named_with_its_line_before_the_reader_sees_it(tmp_path: Path) -> None:
    lines = tmp_path / "bad.jsonl"
    lines.write_text('{"text": "fine"}\n{"text": "cut\n')
    with pytest.raises(UserInputError, match=r"data.train: .*bad.jsonl: line 2 is not valid JSON"):
        load_data(DataSettings(train=str(lines)), OBJECTIVES["causal_lm"], tmp_path / "cache")
    scalars = tmp_path / "scalars.jsonl"
    scalars.write_text('{"text": "fine"}\n3\n')
    with pytest.raises(UserInputError, match="line 2 is not a JSON object"):
        load_data(DataSettings(train=str(scalars)), OBJECTIVES["causal_lm"], tmp_path / "cache")
    # A .json file may hold one object per line, as pandas writes it.
    per_line = tmp_path / "rows.json"
    per_line.write_text('{"text": "one two three"}\n{"text": "four five six"}\n')
    assert load_data(DataSettings(train=str(per_line)), OBJECTIVES["causal_lm"], tmp_path / "cache").train_rows >= 1


def test_peek_columns_reads_the_first_rows_of_each_format_and_gives_up_quietly(tmp_path: Path) -> None:
    rows = [{"prompt": "p", "chosen": "c"}, {"prompt": "p", "rejected": "r"}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "b.json").write_text(json.dumps(rows))
    pd.DataFrame([{"prompt": "p", "chosen": "c", "rejected": "r"}]).to_csv(tmp_path / "c.csv", index=False)
    pd.DataFrame([{"prompt": "p", "label": True}]).to_parquet(tmp_path / "d.parquet")
    (tmp_path / "e.jsonl").write_text("not json\n")
    assert peek_columns(str(tmp_path / "a.jsonl")) == ["chosen", "prompt", "rejected"]  # the union of the rows'
    assert peek_columns(str(tmp_path / "b.json")) == ["chosen", "prompt", "rejected"]
    assert peek_columns(str(tmp_path / "c.csv")) == ["prompt", "chosen", "rejected"]
    assert peek_columns(str(tmp_path / "d.parquet")) == ["prompt", "label"]
    # Loading names these problems, with the file and line: the peek stays out of its way.
    assert peek_columns(str(tmp_path / "e.jsonl")) is None
    assert peek_columns(str(tmp_path / "missing.jsonl")) is None and peek_columns("org/hub-dataset") is None
