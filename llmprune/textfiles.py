"""Local text files -> documents: .txt (blank-line separated blocks), .jsonl/.json records with a
text field, .parquet columns, and directories of .txt files (optionally train/ test/ validation/)."""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from .errors import UsageError

logger = logging.getLogger(__name__)

_SPLIT_ALIASES = {"train": "train", "test": "test", "eval": "test", "validation": "validation",
                  "valid": "validation", "val": "validation", "dev": "validation"}
_FIELD_FIX = "choose one with text_field=NAME (recipe key calibration.text_field)"
_LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


class DataError(UsageError):
    """A problem with calibration/evaluation data; the message names the problem and the fix."""


def read_local(path: Path, split: str, text_field: str) -> tuple[list[str], str, str, str]:
    """Documents of a local file or directory, with the path actually read, the split recorded
    ("all" unless a split subfolder was used) and the text field used ("-" for plain text)."""
    if path.is_dir():
        used, docs = _read_dir(path, split)
        return docs, str(used), (used.name if used != path else "all"), "-"
    suffix = path.suffix.lower()
    if suffix == ".txt":
        docs, text_field = _paragraphs(_read_text(path)), "-"
    elif suffix == ".jsonl":
        docs = _from_records(_read_jsonl(path), text_field, path)
    elif suffix == ".json":
        docs = _read_json(path, text_field)
    elif suffix == ".parquet":
        docs = _read_parquet(path, text_field)
    else:
        raise DataError(f"unsupported data file type {path.name!r}; use one of "
                        f"{', '.join(_LOCAL_SUFFIXES)} or a directory of .txt files")
    logger.debug("data: split %r ignored for local file %s", split, path)
    return docs, str(path), "all", text_field


def _read_dir(root: Path, split: str) -> tuple[Path, list[str]]:
    wanted = _SPLIT_ALIASES.get(split.lower(), split.lower())
    subdirs = ("train",) if wanted == "train" else ("test", "validation")
    for candidate in [root / s for s in subdirs] + [root]:
        files = sorted(candidate.glob("*.txt")) if candidate.is_dir() else []
        if files:
            return candidate, [_read_text(f) for f in files]
    raise DataError(f"directory {str(root)!r} contains no .txt files (looked in "
                    f"{', '.join(s + '/' for s in subdirs)} and the directory itself); "
                    f"add .txt files or pass a .txt/.jsonl/.json/.parquet file")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start}); "
                        f"re-encode it as UTF-8") from None


def _paragraphs(text: str) -> list[str]:
    """Blank-line separated blocks (a line holding only spaces/tabs counts as blank)."""
    return [b.strip("\r\n") for b in re.split(r"\r?\n(?:[ \t]*\r?\n)+", text)]


def _read_jsonl(path: Path) -> Iterator[Any]:
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}); fix the line or remove "
                                f"it (each line of a .jsonl file must be one JSON object)") from None


def _read_json(path: Path, text_field: str) -> list[str]:
    try:
        obj = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines saved as .json
            return _from_records(_read_jsonl(path), text_field, path)
        raise DataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}); fix the file") from None
    if isinstance(obj, dict) and len(lists := [v for v in obj.values() if isinstance(v, list)]) == 1:
        obj = lists[0]  # {"data": [records...], "version": ...}
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a list of records with a {text_field!r} field, got "
                        f"{type(obj).__name__}; reshape the file or use .jsonl")
    return _from_records(obj, text_field, path)


def _from_records(records: Iterator[Any] | Sequence[Any], text_field: str, path: Path) -> list[str]:
    texts = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: record {i} is a {type(rec).__name__}, not an object; every "
                            f"record must be an object with a {text_field!r} field")
        if text_field not in rec:
            raise DataError(f"{path}: record {i} has no field {text_field!r}; available fields: "
                            f"{', '.join(sorted(rec)) or '(none)'}; {_FIELD_FIX}")
        texts.append(_as_text(rec[text_field], f"{path}: record {i} field {text_field!r}"))
    return texts


def _read_parquet(path: Path, text_field: str) -> list[str]:
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    if text_field not in names:
        raise DataError(f"{path}: no column {text_field!r}; available columns: {', '.join(names)}; "
                        f"{_FIELD_FIX}")
    values = pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
    return [_as_text(v, f"{path}: row {i} column {text_field!r}") for i, v in enumerate(values)]


def _as_text(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where} is a {type(value).__name__}, not text; choose a text field")
    return value


__all__ = ["DataError", "read_local"]
