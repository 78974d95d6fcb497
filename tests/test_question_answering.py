"""Extractive QA: SQuAD windows that map answers back to the context's text, span decoding over
windows, the official scores, and QA models patched with every method against references (the
explicit-concatenation prefix, the un-checkpointed run, per-task prompts for a bank)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from conftest import DATA, TINY, VOCAB
from test_patch_ptv2 import _reference_run

import fastprompt
from fastprompt.training import squad
from fastprompt.training.metrics import answer_f1, normalize_answer, squad_scores
from fastprompt.training.tasks import QuestionAnswering

SQUAD = DATA / "squad"
QA_CLASSES = {"bert": tf.BertForQuestionAnswering, "roberta": tf.RobertaForQuestionAnswering, "llama": tf.LlamaForQuestionAnswering,
              "qwen2": tf.Qwen2ForQuestionAnswering}


def _tokenizer():
    from fastprompt.training.loop import default_model_path

    return tf.AutoTokenizer.from_pretrained(default_model_path())


def qa_model(arch, seed=0):
    torch.manual_seed(seed)
    config = TINY[arch][0]()
    config.pad_token_id = 1 if arch == "roberta" else 0
    return QA_CLASSES[arch](config).eval()


def qa_inputs(batch=3, length=9, seed=1):
    """Right-padded (row 1 ends 3 tokens early), with start/end targets inside the real tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "start_positions": torch.tensor([1, 2, 0])[:batch],
            "end_positions": torch.tensor([3, 4, 0])[:batch]}


def _logits(out):
    return torch.stack([out.start_logits, out.end_logits], -1)


# ---- windows and decoding, on real SQuAD text with MiniLM's tokenizer


@pytest.mark.skipif(not SQUAD.is_dir(), reason="../shared/data/squad is not on this machine")
def test_windows_hold_the_answer_tokens_that_spell_the_answer():
    questions, v2 = squad.read_squad(SQUAD / "train.json")
    assert not v2 and len(questions) == 7235  # PROVENANCE.md's count
    questions = questions[:300]
    tok = _tokenizer()
    features = squad.make_features(tok, questions, max_length=96, doc_stride=24)
    assert len(features) > len(questions)  # long contexts made several windows
    found, exact = set(), 0
    for f in features:
        assert len(f.inputs["input_ids"]) <= 96
        q = questions[f.question]
        if f.start == f.null:
            continue
        # the smallest run of whole tokens that covers the answer's characters
        span = q.context[f.offsets[f.start][0] : f.offsets[f.end][1]]
        assert q.answers[0] in span, (q.id, span, q.answers[0])
        exact += normalize_answer(span) == normalize_answer(q.answers[0])
        found.add(f.question)
    # every answer fits a 96-token window somewhere except ones longer than the stride's overlap
    assert len(found) >= 0.97 * len(questions)
    # a few answers end inside a word piece ("gold" of "golden"): the span is then that whole token
    assert exact >= 0.95 * len([f for f in features if f.start != f.null])


@pytest.mark.skipif(not SQUAD.is_dir(), reason="../shared/data/squad is not on this machine")
def test_decoding_targets_as_logits_recovers_the_gold_answers():
    """Logits peaked at each window's targets decode, over all windows, to the first gold answer."""
    questions = squad.read_squad(SQUAD / "eval.json")[0][:200]
    tok = _tokenizer()
    features = squad.make_features(tok, questions, max_length=128, doc_stride=32)
    starts, ends = [], []
    for f in features:
        n = len(f.inputs["input_ids"])
        s, e = torch.zeros(n), torch.zeros(n)
        if f.start != f.null:
            s[f.start] = e[f.end] = 10.0
        else:
            s[f.null] = e[f.null] = 5.0  # windows without the answer prefer the null, less strongly
        starts.append(s)
        ends.append(e)
    spans, _ = squad.decode(questions, features, starts, ends, max_answer_length=64)
    golds = {q.id: q.answers for q in questions}
    scores = squad_scores(golds, spans)
    assert scores["exact"] > 97.0, scores


def test_decode_respects_length_and_context_only():
    tok = _tokenizer()
    q = squad.Question("q1", "Who?", "Alice met Bob in Paris yesterday.", ["Bob"], 10)
    (f,) = squad.make_features(tok, [q], max_length=64, doc_stride=16)
    n = len(f.inputs["input_ids"])
    s, e = torch.full((n,), -100.0), torch.zeros(n)
    s[1] = e[1] = 50.0  # a question token: never an answer
    bob = f.start
    s[bob], e[bob] = 10.0, 10.0
    far = max(i for i, o in enumerate(f.offsets) if o is not None)
    e[far] = 30.0  # a better end, but past max_answer_length from every start
    spans, odds = squad.decode([q], [f], [s], [e], max_answer_length=2)
    assert spans == {"q1": "Bob"}
    assert odds["q1"] == pytest.approx(float(s[f.null] + e[f.null]) - 20.0)


