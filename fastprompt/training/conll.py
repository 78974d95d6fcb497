"""CoNLL-style token classification files: one `token ... tag` line per token."""

from __future__ import annotations

from pathlib import Path

from .errors import DataError


def read_conll(path: str | Path, labels: list[str] | None = None, tagged: bool = True) -> tuple[list[tuple[list[str], list[int]]], list[str]]:
    """Reads CoNLL-style token classification data: one `token ... tag` line per token (the tag is
    the last column), blank lines between sentences, `-DOCSTART-` lines skipped.
    tagged=False reads the tokens only (the first column; for prediction): tags become [].

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
        if not tagged:
            words.append(parts[0])
            continue
        if len(parts) < 2:
            raise DataError(f"{path}:{n}: expected 'token ... tag', got {line!r}")
        words.append(parts[0])
        tags.append(parts[-1])
    if words:
        sentences.append((words, tags))
    if not sentences:
        raise DataError(f"{path}: no sentences")
    if not tagged:
        return [(w, []) for w, _ in sentences], labels or []
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
