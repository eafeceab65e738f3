"""Read calibration and evaluation texts (and labels) from JSONL, CSV, TXT or a local HF dataset.

Why one reader: calibration, Fisher estimation and the accuracy benchmark all take "a data file
and a column name"; they must agree on what a sample is and fail the same way on bad input.

- ``.jsonl`` / ``.json`` (one object per line, or a JSON list of objects): records by key.
- ``.csv`` / ``.tsv``: records by header name.
- ``.txt``: one sample per paragraph (blank-line separated; hard-wrapped lines joined), so a
  novel gives sentence-sized samples rather than 70-character fragments. There is no column.
- a folder: a dataset saved with ``datasets.save_to_disk`` (needs the ``datasets`` package; the
  ``train`` split or the first one), or else the data files in it, in name order.

Records are streamed, so asking for ``max_samples`` reads only as far as needed.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from factorlm.errors import BackendUnavailableError, DataError

__all__ = [
    "SUPPORTED_SUFFIXES",
    "iter_records",
    "read_labelled",
    "read_texts",
    "texts_digest",
]

logger = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".txt")
_TXT_COLUMN = "text"


def _iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        first = handle.read(1)
        while first.isspace():
            first = handle.read(1)
        handle.seek(0)
        if first == "[":  # a JSON array of records
            try:
                records = json.load(handle)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})."
                ) from exc
            for i, record in enumerate(records):
                if not isinstance(record, dict):
                    raise DataError(f"{path} item {i} is not a JSON object.")
                yield record
            return
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {number} is not valid JSON ({exc.msg}).") from exc
            if not isinstance(record, dict):
                raise DataError(f"{path} line {number} is not a JSON object.")
            yield record


def _iter_csv(path: Path) -> Iterator[dict[str, Any]]:
    delimiter = "\t" if path.suffix == ".tsv" else ","
    with path.open(encoding="utf-8", newline="") as handle:
        yield from csv.DictReader(handle, delimiter=delimiter)


def _iter_txt(path: Path) -> Iterator[dict[str, Any]]:
    paragraph: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                paragraph.append(line.strip())
            elif paragraph:
                yield {_TXT_COLUMN: " ".join(paragraph)}
                paragraph = []
    if paragraph:
        yield {_TXT_COLUMN: " ".join(paragraph)}


def _iter_folder(path: Path) -> Iterator[dict[str, Any]]:
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
        yield from _iter_file(file)


def _iter_file(path: Path) -> Iterator[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _iter_jsonl(path)
    if suffix in (".csv", ".tsv"):
        return _iter_csv(path)
    if suffix == ".txt":
        return _iter_txt(path)
    raise DataError(
        f"{path} has an unsupported extension; use one of {', '.join(SUPPORTED_SUFFIXES)}."
    )


def iter_records(path: Path) -> Iterator[dict[str, Any]]:
    """Stream the records of a data file or folder as dicts (TXT: ``{"text": paragraph}``)."""
    path = Path(path)
    if path.is_dir():
        return _iter_folder(path)
    if not path.is_file():
        raise DataError(f"The data file {path} does not exist.")
    return _iter_file(path)


def _take(path: Path, columns: Sequence[str], max_samples: int | None) -> Iterator[tuple[Any, ...]]:
    """Yield the named columns of non-empty records, checking the columns on the first one."""
    if max_samples is not None and max_samples < 1:
        raise DataError(f"max_samples must be at least 1, not {max_samples}.")
    records = iter_records(path)
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
        texts.append(text)
        out_labels.append(str(label))
    if not texts:
        raise DataError(f"{path} holds no texts labelled {sorted(keep or [])}.")
    return texts, out_labels


def texts_digest(texts: Sequence[str]) -> str:
    """sha256 over the texts actually used: the data half of a statistics cache key."""
    digest = hashlib.sha256()
    for text in texts:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()
