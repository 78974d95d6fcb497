"""The tasks `fastprompt train` runs, one class each: what it reads, how a batch becomes model
inputs with labels, and how it is scored and predicted.

- `Classification`: one sentence or a pair per example (token type ids where the model has them;
  longest-first truncation keeps both parts); accuracy, and F1 of the positive class for two labels.
- `TokenTagging`: CoNLL files; a word's tag goes on its first sub-token; entity-level F1.
- `QuestionAnswering`: SQuAD JSON (v1.1, or v2.0 with `is_impossible`); windows over long contexts,
  a start/end head; exact match and token F1 as the official script computes them.
"""

from __future__ import annotations

import torch

from . import squad
from .conll import looks_like_conll, read_conll
from .embedded import embedded_sentiment
from .metrics import classification_metrics, entity_f1, final_answers, squad_scores
from .tables import DataError, Example, read_classification

EVAL_BATCH = 64


def _forward_batches(model, items, size, encode):
    """model outputs per batch of items, in eval mode without gradients (train mode restored)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(items), size):
                batch = items[i : i + size]
                inputs, extra = encode(batch)
                yield batch, model(**inputs), extra
    finally:
        model.train(was_training)


class Classification:
    """Sequence classification of single sentences or sentence pairs."""

    kind, metric, metric_label, auto_class = "seq", "accuracy", "accuracy", "AutoModelForSequenceClassification"
    default_max_length = 64
    tokenizer_kwargs: dict = {}

    def __init__(self, train: list[Example], eval_set: list[Example], labels: list[str], columns=None):
        self.train_items, self.eval_items, self.labels, self.columns = train, eval_set, labels, columns

    @classmethod
    def read(cls, args) -> Classification:
        if args.data is None:
            train, evalset, labels = embedded_sentiment(args.seed)
            return cls([Example(t, None, y) for t, y in train], [Example(t, None, y) for t, y in evalset], labels)
        kw = dict(text_column=args.text_column, pair_column=args.text_pair_column, label_column=args.label_column)
        train, labels, cols = read_classification(args.data, **kw)
        evalset = read_classification(args.eval, labels, **kw)[0] if args.eval else []
        return cls(train, evalset, labels, cols)

    def describe(self) -> str:
        if self.columns is None:
            return "single sentences"
        c = self.columns
        return f"pairs ({c.text!r}, {c.pair!r})" if c.pair else f"single sentences ({c.text!r})"

    def prepare(self, tokenizer, max_length: int, args) -> None:
        self.max_length = max_length

    def settings(self) -> dict:
        return {"labels": self.labels, "columns": None if self.columns is None else self.columns._asdict()}

    def encode(self, tokenizer, batch: list[Example], labels: bool = True):
        pairs = [e.pair for e in batch] if batch[0].pair is not None else None
        # truncation=True is longest-first for pairs: both parts keep tokens
        enc = tokenizer([e.text for e in batch], pairs, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        if labels:
            enc["labels"] = torch.tensor([e.label for e in batch])
        return enc

    def _guesses(self, model, tokenizer, items):
        out = []
        for _, o, _ in _forward_batches(model, items, EVAL_BATCH, lambda b: (self.encode(tokenizer, b, labels=False), None)):
            out += o.logits.float().softmax(-1).tolist()
        return out

    def evaluate(self, model, tokenizer) -> tuple[dict, object]:
        probs = self._guesses(model, tokenizer, self.eval_items)
        pred = [max(range(len(p)), key=p.__getitem__) for p in probs]
        return classification_metrics([e.label for e in self.eval_items], pred, self.labels), [self.labels[i] for i in pred]

    def predict(self, model, tokenizer, items: list[Example]) -> list[dict]:
        """One {"label": name, "probability": p} per example, in order."""
        rows = []
        for p in self._guesses(model, tokenizer, items):
            i = max(range(len(p)), key=p.__getitem__)
            rows.append({"label": self.labels[i], "probability": p[i]})
        return rows


def _first_subtokens(enc, i: int) -> list[tuple[int, int]]:
    """(word, position of its first sub-token) for example i; words cut by truncation, or that
    tokenize to nothing, are absent."""
    first, previous = [], None
    for j, w in enumerate(enc.word_ids(i)):
        if w is not None and w != previous:
            first.append((w, j))
        previous = w
    return first


class TokenTagging:
    """Token classification (NER) on CoNLL files."""

    kind, metric, metric_label, auto_class = "token", "f1", "entity F1", "AutoModelForTokenClassification"
    default_max_length = 64
    tokenizer_kwargs = {"add_prefix_space": True}  # GPT-2/RoBERTa-style tokenizers need it for pre-split words

    def __init__(self, train, eval_set, labels):
        self.train_items, self.eval_items, self.labels = train, eval_set, labels

    @classmethod
    def read(cls, args) -> TokenTagging:
        if args.data is None:
            raise DataError("--task token needs --data (a CoNLL file)")
        train, labels = read_conll(args.data)
        return cls(train, read_conll(args.eval, labels)[0] if args.eval else [], labels)

    def describe(self) -> str:
        return "tagged tokens (CoNLL)"

    def prepare(self, tokenizer, max_length: int, args) -> None:
        self.max_length = max_length

    def settings(self) -> dict:
        return {"labels": self.labels}

    def encode(self, tokenizer, batch, labels: bool = True):
        """(words, tags) -> inputs; each word's tag on its first sub-token, -100 elsewhere (so the loss
        and the logits keep the input's length)."""
        enc = tokenizer([w for w, _ in batch], is_split_into_words=True, padding=True, truncation=True, max_length=self.max_length,
                        return_tensors="pt")
        if labels:
            y = torch.full(enc["input_ids"].shape, -100, dtype=torch.long)
            for i, (_, tags) in enumerate(batch):
                for w, j in _first_subtokens(enc, i):
                    y[i, j] = tags[w]
            enc["labels"] = y
        return enc

    def _tags(self, model, tokenizer, items):
        out = []

        def encode(b):
            enc = self.encode(tokenizer, b, labels=False)
            return enc, [_first_subtokens(enc, i) for i in range(len(b))]

        for batch, o, firsts in _forward_batches(model, items, EVAL_BATCH, encode):
            guess = o.logits.argmax(-1)
            for i, (words, _) in enumerate(batch):
                tags = ["O"] * len(words)  # words cut off by --max-length are predicted O
                for w, j in firsts[i]:
                    tags[w] = self.labels[int(guess[i, j])]
                out.append(tags)
        return out

    def evaluate(self, model, tokenizer) -> tuple[dict, object]:
        pred = self._tags(model, tokenizer, self.eval_items)
        gold = [[self.labels[t] for t in tags] for _, tags in self.eval_items]
        return {"f1": entity_f1(gold, pred)}, pred

    def predict(self, model, tokenizer, items) -> list[dict]:
        return [{"tokens": words, "tags": tags} for (words, _), tags in zip(items, self._tags(model, tokenizer, items))]


