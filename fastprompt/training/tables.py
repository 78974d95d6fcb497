"""Labelled text tables for sequence classification: CSV, TSV or JSONL, one sentence or a pair per row.

Files are read as they come in the wild: a UTF-8 byte-order mark before the header is dropped (the
GLUE scripts write one), TSV fields are read without quote processing (sentences hold unbalanced
`"`: MRPC loses about 100 rows to csv's default quoting), and the columns are inferred from the
usual names unless given.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import NamedTuple

from .errors import DataError


class Example(NamedTuple):
    """One classification example: text, its pair's second text (None for single sentences), label index
    (None for unlabelled rows, e.g. a test file given to `fastprompt predict`)."""

    text: str
    pair: str | None
    label: int | None


# the usual column names, most specific first; pairs before single texts
PAIR_COLUMNS = (
    ("sentence1", "sentence2"), ("premise", "hypothesis"), ("question", "passage"), ("question", "sentence"),
    ("#1 String", "#2 String"), ("question1", "question2"), ("text_a", "text_b"), ("text1", "text2"),
)
TEXT_COLUMNS = ("text", "sentence", "review", "content")
LABEL_COLUMNS = ("label", "Quality", "gold_label", "labels", "class")
SUFFIXES = (".csv", ".tsv", ".jsonl")


class Columns(NamedTuple):
    text: str
    pair: str | None
    label: str | None


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a .csv, .tsv or .jsonl file as dicts (header names stripped)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    rows: list[dict] = []
    try:
        if suffix == ".jsonl":
            for i, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise DataError(f"{path}:{i}: expected a JSON object per line")
                    rows.append(row)
        elif suffix in (".tsv", ".csv"):
            # utf-8-sig: a byte-order mark would otherwise become part of the first column's name
            with path.open(encoding="utf-8-sig", newline="") as f:
                if suffix == ".tsv":
                    reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
                else:
                    reader = csv.DictReader(f)
                rows = [{(k or "").strip(): v for k, v in r.items()} for r in reader]
        else:
            raise DataError(f"{path}: unknown format {suffix!r}; expected one of {list(SUFFIXES)}")
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot parse ({e})") from None
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows


def infer_columns(path, found: set[str], text: str | None = None, pair: str | None = None, label: str | None = None,
                  need_label: bool = True) -> Columns:
    """The text, pair and label columns: the given names (each must exist) or the usual ones."""
    for flag, name in (("--text-column", text), ("--text-pair-column", pair), ("--label-column", label)):
        if name is not None and name not in found:
            raise DataError(f"{path}: {flag} {name!r} is not a column; found {sorted(found)}")
    if text is None:
        usual = [p for p in PAIR_COLUMNS if p[0] in found and p[1] in found] if pair is None else []
        if usual:
            text, pair = usual[0]
        else:
            text = next((c for c in TEXT_COLUMNS if c in found), None)
    if text is None:
        raise DataError(
            f"{path}: needs a text column ({list(TEXT_COLUMNS)}) or a pair of them ({[list(p) for p in PAIR_COLUMNS]}), "
            f"found {sorted(found)}; name them with --text-column (and --text-pair-column)"
        )
    if label is None:
        label = next((c for c in LABEL_COLUMNS if c in found), None)
    if label is None and need_label:
        raise DataError(f"{path}: needs a label column ({list(LABEL_COLUMNS)}), found {sorted(found)}; name it with --label-column")
    return Columns(text, pair, label)


def _label_text(value) -> str:
    # JSON booleans (BoolQ) and numbers become the names they print as
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value).strip()


def sort_labels(names) -> list[str]:
    """Integers in numeric order first, then the rest alphabetically."""
    def key(x):
        digits = x.lstrip("-").isdigit()
        return (not digits, int(x) if digits else 0, x)

    return sorted(set(names), key=key)


def read_classification(path: str | Path, labels: list[str] | None = None, *, text_column: str | None = None,
                        pair_column: str | None = None, label_column: str | None = None,
                        labelled: bool = True) -> tuple[list[Example], list[str], Columns]:
    """Reads single-sentence or sentence-pair classification data.

    Returns (examples, label names, the columns used). With `labels` (the training file's), every label
    must be one of them. labelled=False reads texts only (for prediction; labels become None).
    """
    rows = read_rows(path)
    first_line = 1 if Path(path).suffix.lower() == ".jsonl" else 2
    cols = infer_columns(path, set(rows[0]), text_column, pair_column, label_column, labelled)
    if not labelled:
        cols = cols._replace(label=None)
    raw = [_label_text(r.get(cols.label)) for r in rows] if cols.label else [""] * len(rows)
    if labels is None:
        labels = sort_labels(x for x in raw if x) if cols.label else []
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for n, (row, lab) in enumerate(zip(rows, raw), first_line):
        texts = []
        for col in (cols.text, cols.pair):
            if col is None:
                texts.append(None)
                continue
            value = row.get(col)
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{path}: row {n}: empty or missing {col!r}")
            texts.append(value)
        if cols.label is None:
            out.append(Example(texts[0], texts[1], None))
            continue
        if not lab:
            raise DataError(f"{path}: row {n}: empty label in column {cols.label!r}")
        if lab not in index:
            raise DataError(f"{path}: row {n}: unknown label {lab!r}; expected one of {labels}")
        out.append(Example(texts[0], texts[1], index[lab]))
    return out, labels, cols
