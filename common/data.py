"""Dataset loading and validation shared by every stage.

``load_split(name, data_dir, split)`` behaves like ``datasets.load_dataset(name, data_dir=data_dir, split=split)``
for a Hub id, and extends it to what people actually pass on the command line: a local folder (json, jsonl,
csv, parquet or arrow files, searched recursively under ``data_dir``), a single file, or a ``save_to_disk``
folder. ``validate_fields`` then checks, before any model is loaded, that every row has the string fields a
stage needs. Every problem is a ``DataError`` naming the file or split, the row and the field, which the
scripts print as one line and exit non-zero (see ``common.cli.run``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import datasets

from common.cli import UserError

DATA_EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
# The names `datasets` recognises for split files and folders (a subset of its own patterns).
SPLIT_NAMES = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing", "eval", "evaluation"),
}
MAX_REPORTED_PROBLEMS = 10
STREAMING_PEEK_ROWS = 1000


class DataError(UserError):
    """A problem with the user's data: printed as one message, no traceback."""


@dataclass
class LoadedSplit:
    """A loaded split and where its rows come from, so errors can name a file and a row."""

    dataset: datasets.Dataset | datasets.IterableDataset
    source: str  # human-readable: "split 'train' of lvwerra/stack-exchange-paired (data_dir data/rl)"
    # For local multi-file loads: (first row index, file) per file, in row order.
    file_offsets: list[tuple[int, str]] | None = None

    def where(self, row: int) -> str:
        """`file F, row R` (1-based within the file) or `S, row R` (1-based within the split)."""
        if self.file_offsets:
            start, path = max((o for o in self.file_offsets if o[0] <= row), key=lambda o: o[0])
            return f"file {path}, row {row - start + 1}"
        return f"{self.source}, row {row + 1}"


def _is_save_to_disk_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or (
        os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json"))
    )


def _looks_like_hub_id(name: str) -> bool:
    return (bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name))
            and os.path.splitext(name)[1] not in DATA_EXTENSIONS)


def _split_of(relpath: str) -> str | None:
    """Which split a file belongs to by its name or folder, as `datasets` infers it; None if it names none."""
    parts = relpath.replace(os.sep, "/").split("/")
    names = [p.lower() for p in parts[:-1]] + [re.split(r"[-_.]", parts[-1].lower())[0]]
    for split, aliases in SPLIT_NAMES.items():
        if any(n in aliases for n in names):
            return split
    return None


def find_data_files(root: str, split: str) -> list[str]:
    """Data files of ``split`` under ``root``: those named for the split, or all files if none is named."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if os.path.splitext(f)[1].lower() in DATA_EXTENSIONS and not f.startswith("."):
                found.append(os.path.join(dirpath, f))
    if not found:
        raise DataError(f"no data files ({', '.join(sorted(DATA_EXTENSIONS))}) found under {root}")
    by_split = {f: _split_of(os.path.relpath(f, root)) for f in found}
    if all(s is None for s in by_split.values()):
        by_split = {f: "train" for f in found}  # no split names at all: everything is `train`, as in `datasets`
    base_split = split.split("[")[0]
    files = [f for f, s in by_split.items() if s == base_split]
    if not files:
        available = sorted({s for s in by_split.values() if s})
        raise DataError(f"split '{base_split}' not found under {root}; splits found: {', '.join(available)}")
    return files


def _diagnose_json_file(path: str) -> str | None:
    """The first structural problem in a JSON/JSONL file, for errors `datasets` reports without a location."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if not text.strip():
        return f"file {path} is empty"
    if path.endswith(".json") and text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return f"file {path} is not valid JSON (line {e.lineno}: {e.msg})"
        return None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            return f"file {path}, line {lineno}: corrupt JSON ({e.msg}): {line[:80]!r}"
        if not isinstance(obj, dict):
            return f"file {path}, line {lineno}: expected a JSON object per line, found {type(obj).__name__}"
    return None


def _load_file(path: str, streaming: bool):
    builder = DATA_EXTENSIONS[os.path.splitext(path)[1].lower()]
    if os.path.getsize(path) == 0:
        raise DataError(f"file {path} is empty")
    try:
        return datasets.load_dataset(builder, data_files=path, split="train", streaming=streaming)
    except (Exception, StopIteration) as e:  # `datasets` raises many types, StopIteration on empty files
        detail = _diagnose_json_file(path) if builder == "json" else None
        raise DataError(detail or f"could not read {path}: {type(e).__name__}: {e}") from e


def _concatenate(parts: list, files: list[str], root: str):
    """``concatenate_datasets``, with a ``DataError`` naming the first file whose column types clash."""
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError:
        acc = parts[0]
        for f, part in zip(files[1:], parts[1:]):
            try:
                acc = datasets.concatenate_datasets([acc, part])
            except ValueError as e:
                raise DataError(f"file {f}: column types do not match those of the files before it under {root}: "
                                f"{str(e).splitlines()[0]}") from e
        raise