def test_left_padded_windows_shift_targets():
    tok = _tokenizer()
    tok.padding_side = "left"
    qs = [squad.Question("a", "Who?", "Alice met Bob.", ["Bob"], 10), squad.Question("b", "Where did Alice meet Bob then?", "In Paris.", ["Paris"], 3)]
    features = squad.make_features(tok, qs, max_length=64, doc_stride=16)
    batch, shifts = squad.pad_features(tok, features, labels=True)
    for i, f in enumerate(features):
        row = batch["input_ids"][i]
        assert batch["attention_mask"][i, : shifts[i]].sum() == 0
        got = tok.decode(row[batch["start_positions"][i] : batch["end_positions"][i] + 1])
        assert normalize_answer(got) == normalize_answer(qs[f.question].answers[0])


# ---- the official scores


def test_official_normalisation_and_scores():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an apple and a pear") == "apple and pear"
    assert answer_f1("the big cat", "a big dog") == pytest.approx(0.5)  # {big} of 2 and 2 tokens
    golds = {"q1": ["Denver Broncos", "the Broncos"], "q2": ["1990"], "q3": ["Paris"]}
    preds = {"q1": "Broncos", "q2": "in 1990"}  # q3 unanswered: scores 0
    s = squad_scores(golds, preds)
    # q1: exact with "the Broncos"; q2: f1 2*(1/2*1)/(1/2+1) = 2/3
    assert s["exact"] == pytest.approx(100 / 3)
    assert s["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)


def test_v2_no_answer_threshold_as_the_official_script():
    golds = {"a": ["x"], "b": [""], "c": ["y"]}
    spans = {"a": "x", "b": "z", "c": "w"}
    odds = {"a": -2.0, "b": 1.0, "c": 3.0}
    s = squad_scores(golds, spans, odds, threshold=0.0)
    # threshold 0: a answered (right), b and c "" (b right, c wrong)
    assert s["exact"] == pytest.approx(200 / 3)
    # the sweep: best is answering only a (2 of 3), reached at a's odds
    assert s["best_exact"] == pytest.approx(200 / 3) and s["best_exact_thresh"] == -2.0


def test_v2_reader_marks_impossible_questions(tmp_path):
    doc = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": "Alice met Bob.", "qas": [
        {"id": "1", "question": "Who?", "answers": [{"text": "Bob", "answer_start": 10}], "is_impossible": False},
        {"id": "2", "question": "When?", "answers": [], "plausible_answers": [{"text": "Bob", "answer_start": 10}], "is_impossible": True},
    ]}]}]}
    path = tmp_path / "v2.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    qs, v2 = squad.read_squad(path)
    assert v2 and [q.impossible for q in qs] == [False, True]
    features = squad.make_features(_tokenizer(), qs, max_length=32, doc_stride=8)
    assert features[1].start == features[1].null == features[1].inputs["input_ids"].index(_tokenizer().cls_token_id)


