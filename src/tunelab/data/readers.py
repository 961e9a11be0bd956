"""Read data files into records, each tagged with where it came from (file and line or index).

Supported: `.json` (an array, or one object holding an array), `.jsonl`, `.csv`, `.parquet`, a folder
of those, or a datasets-hub name. Errors name the file and line so a user can open it there.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import TunelabError

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
CHUNK_RECORDS = 1024  # records per chunk: the unit a worker encodes and the progress bar counts


@dataclass
class Record:
    data: dict
    source: str  # "file:line 12" or "file[record 3]"


@dataclass
class Chunk:
    """Consecutive records of one file; JSONL lines stay unparsed so that a worker, not the reader, parses them.

    `where` and `at` say where each record came from without a string per record: record k's source
    is where[0] + str(at[k]) + where[1] (a line number, or an index in the file).
    """

    where: tuple[str, str]
    lines: list[bytes] = field(default_factory=list)  # raw JSONL lines, blank ones included
    first_line: int = 1
    first_byte: int = 0
    records: list[Record] | None = None  # parsed already (JSON, CSV, Parquet, hub)
    at: list[int] = field(default_factory=list)

    def read(self) -> list[Record]:
        if self.records is not None:
            return self.records
        records, self.at = [], []
        byte = self.first_byte
        for lineno, raw in enumerate(self.lines, self.first_line):
            if raw.strip():
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise TunelabError(
                        f"{self.where[0].rstrip(':')}: not UTF-8 text (byte {byte + exc.start})"
                    ) from None
                where = f"{self.where[0]}{lineno}"
                obj = _loads(line, where)
                if not isinstance(obj, dict):
                    raise TunelabError(f"{where}: expected a JSON object, got {type(obj).__name__}")
                records.append(Record(obj, where))
                self.at.append(lineno)
            byte += len(raw)
        return records

    def __len__(self) -> int:
        return len(self.records) if self.records is not None else sum(1 for raw in self.lines if raw.strip())

    def head(self, n: int) -> "Chunk":
        """The chunk cut after its n-th record (blank lines do not count)."""
        if self.records is not None:
            return Chunk(self.where, records=self.records[:n], at=self.at[:n])
        keep, count = [], 0
        for raw in self.lines:
            if count == n:
                break
            keep.append(raw)
            count += bool(raw.strip())
        return Chunk(self.where, keep, self.first_line, self.first_byte)

    def first_record(self) -> Record | None:
        """The chunk's first record, parsing no more than it (format detection needs only that)."""
        if self.records is not None:
            return self.records[0] if self.records else None
        for k, raw in enumerate(self.lines):
            if raw.strip():
                byte = self.first_byte + sum(len(line) for line in self.lines[:k])
                return Chunk(self.where, [raw], self.first_line + k, byte).read()[0]
        return None


def read_records(spec: str, hub: str = "hf") -> list[Record]:
    return [r for chunk in record_chunks(spec, hub) for r in chunk.read()]


