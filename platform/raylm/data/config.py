"""Config of the prepare stage: ingest, cleaning, quality filters, exact and fuzzy dedup, split.

Every filter has `enabled` and its thresholds; a document is dropped by the first enabled
filter it fails (in the order of `FiltersConfig`'s fields), and the stats count each one.
Defaults follow the Gopher rules (Rae et al. 2021) as datatrove and NeMo Curator implement them.
"""

from typing import Literal

from pydantic import Field, model_validator

from raylm.configbase import ConfigSection


class PiiConfig(ConfigSection):
    """Redaction of personal data: each match is replaced by a placeholder and counted."""

    enabled: bool = False
    emails: bool = True
    """Addresses like `name@example.org` become `<EMAIL>`."""
    ip_addresses: bool = True
    """IPv4 and IPv6 addresses become `<IP_ADDRESS>`."""
    phone_numbers: bool = True
    """Phone numbers (international or North-American style, 9 to 15 digits) become `<PHONE_NUMBER>`."""


class CleanConfig(ConfigSection):
    unicode_normalization: Literal["NFC", "NFKC", "none"] = "NFC"
    """Unicode normal form applied to every text."""
    strip_html: bool = True
    """Remove HTML/XML markup (tags, comments, script and style bodies) and decode entities, in texts that contain markup."""
    pii: PiiConfig = PiiConfig()


class LengthFilter(ConfigSection):
    enabled: bool = True
    min_chars: int = Field(100, ge=0)
    """Documents shorter than this many characters (after cleaning) are dropped."""


class WordCountFilter(ConfigSection):
    enabled: bool = True
    min_words: int = Field(50, ge=0)
    max_words: int = Field(100_000, ge=1)


class MeanWordLengthFilter(ConfigSection):
    enabled: bool = True
    min: float = Field(3.0, ge=0)
    max: float = Field(10.0, gt=0)


class SymbolRatioFilter(ConfigSection):
    enabled: bool = True
    max_ratio: float = Field(0.1, ge=0)
    """Most `#` and ellipses (`...`, `…`) per word."""


class AlphaWordsFilter(ConfigSection):
    enabled: bool = True
    min_fraction: float = Field(0.8, ge=0, le=1)
    """Least fraction of words that contain an alphabetic character."""


class StopWordsFilter(ConfigSection):
    enabled: bool = True
    min_count: int = Field(2, ge=0)
    """Least number of stop-word occurrences in the text."""
    words: tuple[str, ...] = ("the", "be", "to", "of", "and", "that", "have", "with")


class RepetitionFilter(ConfigSection):
    """Gopher repetition rules: duplicate lines and paragraphs, top and duplicate n-grams."""

    enabled: bool = True
    max_dup_line_fraction: float = Field(0.3, ge=0, le=1)
    """Most fraction of lines that repeat an earlier line."""
    max_dup_paragraph_fraction: float = Field(0.3, ge=0, le=1)
    max_dup_line_char_fraction: float = Field(0.2, ge=0, le=1)
    """Most fraction of characters in duplicated lines."""
    max_dup_paragraph_char_fraction: float = Field(0.2, ge=0, le=1)
    max_top_ngram_char_fraction: dict[int, float] = {2: 0.20, 3: 0.18, 4: 0.16}
    """Per n: most fraction of characters covered by the most frequent word n-gram."""
    max_dup_ngram_char_fraction: dict[int, float] = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    """Per n: most fraction of characters covered by word n-grams that occur more than once."""


class EllipsisLinesFilter(ConfigSection):
    enabled: bool = True
    max_fraction: float = Field(0.3, ge=0, le=1)
    """Most fraction of lines ending in an ellipsis."""


class BulletLinesFilter(ConfigSection):
    enabled: bool = True
    max_fraction: float = Field(0.9, ge=0, le=1)
    """Most fraction of lines starting with a bullet (`•`, `-`, `*`, `·`, `‣`, ...)."""