@pytest.mark.parametrize("doc, message", [
    ({"rows": []}, "expected SQuAD JSON"),
    ({"data": [{"paragraphs": [{"context": 3, "qas": []}]}]}, "needs a 'context' string"),
    ({"data": [{"paragraphs": [{"context": "abc", "qas": [{"id": "1", "question": "?", "answers": [{"text": "zz", "answer_start": 0}]}]}]}]},
     "'zz' is not in the context"),
])
def test_bad_squad_files_say_what_is_wrong(tmp_path, doc, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        squad.read_squad(path)


def test_window_settings_are_checked():
    with pytest.raises(ValueError, match="--doc-stride must be between 1 and"):
        squad.check_windows(_tokenizer(), 64, 40)


# ---- patched QA models


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("start_layer", [0, 1])
def test_ptv2_qa_logits_and_grads_match_concat_reference(arch, start_layer):
    model = qa_model(arch)
    inputs = qa_inputs()
    fastprompt.patch(model, method="ptv2", num_tokens=4, start_layer=start_layer)
    out = model(**inputs)
    assert out.start_logits.shape == inputs["input_ids"].shape  # the prefix adds no positions
    # real positions only: on causal stacks the op's contract leaves a padded query row to the
    # prefix alone (the packed FlashAttention path has no such row), where the reference lets it
    # see the real keys too; neither is meaningful, and decoding never reads padding
    real = inputs["attention_mask"].bool()
    w = torch.randn_like(_logits(out)) * real[..., None]
    (_logits(out) * w).sum().backward()
    grad = model.fastprompt.prefix.grad[0].clone()
    ref_prefix = model.fastprompt.prefix[0].detach().clone().requires_grad_(True)
    fastprompt.unpatch(model)
    ref = _reference_run(_Logits(model), arch, ref_prefix, start_layer, {k: v for k, v in inputs.items() if "positions" not in k})
    (ref * w).sum().backward()
    torch.testing.assert_close(_logits(out)[real], ref[real], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(grad, ref_prefix.grad, atol=2e-5, rtol=1e-4)
    assert grad.abs().sum() > 0


class _Logits(torch.nn.Module):
    """A QA model whose output reads as `logits` (B, S, 2), for the shared reference runner."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config
        self.base_model = model.base_model

    def set_attn_implementation(self, impl):
        self.model.set_attn_implementation(impl)

    def forward(self, **inputs):
        return tf.modeling_outputs.TokenClassifierOutput(logits=_logits(self.model(**inputs)))


METHODS = {"ptv2": {}, "ptv2 late": dict(start_layer=1), "prompt": dict(method="prompt"), "lpt": dict(method="lpt", start_layer=1)}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ["bert", "roberta", "llama", "qwen2"])
def test_every_method_trains_qa_and_checkpointing_changes_nothing(arch, method):
    """The QA loss (start/end targets) with the prompt and the qa_outputs head trained: loss and every
    trained gradient equal the un-checkpointed run's."""
    kw = {"method": "ptv2", "num_tokens": 3, **METHODS[method]}
    runs = []
    for ckpt in (False, True):
        model = qa_model(arch)
        torch.manual_seed(5)  # the same prompt initialisation in both runs
        fastprompt.patch(model, checkpointing=ckpt, **kw)
        model.train()  # dropout on: checkpointing must replay the same masks
        torch.manual_seed(7)
        out = model(**qa_inputs())
        out.loss.backward()
        runs.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss, grads), (loss_c, grads_c) = runs
    assert torch.isfinite(loss)
    assert any(n.startswith("qa_outputs") for n in grads) and any("fastprompt" in n for n in grads)
    assert all(g.abs().sum() > 0 for g in grads.values())
    torch.testing.assert_close(loss_c, loss)
    assert grads.keys() == grads_c.keys()
    for n in grads:
        torch.testing.assert_close(grads_c[n], grads[n], atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("method", ["ptv2", "prompt", "lpt"])
def test_qa_prompt_bank_rows_match_each_task_alone(tmp_path, method):
    """A mixed batch through a bank of 2 QA prompts: each row's start/end logits equal the logits of
    the same model with only that task's prompt (exported with save_prompts(task=t))."""
    kw = dict(method=method, num_tokens=3, start_layer=1 if method == "lpt" else 0)
    model = qa_model("bert")
    fastprompt.patch(model, num_tasks=2, **kw)
    with torch.no_grad():
        for p in fastprompt.prompt_parameters(model):
            p.add_(torch.randn_like(p) * 0.5)  # the tasks' prompts differ
    inputs = {k: v for k, v in qa_inputs(batch=3).items() if "positions" not in k}
    ids = torch.tensor([1, 0, 1])
    mixed = _logits(model(**inputs, prompt_ids=ids))
    for t in (0, 1):
        folder = fastprompt.save_prompts(model, tmp_path / f"task{t}", task=t)
        alone = fastprompt.load_prompts(qa_model("bert"), folder)
        rows = (ids == t).nonzero(as_tuple=True)[0]
        want = _logits(alone(**{k: v[rows] for k, v in inputs.items()}))
        torch.testing.assert_close(mixed[rows], want, atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(not SQUAD.is_dir(), reason="../shared/data/squad is not on this machine")
def test_task_object_trains_windows_and_scores_eval(tmp_path):
    """The task as `fastprompt train` drives it: windows, a few steps, then scoring every eval question."""
    tok = _tokenizer()
    train, _ = squad.read_squad(SQUAD / "train.json")
    evalq, _ = squad.read_squad(SQUAD / "eval.json")
    task = QuestionAnswering(train[:40], evalq[:30], False)
    task.prepare(tok, 128)  # doc_stride default (a quarter of the window), max_answer_length 30
    assert task.doc_stride == 32
    model = tf.BertForQuestionAnswering(tf.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                                      num_attention_heads=4, intermediate_size=37, max_position_embeddings=130))
    fastprompt.patch(model, num_tokens=4)
    loss = model(**task.encode(tok, task.train_items[:8])).loss
    loss.backward()
    metrics, predictions = task.evaluate(model, tok)
    assert set(predictions) == {q.id for q in evalq[:30]}
    assert all(isinstance(a, str) for a in predictions.values())
    # the scores are the official ones of these very predictions
    assert metrics == squad_scores({q.id: q.answers for q in evalq[:30]}, predictions)
