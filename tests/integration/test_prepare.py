"""The prepare stage on a local Ray: synthetic shards in three formats, the bundled demo corpus, bad inputs."""

from __future__ import annotations

import gzip
import json
import random
import re
import unicodedata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm.artifacts import read_manifest
from raylm.cli import main as cli_main
from raylm.config import load_config
from raylm.data.clean import clean_text
from raylm.data.dedup_exact import text_hash
from raylm.data.filters import FILTER_NAMES
from raylm.data.split import split_of
from raylm.data.writers import OUTPUT_SCHEMA, ParquetFiles
from raylm.errors import InputError
from raylm.stages import run_stage

VALIDATION_FRACTION = 0.25
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def _doc(i: int) -> str:
    words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(8 + i % 5)]
    return f"Document {i}.\n\n" + " ".join(words) + f" number {i}."


def _records() -> list[dict]:
    """40 unique documents, 4 copies that cleaning and dedup must remove, 3 that the filters must drop."""
    docs = [{"id": f"d{i:02d}", "text": _doc(i)} for i in range(40)]
    cafe = "Un café pour la fiancée naïve, s'il vous plaît, merci beaucoup."
    return docs + [
        {"id": "z-copy-05", "text": _doc(5)},  # exact copy, larger id: d05 stays
        {"id": "a-copy-07", "text": _doc(7)},  # exact copy, smaller id: it stays, d07 goes
        {"id": "w-10", "text": "  " + _doc(10).replace(" ", " \t ").replace("\n", "\r\n") + "\r\n\r\n"},
        {"id": "u-nfc", "text": unicodedata.normalize("NFC", cafe)},
        {"id": "u-nfd", "text": unicodedata.normalize("NFD", cafe)},
        {"id": "j-empty", "text": " \n\t "},
        {"id": "j-short", "text": "Exeunt."},
        {"id": "j-words", "text": "=" * 40},
    ]


EXPECTED_KEPT = {f"d{i:02d}" for i in range(40)} - {"d07"} | {"a-copy-07", "u-nfc"}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)


def _write_shards(root: Path, rows: list[dict], names: list[str]) -> Path:
    """Deal `rows` round-robin into shards named `names` (format by suffix)."""
    root.mkdir(parents=True)
    for s, name in enumerate(names):
        part = rows[s :: len(names)]
        if name.endswith(".parquet"):
            pq.write_table(pa.Table.from_pylist(part), root / name)
        else:
            _write_jsonl(root / name, part)
    return root


_OTHER_FILTERS = tuple(name for name in FILTER_NAMES if name not in ("length", "word_count"))


def _removed_by_filter(stats: dict) -> dict[str, int]:
    return {r: v["documents"] for r, v in stats["filter"]["removed"].items() if v["documents"]}


def _cfg(input_path, workdir, *extra: str):
    return load_config(
        None,
        [
            f"prepare.input={input_path}",
            f"run.workdir={workdir}",
            "prepare.filters.length.min_chars=20",
            "prepare.filters.word_count.min_words=4",
            # The synthetic documents repeat a 16-word vocabulary: only the length filters and exact
            # dedup are under test here (test_prepare_dedup.py covers fuzzy dedup on real text).
            *(f"prepare.filters.{name}.enabled=false" for name in _OTHER_FILTERS),
            "prepare.dedup.fuzzy.enabled=false",
            f"prepare.validation_fraction={VALIDATION_FRACTION}",
            *extra,
        ],
    )


def _output(path) -> dict[str, list[dict]]:
    return {split: pq.read_table(Path(path) / split).to_pylist() for split in ("train", "validation")}


@pytest.fixture(scope="module")
def three_shards(ray_local, tmp_path_factory):
    """One prepare run over the synthetic records in a JSONL, a JSONL.gz and a Parquet shard."""
    tmp = tmp_path_factory.mktemp("three_shards")
    rows = _records()
    # Rotate so that every copy lands in a different shard than its original.
    corpus = _write_shards(tmp / "raw", rows[1:] + rows[:1], ["s0.jsonl", "s1.jsonl.gz", "s2.parquet"])
    cfg = _cfg(corpus, tmp / "run", "prepare.id_field=id")
    return cfg, run_stage("prepare", cfg)


