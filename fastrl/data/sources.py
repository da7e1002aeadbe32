"""Checks of ``data.dataset`` that need neither torch nor ``datasets``: the CLI runs them before any heavy
import, ``load_data`` runs them too.

A local file is read once with the standard library (up to ``SCAN_BYTES`` of it; a file that ``datasets``
then fails to read is scanned to its end) so that a malformed one is reported with its line number, which
``datasets`` does not give ("An error occurred while generating the dataset"); an empty one, which
``datasets`` reports as a bare ``StopIteration``, is named as empty.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from fastrl._hub import DATA_SUFFIXES, check_hub_id, looks_local, missing_path

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
SCAN_BYTES = 64 << 20


def check_dataset_source(dataset: str, *, key: str = "data.dataset") -> str:
    """``"file"``, ``"dir"`` or ``"hub"`` for ``dataset``; a ``ValueError`` naming ``key`` when it is a local
    path that does not exist, an unreadable or empty file, or an uncached Hub id while the Hub is down."""
    if not isinstance(dataset, str) or not dataset:
        raise ValueError(f"{key} must name a Hugging Face dataset or a local file or folder, got {dataset!r}")
    path = Path(dataset).expanduser()
    if path.is_file():
        check_data_file(path, key=key)
        return "file"
    if path.is_dir():
        _check_data_dir(path, key)
        return "dir"
    if looks_local(dataset, DATA_SUFFIXES):
        raise missing_path(key, dataset)
    check_hub_id(key, dataset, "dataset")
    return "hub"


def check_data_file(path: Path, *, key: str = "data.dataset", limit: int | None = SCAN_BYTES) -> None:
    """Raise ``ValueError`` (line number included) on a local data file that cannot be a dataset; reads at
    most ``limit`` bytes (None: all)."""
    kind = LOCAL_FORMATS.get(path.suffix.lower())
    name = f"{key} {str(path)!r}"
    if kind is None:
        raise ValueError(f"{name}: local files must end in one of {sorted(LOCAL_FORMATS)}")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{name} is empty (0 bytes)")
    if kind == "parquet":
        _check_parquet(path, name, size)
        return
    with path.open("rb") as f:
        raw = f.read(limit) if limit is not None else f.read()
    complete = limit is None or size <= limit
    if not complete:  # scan whole lines only
        raw = raw[: raw.rfind(b"\n") + 1]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ValueError(f"{name} line {line}: not UTF-8 text ({err.reason})") from None
    if kind == "csv":
        _check_csv(text, name, complete)
    elif path.suffix.lower() == ".json" and text.lstrip()[:1] == "[":
        if complete:  # a document cut at SCAN_BYTES cannot be parsed; datasets' own error covers it
            _check_json_document(text, name)
    elif path.suffix.lower() == ".json" and complete and text.lstrip()[:1] == "{":
        _check_json_document(text, name)
    else:
        _check_json_lines(text, name, complete)


def _check_json_lines(text: str, name: str, complete: bool) -> None:
    records = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{name} line {lineno}: not valid JSON ({err.msg} at column {err.colno})"
            ) from None
        if not isinstance(record, dict):
            raise ValueError(
                f"{name} line {lineno}: each JSON Lines record must be an object {{...}}, got "
                f"{type(record).__name__}"
            )
        records += 1
    if complete and not records:
        raise ValueError(f"{name} has no records (only blank lines)")


def _check_json_document(text: str, name: str) -> None:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # one object per line in a .json file: datasets reads it as JSON Lines
            _check_json_lines(text, name, True)
            return
        raise ValueError(
            f"{name} line {err.lineno}: not valid JSON ({err.msg} at column {err.colno})"
        ) from None
    if isinstance(doc, list):
        bad = next((i for i, r in enumerate(doc) if not isinstance(r, dict)), None)
        if bad is not None:
            raise ValueError(f"{name}: record {bad} must be an object {{...}}, got {type(doc[bad]).__name__}")
        if not doc:
            raise ValueError(f"{name} has no records (an empty list)")
        return
    if isinstance(doc, dict) and len(doc) == 1 and isinstance(next(iter(doc.values())), list):
        _check_json_document(json.dumps(next(iter(doc.values()))), name)  # {"data": [...]}
        return
    if isinstance(doc, dict) and doc and all(isinstance(v, list) for v in doc.values()):
        lengths = {len(v) for v in doc.values()}
        if len(lengths) > 1:
            raise ValueError(f"{name}: its columns have different lengths {sorted(lengths)}")
        if lengths == {0}:
            raise ValueError(f"{name} has no records (empty columns)")
        return
    raise ValueError(f"{name} must hold a list of records, or one record per line (JSON Lines)")


def _check_csv(text: str, name: str, complete: bool) -> None:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next((row for row in reader if row), None)
        if header is None:
            raise ValueError(f"{name} is empty (no header row)")
        rows = 0
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(
                    f"{name} line {reader.line_num}: {len(row)} fields, the header has {len(header)}"
                )
            rows += 1
    except csv.Error as err:
        raise ValueError(f"{name} line {reader.line_num}: not valid CSV ({err})") from None
    if complete and not rows:
        raise ValueError(f"{name} has a header but no rows")


def _check_parquet(path: Path, name: str, size: int) -> None:
    with path.open("rb") as f:
        head = f.read(4)
        f.seek(max(size - 4, 0))
        tail = f.read(4)
    if size < 12 or head != b"PAR1" or tail != b"PAR1":
        raise ValueError(
            f"{name} is not a parquet file (no PAR1 header and footer; truncated or mislabelled?)"
        )
    try:
        import pyarrow.parquet as pq
    except ImportError:
        return
    try:
        rows = pq.read_metadata(str(path)).num_rows
    except Exception as err:  # pyarrow's own errors (ArrowInvalid...) on a corrupt footer
        raise ValueError(f"{name} is not a readable parquet file ({err})") from None
    if rows == 0:
        raise ValueError(f"{name} has no rows")


def _check_data_dir(path: Path, key: str) -> None:
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        return  # written by Dataset.save_to_disk
    for i, f in enumerate(path.rglob("*")):
        if f.is_file() and f.suffix.lower() in LOCAL_FORMATS:
            return
        if i > 10_000:
            return
    raise ValueError(
        f"{key} {str(path)!r} is a folder without data files ({', '.join(sorted(LOCAL_FORMATS))}) and is not "
        "a dataset saved with save_to_disk"
    )
