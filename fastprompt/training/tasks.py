"""The tasks `fastprompt train` runs, one class each, behind one protocol (`Task`): what it reads,
how a batch becomes model inputs with labels, how it is scored, what it saves beside the prompts and
how `fastprompt predict` rebuilds it. The loop and `predict` know nothing task-specific.

- `Classification`: one sentence or a pair per example (token type ids where the model has them;
  longest-first truncation keeps both parts); accuracy, and F1 of the positive class for two labels.
- `TokenTagging`: CoNLL files; a word's tag goes on its first sub-token; entity-level F1.
- `QuestionAnswering`: SQuAD JSON (v1.1, or v2.0 with `is_impossible`); windows over long contexts,
  a start/end head; exact match and token F1 as the official script computes them.
- `Generation`: source/completion pairs or chat conversations on a causal LM; loss on the completion
  only; evaluation by batched generation (BLEU, ROUGE-L, exact match) and the completions' loss.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..integration.facade import QUANTISATION_SKIP
from ..storage import PromptLoadError, atomic_write
from . import squad
from .conll import looks_like_conll, read_conll
from .embedded import embedded_sentiment
from .errors import DataError, ModelLoadError
from .generation import generate_texts
from .lm_encoding import LMEncoder
from .metrics import classification_metrics, entity_f1, final_answers, generation_scores, squad_scores
from .tables import Columns, Example, read_classification
from .text_pairs import Columns as PairColumns
from .text_pairs import TextPair, group_references, looks_like_generation, read_text_pairs

EVAL_BATCH = 64
# heads stay float under 8/4-bit loading: they train


def to_device(inputs: dict, model) -> dict:
    device = next(model.parameters()).device
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def write_json(path: Path, value) -> None:
    atomic_write(path, (json.dumps(value, indent=1, ensure_ascii=False) + "\n").encode())


def _forward_batches(model, items, size, encode):
    """model outputs per batch of items, in eval mode without gradients (train mode restored)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(items), size):
                batch = items[i : i + size]
                inputs, extra = encode(batch)
                yield batch, model(**to_device(inputs, model)), extra
    finally:
        model.train(was_training)


def _need(info: dict, where: str, **kinds) -> None:
    """task.json fields of the given types, or PromptLoadError naming the field."""
    for name, kind in kinds.items():
        value = info.get(name)
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if not ok:
            raise PromptLoadError(f"{where}: needs {name!r} ({getattr(kind, '__name__', kind)}), got {value!r}")


class Task:
    """The protocol: class attributes say what the task is; `read` builds it from TrainSettings for
    training, `from_saved` from task.json for prediction."""

    kind, metric, metric_label, auto_class = "", "", "", ""
    default_max_length = 64
    tokenizer_kwargs: dict = {}
    unit = "examples"  # what one training item is
    float_modules = QUANTISATION_SKIP  # kept float under 8/4-bit loading
    predictions_file = "predictions.json"
    labels: list[str] | None = None
    train_items: list = []
    eval_items: list = []

    @classmethod
    def read(cls, settings) -> Task:
        raise NotImplementedError

    @classmethod
    def from_saved(cls, info: dict, where: str) -> Task:
        """The task a training run saved in task.json (validated; PromptLoadError names the field)."""
        raise NotImplementedError

    def read_inputs(self, settings) -> list:
        """What `fastprompt predict` reads from settings.data (labels not needed)."""
        raise NotImplementedError

    def model_kwargs(self) -> dict:
        """from_pretrained arguments that size the task's head."""
        return {}

    def check_model(self, model, path: str) -> None:
        """Raises ModelLoadError for a model this task cannot train."""

    def describe(self) -> str:
        raise NotImplementedError

    def prepare(self, tokenizer, max_length: int) -> None:
        """Tokenizer-dependent preparation (and checks) before training or prediction."""
        self.max_length = max_length

    def settings(self) -> dict:
        """What task.json records beside the task name, model and max_length."""
        return {}

    def encode(self, tokenizer, batch) -> dict:
        raise NotImplementedError

    def evaluate(self, model, tokenizer) -> tuple[dict, object]:
        """(metrics with self.metric among them, predictions to save)."""
        raise NotImplementedError

    def predict(self, model, tokenizer, items):
        raise NotImplementedError

    def write_predictions(self, path: Path, predictions) -> None:
        write_json(path, predictions)