class FiltersConfig(ConfigSection):
    """The quality filters, checked in this order; the first failing one names the drop reason."""

    length: LengthFilter = LengthFilter()
    word_count: WordCountFilter = WordCountFilter()
    mean_word_length: MeanWordLengthFilter = MeanWordLengthFilter()
    symbol_ratio: SymbolRatioFilter = SymbolRatioFilter()
    alpha_words: AlphaWordsFilter = AlphaWordsFilter()
    stop_words: StopWordsFilter = StopWordsFilter()
    repetition: RepetitionFilter = RepetitionFilter()
    ellipsis_lines: EllipsisLinesFilter = EllipsisLinesFilter()
    bullet_lines: BulletLinesFilter = BulletLinesFilter()


class ExactDedupConfig(ConfigSection):
    enabled: bool = True


class FuzzyDedupConfig(ConfigSection):
    """MinHash + LSH candidates, verified by their real Jaccard similarity, clustered by connected components."""

    enabled: bool = True
    threshold: float = Field(0.8, gt=0, le=1)
    """Documents whose shingle sets have at least this Jaccard similarity are duplicates."""
    unit: Literal["word", "char"] = "word"
    """Shingles are n-grams of words (lower-cased, punctuation removed) or of characters."""
    ngram: int = Field(5, ge=1)
    num_perm: int = Field(128, ge=2)
    """MinHash permutations per document."""
    bands: int | None = Field(None, ge=1)
    """LSH bands; unset: chosen with `rows` so that pairs at the threshold are almost always candidates."""
    rows: int | None = Field(None, ge=1)
    """Rows (signature values) per band; bands × rows ≤ num_perm."""
    seed: int = 42
    """Seed of the MinHash permutations."""
    max_bucket_all_pairs: int = Field(64, ge=2)
    """LSH buckets up to this size yield all their pairs as candidates; larger ones pair each member with the bucket's first `bucket_anchors` ids."""
    bucket_anchors: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _bands_fit(self):
        if (self.bands is None) != (self.rows is None):
            raise ValueError("set both bands and rows, or neither")
        if self.bands is not None and self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands × rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")
        return self


class DedupConfig(ConfigSection):
    exact: ExactDedupConfig = ExactDedupConfig()
    fuzzy: FuzzyDedupConfig = FuzzyDedupConfig()
    partitions: int | None = Field(None, ge=1)
    """Hash partitions of every dedup shuffle; unset: one per 128 MiB of input, at least 4, at most 256."""


class PrepareConfig(ConfigSection):
    input: str
    """Raw shards: a directory, a glob, a file, or an object-store URI (s3://, gs://) of any of these.

    Formats by suffix: JSON Lines (`.jsonl`, `.ndjson`, `.json`), Parquet, plain text (`.txt`),
    each optionally compressed (`.gz`, `.zst`; not Parquet). `package:demo_corpus` is the bundled corpus.
    """
    output: str
    """Directory for the cleaned, deduplicated Parquet shards (train/ and validation/), quarantine/ and stats.json."""
    text_field: str = "text"
    """Field holding each document's text (JSONL, Parquet)."""
    id_field: str | None = None
    """Field holding a document id; without one the id is `<file name>:<line or row>`."""
    txt_documents: Literal["file", "paragraph", "line"] = "file"
    """What one document of a `.txt` file is: the whole file, each blank-line-separated paragraph, or each line."""
    on_error: Literal["quarantine", "fail"] = "quarantine"
    """Bad records (malformed JSON, invalid UTF-8, missing text, unreadable or truncated files): written to quarantine/ with file and line and counted, or the run stops at the first one."""
    clean: CleanConfig = CleanConfig()
    filters: FiltersConfig = FiltersConfig()
    dedup: DedupConfig = DedupConfig()
    validation_fraction: float = Field(0.05, gt=0.0, lt=1.0)
    """Share of documents routed to the validation split, by a hash of their text."""
    split_seed: int = 0
    """Salt of the split hash: change it for a different, still deterministic, split."""
    read_batch_docs: int = Field(2048, ge=1)
    """Documents per block that a reader task emits (bounds a task's memory on large shards)."""
    docs_per_output_file: int = Field(50_000, ge=1)
    """Documents per output Parquet file, at least (the last file of a split may have fewer)."""
