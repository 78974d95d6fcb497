"""Labelled text for `fastprompt train`: file readers and the small embedded sentiment set.

The embedded set is written for this project (no third-party data): short movie-review
sentences built from hand-written phrase lists, with train and eval drawn from disjoint
subjects and phrasings so that eval accuracy measures generalisation, not recall.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path


class DataError(ValueError):
    """The data file cannot be used; the message names the file and the problem."""


_POSITIVE = [
    "was a joy from start to finish", "made me laugh out loud", "is warm, clever and moving", "deserves every award it gets",
    "kept me on the edge of my seat", "is beautifully shot and well acted", "left me smiling for days", "is a delight",
    "works wonderfully", "is sharp, funny and full of heart", "feels fresh and alive", "is the best thing I have seen this year",
    "surprised me in the best way", "is a small masterpiece", "never loses its charm", "has a lovely, generous spirit",
    "is gripping and smart", "is tender and honest", "earns its happy ending", "is great fun for the whole family",
]
_NEGATIVE = [
    "was a chore to sit through", "made me check my watch", "is dull, lazy and forgettable", "wastes a talented cast",
    "put me to sleep", "is badly written and worse acted", "left me cold", "is a mess",
    "falls flat", "is loud, empty and tiresome", "feels stale and lifeless", "is the worst thing I have seen this year",
    "disappointed me at every turn", "is a tedious failure", "never finds its footing", "has a mean, cynical streak",
    "is confusing and dumb", "is clumsy and dishonest", "ruins its own ending", "is no fun for anyone",
]
_TRAIN_SUBJECTS = ["The movie", "This film", "The sequel", "The comedy", "The documentary", "The thriller", "The script", "The new drama"]
_EVAL_SUBJECTS = ["The remake", "This picture", "The animated feature", "The director's latest"]


def embedded_sentiment(seed: int = 0) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[str]]:
    """(train, eval, label names): 224 train and 48 eval sentences; labels 0 = negative, 1 = positive.

    Eval sentences use subjects and phrases that never occur in training.
    """
    def build(subjects, phrases_by_label):
        return [(f"{s} {p}.", lab) for lab, phrases in enumerate(phrases_by_label) for s in subjects for p in phrases]

    train = build(_TRAIN_SUBJECTS, [_NEGATIVE[:14], _POSITIVE[:14]])
    evalset = build(_EVAL_SUBJECTS, [_NEGATIVE[14:], _POSITIVE[14:]])
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(evalset)
    return train, evalset, ["negative", "positive"]


_TEXT_COLUMNS = ("text", "sentence", "review")


def read_labelled(path: str | Path, labels: list[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """Reads CSV, TSV or JSONL with a text column (text/sentence/review) and a label column.

    Returns ([(text, label index)], label names). With `labels`, every label must be one of them.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    rows: list[dict] = []
    try:
        if suffix == ".jsonl":
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise DataError(f"{path}:{i}: expected a JSON object per line")
                    rows.append(row)
        elif suffix in (".tsv", ".csv"):
            with path.open(encoding="utf-8", newline="") as f:
                delim = "\t" if suffix == ".tsv" else ","
                quoting = csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL
                rows = list(csv.DictReader(f, delimiter=delim, quoting=quoting))
        else:
            raise DataError(f"{path}: unknown format {suffix!r}; expected .csv, .tsv or .jsonl")
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot parse ({e})") from None
    if not rows:
        raise DataError(f"{path}: no examples")
    columns = set(rows[0])
    text_col = next((c for c in _TEXT_COLUMNS if c in columns), None)
    if text_col is None or "label" not in columns:
        raise DataError(f"{path}: needs a text column (one of {list(_TEXT_COLUMNS)}) and a 'label' column, found {sorted(columns)}")
    raw = [str(r.get("label", "")).strip() for r in rows]
    if labels is None:
        labels = sorted(set(raw), key=lambda x: (not x.lstrip("-").isdigit(), int(x) if x.lstrip("-").isdigit() else 0, x))
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for n, (row, lab) in enumerate(zip(rows, raw), 2 if suffix != ".jsonl" else 1):
        if lab not in index:
            raise DataError(f"{path}: row {n}: unknown label {lab!r}; expected one of {labels}")
        text = row.get(text_col)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}: row {n}: empty text")
        out.append((text, index[lab]))
    return out, labels


def read_conll(path: str | Path, labels: list[str] | None = None) -> tuple[list[tuple[list[str], list[int]]], list[str]]:
    """Reads CoNLL-style token classification data: one `token ... tag` line per token (the tag is
    the last column), blank lines between sentences, `-DOCSTART-` lines skipped.

    Returns ([(tokens, tag indices)], tag names); tag names sorted with "O" first unless given.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    sentences: list[tuple[list[str], list[str]]] = []
    words: list[str] = []
    tags: list[str] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            if words:
                sentences.append((words, tags))
                words, tags = [], []
            continue
        if parts[0] == "-DOCSTART-":
            continue
        if len(parts) < 2:
            raise DataError(f"{path}:{n}: expected 'token ... tag', got {line!r}")
        words.append(parts[0])
        tags.append(parts[-1])
    if words:
        sentences.append((words, tags))
    if not sentences:
        raise DataError(f"{path}: no sentences")
    if labels is None:
        found = sorted({t for _, ts in sentences for t in ts})
        labels = (["O"] if "O" in found else []) + [t for t in found if t != "O"]
    index = {t: i for i, t in enumerate(labels)}
    out = []
    for words, ts in sentences:
        unknown = [t for t in ts if t not in index]
        if unknown:
            raise DataError(f"{path}: unknown tag {unknown[0]!r}; expected one of {labels}")
        out.append((words, [index[t] for t in ts]))
    return out, labels


def looks_like_conll(path: str | Path) -> bool:
    """True when the file name says CoNLL (`.conll`, `.txt`, `.iob`, `.bio`): by extension only,
    the content is not read; `.csv`, `.tsv`, `.jsonl` and anything else are not CoNLL."""
    return Path(path).suffix.lower() in (".conll", ".txt", ".iob", ".bio")


def _spans(tags: list[str]) -> set[tuple[str, int, int]]:
    """IOB2 entity spans (type, start, end exclusive); a stray I- starts a span, as seqeval does."""
    spans, start, kind = set(), None, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, typ = tag.partition("-")
        if start is not None and (prefix in ("O", "B") or typ != kind):
            spans.add((kind, start, i))
            start = kind = None
        if prefix == "B" or (prefix == "I" and start is None):
            start, kind = i, typ
    return spans


def entity_f1(gold: list[list[str]], pred: list[list[str]]) -> float:
    """Entity-level F1 (exact span and type match) over sentences of IOB2 tags."""
    tp = n_gold = n_pred = 0
    for g, p in zip(gold, pred):
        gs, ps = _spans(g), _spans(p)
        tp += len(gs & ps)
        n_gold += len(gs)
        n_pred += len(ps)
    if tp == 0:
        return 0.0
    precision, recall = tp / n_pred, tp / n_gold
    return 2 * precision * recall / (precision + recall)