def record_chunks(spec: str, hub: str = "hf", size: int | None = None, stream: bool = False) -> Iterator[Chunk]:
    """The records of a file, folder or hub dataset, a chunk at a time. JSONL and Parquet are read lazily;
    a hub dataset too with `stream` (the hub's streaming mode); JSON arrays and CSV are read whole."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES)
        if not files:
            raise TunelabError(f"{path}: folder holds no data file ({', '.join(SUFFIXES)})")
        for f in files:
            yield from _file_chunks(f, size or CHUNK_RECORDS)
    elif path.is_file():
        yield from _file_chunks(path, size or CHUNK_RECORDS)
    elif _looks_like_hub_name(spec):
        yield from _split(_read_hub(spec, hub, stream), (f"{spec}[row ", "]"), size or CHUNK_RECORDS)
    else:
        raise TunelabError(
            f"{spec}: data file not found (looked for {path.resolve()}; a relative path in a YAML config is "
            "looked for next to that file first)"
        )


def count_lines(spec: str) -> int | None:
    """Lines in a JSONL file or folder (a quick upper bound on its records, for the progress bar)."""
    path = Path(spec)
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES) if path.is_dir() else [path]
    if not all(f.is_file() and f.suffix.lower() == ".jsonl" for f in files):
        return None
    total = 0
    for f in files:
        with f.open("rb") as stream:
            total += sum(block.count(b"\n") for block in iter(lambda: stream.read(1 << 22), b""))
    return total


def _file_chunks(path: Path, size: int) -> Iterator[Chunk]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_chunks(path, size)
    elif suffix == ".parquet":
        yield from _split(_parquet_rows(path, size), (f"{path}[row ", "]"), size)
    else:
        where = (f"{path}:", "") if suffix == ".csv" else (f"{path}[record ", "]")
        yield from _split(_read_file(path), where, size)


def _split(records: Iterable[Record], where: tuple[str, str], size: int) -> Iterator[Chunk]:
    records = iter(records)
    while part := list(islice(records, size)):
        yield Chunk(where, records=part, at=[_position(r.source, where) for r in part])


def _position(source: str, where: tuple[str, str]) -> int:
    return int(source[len(where[0]) : len(source) - len(where[1])])


def _jsonl_chunks(path: Path, size: int) -> Iterator[Chunk]:
    # split on "\n" only: JSON strings may hold U+2028 and friends, which str.splitlines() breaks on
    with path.open("rb") as stream:
        lines, first_line, first_byte, byte = [], 1, 0, 0
        for n, raw in enumerate(stream, 1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw, byte, first_byte = raw[3:], 3, 3
            lines.append(raw)
            byte += len(raw)
            if len(lines) >= size:
                yield Chunk((f"{path}:", ""), lines=lines, first_line=first_line, first_byte=first_byte)
                lines, first_line, first_byte = [], n + 1, byte
        if lines:
            yield Chunk((f"{path}:", ""), lines=lines, first_line=first_line, first_byte=first_byte)


def _looks_like_hub_name(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~")) and Path(spec).suffix == ""


def _read_file(path: Path) -> list[Record]:
    suffix = path.suffix.lower()
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


def _loads(text: str, where: str, multiline: bool = False):
    """json.loads, with every way it can fail (syntax, nesting, huge numbers) as one TunelabError at `where`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        body = text.rstrip()
        if exc.pos >= len(body):  # cut short: say where the text ends, not the column after its line break
            last = body.count("\n") + 1
            line = f":{last}" if multiline else ""
            ends = len(body) - (body.rfind("\n") + 1)
            what = "file" if multiline else "line"
            raise TunelabError(
                f"{where}{line}: malformed JSON ({exc.msg}: the {what} ends after column {ends}, before the JSON does)"
            ) from None
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
                assert reader.fieldnames is not None  # a row was read, so the header was
                raise TunelabError(
                    f"{path}:{start}: row has {len(reader.fieldnames) + len(row[None])} fields "
                    f"but the header has {len(reader.fieldnames)}"
                )
            records.append(Record(dict(row), f"{path}:{start}"))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise TunelabError(f"{path}:{start}: malformed CSV ({exc})") from None
    return records


def _read_parquet(path: Path) -> list[Record]:
    return list(_parquet_rows(path, CHUNK_RECORDS))


def _parquet_rows(path: Path, size: int) -> Iterator[Record]:
    """Row batches as they are read, so a file larger than memory never is whole in it."""
    import pyarrow.parquet as pq

    i = 0
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=size)
        for batch in batches:
            for row in batch.to_pylist():
                yield Record(row, f"{path}[row {i}]")
                i += 1
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise TunelabError(f"{path}: cannot read parquet ({exc})") from None


def _read_hub(name: str, hub: str, stream: bool = False) -> Iterator[Record]:
    """A hub dataset's train split, with `stream` in the hub's streaming mode (rows as they download; the
    ModelScope hub loads whole). It needs network, so a failure is one clear error, not a traceback."""
    try:
        if hub == "modelscope":
            from modelscope.msdatasets import MsDataset

            rows = MsDataset.load(name, split="train").to_hf_dataset()
        else:
            import datasets

            rows = datasets.load_dataset(name, split="train", streaming=stream)
    except ImportError as exc:
        raise TunelabError(
            f"{name}: the {hub} dataset hub needs an extra package ({exc.name}); pip install 'tunelab[{hub}]'"
        ) from None
    except Exception as exc:
        raise TunelabError(
            f"{name}: not a local file and could not be loaded from the {hub} hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    return (Record(dict(row), f"{name}[row {i}]") for i, row in enumerate(rows))
