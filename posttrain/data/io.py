"""Read and write datasets: jsonl, parquet, a saved Hugging Face dataset folder, or a
dataset name in the local Hugging Face cache. Every problem names the file and line."""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Sequence

from posttrain.errors import DataError


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Rows of a jsonl file; a malformed line is an error naming the file and line."""
    if not os.path.exists(path):
        raise DataError(f"data file {path!r} does not exist; set data.path to a jsonl, parquet or dataset folder")
    rows = []
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}, line {lineno}: not valid JSON ({e.msg} at column {e.colno}); fix or remove the line") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}, line {lineno}: expected a JSON object per line, got {type(row).__name__}")
                row["_line"] = lineno
                rows.append(row)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
    if not rows:
        raise DataError(f"data file {path!r} is empty; it needs one JSON object per line")
    return rows


def check_unique_ids(rows: Sequence[dict], path: str, field: str = "id") -> list[dict]:
    """``rows`` unchanged, or a DataError naming both lines when two rows share an ``id``
    (a copy-pasted or twice-merged sample would count twice and leak between splits)."""
    first: dict[str, Any] = {}
    for row in rows:
        if field not in row or row[field] is None:
            continue
        key = json.dumps(row[field], sort_keys=True, default=str)
        if key in first:
            raise DataError(
                f"{path}, line {row.get('_line', '?')}: duplicate {field} {row[field]!r} (first on line {first[key]}); "
                "give every row its own id or remove the repeated row"
            )
        first[key] = row.get("_line", "?")
    return rows


def load_rows(path: str) -> list[dict[str, Any]]:
    """Rows from a jsonl / json / parquet file, a saved dataset folder, or a cached hub dataset;
    rows carrying an ``id`` must have distinct ones."""
    return check_unique_ids(_load_rows(path), path)


def _load_rows(path: str) -> list[dict[str, Any]]:
    if path.endswith(".jsonl"):
        return read_jsonl(path)
    if path.endswith(".json"):
        if not os.path.exists(path):
            raise DataError(f"data file {path!r} does not exist")
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataError(f"{path}: expected a JSON list of objects")
        return [dict(r, _line=i + 1) for i, r in enumerate(data)]
    if path.endswith(".parquet"):
        if not os.path.exists(path):
            raise DataError(f"data file {path!r} does not exist")
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise DataError(f"{path}: cannot read parquet: {e}") from None
        return [dict(r, _line=i + 1) for i, r in enumerate(table.to_pylist())]
    if os.path.isdir(path):
        import datasets

        try:
            ds = datasets.load_from_disk(path)
        except Exception as e:
            raise DataError(f"{path}: not a saved Hugging Face dataset ({e}); give a jsonl, parquet or dataset folder") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        return [dict(r, _line=i + 1) for i, r in enumerate(ds)]
    if os.path.exists(path):
        raise DataError(f"{path}: unknown data format; use .jsonl, .json, .parquet or a dataset folder")
    if "/" in path and not path.startswith((".", "/")):
        import datasets

        try:
            ds = datasets.load_dataset(path, split="train", download_mode="reuse_cache_if_exists")
        except Exception as e:
            raise DataError(
                f"dataset {path!r} is not a local file and could not be loaded from the local Hugging Face cache "
                f"({type(e).__name__}); download it on a machine with network access first"
            ) from None
        return [dict(r, _line=i + 1) for i, r in enumerate(ds)]
    raise DataError(f"data file {path!r} does not exist; set data.path to a jsonl, parquet or dataset folder")


def require_fields(rows: Sequence[dict], fields: Iterable[str], path: str) -> None:
    """Every row has every field, as a non-empty string; else an error naming the line."""
    for row in rows:
        for name in fields:
            value = row.get(name)
            where = f"{path}, line {row.get('_line', '?')}"
            if value is None:
                raise DataError(f"{where}: missing field {name!r}")
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}: field {name!r} must be a non-empty string, got {value!r}")


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    """Write rows atomically (temp file, then rename), dropping bookkeeping fields."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps({k: v for k, v in row.items() if not k.startswith("_")}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise DataError(f"cannot write {path}: {e.strerror or e}; choose a writable path with free space") from None