def _labelled_head(labels: list[str]) -> dict:
    return dict(num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)},
                ignore_mismatched_sizes=True)


def _check_labels(labels: list[str], path) -> None:
    if len(labels) < 2:
        raise DataError(f"--data {path}: need at least 2 distinct labels, found {labels}")


class Classification(Task):
    """Sequence classification of single sentences or sentence pairs."""

    kind, metric, metric_label, auto_class = "seq", "accuracy", "accuracy", "AutoModelForSequenceClassification"

    def __init__(self, train: list[Example], eval_set: list[Example], labels: list[str], columns=None):
        self.train_items, self.eval_items, self.labels, self.columns = train, eval_set, labels, columns

    @classmethod
    def read(cls, settings) -> Classification:
        if settings.data is None:
            train, evalset, labels = embedded_sentiment(settings.seed)
            return cls([Example(t, None, y) for t, y in train], [Example(t, None, y) for t, y in evalset], labels)
        kw = dict(text_column=settings.text_column, pair_column=settings.text_pair_column, label_column=settings.label_column)
        train, labels, cols = read_classification(settings.data, **kw)
        _check_labels(labels, settings.data)
        evalset = read_classification(settings.eval, labels, **kw)[0] if settings.eval else []
        return cls(train, evalset, labels, cols)

    @classmethod
    def from_saved(cls, info, where):
        if not (isinstance(info.get("labels"), list) and all(isinstance(x, str) for x in info["labels"])):
            raise PromptLoadError(f"{where}: needs 'labels', a list of label names")
        columns = info.get("columns")
        try:
            columns = Columns(**columns) if columns else None
        except TypeError:
            raise PromptLoadError(f"{where}: 'columns' must be {{text, pair, label}}, got {columns!r}") from None
        return cls([], [], info["labels"], columns)

    def read_inputs(self, settings):
        named = dict(text_column=settings.text_column, pair_column=settings.text_pair_column)
        if settings.text_column is None and self.columns is not None:
            try:  # the training file's columns, when this file has them
                return read_classification(settings.data, self.labels, text_column=self.columns.text, pair_column=self.columns.pair,
                                           labelled=False)[0]
            except DataError:
                pass
        return read_classification(settings.data, self.labels, labelled=False, **named)[0]

    def model_kwargs(self):
        return _labelled_head(self.labels)

    def describe(self) -> str:
        if self.columns is None:
            return "single sentences"
        c = self.columns
        return f"pairs ({c.text!r}, {c.pair!r})" if c.pair else f"single sentences ({c.text!r})"

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


class TokenTagging(Task):
    """Token classification (NER) on CoNLL files."""

    kind, metric, metric_label, auto_class = "token", "f1", "entity F1", "AutoModelForTokenClassification"
    tokenizer_kwargs = {"add_prefix_space": True}  # GPT-2/RoBERTa-style tokenizers need it for pre-split words

    def __init__(self, train, eval_set, labels):
        self.train_items, self.eval_items, self.labels = train, eval_set, labels

    @classmethod
    def read(cls, settings) -> TokenTagging:
        if settings.data is None:
            raise DataError("--task token needs --data (a CoNLL file)")
        train, labels = read_conll(settings.data)
        _check_labels(labels, settings.data)
        return cls(train, read_conll(settings.eval, labels)[0] if settings.eval else [], labels)

    @classmethod
    def from_saved(cls, info, where):
        Classification.from_saved(info, where)  # the same 'labels' check
        return cls([], [], info["labels"])

    def read_inputs(self, settings):
        return read_conll(settings.data, self.labels, tagged=False)[0]

    def model_kwargs(self):
        return _labelled_head(self.labels)

    def describe(self) -> str:
        return "tagged tokens (CoNLL)"

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


