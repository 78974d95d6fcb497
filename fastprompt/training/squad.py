"""Extractive question answering on SQuAD-format JSON: reading, windows over long contexts, and
answer decoding back to the context's text.

A context longer than the window is cut into overlapping windows (`doc_stride` tokens shared by
neighbours); each window is one model input ("feature"). Training marks the answer's first and last
token in every window that holds it whole, and the null position (the [CLS] token, or 0) in the
others. Decoding scores every start/end pair among each window's top logits, over all windows of a
question, and maps the best span back to characters with the tokenizer's offsets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DataError, SettingsError


@dataclass
class Question:
    """One SQuAD question. answers: the gold texts (several in dev-style files); answer_start: the
    first answer's character offset in context (None when unanswerable or unlabelled)."""

    id: str
    question: str
    context: str
    answers: list[str]
    answer_start: int | None
    impossible: bool = False


@dataclass
class Feature:
    """One window of one question. inputs: input_ids (L,) and the tokenizer's other inputs, unpadded;
    offsets: (start, end) characters of each context token, None for question/special tokens;
    start, end: the answer's token positions (the null index where the window lacks it)."""

    question: int
    inputs: dict[str, list[int]]
    offsets: list[tuple[int, int] | None]
    null: int
    start: int = 0
    end: int = 0


def looks_like_squad(path: str | Path) -> bool:
    """A .json file (SQuAD's layout; the reader checks the content)."""
    return Path(path).suffix.lower() == ".json"


def read_squad(path: str | Path) -> tuple[list[Question], bool]:
    """(questions in file order, whether the file is SQuAD 2.0, i.e. has `is_impossible`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot parse ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DataError(f"{path}: expected SQuAD JSON: an object with a 'data' list of articles with 'paragraphs'")
    out, v2, seen = [], False, set()
    for a, article in enumerate(doc["data"]):
        for p, para in enumerate(article.get("paragraphs", []) if isinstance(article, dict) else []):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            context = para.get("context") if isinstance(para, dict) else None
            if not isinstance(context, str) or not isinstance(para.get("qas"), list):
                raise DataError(f"{where}: needs a 'context' string and a 'qas' list")
            for qa in para["qas"]:
                if not isinstance(qa, dict) or not isinstance(qa.get("question"), str) or "id" not in qa:
                    raise DataError(f"{where}: every qas entry needs 'id' and 'question'")
                qid = str(qa["id"])
                if qid in seen:
                    raise DataError(f"{where}: question id {qid!r} appears twice")
                seen.add(qid)
                impossible = bool(qa.get("is_impossible", False))
                v2 = v2 or "is_impossible" in qa
                answers = [] if impossible else [x for x in qa.get("answers", []) if isinstance(x, dict) and isinstance(x.get("text"), str)]
                start = None
                if answers:
                    start = _locate(context, answers[0])
                    if start is None:
                        raise DataError(f"{where}: question {qid!r}: answer {answers[0]['text']!r} is not in the context")
                out.append(Question(qid, qa["question"], context, [x["text"] for x in answers], start, impossible))
    if not out:
        raise DataError(f"{path}: no questions")
    return out, v2


def _locate(context: str, answer: dict) -> int | None:
    """The answer's character offset: answer_start when the text is there, else its first occurrence."""
    text, start = answer["text"], answer.get("answer_start")
    if isinstance(start, int) and context[start : start + len(text)] == text:
        return start
    found = context.find(text)
    return found if found >= 0 else None


def check_windows(tokenizer, max_length: int, doc_stride: int) -> None:
    """Window settings the tokenizer can honour: the question gets at most half the window."""
    if not getattr(tokenizer, "is_fast", False):
        raise SettingsError("--task qa needs a fast tokenizer (it maps answers through token offsets)")
    room = max_length - max_length // 2 - tokenizer.num_special_tokens_to_add(pair=True)
    if not 0 < doc_stride < room:
        raise SettingsError(f"--doc-stride must be between 1 and {room - 1} for --max-length {max_length}, got {doc_stride}")


def _questions_that_fit(tokenizer, questions: list[Question], limit: int) -> list[str]:
    """Question texts, the rare one longer than `limit` tokens cut to it (the window's other half
    is the context's)."""
    texts = [q.question.lstrip() for q in questions]  # leading spaces would only waste window room
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [t if len(i) <= limit else tokenizer.decode(i[:limit]) for t, i in zip(texts, ids)]


