"""Read data files into records, each tagged with where it came from (file and line or index).

Supported: `.json` (an array, or one object holding an array), `.jsonl`, `.csv`, `.parquet`, a folder
of those, or a datasets-hub name. Errors name the file and line so a user can open it there.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import TunelabError

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


@dataclass
class Record:
    data: dict
    source: str  # "file:line 12" or "file[record 3]"


def read_records(spec: str, hub: str = "hf") -> list[Record]:
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES)
        if not files:
            raise TunelabError(f"{path}: folder holds no data file ({', '.join(SUFFIXES)})")
        return [r for f in files for r in _read_file(f)]
    if path.is_file():
        return _read_file(path)
    if _looks_like_hub_name(spec):
        return _read_hub(spec, hub)
    raise TunelabError(f"{spec}: data file not found")


def _looks_like_hub_name(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~")) and Path(spec).suffix == ""


def _read_file(path: Path) -> list[Record]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise TunelabError(f"{path}: unsupported file type '{suffix or '(none)'}'; expected one of {', '.join(SUFFIXES)}")


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TunelabError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    # split on "\n" only: JSON strings may hold U+2028 and friends, which str.splitlines() breaks on
    for lineno, line in enumerate(_text(path).split("\n"), 1):
        if not line.strip():
            continue
        obj = _loads(line, f"{path}:{lineno}")
        if not isinstance(obj, dict):
            raise TunelabError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        records.append(Record(obj, f"{path}:{lineno}"))
    return records


def _loads(text: str, where: str, multiline: bool = False):
    """json.loads, with every way it can fail (syntax, nesting, huge numbers) as one TunelabError at `where`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        line = f":{exc.lineno}" if multiline else ""
        raise TunelabError(f"{where}{line}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise TunelabError(f"{where}: malformed JSON (nested too deeply)") from None
    except ValueError as exc:  # an integer over Python's 4300-digit limit
        raise TunelabError(f"{where}: malformed JSON ({str(exc).split(';')[0]})") from None


def _read_json(path: Path) -> list[Record]:
    obj = _loads(_text(path), str(path), multiline=True)
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise TunelabError(f"{path}: expected a JSON array of records")
        obj = lists[0]
    if not isinstance(obj, list):
        raise TunelabError(f"{path}: expected a JSON array of records, got {type(obj).__name__}")
    records = []
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            raise TunelabError(f"{path}[record {i}]: expected a JSON object, got {type(item).__name__}")
        records.append(Record(item, f"{path}[record {i}]"))
    return records


def _read_csv(path: Path) -> list[Record]:
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # long texts are fine (default cap: 128 KiB)
    reader = csv.DictReader(io.StringIO(_text(path), newline=""))
    records = []
    start = 1
    try:
        reader.fieldnames  # reads the header, so line_num counts it
        start = reader.line_num + 1
        for row in reader:
            if None in row:  # DictReader files surplus values under the key None
                raise TunelabError(f"{path}:{start}: row has {len(reader.fieldnames) + len(row[None])} fields "
                                   f"but the header has {len(reader.fieldnames)}")
            records.append(Record(dict(row), f"{path}:{start}"))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise TunelabError(f"{path}:{start}: malformed CSV ({exc})") from None
    return records


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise TunelabError(f"{path}: cannot read parquet ({exc})") from None
    return [Record(row, f"{path}[row {i}]") for i, row in enumerate(rows)]


def _read_hub(name: str, hub: str) -> list[Record]:
    """A hub dataset's train split; needs network, so a failure is one clear error, not a traceback."""
    try:
        if hub == "modelscope":
            from modelscope.msdatasets import MsDataset

            rows = MsDataset.load(name, split="train").to_hf_dataset()
        else:
            import datasets

            rows = datasets.load_dataset(name, split="train")
    except ImportError as exc:
        raise TunelabError(f"{name}: the {hub} dataset hub needs an extra package ({exc.name}); "
                           f"pip install 'tunelab[{hub}]'") from None
    except Exception as exc:
        raise TunelabError(f"{name}: not a local file and could not be loaded from the {hub} hub "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return [Record(dict(row), f"{name}[row {i}]") for i, row in enumerate(rows)]
