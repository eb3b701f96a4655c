"""Tests for ``common.data``: loading a split from every supported source, and the ``DataError`` messages.

All offline: every dataset is written under ``tmp_path``; the `datasets` cache is redirected there per test and
the one Hub-id path is exercised with a stand-in for ``datasets.load_dataset``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import datasets
import pyarrow as pa
import pytest

from common.cli import UserError, run
from common.data import (
    MAX_REPORTED_PROBLEMS,
    STREAMING_PEEK_ROWS,
    DataError,
    LoadedSplit,
    find_data_files,
    load_and_validate,
    load_split,
    validate_fields,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ROWS = [
    {"question": "What is two plus two?", "response_j": "four", "response_k": "five"},
    {"question": "Capital of France?", "response_j": "Paris", "response_k": "Rome"},
    {"question": "Colour of the sky?", "response_j": "Blue", "response_k": "Green"},
]
FIELDS = ["question", "response_j", "response_k"]


@pytest.fixture(autouse=True)
def _offline_private_cache(tmp_path, monkeypatch):
    """Offline, and a `datasets` cache of this test's own (no stale cache hits, nothing written to $HOME)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "_hf_cache")


# ----------------------------------------------------------------------------------------------- helpers


def write_jsonl(path, rows) -> str:
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def write_text(path, text: str) -> str:
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def write_csv(path, rows) -> str:
    cols = list(rows[0])
    lines = [",".join(cols)] + [",".join(str(r[c]) for c in cols) for r in rows]
    return write_text(path, "\n".join(lines) + "\n")


def as_rows(ds) -> list[dict]:
    return [dict(r) for r in ds]


def raises_data_error(*args, **kwargs) -> str:
    """Run ``load_and_validate(*args, **kwargs)``; return the DataError message (failing if none is raised)."""
    with pytest.raises(DataError) as info:
        loaded = load_and_validate(*args, **kwargs)
        if kwargs.get("streaming"):
            list(loaded.dataset)
    return str(info.value)


# ------------------------------------------------------------------------------------ formats load right


def test_data_error_is_a_user_error():
    assert issubclass(DataError, UserError)