def make_features(tokenizer, questions: list[Question], max_length: int, doc_stride: int) -> list[Feature]:
    """Every window of every question, with the answer's token positions for training."""
    check_windows(tokenizer, max_length, doc_stride)
    texts = _questions_that_fit(tokenizer, questions, max_length // 2)
    enc = tokenizer(texts, [q.context for q in questions], truncation="only_second", max_length=max_length,
                    stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True)
    names = [n for n in tokenizer.model_input_names if n in enc]
    features = []
    for i, owner in enumerate(enc["overflow_to_sample_mapping"]):
        ids = enc["input_ids"][i]
        seq = enc.sequence_ids(i)
        offsets = [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][i], seq)]
        null = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
        f = Feature(owner, {n: enc[n][i] for n in names}, offsets, null, null, null)
        q = questions[owner]
        if q.answer_start is not None:
            a0, a1 = q.answer_start, q.answer_start + len(q.answers[0])
            ctx = [t for t, o in enumerate(offsets) if o is not None]
            if ctx and offsets[ctx[0]][0] <= a0 and offsets[ctx[-1]][1] >= a1:
                f.start = max(t for t in ctx if offsets[t][0] <= a0)
                f.end = min(t for t in ctx if offsets[t][1] >= a1)
        features.append(f)
    return features


def pad_features(tokenizer, features: list[Feature], labels: bool) -> tuple[dict[str, torch.Tensor], list[int]]:
    """A batch of windows padded on the tokenizer's side -> (model inputs, each window's shift: the
    padding in front of it, 0 when padding on the right)."""
    length = max(len(f.inputs["input_ids"]) for f in features)
    left = tokenizer.padding_side == "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = {n: [] for n in features[0].inputs}
    out["attention_mask"] = []
    shifts = []
    for f in features:
        n = len(f.inputs["input_ids"])
        gap = length - n
        shifts.append(gap if left else 0)
        for name, values in f.inputs.items():
            if name == "attention_mask":
                continue
            fill = [pad_id if name == "input_ids" else 0] * gap
            out[name].append(fill + values if left else values + fill)
        mask = [1] * n
        out["attention_mask"].append([0] * gap + mask if left else mask + [0] * gap)
    batch = {k: torch.tensor(v) for k, v in out.items()}
    if labels:
        batch["start_positions"] = torch.tensor([f.start + s for f, s in zip(features, shifts)])
        batch["end_positions"] = torch.tensor([f.end + s for f, s in zip(features, shifts)])
    return batch, shifts


def decode(questions: list[Question], features: list[Feature], start_logits: list[torch.Tensor], end_logits: list[torch.Tensor],
           max_answer_length: int = 30, n_best: int = 20) -> tuple[dict[str, str], dict[str, float]]:
    """Best span per question over all its windows -> (id -> span text, id -> null odds: the null
    score minus the best span's, the lowest null score over the windows as the official v2 baseline
    does). start_logits[i], end_logits[i]: (L_i,) float logits of feature i, unpadded."""
    best: dict[int, tuple[float, str]] = {}
    null: dict[int, float] = {}
    for f, s_log, e_log in zip(features, start_logits, end_logits):
        q = questions[f.question]
        null_score = float(s_log[f.null] + e_log[f.null])
        null[f.question] = min(null.get(f.question, float("inf")), null_score)
        k = min(n_best, s_log.numel())
        starts, ends = s_log.topk(k).indices.tolist(), e_log.topk(k).indices.tolist()
        for s in starts:
            if f.offsets[s] is None:
                continue
            for e in ends:
                if f.offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                    continue
                score = float(s_log[s] + e_log[e])
                if f.question not in best or score > best[f.question][0]:
                    best[f.question] = (score, q.context[f.offsets[s][0] : f.offsets[e][1]])
    spans, odds = {}, {}
    for i, q in enumerate(questions):
        score, text = best.get(i, (float("-inf"), ""))
        spans[q.id] = text
        odds[q.id] = null.get(i, 0.0) - score if i in best else float("inf")
    return spans, odds