class QuestionAnswering:
    """Extractive QA: a start/end head (`qa_outputs`) trained with the prompts."""

    kind, metric, metric_label, auto_class = "qa", "f1", "F1", "AutoModelForQuestionAnswering"
    default_max_length = 384
    tokenizer_kwargs: dict = {}
    labels = None

    def __init__(self, train: list[squad.Question], eval_set: list[squad.Question], v2: bool):
        self.questions, self.eval_questions, self.v2 = train, eval_set, v2

    @classmethod
    def read(cls, args) -> QuestionAnswering:
        if args.data is None:
            raise DataError("--task qa needs --data (SQuAD JSON)")
        train, v2 = squad.read_squad(args.data)
        evalset, v2_eval = squad.read_squad(args.eval) if args.eval else ([], False)
        return cls([q for q in train if q.answer_start is not None or q.impossible], evalset, v2 or v2_eval)

    def describe(self) -> str:
        return f"SQuAD {'2.0' if self.v2 else '1.1'} questions"

    def prepare(self, tokenizer, max_length: int, args) -> None:
        self.max_length = max_length
        self.doc_stride = args.doc_stride if args.doc_stride is not None else min(128, max_length // 4)
        self.max_answer_length = args.max_answer_length
        squad.check_windows(tokenizer, max_length, self.doc_stride)
        # the windows are tokenized once; the loop batches windows
        self.train_items = squad.make_features(tokenizer, self.questions, max_length, self.doc_stride) if self.questions else []
        self.eval_items = self.eval_questions
        self._eval_features = None

    def settings(self) -> dict:
        return {"doc_stride": self.doc_stride, "max_answer_length": self.max_answer_length, "squad_v2": self.v2}

    def encode(self, tokenizer, batch: list[squad.Feature], labels: bool = True):
        return squad.pad_features(tokenizer, batch, labels)[0]

    def _spans(self, model, tokenizer, questions):
        if questions is self.eval_questions:
            # the eval windows are the same every epoch: tokenized once
            if self._eval_features is None:
                self._eval_features = squad.make_features(tokenizer, questions, self.max_length, self.doc_stride)
            features = self._eval_features
        else:
            features = squad.make_features(tokenizer, questions, self.max_length, self.doc_stride)
        starts, ends = [], []
        for batch, o, shifts in _forward_batches(model, features, EVAL_BATCH // 2, lambda b: squad.pad_features(tokenizer, b, False)):
            for i, (f, shift) in enumerate(zip(batch, shifts)):
                n = len(f.inputs["input_ids"])
                starts.append(o.start_logits[i, shift : shift + n].float())
                ends.append(o.end_logits[i, shift : shift + n].float())
        return squad.decode(questions, features, starts, ends, self.max_answer_length)

    def evaluate(self, model, tokenizer) -> tuple[dict, object]:
        spans, odds = self._spans(model, tokenizer, self.eval_questions)
        golds = {q.id: (q.answers if not q.impossible else [""]) for q in self.eval_questions}
        null = odds if self.v2 else None
        return squad_scores(golds, spans, null), final_answers(spans, null)

    def predict(self, model, tokenizer, questions) -> dict[str, str]:
        """id -> answer text, the official evaluation script's input."""
        spans, odds = self._spans(model, tokenizer, questions)
        return final_answers(spans, odds if self.v2 else None)


TASKS = {"seq": Classification, "token": TokenTagging, "qa": QuestionAnswering}


def infer_task(data: str | None) -> str:
    """The task a --data file implies: CoNLL names -> token, .json -> qa, else seq."""
    if data is None:
        return "seq"
    if looks_like_conll(data):
        return "token"
    return "qa" if squad.looks_like_squad(data) else "seq"