class QuestionAnswering(Task):
    """Extractive QA: a start/end head (`qa_outputs`) trained with the prompts."""

    kind, metric, metric_label, auto_class = "qa", "f1", "F1", "AutoModelForQuestionAnswering"
    default_max_length = 384
    unit = "windows"

    def __init__(self, train: list[squad.Question], eval_set: list[squad.Question], v2: bool, doc_stride: int | None = None,
                 max_answer_length: int = 30):
        self.questions, self.eval_questions, self.v2 = train, eval_set, v2
        self.doc_stride, self.max_answer_length = doc_stride, max_answer_length

    @classmethod
    def read(cls, settings) -> QuestionAnswering:
        if settings.data is None:
            raise DataError("--task qa needs --data (SQuAD JSON)")
        train, v2 = squad.read_squad(settings.data)
        evalset, v2_eval = squad.read_squad(settings.eval) if settings.eval else ([], False)
        return cls([q for q in train if q.answer_start is not None or q.impossible], evalset, v2 or v2_eval, settings.doc_stride,
                   settings.max_answer_length)

    @classmethod
    def from_saved(cls, info, where):
        _need(info, where, doc_stride=int, max_answer_length=int)
        return cls([], [], bool(info.get("squad_v2")), info["doc_stride"], info["max_answer_length"])

    def read_inputs(self, settings):
        return squad.read_squad(settings.data)[0]

    def model_kwargs(self):
        # a start and an end logit per token, whatever num_labels the checkpoint's config carries
        return dict(num_labels=2, ignore_mismatched_sizes=True)

    def describe(self) -> str:
        return f"SQuAD {'2.0' if self.v2 else '1.1'} questions"

    def prepare(self, tokenizer, max_length: int) -> None:
        self.max_length = max_length
        if self.doc_stride is None:
            self.doc_stride = min(128, max_length // 4)
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


GENERATION_BATCH = 32


class Generation(Task):
    """Causal language modelling of completions: source -> completion pairs or chat conversations."""

    kind, metric, metric_label, auto_class = "lm", "bleu", "BLEU", "AutoModelForCausalLM"
    default_max_length = 256
    float_modules = ("lm_head",)
    predictions_file = "predictions.jsonl"

    def __init__(self, train: list[TextPair], eval_set: list[TextPair], columns: PairColumns, template: str | None = None,
                 num_beams: int = 1, max_new_tokens: int | None = None):
        self.pairs, self.eval_pairs, self.columns = train, eval_set, columns
        self.template, self.num_beams, self.max_new_tokens = template, num_beams, max_new_tokens
        self.train_items, self.eval_items = train, eval_set

    @classmethod
    def read(cls, settings) -> Generation:
        if settings.data is None:
            raise DataError("--task lm needs --data (JSONL prompt/completion or chat messages, or CSV/TSV with source and target columns)")
        train, columns = read_text_pairs(settings.data, text_column=settings.text_column, target_column=settings.target_column)
        evalset = read_text_pairs(settings.eval, columns=columns, text_column=settings.text_column,
                                  target_column=settings.target_column)[0] if settings.eval else []
        return cls(train, evalset, columns, settings.template, settings.num_beams, settings.max_new_tokens)

    @classmethod
    def from_saved(cls, info, where):
        _need(info, where, columns=dict, num_beams=int, max_new_tokens=int)
        if info.get("template") is not None and not isinstance(info["template"], str):
            raise PromptLoadError(f"{where}: 'template' must be a string or null, got {info['template']!r}")
        try:
            columns = PairColumns(**info["columns"])
        except TypeError:
            raise PromptLoadError(f"{where}: 'columns' must be {{kind, source, target}}, got {info['columns']!r}") from None
        return cls([], [], columns, info.get("template"), info["num_beams"], info["max_new_tokens"])

    def read_inputs(self, settings):
        return read_text_pairs(settings.data, text_column=settings.text_column, labelled=False, columns=self.columns)[0]

    def check_model(self, model, path):
        from ..integration.facade import spec_for

        stacks = spec_for(model).stacks(model) if not model.config.is_encoder_decoder else []
        if not stacks or not stacks[0].causal:
            raise ModelLoadError(f"--model {path}: --task lm trains a decoder-only causal LM (Llama, Qwen, GPT-2, ...); "
                                 f"{type(model).__name__} is not one")

    def describe(self) -> str:
        if self.columns.kind == "chat":
            return "chat conversations"
        return f"{self.columns.kind} ({self.columns.source!r} -> {self.columns.target!r})"

    def prepare(self, tokenizer, max_length: int) -> None:
        self.max_length = max_length
        self.encoder = LMEncoder(tokenizer, self.template, max_length, chat=self.columns.kind == "chat")
        self.train_items = [self.encoder.train_example(p) for p in self.pairs]
        self.eval_items = [self.encoder.train_example(p) for p in self.eval_pairs]
        self.eval_inputs, self.eval_refs = group_references(self.eval_pairs)
        if self.max_new_tokens is None:
            # room for the longest reference, and a little more
            targets = [p.target for p in (self.eval_pairs or self.pairs) if p.target]
            longest = max((self.encoder.completion_length(t) for t in targets), default=48)
            self.max_new_tokens = min(longest + 16, 256)

    def settings(self) -> dict:
        return {"columns": self.columns._asdict(), "template": self.template, "num_beams": self.num_beams,
                "max_new_tokens": self.max_new_tokens}

    def encode(self, tokenizer, batch) -> dict:
        return self.encoder.pad_right(batch)

    def _eval_loss(self, model) -> float:
        """Mean negative log-likelihood per completion token over the eval rows (every reference)."""
        total = count = 0.0
        for _, out, n in _forward_batches(model, self.eval_items, GENERATION_BATCH, self._loss_batch):
            total += out.loss.float().item() * n
            count += n
        return total / max(count, 1)

    def _loss_batch(self, batch):
        enc = self.encoder.pad_right(batch)
        return enc, int((enc["labels"][:, 1:] != -100).sum())  # the model shifts labels by one

    def _generate(self, model, tokenizer, inputs: list[TextPair]) -> list[str]:
        prompts = [self.encoder.generation_prompt(p, self.max_new_tokens) for p in inputs]
        return generate_texts(model, tokenizer, self.encoder, prompts, max(1, GENERATION_BATCH // self.num_beams),
                              self.max_new_tokens, self.num_beams)

    def evaluate(self, model, tokenizer) -> tuple[dict, object]:
        loss = self._eval_loss(model)
        predictions = self._generate(model, tokenizer, self.eval_inputs)
        metrics = generation_scores(predictions, self.eval_refs)
        metrics.update(eval_loss=loss, perplexity=math.exp(min(loss, 50.0)))
        return metrics, self._rows(self.eval_inputs, predictions)

    @staticmethod
    def _rows(inputs, predictions) -> list[dict]:
        return [{"input": p.input_for_output(), "prediction": text} for p, text in zip(inputs, predictions)]

    def predict(self, model, tokenizer, items) -> list[dict]:
        """One {"input", "prediction"} per distinct input, in first-seen order."""
        inputs, _ = group_references(items)
        return self._rows(inputs, self._generate(model, tokenizer, inputs))

    def write_predictions(self, path: Path, predictions) -> None:
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in predictions)
        atomic_write(path, lines.encode())


TASKS = {t.kind: t for t in (Classification, TokenTagging, QuestionAnswering, Generation)}


def infer_task(data: str | None, target_column: str | None = None) -> str:
    """The task a --data file implies: CoNLL names -> token, .json -> qa, generation columns (or
    --target-column) -> lm, else seq."""
    if data is None:
        return "seq"
    if looks_like_conll(data):
        return "token"
    if squad.looks_like_squad(data):
        return "qa"
    return "lm" if target_column is not None or looks_like_generation(data) else "seq"