def test_prepare_filters_dedups_and_splits(three_shards):
    cfg, result = three_shards
    stats = result["stats"]
    assert result["output"] == cfg.prepare.output and not result["reused"]
    assert stats["input_files"] == 3
    assert stats["read"]["documents"] == 48
    assert _removed_by_filter(stats) == {"empty": 1, "length": 1, "word_count": 1}
    assert stats["filter"]["documents"] == 45
    assert stats["dedup_exact"]["removed"]["documents"] == 4
    assert stats["dedup_exact"]["clusters"] == 4
    assert stats["dedup_exact"]["cluster_sizes"] == {"2": 4}
    assert stats["dedup_exact"]["documents"] == len(EXPECTED_KEPT) == 41

    out = _output(cfg.prepare.output)
    kept = {r["id"]: r["text"] for split in out.values() for r in split}
    assert set(kept) == EXPECTED_KEPT
    assert kept["d10"] == clean_text(_doc(10))
    assert kept["u-nfc"] == unicodedata.normalize("NFC", kept["u-nfc"])
    for split, rows in out.items():
        assert all(split_of(r["text"], 0, VALIDATION_FRACTION) == split for r in rows)
        assert stats["split"][split]["documents"] == len(rows)
        assert stats["split"][split]["bytes"] == sum(len(r["text"].encode()) for r in rows)
    assert len(out["validation"]) > 0
    assert pq.read_schema(next((Path(cfg.prepare.output) / "train").glob("*.parquet"))).names == ["id", "text"]


def test_manifest_and_stats_file(three_shards):
    cfg, result = three_shards
    manifest = read_manifest(cfg.prepare.output)
    assert manifest["stage"] == "prepare"
    assert manifest["config"]["input"] == cfg.prepare.input
    assert manifest["stats"] == result["stats"]
    assert json.loads((Path(cfg.prepare.output) / "stats.json").read_text()) == result["stats"]


def test_rerun_is_a_no_op(three_shards):
    cfg, result = three_shards
    manifest = Path(cfg.prepare.output) / "manifest.json"
    before = manifest.stat().st_mtime_ns
    again = run_stage("prepare", cfg)
    assert again["reused"] is True
    assert again["stats"] == result["stats"]
    assert manifest.stat().st_mtime_ns == before


def test_result_does_not_depend_on_sharding(three_shards, tmp_path):
    cfg3, _ = three_shards
    corpus = _write_shards(tmp_path / "raw", list(reversed(_records())), ["all.jsonl"])
    cfg1 = _cfg(corpus, tmp_path / "run", "prepare.id_field=id")
    one = run_stage("prepare", cfg1)
    assert one["stats"]["input_files"] == 1
    out1, out3 = _output(cfg1.prepare.output), _output(cfg3.prepare.output)
    # Same documents, same splits, same order (rows are ordered by text hash).
    assert out1 == out3


def test_default_ids_are_file_and_line(ray_local, tmp_path):
    corpus = _write_shards(tmp_path / "raw", _records()[:6], ["a.jsonl", "b.parquet"])
    # Fuzzy dedup on, with nothing near-duplicate to find: it must pass every document through.
    cfg = _cfg(corpus, tmp_path / "run", "prepare.validation_fraction=0.5", "prepare.dedup.fuzzy.enabled=true")
    stats = run_stage("prepare", cfg)["stats"]
    assert stats["dedup_fuzzy"]["removed"]["documents"] == 0 and stats["dedup_fuzzy"]["clusters"] == 0
    assert pq.read_table(Path(cfg.prepare.output) / "duplicates/fuzzy").num_rows == 0
    ids = sorted(r["id"] for rows in _output(cfg.prepare.output).values() for r in rows)
    assert ids == ["a.jsonl:1", "a.jsonl:2", "a.jsonl:3", "b.parquet:0", "b.parquet:1", "b.parquet:2"]


def _assert_nothing_written(cfg) -> None:
    out = Path(cfg.prepare.output)
    assert not out.exists()
    assert not list(out.parent.glob(f"{out.name}.tmp-*"))


def test_malformed_json_line_names_file_and_line(ray_local, tmp_path):
    corpus = _write_shards(tmp_path / "raw", _records()[:4], ["good.parquet"])
    (corpus / "bad.jsonl").write_text('{"text": "fine, fine, fine, fine, fine"}\n{"text": "oops\n')
    cfg = _cfg(corpus, tmp_path / "run", "prepare.on_error=fail")
    with pytest.raises(InputError) as err:
        run_stage("prepare", cfg)
    message = str(err.value)
    assert re.fullmatch(r".*bad\.jsonl:2: malformed JSON \(.*\)", message), message
    _assert_nothing_written(cfg)


def test_missing_text_field_names_file_and_line(ray_local, tmp_path):
    corpus = tmp_path / "raw"
    corpus.mkdir()
    _write_jsonl(corpus / "x.jsonl.gz", [{"text": "a b c d e f g h i j k"}, {"body": "no text here"}])
    cfg = _cfg(corpus, tmp_path / "run", "prepare.on_error=fail")
    with pytest.raises(InputError, match=r"x\.jsonl\.gz:2: record has no text field 'text'") as err:
        run_stage("prepare", cfg)
    assert "\n" not in str(err.value)
    _assert_nothing_written(cfg)