def test_jsonl_file(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    loaded = load_and_validate(path, None, "train", FIELDS)
    assert isinstance(loaded.dataset, datasets.Dataset)
    assert loaded.dataset.num_rows == 3
    assert as_rows(loaded.dataset) == ROWS
    assert path in loaded.source
    assert loaded.file_offsets == [(0, path)]


def test_json_file_with_json_lines(tmp_path):
    path = write_jsonl(tmp_path / "pairs.json", ROWS)
    loaded = load_and_validate(path, None, "train", FIELDS)
    assert as_rows(loaded.dataset) == ROWS


def test_json_file_with_array(tmp_path):
    path = write_text(tmp_path / "pairs.json", json.dumps(ROWS, indent=2))
    loaded = load_and_validate(path, None, "train", FIELDS)
    assert as_rows(loaded.dataset) == ROWS


def test_csv_file(tmp_path):
    path = write_csv(tmp_path / "pairs.csv", ROWS)
    loaded = load_and_validate(path, None, "train", FIELDS)
    assert loaded.dataset.num_rows == 3
    assert as_rows(loaded.dataset) == ROWS


def test_parquet_file(tmp_path):
    path = str(tmp_path / "pairs.parquet")
    datasets.Dataset.from_list(ROWS).to_parquet(path)
    loaded = load_and_validate(path, None, "train", FIELDS)
    assert as_rows(loaded.dataset) == ROWS


def test_arrow_file_from_save_to_disk(tmp_path):
    """A standalone ``.arrow`` file in the format `datasets` writes (``save_to_disk``'s data file)."""
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    path = str(tmp_path / "standalone" / "pairs.arrow")
    os.makedirs(os.path.dirname(path))
    shutil.copy(tmp_path / "saved" / "data-00000-of-00001.arrow", path)
    loaded = load_and_validate(path, None, "train", FIELDS)
    assert as_rows(loaded.dataset) == ROWS
    # ... and found as a data file in a plain folder (no state.json: not a save_to_disk folder).
    loaded = load_and_validate(os.path.dirname(path), None, "train", FIELDS)
    assert as_rows(loaded.dataset) == ROWS


def test_arrow_file_written_by_pyarrow_ipc_stream(tmp_path):
    path = str(tmp_path / "pairs.arrow")
    table = pa.Table.from_pylist(ROWS)
    with pa.ipc.new_stream(path, table.schema) as writer:
        writer.write_table(table)
    assert as_rows(load_and_validate(path, None, "train", FIELDS).dataset) == ROWS


def test_single_file_ignores_data_dir(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    loaded = load_and_validate(path, "data/rl", "train", FIELDS)
    assert as_rows(loaded.dataset) == ROWS


def test_local_folder_with_data_dir(tmp_path):
    write_jsonl(tmp_path / "ds" / "data" / "rl" / "train.jsonl", ROWS[:2])
    write_jsonl(tmp_path / "ds" / "data" / "reward" / "train.jsonl", [ROWS[2]])  # another subset: not read
    loaded = load_and_validate(str(tmp_path / "ds"), "data/rl", "train", FIELDS)
    assert as_rows(loaded.dataset) == ROWS[:2]
    loaded = load_and_validate(str(tmp_path / "ds"), "data/reward", "train", FIELDS)
    assert as_rows(loaded.dataset) == [ROWS[2]]


def test_local_folder_empty_data_dir_means_whole_folder(tmp_path):
    write_jsonl(tmp_path / "ds" / "train.jsonl", ROWS)
    assert load_split(str(tmp_path / "ds"), "", "train").dataset.num_rows == 3


def test_folder_files_are_found_recursively(tmp_path):
    write_jsonl(tmp_path / "ds" / "part1" / "a.jsonl", ROWS[:1])
    write_jsonl(tmp_path / "ds" / "part2" / "deeper" / "b.jsonl", ROWS[1:])
    write_text(tmp_path / "ds" / "README.md", "# not data\n")
    write_jsonl(tmp_path / "ds" / ".hidden" / "c.jsonl", [{"question": None}])  # hidden folders are skipped
    loaded = load_and_validate(str(tmp_path / "ds"), None, "train", FIELDS)
    assert as_rows(loaded.dataset) == ROWS


def test_save_to_disk_dataset(tmp_path):
    folder = str(tmp_path / "saved")
    datasets.Dataset.from_list(ROWS).save_to_disk(folder)
    loaded = load_and_validate(folder, None, "train", FIELDS)
    assert as_rows(loaded.dataset) == ROWS
    assert folder in loaded.source


def test_save_to_disk_dataset_dict_picks_split(tmp_path):
    folder = str(tmp_path / "saved")
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS[:2]), "test": datasets.Dataset.from_list(ROWS[2:])}
    ).save_to_disk(folder)
    assert as_rows(load_and_validate(folder, None, "train", FIELDS).dataset) == ROWS[:2]
    assert as_rows(load_and_validate(folder, None, "test", FIELDS).dataset) == ROWS[2:]
    assert as_rows(load_and_validate(folder, None, "test", FIELDS, streaming=True).dataset) == ROWS[2:]


