"""Data files become records tagged with their source; every bad file is one TunelabError naming file and line."""

import json

import pytest

from tunelab.data.readers import Record, read_records
from tunelab.errors import TunelabError

pytestmark = pytest.mark.fast  # a pure unit: `make test-fast` runs it


def data_of(records):
    return [r.data for r in records]


def error_of(spec) -> str:
    with pytest.raises(TunelabError) as info:
        read_records(str(spec))
    return str(info.value)


# --- formats ------------------------------------------------------------------------------------------------


def test_json_array_records_carry_their_index(write_data):
    path = write_data("train.json", [{"text": "a"}, {"text": "b", "n": 2}])
    records = read_records(path)
    assert records == [Record({"text": "a"}, f"{path}[record 0]"), Record({"text": "b", "n": 2}, f"{path}[record 1]")]


def test_json_object_holding_one_array_is_read_as_that_array(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"version": "1", "data": [{"text": "a"}, {"text": "b"}]}), encoding="utf-8")
    assert data_of(read_records(str(path))) == [{"text": "a"}, {"text": "b"}]


def test_json_object_with_no_single_array_is_an_error(tmp_path):
    path = tmp_path / "two.json"
    path.write_text(json.dumps({"train": [{"text": "a"}], "test": [{"text": "b"}]}), encoding="utf-8")
    assert error_of(path) == f"{path}: expected a JSON array of records"


def test_json_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"text": "a"}]).encode())
    assert data_of(read_records(str(path))) == [{"text": "a"}]


def test_jsonl_skips_blank_lines_and_sources_carry_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n\n   \n{"text": "b"}\r\n{"text": "c"}', encoding="utf-8")
    records = read_records(str(path))
    assert data_of(records) == [{"text": "a"}, {"text": "b"}, {"text": "c"}]
    assert [r.source for r in records] == [f"{path}:1", f"{path}:4", f"{path}:5"]


def test_jsonl_keeps_non_ascii_text(write_data):
    path = write_data("zh.jsonl", [{"text": "你好，世界"}])
    assert data_of(read_records(path)) == [{"text": "你好，世界"}]


def test_jsonl_line_separator_characters_inside_strings_stay_in_the_string(write_data):
    rows = [{"text": "one\u2028two"}, {"text": "three\u2029four"}, {"text": "five\x85six"}]
    path = write_data("seps.jsonl", rows)  # json.dumps(ensure_ascii=False) writes these characters raw
    assert data_of(read_records(path)) == rows


def test_csv_rows_become_string_records_with_line_numbers(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('instruction,output\nSay hi,hi\n"a, b",2\n', encoding="utf-8")
    records = read_records(str(path))
    assert data_of(records) == [{"instruction": "Say hi", "output": "hi"}, {"instruction": "a, b", "output": "2"}]
    assert [r.source for r in records] == [f"{path}:2", f"{path}:3"]


def test_csv_quoted_field_keeps_its_newline(tmp_path):
    path = tmp_path / "multi.csv"
    path.write_text('instruction,output\n"line1\nline2",ok\n', encoding="utf-8", newline="")
    assert data_of(read_records(str(path))) == [{"instruction": "line1\nline2", "output": "ok"}]


def test_parquet_rows_become_records(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "id": 7},
        {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}], "id": 8},
    ]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    records = read_records(str(path))
    assert data_of(records) == rows
    assert [r.source for r in records] == [f"{path}[row 0]", f"{path}[row 1]"]


def test_a_broken_parquet_file_is_an_error(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"not parquet at all")
    assert error_of(path).startswith(f"{path}: cannot read parquet (")


def test_a_folder_is_read_file_by_file_in_sorted_order_ignoring_other_files(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "b.jsonl").write_text('{"text": "b1"}\n{"text": "b2"}\n', encoding="utf-8")
    (folder / "a.json").write_text(json.dumps([{"text": "a1"}]), encoding="utf-8")
    (folder / "c.CSV").write_text("text\nc1\n", encoding="utf-8")
    (folder / "README.md").write_text("# not data\n", encoding="utf-8")
    (folder / "notes.txt").write_text("not data either\n", encoding="utf-8")
    records = read_records(str(folder))
    assert data_of(records) == [{"text": "a1"}, {"text": "b1"}, {"text": "b2"}, {"text": "c1"}]
    assert [r.source for r in records] == [
        f"{folder / 'a.json'}[record 0]",
        f"{folder / 'b.jsonl'}:1",
        f"{folder / 'b.jsonl'}:2",
        f"{folder / 'c.CSV'}:2",
    ]


