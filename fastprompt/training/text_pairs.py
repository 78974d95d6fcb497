"""Generation data: a source text and the completion a model should write for it.

Read from
- JSONL with `prompt`/`completion`, `input`/`output`, `source`/`target`, or `instruction` (+ an
  optional `input`, joined below it) / `output`;
- JSONL with chat `messages` ([{"role", "content"}, ...]): the completion is every assistant turn
  (the last one is the reference when evaluating), the source the conversation before the last;
- CSV/TSV with a source and a target column: `mr`/`ref` (E2E NLG), `source`/`target`,
  `prompt`/`completion`, `input`/`output`, `src`/`tgt`, `question`/`answer`, or named with
  `--text-column`/`--target-column`.
Several rows with the same source are several references of one input: training uses every row,
evaluation each distinct input once against all its references (`group_references`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from .errors import DataError
from .tables import read_rows

# (source column, target column), most specific first
PAIR_COLUMNS = (
    ("prompt", "completion"), ("mr", "ref"), ("source", "target"), ("input", "output"), ("src", "tgt"), ("question", "answer"),
)
ROLES = ("system", "user", "assistant", "tool")


class TextPair(NamedTuple):
    """One generation example: source (a text, or for chat the messages before the last assistant
    turn), target (the completion; None for unlabelled rows), messages (chat: the whole conversation
    as (role, content) pairs; None for plain pairs)."""

    source: str | tuple
    target: str | None
    messages: tuple | None = None

    @property
    def key(self) -> str:
        """What identifies the input (rows sharing it are references of one input)."""
        return self.source if isinstance(self.source, str) else json.dumps(self.source, ensure_ascii=False)

    def input_for_output(self):
        """The input as predictions.jsonl writes it: the text, or the chat messages as dicts."""
        return self.source if isinstance(self.source, str) else [{"role": r, "content": c} for r, c in self.source]


class Columns(NamedTuple):
    """How rows were read: 'chat', 'instruction' or 'pair' (source and target column names)."""

    kind: str
    source: str | None = None
    target: str | None = None


def looks_like_generation(path: str | Path) -> bool:
    """Whether the file's first row has generation columns (and no classification label)."""
    try:
        rows = read_rows(path)
    except DataError:
        return False
    found = set(rows[0])
    if "messages" in found or ("instruction" in found and "output" in found):
        return True
    if any(c in found for c in ("label", "labels", "Quality", "gold_label", "class")):
        return False
    return any(s in found and t in found for s, t in PAIR_COLUMNS)


def _columns(path, found: set[str], source: str | None, target: str | None, need_target: bool) -> Columns:
    for flag, name in (("--text-column", source), ("--target-column", target)):
        if name is not None and name not in found:
            raise DataError(f"{path}: {flag} {name!r} is not a column; found {sorted(found)}")
    if source is None and target is None:
        if "messages" in found:
            return Columns("chat")
        if "instruction" in found:
            return Columns("instruction", "instruction", "output" if "output" in found else None)
    if source is None:
        source = next((s for s, t in PAIR_COLUMNS if s in found and (t in found or not need_target or t == target)), None)
    if target is None and need_target:
        target = next((t for s, t in PAIR_COLUMNS if s == source and t in found), None)
    if source is None or (need_target and target is None):
        raise DataError(
            f"{path}: needs a source and a target column ({[list(p) for p in PAIR_COLUMNS]}), instruction/output, or chat "
            f"'messages', found {sorted(found)}; name them with --text-column and --target-column"
        )
    return Columns("pair", source, target if target in found else None)


def _text(path, n, row, col, what) -> str:
    value = row.get(col)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{path}: row {n}: empty or missing {what} in column {col!r}")
    return value.strip()


def _chat(path, n, row, labelled: bool) -> TextPair:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{path}: row {n}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{path}: row {n}: message {i} must be {{'role': one of {list(ROLES)}, 'content': a string}}, got {m!r}")
        turns.append((m["role"], m["content"]))
    last = max((i for i, (r, _) in enumerate(turns) if r == "assistant"), default=None)
    if last is None:
        if labelled:
            raise DataError(f"{path}: row {n}: no assistant message to learn")
        return TextPair(tuple(turns), None, None)
    if not turns[last][1].strip():
        raise DataError(f"{path}: row {n}: empty completion (assistant message {last})")
    if last == 0:
        raise DataError(f"{path}: row {n}: the conversation starts with the assistant: no input to answer")
    return TextPair(tuple(turns[:last]), turns[last][1].strip(), tuple(turns[: last + 1]))


def read_text_pairs(path: str | Path, *, text_column: str | None = None, target_column: str | None = None,
                    labelled: bool = True, columns: Columns | None = None) -> tuple[list[TextPair], Columns]:
    """Reads generation data; labelled=False (predict) needs sources only. columns: read as a
    training file was read (its saved Columns), when this file has them."""
    rows = read_rows(path)
    first_line = 1 if Path(path).suffix.lower() == ".jsonl" else 2
    if columns is None or (columns.kind != "chat" and columns.source not in rows[0]):
        columns = _columns(path, set(rows[0]), text_column, target_column, labelled)
    out = []
    for n, row in enumerate(rows, first_line):
        if columns.kind == "chat":
            out.append(_chat(path, n, row, labelled))
            continue
        source = _text(path, n, row, columns.source, "source")
        if columns.kind == "instruction" and isinstance(row.get("input"), str) and row["input"].strip():
            source = f"{source}\n\n{row['input'].strip()}"
        target = None
        if labelled or (columns.target is not None and columns.target in row):
            target = _text(path, n, row, columns.target, "completion") if labelled else (row.get(columns.target) or "").strip() or None
        out.append(TextPair(source, target))
    return out, columns


def group_references(pairs: list[TextPair]) -> tuple[list[TextPair], list[list[str]]]:
    """(one pair per distinct input in first-seen order, the references of each)."""
    first: dict[str, int] = {}
    inputs, refs = [], []
    for p in pairs:
        if p.key not in first:
            first[p.key] = len(inputs)
            inputs.append(p)
            refs.append([])
        if p.target is not None:
            refs[first[p.key]].append(p.target)
    return inputs, refs