def test_save_to_disk_folder_under_data_dir(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds" / "data" / "rl"))
    loaded = load_and_validate(str(tmp_path / "ds"), "data/rl", "train", FIELDS)
    assert as_rows(loaded.dataset) == ROWS


@pytest.mark.parametrize("split, expected", [("train", ROWS[:2]), ("test", ROWS[2:])])
def test_split_selection_in_folder(tmp_path, split, expected):
    write_jsonl(tmp_path / "ds" / "train.jsonl", ROWS[:2])
    write_jsonl(tmp_path / "ds" / "test.jsonl", ROWS[2:])
    loaded = load_and_validate(str(tmp_path / "ds"), None, split, FIELDS)
    assert as_rows(loaded.dataset) == expected
    assert f"split '{split}'" in loaded.source


def test_split_selection_by_aliases_and_subfolders(tmp_path):
    write_jsonl(tmp_path / "ds" / "train" / "shard-0.jsonl", ROWS[:1])
    write_jsonl(tmp_path / "ds" / "train" / "shard-1.jsonl", ROWS[1:2])
    write_jsonl(tmp_path / "ds" / "dev.jsonl", ROWS[2:])  # `dev` is a `validation` alias
    root = str(tmp_path / "ds")
    assert as_rows(load_split(root, None, "train").dataset) == ROWS[:2]
    assert as_rows(load_split(root, None, "validation").dataset) == ROWS[2:]
    assert find_data_files(root, "validation") == [os.path.join(root, "dev.jsonl")]


def test_folder_of_several_files_concatenates_rows(tmp_path):
    root = tmp_path / "ds"
    a = write_jsonl(root / "a.jsonl", ROWS[:2])
    b = write_text(root / "b.json", json.dumps(ROWS[2:]))  # a JSON array among JSON-lines files
    c = str(root / "c.parquet")
    datasets.Dataset.from_list(list(reversed(ROWS))).to_parquet(c)
    loaded = load_and_validate(str(root), None, "train", FIELDS)
    assert loaded.dataset.num_rows == 6
    assert as_rows(loaded.dataset) == ROWS[:2] + ROWS[2:] + list(reversed(ROWS))
    assert loaded.file_offsets == [(0, a), (2, b), (3, c)]
    assert loaded.where(0) == f"file {a}, row 1"
    assert loaded.where(2) == f"file {b}, row 1"
    assert loaded.where(5) == f"file {c}, row 3"


def test_folder_of_several_files_bad_row_names_file_and_row_within_it(tmp_path):
    root = tmp_path / "ds"
    write_jsonl(root / "a.jsonl", ROWS)
    b = write_jsonl(root / "b.jsonl", ROWS[:1] + [dict(ROWS[1], response_j=None)] + ROWS[2:])
    msg = raises_data_error(str(root), None, "train", FIELDS)
    assert f"file {b}, row 2: field 'response_j' is null" in msg
    assert "a.jsonl" not in msg
    assert "row 5" not in msg  # the row within b.jsonl, not within the split


def test_folder_of_several_files_bad_row_when_streaming(tmp_path):
    """Streamed, the row is located in its file or (multi-file streams have no per-file offsets) in the split."""
    root = tmp_path / "ds"
    write_jsonl(root / "a.jsonl", ROWS)
    b = write_jsonl(root / "b.jsonl", ROWS[:1] + [dict(ROWS[1], question=None)])
    msg = raises_data_error(str(root), None, "train", FIELDS, streaming=True)
    assert "field 'question' is null" in msg
    assert f"file {b}, row 2" in msg or f"split 'train' of {root}, row 5" in msg


def test_folder_of_files_with_clashing_column_types(tmp_path):
    root = tmp_path / "ds"
    write_jsonl(root / "a.jsonl", ROWS)
    b = write_jsonl(root / "b.jsonl", [dict(ROWS[0], question=7)])
    for streaming in (False, True):
        msg = raises_data_error(str(root), None, "train", FIELDS, streaming=streaming)
        assert f"file {b}" in msg
        assert "question" in msg


def write_format(tmp_path, fmt: str) -> str:
    if fmt == "jsonl":
        return write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    if fmt == "json-array":
        return write_text(tmp_path / "pairs.json", json.dumps(ROWS))
    if fmt == "csv":
        return write_csv(tmp_path / "pairs.csv", ROWS)
    if fmt == "parquet":
        datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "pairs.parquet"))
        return str(tmp_path / "pairs.parquet")
    if fmt == "folder":
        write_jsonl(tmp_path / "ds" / "a.jsonl", ROWS[:1])
        write_jsonl(tmp_path / "ds" / "b.jsonl", ROWS[1:])
        return str(tmp_path / "ds")
    if fmt == "save_to_disk":
        datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
        return str(tmp_path / "saved")
    raise AssertionError(fmt)


@pytest.mark.parametrize("fmt", ["jsonl", "json-array", "csv", "parquet", "folder", "save_to_disk"])
def test_streaming_yields_same_rows(tmp_path, fmt):
    path = write_format(tmp_path, fmt)
    eager = load_and_validate(path, None, "train", FIELDS)
    streamed = load_and_validate(path, None, "train", FIELDS, streaming=True)
    assert isinstance(streamed.dataset, datasets.IterableDataset)
    assert as_rows(streamed.dataset) == as_rows(eager.dataset) == ROWS