def load_split(dataset_name: str, data_dir: str | None = None, split: str = "train",
               streaming: bool = False) -> LoadedSplit:
    """Load one split as ``datasets.load_dataset(dataset_name, data_dir=data_dir, split=split)`` would.

    ``dataset_name`` may be a Hub id, a local folder (``data_dir`` is a sub-folder of it), a single data file
    (``data_dir`` is ignored), or a folder written by ``save_to_disk``.
    """
    data_dir = data_dir or None
    if os.path.exists(dataset_name):
        root = os.path.join(dataset_name, data_dir) if (data_dir and os.path.isdir(dataset_name)) else dataset_name
        if not os.path.exists(root):
            raise DataError(f"data folder {root} does not exist (from --dataset_name {dataset_name} and "
                            f"--subset/data_dir {data_dir})")
        if os.path.isfile(root):
            return LoadedSplit(_load_file(root, streaming), f"file {root}", [(0, root)])
        if _is_save_to_disk_folder(root):
            loaded = datasets.load_from_disk(root)
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(f"split '{split}' not found in {root}; splits found: {', '.join(loaded)}")
                loaded = loaded[split]
            if streaming:
                loaded = loaded.to_iterable_dataset()
            return LoadedSplit(loaded, f"split '{split}' of {root}")
        files = find_data_files(root, split)
        parts = [_load_file(f, streaming) for f in files]
        if streaming:
            ds = parts[0] if len(parts) == 1 else _concatenate(parts, files, root)
            return LoadedSplit(ds, f"split '{split}' of {root}", [(0, files[0])] if len(files) == 1 else None)
        offsets, start = [], 0
        for f, part in zip(files, parts):
            offsets.append((start, f))
            start += len(part)
        ds = parts[0] if len(parts) == 1 else _concatenate(parts, files, root)
        return LoadedSplit(ds, f"split '{split}' of {root}", offsets)
    if not _looks_like_hub_id(dataset_name):
        raise DataError(f"--dataset_name {dataset_name}: no such file or folder")
    source = f"split '{split}' of {dataset_name}" + (f" (data_dir {data_dir})" if data_dir else "")
    try:
        ds = datasets.load_dataset(dataset_name, data_dir=data_dir, split=split, streaming=streaming)
    except Exception as e:  # network, auth, unknown split: all reported as one line
        hint = ""
        if data_dir and os.path.isdir(data_dir):
            hint = f" (a local folder {data_dir} exists: pass --dataset_name . to use it)"
        raise DataError(f"could not load {source}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}{hint}") from e
    return LoadedSplit(ds, source)


def str_problem(value, field: str) -> str | None:
    """What is wrong with a required string value (null, not a string, empty), or None."""
    if value is None:
        return f"field '{field}' is null"
    if not isinstance(value, str):
        return f"field '{field}' is a {type(value).__name__}, not a string"
    if not value.strip():
        return f"field '{field}' is an empty string"
    return None


def check_row(row: dict, fields: list[str]) -> list[str]:
    """Problems of one row (as dict) for the required string ``fields``."""
    return [p for f in fields if (p := str_problem(row.get(f), f))]


RowCheck = Callable[[dict], list[str]]


def validate_rows(loaded: LoadedSplit, fields: list[str], check: RowCheck | None = None) -> None:
    """Raise one ``DataError`` listing every (first few) problem of the rows: the ``fields`` must be columns, and
    ``check(row)`` (default: each field a non-empty string) must find nothing in a row of those fields.

    A map-style dataset is checked whole; a streamed one on its first rows here and on every later row as it
    is read (see ``checked_stream``).
    """
    check = check or (lambda row: check_row(row, fields))
    ds = loaded.dataset
    columns = list(ds.column_names or []) if ds.column_names is not None else None
    if columns is None and isinstance(ds, datasets.IterableDataset):
        first = next(iter(ds.take(1)), None)
        columns = list(first) if first else []
    missing = [f for f in fields if f not in columns]
    if missing:
        raise DataError(
            f"{loaded.source}: missing field{'s' if len(missing) > 1 else ''} {', '.join(repr(m) for m in missing)}; "
            f"columns found: {', '.join(columns) or '(none)'}"
        )
    problems, count, n_rows = [], 0, 0
    rows = ds.take(STREAMING_PEEK_ROWS) if isinstance(ds, datasets.IterableDataset) else ds.select_columns(fields)
    for batch in rows.iter(batch_size=4096):
        n = len(batch[fields[0]])
        for i in range(n):
            for p in check({f: batch[f][i] for f in fields}):
                count += 1
                if len(problems) < MAX_REPORTED_PROBLEMS:
                    problems.append(f"{loaded.where(n_rows + i)}: {p}")
        n_rows += n
    if n_rows == 0:
        raise DataError(f"{loaded.source} has no rows")
    if problems:
        more = f"\n  ... and {count - len(problems)} more" if count > len(problems) else ""
        raise DataError(f"{count} invalid value{'s' if count > 1 else ''} in {loaded.source}:\n  "
                        + "\n  ".join(problems) + more)


def validate_fields(loaded: LoadedSplit, fields: list[str]) -> None:
    """``validate_rows`` for required string ``fields``."""
    validate_rows(loaded, fields)


def checked_stream(loaded: LoadedSplit, fields: list[str], check: RowCheck | None = None) -> datasets.IterableDataset:
    """A streamed split that raises ``DataError`` on the first bad row past the validated peek."""
    check = check or (lambda row: check_row(row, fields))

    def checked(row, idx):
        problems = check(row)
        if problems:
            raise DataError(f"{loaded.where(idx)}: {problems[0]}")
        return row

    return loaded.dataset.map(checked, with_indices=True)


def load_and_validate(dataset_name: str, data_dir: str | None, split: str, fields: list[str],
                      streaming: bool = False) -> LoadedSplit:
    """``load_split`` + ``validate_fields``: the one call a stage makes before loading any model."""
    loaded = load_split(dataset_name, data_dir, split, streaming)
    validate_fields(loaded, fields)
    if streaming:
        loaded.dataset = checked_stream(loaded, fields)
    return loaded