def test_missing_input_is_one_line_from_the_cli(ray_local, tmp_path, capsys, repo_root):
    missing = tmp_path / "nowhere"
    config = str(repo_root / "configs/demo.yaml")
    code = cli_main(["prepare", "--config", config, f"--prepare.input={missing}", f"--run.workdir={tmp_path / 'run'}"])
    # Late log lines of earlier tests' Ray workers can reach this process's stderr too: look at ours.
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("raylm ")]
    assert code == 1
    assert ours == [f"raylm prepare: error: {missing}: input not found"]


def test_demo_corpus(ray_local, tmp_path, repo_root):
    """The bundled corpus through the demo config: the planted junk, copies and near copies are removed (ATTRIBUTION.md)."""
    cfg = load_config(repo_root / "configs/demo.yaml", [f"run.workdir={tmp_path}"])
    stats = run_stage("prepare", cfg)["stats"]
    assert stats["input_files"] == 6
    assert stats["read"]["documents"] == 1161
    assert _removed_by_filter(stats) == {"empty": 2, "length": 3, "word_count": 1, "repetition": 4}
    assert stats["dedup_exact"]["removed"]["documents"] == 13
    assert stats["dedup_exact"]["clusters"] == 12
    fuzzy = stats["dedup_fuzzy"]
    assert fuzzy["removed"]["documents"] == 5 and fuzzy["clusters"] == 4 and fuzzy["cluster_sizes"] == {"2": 3, "3": 1}
    out = Path(cfg.prepare.output)
    near = {r["id"] for r in pq.read_table(out / "duplicates/fuzzy").to_pylist()}
    assert {i.split("#")[1] for i in near} == {"edited", "edited2", "abridged"}  # the planted near copies
    assert stats["split"]["train"]["documents"] + stats["split"]["validation"]["documents"] == 1133
    assert stats["split"]["validation"]["documents"] > 20
    ids = [r["id"] for r in pq.read_table(out / "validation").to_pylist()]
    # configs/demo.yaml keeps the corpus's own ids (prepare.id_field: id), e.g. hamlet/0012
    assert all(re.fullmatch(r"[a-z0-9_]+/(\d{4}|nfc)(#rewritten)?", i) for i in ids), ids
    assert "Near duplicates: 5 removed in 4 clusters" in (out / "report.md").read_text()


def test_nothing_left_after_filtering_is_an_error(ray_local, tmp_path):
    corpus = _write_shards(tmp_path / "raw", [{"text": "too short"}, {"text": ""}], ["tiny.jsonl"])
    cfg = _cfg(corpus, tmp_path / "run")
    with pytest.raises(InputError, match=r"no document passes the filters \(see prepare.filters"):
        run_stage("prepare", cfg)
    _assert_nothing_written(cfg)