def test_hub_id_is_passed_to_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(name, **kwargs):
        calls.append((name, kwargs))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    loaded = load_and_validate("lvwerra/stack-exchange-paired", "data/rl", "train", FIELDS)
    assert calls == [("lvwerra/stack-exchange-paired", {"data_dir": "data/rl", "split": "train", "streaming": False})]
    assert loaded.source == "split 'train' of lvwerra/stack-exchange-paired (data_dir data/rl)"
    assert loaded.where(1) == "split 'train' of lvwerra/stack-exchange-paired (data_dir data/rl), row 2"


def test_hub_failure_is_a_data_error_with_local_folder_hint(tmp_path, monkeypatch):
    def failing_load_dataset(name, **kwargs):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (offline)\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", failing_load_dataset)
    monkeypatch.chdir(tmp_path)
    os.makedirs("data/rl")
    with pytest.raises(DataError) as info:
        load_split("someone/some-dataset", "data/rl", "train")
    msg = str(info.value)
    assert "split 'train' of someone/some-dataset (data_dir data/rl)" in msg
    assert "ConnectionError" in msg and "second line" not in msg
    assert "--dataset_name ." in msg


# ------------------------------------------------------------------------------------------- bad inputs


def test_missing_field_lists_columns_found(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    msg = raises_data_error(path, None, "train", ["prompt", "question"])
    assert path in msg
    assert "missing field 'question'" in msg
    assert "columns found: prompt, chosen, rejected" in msg


def test_several_missing_fields(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p"}])
    msg = raises_data_error(path, None, "train", ["question", "response_j"])
    assert "missing fields 'question', 'response_j'" in msg
    assert "columns found: prompt" in msg


def test_missing_field_when_streaming(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "c"}] * 3)
    msg = raises_data_error(path, None, "train", ["question"], streaming=True)
    assert path in msg and "missing field 'question'" in msg and "columns found: prompt, chosen" in msg


def test_missing_field_in_save_to_disk_folder(tmp_path):
    folder = str(tmp_path / "saved")
    datasets.Dataset.from_dict({"text": ["a"]}).save_to_disk(folder)
    msg = raises_data_error(folder, None, "train", ["question"])
    assert folder in msg and "missing field 'question'" in msg and "columns found: text" in msg


@pytest.mark.parametrize(
    "value, problem",
    [
        (None, "field 'response_k' is null"),
        (3, "field 'response_k' is a int, not a string"),
        (2.5, "field 'response_k' is a float, not a string"),
        ("", "field 'response_k' is an empty string"),
        ("   \t ", "field 'response_k' is an empty string"),
    ],
    ids=["null", "int", "float", "empty", "whitespace"],
)
def test_bad_value_names_file_row_and_field(tmp_path, value, problem):
    rows = [dict(r) for r in ROWS]
    rows[1]["response_k"] = value
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    msg = raises_data_error(path, None, "train", FIELDS)
    assert f"file {path}, row 2: {problem}" in msg
    assert msg.startswith(f"1 invalid value in file {path}")


def test_int_column_in_csv(tmp_path):
    path = write_text(tmp_path / "pairs.csv", "question,answer\n1,a\n2,b\n")
    msg = raises_data_error(path, None, "train", ["question", "answer"])
    assert msg.startswith(f"2 invalid values in file {path}:")
    assert f"file {path}, row 1: field 'question' is a int, not a string" in msg
    assert f"file {path}, row 2: field 'question' is a int, not a string" in msg
    assert "answer" not in msg


def test_numbers_among_strings_in_csv_are_strings(tmp_path):
    """CSV has no types: a column with any text is read as text, "1" included (not an error)."""
    path = write_text(tmp_path / "pairs.csv", "question,answer\n1,a\nhello,b\n")
    loaded = load_and_validate(path, None, "train", ["question", "answer"])
    assert loaded.dataset["question"] == ["1", "hello"]


def test_bad_value_in_save_to_disk_split_names_split_and_row(tmp_path):
    folder = str(tmp_path / "saved")
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"question": ["a", "b", None]})}).save_to_disk(folder)
    msg = raises_data_error(folder, None, "test", ["question"])
    assert f"split 'test' of {folder}, row 3: field 'question' is null" in msg


