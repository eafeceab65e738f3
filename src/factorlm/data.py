"""The one reader of user data files: JSONL, JSON, CSV/TSV, TXT or a folder of them.

Why one reader: calibration, Fisher estimation, recovery and the benchmark all take "a data file
and a column name"; they must agree on what a record is and fail the same way on bad input.

- ``.jsonl`` / ``.ndjson`` / ``.json``: one JSON object per line, or one JSON array of objects
  (accepted for every suffix and by every command). Lines split on ``\n`` only, so U+2028 inside
  a string is not a break. Records by key.
- ``.csv`` / ``.tsv``: records by header name (quoted fields may hold newlines).
- ``.txt`` / ``.text`` / ``.md``: one record per non-empty line (stripped), under whatever text
  column was asked for: the convention of Hugging Face's ``text`` loader. A hard-wrapped novel
  thus gives one record per printed line; use JSONL for longer samples. Tasks that read a text as
  a whole (perplexity) use ``read_corpus``, which for a TXT file is the file's exact text.
- a folder: a dataset saved with ``datasets.save_to_disk`` (needs the ``datasets`` package; the
  ``train`` split or the first one), or else the data files in it, in name order.

A record whose text is missing or blank is skipped everywhere (``max_samples`` counts only kept
records). Records are streamed, so asking for ``max_samples`` reads only as far as needed.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from factorlm._common.userfiles import (
    MAX_DATA_DOCUMENT_BYTES,
    iter_csv_rows,
    iter_lines,
    parse_json,
    read_text,
)
from factorlm.errors import BackendUnavailableError, DataError

__all__ = [
    "SUPPORTED_SUFFIXES",
    "TEXT_SUFFIXES",
    "iter_records",
    "load_texts",
    "read_corpus",
    "read_labelled",
    "read_texts",
    "texts_digest",
]

logger = logging.getLogger(__name__)

JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
TABLE_SUFFIXES = (".csv", ".tsv")
TEXT_SUFFIXES = (".txt", ".text", ".md")
SUPPORTED_SUFFIXES = JSON_SUFFIXES + TABLE_SUFFIXES + TEXT_SUFFIXES


def _iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"["):  # a JSON array of records
        text = read_text(path, what="data file", limit=MAX_DATA_DOCUMENT_BYTES, error=DataError)
        records = parse_json(text, source=f"data file {path}", error=DataError)
        for i, record in enumerate(records):
            if not isinstance(record, dict):
                raise DataError(f"{path} item {i} is not a JSON object.")
            yield record
        return
    for number, line in iter_lines(path, error=DataError):
        if not line.strip():
            continue
        record = parse_json(line, source=f"{path} line {number}", error=DataError)
        if not isinstance(record, dict):
            raise DataError(f"{path} line {number} is not a JSON object.")
        yield record


def _iter_csv(path: Path) -> Iterator[dict[str, Any]]:
    delimiter = "\t" if path.suffix == ".tsv" else ","
    yield from iter_csv_rows(path, delimiter=delimiter, error=DataError)


def _iter_txt(path: Path, column: str) -> Iterator[dict[str, Any]]:
    for _, line in iter_lines(path, error=DataError):
        if line.strip():
            yield {column: line.strip()}


def _iter_folder(path: Path, column: str) -> Iterator[dict[str, Any]]:
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        try:
            import datasets
        except ImportError as exc:
            raise BackendUnavailableError(
                f"{path} is a saved Hugging Face dataset; reading it needs the datasets package."
            ) from exc
        loaded = datasets.load_from_disk(str(path))
        if hasattr(loaded, "keys"):  # a DatasetDict
            split = "train" if "train" in loaded else next(iter(loaded.keys()))
            logger.info("Reading split %s of %s", split, path)
            loaded = loaded[split]
        yield from loaded
        return
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUPPORTED_SUFFIXES)
    if not files:
        raise DataError(f"{path} holds no data files ({', '.join(SUPPORTED_SUFFIXES)}).")
    for file in files:
        yield from _iter_file(file, column)


def _iter_file(path: Path, column: str) -> Iterator[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        return _iter_jsonl(path)
    if suffix in TABLE_SUFFIXES:
        return _iter_csv(path)
    if suffix in TEXT_SUFFIXES:
        return _iter_txt(path, column)
    raise DataError(
        f"{path} has an unsupported extension; use one of {', '.join(SUPPORTED_SUFFIXES)}."
    )


def iter_records(path: Path, text_column: str = "text") -> Iterator[dict[str, Any]]:
    """Stream the records of a data file or folder as dicts (TXT: ``{text_column: line}``)."""
    path = Path(path)
    if path.is_dir():
        return _iter_folder(path, text_column)
    if not path.is_file():
        raise DataError(f"The data file {path} does not exist.")
    return _iter_file(path, text_column)


def _take(path: Path, columns: Sequence[str], max_samples: int | None) -> Iterator[tuple[Any, ...]]:
    """Yield the named columns of non-empty records, checking the columns on the first one."""
    if max_samples is not None and max_samples < 1:
        raise DataError(f"max_samples must be at least 1, not {max_samples}.")
    records = iter_records(path, columns[0])
    seen = 0
    first = True
    for record in records:
        if first:
            missing = [c for c in columns if c not in record]
            if missing:
                have = ", ".join(map(str, record)) or "none"
                raise DataError(f"{path} has no column {missing[0]!r} (its columns: {have}).")
            first = False
        values = tuple(record.get(c) for c in columns)
        text = values[0]
        if not isinstance(text, str) or not text.strip():
            continue
        yield values
        seen += 1
        if max_samples is not None and seen >= max_samples:
            return
    if seen == 0:
        raise DataError(f"{path} holds no non-empty texts in column {columns[0]!r}.")


def read_texts(
    path: Path, *, text_column: str = "text", max_samples: int | None = None
) -> list[str]:
    """The first ``max_samples`` non-empty texts of ``text_column`` (all when None)."""
    return [row[0] for row in _take(Path(path), [text_column], max_samples)]


def read_labelled(
    path: Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    max_samples: int | None = None,
    labels: Sequence[str] | None = None,
) -> tuple[list[str], list[str]]:
    """Texts and their labels (as strings); ``labels`` keeps only records with those labels."""
    keep = None if labels is None else {str(x) for x in labels}
    rows = _take(Path(path), [text_column, label_column], None)
    if keep is not None:
        rows = (r for r in rows if str(r[1]) in keep)
    if max_samples is not None:
        rows = itertools.islice(rows, max_samples)
    texts: list[str] = []
    out_labels: list[str] = []
    for text, label in rows:
        if label is None or str(label).strip() == "":
            raise DataError(
                f"{path} has a record without a {label_column!r} label (after {len(texts)} "
                "labelled ones)."
            )
        texts.append(text)
        out_labels.append(str(label))
    if not texts:
        raise DataError(f"{path} holds no texts labelled {sorted(keep or [])}.")
    return texts, out_labels


def read_corpus(path: Path, *, text_column: str = "text", skip_rows: int = 0) -> str:
    """One long text for tasks that score text as a whole (perplexity).

    A TXT file gives its exact content (line breaks and blank lines kept); after ``skip_rows``
    records, the remaining non-empty lines joined by newlines. Any other source gives its
    non-empty texts joined by blank lines.
    """
    path = Path(path)
    if skip_rows < 0:
        raise DataError(f"skip_rows must not be negative, not {skip_rows}.")
    if path.is_file() and path.suffix.lower() in TEXT_SUFFIXES:
        if skip_rows == 0:
            text = read_text(path, what="data file", limit=MAX_DATA_DOCUMENT_BYTES, error=DataError)
            if not text.strip():
                raise DataError(f"{path} holds no non-empty texts.")
            return text
        lines = read_texts(path, text_column=text_column)[skip_rows:]
        if not lines:
            raise DataError(f"{path} holds no lines after skipping {skip_rows}.")
        return "\n".join(lines)
    texts = read_texts(path, text_column=text_column)[skip_rows:]
    if not texts:
        raise DataError(f"{path} holds no texts after skipping {skip_rows}.")
    return "\n\n".join(texts)


def texts_digest(texts: Sequence[str]) -> str:
    """sha256 over the texts actually used: the data half of a statistics cache key."""
    digest = hashlib.sha256()
    for text in texts:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def load_texts(data: Path | Sequence[str], text_column: str, max_samples: int) -> list[str]:
    """Calibration texts from a data file/folder or an in-memory list (first ``max_samples``)."""
    if max_samples < 1:
        raise DataError(f"max_samples must be at least 1, not {max_samples}.")
    if isinstance(data, str | Path):
        return read_texts(Path(data), text_column=text_column, max_samples=max_samples)
    texts = [t for t in list(data)[:max_samples] if isinstance(t, str) and t.strip()]
    if not texts:
        raise DataError("The calibration text list holds no non-empty texts.")
    return texts
