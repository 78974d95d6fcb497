"""The metrics `fastprompt train` reports: accuracy and F1 of the positive class, entity-level F1
(seqeval's strict IOB2 spans), SQuAD's exact match and token F1 after the official normalisation,
and for generation corpus BLEU (sacrebleu, multi-reference), ROUGE-L (rouge-score) and exact match."""

from __future__ import annotations

import re
import string
from collections import Counter


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


_POSITIVE_NAMES = ("1", "true", "yes", "positive", "paraphrase", "entailment", "equivalent")


def positive_label(labels: list[str]) -> int:
    """The class whose F1 a two-label task reports: the one named like a positive ("1", "true", "yes",
    "positive", "entailment", ...), else the second label."""
    lower = [x.lower() for x in labels]
    return next((lower.index(n) for n in _POSITIVE_NAMES if n in lower), 1)


def classification_metrics(gold: list[int], pred: list[int], labels: list[str]) -> dict[str, float]:
    """accuracy; with two labels also f1 (of `positive_label`'s class, as GLUE reports MRPC and QQP)."""
    out = {"accuracy": sum(g == p for g, p in zip(gold, pred)) / max(len(gold), 1)}
    if len(labels) == 2:
        pos = positive_label(labels)
        tp = sum(g == pos and p == pos for g, p in zip(gold, pred))
        n_pred, n_gold = sum(p == pos for p in pred), sum(g == pos for g in gold)
        out["f1"] = 0.0 if tp == 0 else 2 * tp / (n_pred + n_gold)
    return out


# ---- SQuAD: the official evaluation script's normalisation and scores (v1.1, and v2.0's thresholds)

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower case, punctuation and the articles a/an/the removed, whitespace collapsed."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def answer_exact(gold: str, pred: str) -> float:
    return float(normalize_answer(gold) == normalize_answer(pred))


def answer_f1(gold: str, pred: str) -> float:
    """Token F1 of the normalised answers; two empty answers (v2.0's no-answer) agree."""
    g, p = normalize_answer(gold).split(), normalize_answer(pred).split()
    if not g or not p:
        return float(g == p)
    common = Counter(g) & Counter(p)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_scores(golds: dict[str, list[str]], spans: dict[str, str], null_odds: dict[str, float] | None = None,
                 threshold: float = 0.0) -> dict[str, float]:
    """exact and f1 in percent, each the max over a question's gold answers (an unanswerable
    question's golds are [""]), averaged over every gold question (a missing prediction scores 0).

    spans: question id -> the best span's text. null_odds (v2.0): how much the no-answer's score
    beats that span's; the answer is "" where null_odds > threshold. Then also best_exact/best_f1
    and their thresholds, found as the official v2.0 script does.
    """
    preds = final_answers(spans, null_odds, threshold)
    exact, f1, span_exact, span_f1 = {}, {}, {}, {}
    for qid, answers in golds.items():
        answers = [a for a in answers if normalize_answer(a)] or [""]
        for table, fn, pred in ((exact, answer_exact, preds.get(qid, "")), (f1, answer_f1, preds.get(qid, "")),
                                (span_exact, answer_exact, spans.get(qid, "")), (span_f1, answer_f1, spans.get(qid, ""))):
            table[qid] = max(fn(a, pred) for a in answers)
    n = max(len(golds), 1)
    out = {"exact": 100 * sum(exact.values()) / n, "f1": 100 * sum(f1.values()) / n}
    if null_odds is not None:
        for name, score in (("exact", span_exact), ("f1", span_f1)):
            best, thresh = _best_threshold(golds, spans, score, null_odds)
            out[f"best_{name}"], out[f"best_{name}_thresh"] = 100 * best / n, thresh
    return out


def final_answers(spans: dict[str, str], null_odds: dict[str, float] | None, threshold: float = 0.0) -> dict[str, str]:
    """The answers to report: the span, or "" where the no-answer wins by more than threshold."""
    if null_odds is None:
        return dict(spans)
    return {q: ("" if null_odds.get(q, float("-inf")) > threshold else a) for q, a in spans.items()}


def _best_threshold(golds, preds, scores, null_odds):
    """The official script's sweep: start from answering nothing, then answer questions in order of
    increasing null odds, tracking the best total."""
    no_answer = {q for q, a in golds.items() if not any(normalize_answer(x) for x in a)}
    total = best = float(len(no_answer))
    thresh = 0.0
    for qid in sorted(golds, key=lambda q: null_odds.get(q, 0.0)):
        if not preds.get(qid):
            continue
        # answering qid instead of "": gain its span's score, lose the no-answer's credit
        total += scores[qid] - (1.0 if qid in no_answer else 0.0)
        if total > best:
            best, thresh = total, null_odds.get(qid, 0.0)
    return best, thresh


# ---- generation: corpus BLEU with several references (sacrebleu), ROUGE-L (rouge-score), exact match


def generation_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """bleu (sacrebleu's corpus BLEU, 0-100, every input against all its references), rougeL (the
    F-measure of the best-matching reference per input, averaged, 0-100, rouge-score with stemming)
    and exact_match (percent of predictions equal to one of their references, whitespace-normalised)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(predictions) != len(references) or any(not r for r in references):
        raise ValueError("generation_scores needs one prediction and at least one reference per input")
    n = max(len(r) for r in references)
    # sacrebleu takes reference streams: stream i holds each input's i-th reference; inputs with
    # fewer references repeat their first (a repeated reference changes no n-gram count's clip)
    streams = [[r[i] if i < len(r) else r[0] for r in references] for i in range(n)]
    bleu = sacrebleu.corpus_bleu(predictions, streams).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = sum(scorer.score_multi(refs, pred)["rougeL"].fmeasure for pred, refs in zip(predictions, references))
    norm = lambda s: " ".join(s.split())  # noqa: E731
    exact = sum(norm(p) in {norm(r) for r in refs} for p, refs in zip(predictions, references))
    count = max(len(predictions), 1)
    return {"bleu": bleu, "rougeL": 100 * rouge / count, "exact_match": 100 * exact / count}