def test_several_problems_are_reported_at_once(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[0]["question"] = ""
    rows[1]["response_j"] = None
    rows[2]["response_k"] = 5
    rows[2]["question"] = " "
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    msg = raises_data_error(path, None, "train", FIELDS)
    assert msg.startswith(f"4 invalid values in file {path}:")
    assert "row 1: field 'question' is an empty string" in msg
    assert "row 2: field 'response_j' is null" in msg
    assert "row 3: field 'question' is an empty string" in msg
    assert "row 3: field 'response_k' is a int, not a string" in msg
    assert "more" not in msg


def test_many_problems_are_capped_with_a_count(tmp_path):
    n_bad = MAX_REPORTED_PROBLEMS + 5
    rows = [{"question": None} for _ in range(n_bad)] + [{"question": "fine"}]
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    msg = raises_data_error(path, None, "train", ["question"])
    assert msg.startswith(f"{n_bad} invalid values in file {path}:")
    assert msg.count("is null") == MAX_REPORTED_PROBLEMS
    assert f"row {MAX_REPORTED_PROBLEMS}:" in msg and f"row {MAX_REPORTED_PROBLEMS + 1}:" not in msg
    assert msg.endswith("... and 5 more")


def test_corrupt_json_line_names_file_and_line(tmp_path):
    path = write_text(
        tmp_path / "pairs.jsonl",
        json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n" + '{"question": "broken", \n'
        + json.dumps(ROWS[2]) + "\n",
    )
    msg = raises_data_error(path, None, "train", FIELDS)
    assert f"file {path}, line 3" in msg
    assert "corrupt JSON" in msg


def test_corrupt_json_line_in_folder_names_that_file(tmp_path):
    write_jsonl(tmp_path / "ds" / "a.jsonl", ROWS)
    b = write_text(tmp_path / "ds" / "b.jsonl", json.dumps(ROWS[0]) + "\nnot json at all\n")
    msg = raises_data_error(str(tmp_path / "ds"), None, "train", FIELDS)
    assert f"file {b}, line 2" in msg


def test_json_line_that_is_not_an_object(tmp_path):
    path = write_text(tmp_path / "pairs.jsonl", json.dumps(ROWS[0]) + "\n[1, 2]\n")
    msg = raises_data_error(path, None, "train", FIELDS)
    assert f"file {path}, line 2" in msg and "expected a JSON object" in msg


def test_corrupt_json_array(tmp_path):
    path = write_text(tmp_path / "pairs.json", '[\n  {"question": "a"},\n  {"question": }\n]\n')
    msg = raises_data_error(path, None, "train", ["question"])
    assert f"file {path} is not valid JSON (line 3" in msg


@pytest.mark.parametrize("name, text", [("e.jsonl", ""), ("e.csv", ""), ("e.json", "  \n\n ")])
def test_empty_file(tmp_path, name, text):
    path = write_text(tmp_path / name, text)
    msg = raises_data_error(path, None, "train", ["question"])
    assert path in msg
    assert "empty" in msg


def test_empty_file_in_folder_is_named(tmp_path):
    write_jsonl(tmp_path / "ds" / "a.jsonl", ROWS)
    b = write_text(tmp_path / "ds" / "b.jsonl", "")
    msg = raises_data_error(str(tmp_path / "ds"), None, "train", FIELDS)
    assert f"file {b} is empty" in msg


def test_csv_with_header_only_is_an_error(tmp_path):
    path = write_text(tmp_path / "pairs.csv", "question,answer\n")
    msg = raises_data_error(path, None, "train", ["question"])
    assert path in msg


@pytest.mark.parametrize("contents", [[], ["README.md", "notes.txt"]], ids=["empty", "no-data-files"])
def test_folder_without_data_files(tmp_path, contents):
    root = tmp_path / "ds"
    root.mkdir()
    for name in contents:
        write_text(root / name, "hello\n")
    msg = raises_data_error(str(root), None, "train", FIELDS)
    assert "no data files" in msg and str(root) in msg
    for ext in (".jsonl", ".json", ".csv", ".parquet", ".arrow"):
        assert ext in msg


@pytest.mark.parametrize("kind", ["file", "folder", "relative"])
def test_path_that_does_not_exist(tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    name = {"file": str(tmp_path / "missing.jsonl"), "folder": str(tmp_path / "missing" / "dir"),
            "relative": "data/rl/x"}[kind]
    msg = raises_data_error(name, None, "train", FIELDS)
    assert name in msg and "no such file or folder" in msg


def test_data_dir_that_does_not_exist(tmp_path):
    write_jsonl(tmp_path / "ds" / "data" / "rl" / "train.jsonl", ROWS)
    msg = raises_data_error(str(tmp_path / "ds"), "data/reward", "train", FIELDS)
    assert os.path.join(str(tmp_path / "ds"), "data/reward") in msg
    assert "does not exist" in msg


def test_unknown_split_in_folder(tmp_path):
    write_jsonl(tmp_path / "ds" / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "ds" / "test.jsonl", ROWS)
    msg = raises_data_error(str(tmp_path / "ds"), None, "validation", FIELDS)
    assert "split 'validation' not found" in msg
    assert str(tmp_path / "ds") in msg
    assert "splits found: test, train" in msg


def test_split_other_than_train_in_folder_without_split_names(tmp_path):
    write_jsonl(tmp_path / "ds" / "pairs.jsonl", ROWS)
    msg = raises_data_error(str(tmp_path / "ds"), None, "test", FIELDS)
    assert "split 'test' not found" in msg and "splits found: train" in msg


def test_unknown_split_in_save_to_disk_dataset_dict(tmp_path):
    folder = str(tmp_path / "saved")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(folder)
    msg = raises_data_error(folder, None, "test", FIELDS)
    assert f"split 'test' not found in {folder}" in msg and "splits found: train" in msg


def test_streaming_bad_row_in_peek_is_raised_up_front(tmp_path):
    rows = [{"question": f"q{i}"} for i in range(50)]
    rows[41]["question"] = None
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_and_validate(path, None, "train", ["question"], streaming=True)  # no iteration needed
    assert f"file {path}, row 42: field 'question' is null" in str(info.value)


def test_streaming_bad_row_past_the_peek_raises_while_iterating(tmp_path):
    n, bad = STREAMING_PEEK_ROWS + 500, STREAMING_PEEK_ROWS + 200  # 0-based index of the bad row
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(n)]
    rows[bad]["answer"] = 12
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    loaded = load_and_validate(path, None, "train", ["question", "answer"], streaming=True)  # peek is clean
    seen = []
    with pytest.raises(DataError) as info:
        for row in loaded.dataset:
            seen.append(row)
    assert len(seen) == bad  # every good row before it was yielded, in order
    assert seen[-1] == {"question": f"q{bad - 1}", "answer": f"a{bad - 1}"}
    assert str(info.value) == f"file {path}, row {bad + 1}: field 'answer' is a int, not a string"


def test_streaming_clean_file_past_the_peek_yields_every_row(tmp_path):
    n = STREAMING_PEEK_ROWS + 10
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": f"q{i}"} for i in range(n)])
    rows = list(load_and_validate(path, None, "train", ["question"], streaming=True).dataset)
    assert len(rows) == n and rows[-1] == {"question": f"q{n - 1}"}


def test_validate_fields_on_empty_dataset(tmp_path):
    loaded = LoadedSplit(datasets.Dataset.from_dict({"question": []}), "split 'train' of somewhere")
    with pytest.raises(DataError, match=r"^split 'train' of somewhere has no rows$"):
        validate_fields(loaded, ["question"])


# ------------------------------------------------------------------------------------ scripts' behaviour


def test_run_turns_data_error_into_exit_status_2(tmp_path, capsys):
    missing = str(tmp_path / "missing.jsonl")
    with pytest.raises(SystemExit) as info:
        run(load_and_validate, missing, None, "train", ["question"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: --dataset_name {missing}: no such file or folder\n"


def test_script_exit_status_and_one_line_error(tmp_path):
    missing = str(tmp_path / "no" / "such" / "pairs.jsonl")
    code = (
        "from common.cli import run; from common.data import load_and_validate; "
        f"run(lambda: load_and_validate({missing!r}, None, 'train', ['question']))"
    )
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "_hf_cache"))
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:")
    assert missing in lines[0]
    assert proc.stdout == ""
