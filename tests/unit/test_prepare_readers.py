"""Finding and reading raw shards (JSONL, JSONL.gz, Parquet) without Ray: ids, formats, one-line errors."""

from __future__ import annotations

import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm.data.readers import list_input_files, read_shard, resolve_input
from raylm.errors import InputError


def _write_jsonl(path, records, gz=False):
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(data) if gz else data)


def _read_all(path, text_field="text", id_field=None, batch_rows=2):
    (file,) = list_input_files(str(path))
    tables = list(read_shard(file, text_field, id_field, batch_rows))
    return [row for t in tables for row in t.to_pylist()], tables


def test_jsonl_ids_are_file_and_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two", "extra": 1}\n{"text": "three"}\n')
    rows, tables = _read_all(path)
    assert [r["id"] for r in rows] == ["a.jsonl:1", "a.jsonl:3", "a.jsonl:4"]
    assert [r["text"] for r in rows] == ["one", "two", "three"]
    assert [t.num_rows for t in tables] == [2, 1]  # streamed in batches of batch_rows


def test_gzip_jsonl_and_id_field(tmp_path):
    path = tmp_path / "b.jsonl.gz"
    _write_jsonl(path, [{"id": 7, "text": "seven"}, {"id": "x", "text": "ex"}], gz=True)
    rows, _ = _read_all(path, id_field="id")
    assert rows == [{"id": "7", "text": "seven"}, {"id": "x", "text": "ex"}]


def test_parquet_ids_are_file_and_row(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": ["p0", "p1", "p2"]}), path, row_group_size=2)
    rows, _ = _read_all(path, text_field="body")
    assert [r["id"] for r in rows] == ["c.parquet:0", "c.parquet:1", "c.parquet:2"]
    assert [r["text"] for r in rows] == ["p0", "p1", "p2"]


def test_directory_listing_is_sorted_recursive_and_skips_other_files(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.jsonl", "sub/a.parquet", "a.jsonl.gz", "README.md", ".hidden.jsonl", "c.ndjson"):
        (tmp_path / name).write_bytes(b"")
    names = [f.name for f in list_input_files(str(tmp_path))]
    assert names == ["a.jsonl.gz", "b.jsonl", "c.ndjson", os.path.join("sub", "a.parquet")]


def test_glob_names_are_relative_to_the_glob_directory(tmp_path):
    for name in ("x-1.jsonl", "x-2.jsonl", "y.jsonl"):
        (tmp_path / name).write_text('{"text": "t"}\n')
    files = list_input_files(str(tmp_path / "x-*.jsonl"))
    assert [f.name for f in files] == ["x-1.jsonl", "x-2.jsonl"]


def test_package_corpus_resolves_to_the_bundled_directory():
    path = resolve_input("package:demo_corpus")
    assert os.path.isdir(path)
    formats = {f.format for f in list_input_files("package:demo_corpus")}
    assert formats == {"jsonl", "parquet"}


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: str(d / "missing"), "missing: input not found"),
        (lambda d: str(d / "nothing-*.jsonl"), "nothing-*.jsonl: no files match"),
        (lambda d: str(d), "no shards"),
        (lambda d: "package:no_such_corpus", "no bundled corpus named 'no_such_corpus'"),
    ],
)
def test_listing_errors_name_the_path(tmp_path, make, message):
    (tmp_path / "notes.txt").write_text("not a shard")
    with pytest.raises(InputError, match=message.replace("*", r"\*")):
        list_input_files(make(tmp_path))


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "ok"}\n{"text": "broken\n', "bad.jsonl:2: malformed JSON"),
        ('{"text": "ok"}\n\n{"body": "no text"}\n', "bad.jsonl:3: record has no text field 'text'"),
        ('{"text": 5}\n', "bad.jsonl:1: int in text field 'text'"),
        ('["a list"]\n', "bad.jsonl:1: expected a JSON object"),
        ("\n\n", "bad.jsonl: no records"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as err:
        _read_all(path)
    assert "\n" not in str(err.value)


def test_missing_id_field_names_file_and_line(tmp_path):
    path = tmp_path / "ids.jsonl"
    _write_jsonl(path, [{"id": "a", "text": "x"}, {"text": "y"}])
    with pytest.raises(InputError, match="ids.jsonl:2: record has no 'id' field"):
        _read_all(path, id_field="id")


def test_bad_parquet_and_gzip_name_the_file(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(InputError, match="p.parquet: no column 'text'"):
        _read_all(tmp_path / "p.parquet")
    pq.write_table(pa.table({"text": ["x", None]}), tmp_path / "n.parquet")
    with pytest.raises(InputError, match="n.parquet: row 1: text field 'text' is null"):
        _read_all(tmp_path / "n.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="junk.parquet: cannot read"):
        _read_all(tmp_path / "junk.parquet")
    (tmp_path / "t.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 100)[:40])
    with pytest.raises(InputError, match="t.jsonl.gz: cannot read"):
        _read_all(tmp_path / "t.jsonl.gz")


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "bad \xff\xfe byte"}\n')
    with pytest.raises(InputError, match="u.jsonl:2: not valid UTF-8"):
        _read_all(path)
