"""Finding and reading raw shards (JSONL, JSONL.gz, Parquet) without Ray: ids, formats, one-line errors."""

from __future__ import annotations

import gzip
import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from raylm.data.readers import read_shard
from raylm.data.sources import list_input_files, resolve_input
from raylm.errors import InputError


def _write_jsonl(path, records, gz=False):
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(data) if gz else data)


def _read_all(path, text_field="text", id_field=None, batch_rows=2, on_error="fail", txt_documents="file"):
    """Rows (id, text) of one shard; bad records raise (`on_error="fail"`) or come back with their error columns."""
    (file,) = list_input_files(str(path), on_error=on_error)
    tables = list(read_shard(file, text_field, id_field, batch_rows, txt_documents, on_error))
    rows = [row for t in tables for row in t.to_pylist()]
    if on_error == "fail":
        rows = [{"id": r["id"], "text": r["text"]} for r in rows]
    return rows, tables


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
    (tmp_path / "notes.md").write_text("not a shard")
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
        ('{"text": "ok"}\n{"text": "b\u00e9"}\n'.encode().replace(b"\xc3\xa9", b"\xff").decode("latin-1"), "bad.jsonl:2: not valid UTF-8"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content.encode("latin-1") if "\xff" in content else content.encode())
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
    with pytest.raises(InputError, match="junk.parquet: cannot read Parquet"):
        _read_all(tmp_path / "junk.parquet")
    (tmp_path / "t.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 100)[:40])
    with pytest.raises(InputError, match=r"t.jsonl.gz:\d+: compressed stream ends early"):
        _read_all(tmp_path / "t.jsonl.gz")


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "bad \xff\xfe byte"}\n')
    with pytest.raises(InputError, match="u.jsonl:2: not valid UTF-8"):
        _read_all(path)


def _random_lines(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)  # incompressible text, so that cutting the file cuts records
    return [{"id": f"r{i}", "text": " ".join(f"{rng.random():.12f}" for _ in range(20))} for i in range(n)]


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_truncated_compressed_shard_keeps_the_records_before_the_damage(tmp_path, suffix):
    records = _random_lines(1500)  # more than one 128 KiB zstd block, so that a cut leaves whole blocks
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    whole = gzip.compress(data) if suffix.endswith(".gz") else zstandard.ZstdCompressor().compress(data)
    (tmp_path / f"ok{suffix}").write_bytes(whole)
    assert [r["id"] for r in _read_all(tmp_path / f"ok{suffix}", id_field="id", batch_rows=64)[0]] == [
        r["id"] for r in records
    ]
    cut = tmp_path / "cut" / f"t{suffix}"
    cut.parent.mkdir()
    cut.write_bytes(whole[: len(whole) * 3 // 4])
    rows, _ = _read_all(cut, id_field="id", batch_rows=64, on_error="quarantine")
    good = [r for r in rows if r["error_kind"] is None]
    bad = [r for r in rows if r["error_kind"] is not None]
    assert [r["id"] for r in good] == [r["id"] for r in records[: len(good)]]  # a prefix, in order
    assert 0 < len(good) < len(records)
    assert len(bad) == 1 and bad[0]["error_kind"] == "truncated"
    assert bad[0]["error"].startswith(f"{cut}:{len(good) + 1}: compressed stream ends early")


def test_quarantine_mode_returns_every_kind_with_file_and_line(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(
        b'{"id": "a", "text": "good one"}\n{"id": "b", "text": "broken\n[1, 2]\n{"id": "c"}\n'
        b'{"text": "no id"}\n{"id": "d", "text": "bad \xff byte"}\n{"id": "e", "text": "good two"}\n'
    )
    rows, _ = _read_all(path, id_field="id", on_error="quarantine", batch_rows=100)
    assert [(r["id"], r["error_kind"]) for r in rows] == [
        ("a", None), ("mixed.jsonl:2", "malformed_json"), ("mixed.jsonl:3", "not_an_object"),
        ("mixed.jsonl:4", "missing_text"), ("mixed.jsonl:5", "missing_id"), ("mixed.jsonl:6", "invalid_utf8"),
        ("e", None),
    ]  # fmt: skip
    assert rows[1]["error"] == f"{path}:2: malformed JSON (Unterminated string starting at at column 23)" or \
        rows[1]["error"].startswith(f"{path}:2: malformed JSON")  # fmt: skip
    assert rows[1]["text"].startswith('{"id": "b"')  # the raw record is kept for inspection


def test_empty_and_unreadable_files_are_one_bad_record_each(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "gone.jsonl").symlink_to(tmp_path / "missing-target.jsonl")
    files = list_input_files(str(tmp_path))
    assert [(f.name, f.readable) for f in files] == [("empty.jsonl", True), ("gone.jsonl", False)]
    kinds = [r["error_kind"] for f in files for t in read_shard(f, "text", None, 10) for r in t.to_pylist()]
    assert kinds == ["empty_file", "unreadable"]
    with pytest.raises(InputError, match="gone.jsonl: not readable"):
        list_input_files(str(tmp_path), on_error="fail")


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("file", [("poem.txt", "First line\nsecond line\n\nThird after a blank\nlast")]),
        ("paragraph", [("poem.txt:1", "First line\nsecond line\n"), ("poem.txt:4", "Third after a blank\nlast")]),
        ("line", [("poem.txt:1", "First line\n"), ("poem.txt:2", "second line\n"), ("poem.txt:4", "Third after a blank\n"),
                  ("poem.txt:5", "last")]),
    ],
)  # fmt: skip
def test_text_files_by_file_paragraph_or_line(tmp_path, mode, expected):
    path = tmp_path / "poem.txt"
    path.write_text("First line\nsecond line\n\nThird after a blank\nlast")
    rows, _ = _read_all(path, txt_documents=mode, batch_rows=10)
    assert [(r["id"], r["text"]) for r in rows] == expected