def _read_quarantine(output) -> list[dict]:
    rows = []
    for path in sorted((Path(output) / "quarantine").glob("*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def test_bad_records_are_quarantined_and_good_neighbours_kept(ray_local, tmp_path):
    """Every kind of bad input in one corpus: the run finishes, keeps every good record, and lists the bad ones."""
    good = [{"id": f"g{i:02d}", "text": _doc(i)} for i in range(12)]
    raw = tmp_path / "raw"
    raw.mkdir()
    lines = [json.dumps(r) for r in good[:3]]
    (raw / "mixed.jsonl").write_bytes(
        "\n".join([lines[0], '{"id": "bad", "text": "unterminated', lines[1], '{"id": "nt", "body": "no text"}',
                   '["not", "an", "object"]']).encode()  # fmt: skip
        + b'\n{"id": "u8", "text": "caf\xff latin-1"}\n'
        + (lines[2] + "\n").encode()
    )
    (raw / "empty.jsonl").write_bytes(b"")
    whole = gzip.compress("".join(json.dumps(r) + "\n" for r in good[3:9]).encode())
    (raw / "cut.jsonl.gz").write_bytes(whole[: len(whole) * 2 // 3])  # a copy that stopped midway
    (raw / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    (raw / "gone.jsonl").symlink_to(tmp_path / "deleted.jsonl")  # a dangling link: unreadable
    _write_jsonl(raw / "fine.jsonl", good[9:])
    cfg = _cfg(raw, tmp_path / "run", "prepare.id_field=id")
    stats = run_stage("prepare", cfg)["stats"]

    kept = {r["id"] for rows in _output(cfg.prepare.output).values() for r in rows}
    quarantine = _read_quarantine(cfg.prepare.output)
    by_kind = {r["error_kind"]: r for r in quarantine}
    # Everything in the truncated gzip before the damage is kept; every other good record too.
    survived_cut = {i for i in kept if i in {f"g{k:02d}" for k in range(3, 9)}}
    assert {"g00", "g01", "g02", "g09", "g10", "g11"} <= kept and len(survived_cut) >= 1
    assert kept == {"g00", "g01", "g02", "g09", "g10", "g11"} | survived_cut
    assert set(by_kind) == {"malformed_json", "missing_text", "not_an_object", "invalid_utf8", "empty_file",
                            "truncated", "unreadable"}  # fmt: skip
    assert re.fullmatch(r".*mixed\.jsonl:2: malformed JSON.*", by_kind["malformed_json"]["error"])
    assert re.fullmatch(r".*mixed\.jsonl:4: .*text.*", by_kind["missing_text"]["error"])
    assert re.fullmatch(r".*mixed\.jsonl:6: .*UTF-8.*", by_kind["invalid_utf8"]["error"])
    assert "cut.jsonl.gz" in by_kind["truncated"]["error"] and "gone.jsonl" in by_kind["unreadable"]["error"] or \
        "broken.parquet" in by_kind["unreadable"]["error"]  # fmt: skip
    assert sum(1 for r in quarantine if r["error_kind"] == "unreadable") == 2  # the link and the broken Parquet
    assert stats["quarantined"]["documents"] == len(quarantine) == 8
    assert stats["quarantined"]["by_kind"] == {k: (2 if k == "unreadable" else 1) for k in by_kind}
    assert "Quarantined records: 8" in (Path(cfg.prepare.output) / "report.md").read_text()


def test_a_shard_of_bad_records_only_and_no_dedup_still_gives_the_sorted_output(ray_local, tmp_path):
    """The filter of good documents leaves the bad shard's blocks empty; with no dedup step before it, the final
    sort gets those empty blocks, and the output still holds every good document, in order."""
    raw = _write_shards(tmp_path / "raw", [r for r in _records() if not r["id"].startswith("j-")], ["a.jsonl", "b.jsonl"])
    (raw / "zz_bad.jsonl").write_text('{"id": "x1", "text": "unterminated\n["not an object"]\n{"id": "x2", "body": "x"}\n')
    cfg = _cfg(raw, tmp_path / "run", "prepare.id_field=id", "prepare.dedup.exact.enabled=false")
    stats = run_stage("prepare", cfg)["stats"]
    assert stats["quarantined"]["documents"] == 3
    output = _output(cfg.prepare.output)
    assert sum(len(rows) for rows in output.values()) == 45  # every good record: no dedup, no filter drops one
    for rows in output.values():
        keys = [(int(text_hash(r["text"])[:15], 16), r["id"]) for r in rows]
        assert keys == sorted(keys)


def test_on_error_fail_stops_at_the_first_bad_record(ray_local, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jsonl").write_bytes(b'{"id": "ok", "text": "fine fine fine fine fine fine fine"}\n{"id": "x", "text": "\xff"}\n')
    cfg = _cfg(raw, tmp_path / "run", "prepare.on_error=fail")
    with pytest.raises(InputError, match=r"a\.jsonl:2: .*UTF-8") as err:
        run_stage("prepare", cfg)
    assert "\n" not in str(err.value)
    _assert_nothing_written(cfg)


def test_a_split_file_holds_its_blocks_in_dataset_order_with_threads_in_the_write_task(ray_local, tmp_path):
    """Four sorted partitions bundled into one file stay in order, however many threads pyarrow has in the task.

    pyarrow's multi-threaded dataset writer (Ray's own parquet sink) writes a task's blocks as its threads
    finish: with OMP_NUM_THREADS > 1 in the worker, a killed-and-resumed prepare wrote partitions 1, 0, 2, 3."""
    import ray

    rng = random.Random(0)
    blocks = [pa.table({"id": [f"{b}-{i:05d}" for i in range(n)], "text": ["y" * rng.randint(100, 8000) for _ in range(n)]})
              for b, n in enumerate([1500, 300, 900, 1500])]  # fmt: skip
    want = [row_id for block in blocks for row_id in block.column("id").to_pylist()]
    ds = ray.data.from_arrow(blocks)
    ds.context.execution_options.preserve_order = True
    threads = {"runtime_env": {"env_vars": {"OMP_NUM_THREADS": "4"}}}  # sizes the worker's arrow thread pool
    for attempt in range(10):
        path = tmp_path / f"out{attempt}"
        ds.write_datasink(ParquetFiles(str(path), OUTPUT_SCHEMA, min_rows_per_file=len(want)), ray_remote_args=threads)
        assert [p.name for p in path.iterdir()] == ["part-00000.parquet"]
        assert pq.read_table(path).column("id").to_pylist() == want