def test_a_folder_without_data_files_is_an_error(tmp_path):
    (tmp_path / "README.md").write_text("x", encoding="utf-8")
    msg = error_of(tmp_path)
    assert msg == f"{tmp_path}: folder holds no data file (.json, .jsonl, .csv, .parquet)"


def test_an_empty_jsonl_file_gives_no_records(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    assert read_records(str(path)) == []


# --- errors -------------------------------------------------------------------------------------------------


def test_unsupported_suffix_names_the_suffix_and_the_supported_ones(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("hello\n", encoding="utf-8")
    assert error_of(path) == f"{path}: unsupported file type '.txt'; expected one of .json, .jsonl, .csv, .parquet"


def test_malformed_jsonl_line_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "missing quote}\n{"text": "ok"}\n', encoding="utf-8")
    msg = error_of(path)
    assert msg.startswith(f"{path}:3: malformed JSON (")
    assert "column" in msg


def test_a_line_cut_short_says_where_it_ends_not_column_1_of_the_next(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "a", "more": [1,\n', encoding="utf-8")
    assert (
        error_of(path)
        == f"{path}:2: malformed JSON (Expecting value: the line ends after column 25, before the JSON does)"
    )
    whole = tmp_path / "cut.json"
    whole.write_text('[{"text": "ok"},\n {"text": ', encoding="utf-8")
    assert (
        error_of(whole)
        == f"{whole}:2: malformed JSON (Expecting value: the file ends after column 9, before the JSON does)"
    )


def test_a_jsonl_line_that_is_not_an_object_names_the_line_and_the_type(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"text": "ok"}\n["a", "b"]\n', encoding="utf-8")
    assert error_of(path) == f"{path}:2: expected a JSON object, got list"


def test_malformed_json_array_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": }\n]\n', encoding="utf-8")
    assert error_of(path).startswith(f"{path}:3: malformed JSON (")


def test_a_json_array_holding_a_non_object_names_the_record(write_data):
    path = write_data("mixed.json", [{"text": "a"}, "just a string", {"text": "c"}])
    assert error_of(path) == f"{path}[record 1]: expected a JSON object, got str"


def test_a_json_file_holding_a_scalar_is_an_error(tmp_path):
    path = tmp_path / "scalar.json"
    path.write_text("42", encoding="utf-8")
    assert error_of(path) == f"{path}: expected a JSON array of records, got int"


def test_a_missing_file_is_an_error(tmp_path):
    path = tmp_path / "nope.jsonl"
    assert error_of(path).startswith(f"{path}: data file not found (looked for {path.resolve()};")


def test_a_non_utf8_file_names_the_file_and_the_byte(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"text": "café"}\n'.encode("latin-1"))
    assert error_of(path) == f"{path}: not UTF-8 text (byte 13)"


def test_a_hub_dataset_is_read_whole_or_streamed_and_a_failure_is_one_error(monkeypatch):
    import datasets

    from tunelab.data.readers import record_chunks

    calls = []

    def fake_load(name, split, streaming=False):
        calls.append((name, split, streaming))
        if name == "org/missing":
            raise FileNotFoundError("Dataset 'org/missing' doesn't exist on the Hub")
        rows = ({"text": f"row {i}"} for i in range(5))
        return rows if streaming else list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)

    records = read_records("org/set")
    assert [r.source for r in records] == [f"org/set[row {i}]" for i in range(5)] and records[4].data == {
        "text": "row 4"
    }
    streamed = [r for chunk in record_chunks("org/set", size=2, stream=True) for r in chunk.read()]
    assert [r.data for r in streamed] == [r.data for r in records]
    assert calls == [("org/set", "train", False), ("org/set", "train", True)]
    with pytest.raises(
        TunelabError,
        match=r"org/missing: not a local file and could not be loaded from the hf hub "
        r"\(FileNotFoundError: Dataset 'org/missing' doesn't exist",
    ):
        read_records("org/missing")
