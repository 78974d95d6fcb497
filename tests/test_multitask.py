"""Multi-task runs (fastprompt/training/multitask.py): mixed batches against transformers' own task
models, shared-prompt gradients against each dataset's alone, the mixing rule, and the command line
(train several --data, predict --task, --init-from, bad input)."""

from __future__ import annotations

import json
import random

import pytest
import torch
import transformers as tf
from test_cli_matrix import CONLL, _squad_like, _write_model

import fastprompt
from fastprompt import cli
from fastprompt.training import ensemble, task_heads
from fastprompt.training import multitask as mt

CONFIG = dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37, max_position_embeddings=64)
# (task kind, transformers' task model, its head module, the head's constructor argument)
KINDS = [("seq", tf.BertForSequenceClassification, "classifier", 3), ("token", tf.BertForTokenClassification, "classifier", 5),
         ("qa", tf.BertForQuestionAnswering, "qa_outputs", 2)]


class _Labels:
    def __init__(self, n):
        self.labels = [str(i) for i in range(n)]


def _parts(seed=0):
    """One encoded batch per kind: different lengths and right padding inside each, with labels."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for d, ((kind, _, _, n), (rows, length)) in enumerate(zip(KINDS, [(3, 7), (2, 11), (4, 9)])):
        ids = torch.randint(3, 99, (rows, length), generator=g)
        mask = torch.ones(rows, length, dtype=torch.long)
        mask[0, length - 3 :] = 0
        ids[0, length - 3 :] = 0
        p = {"input_ids": ids, "attention_mask": mask, "token_type_ids": (torch.arange(length) >= length // 2).long().expand(rows, -1).clone()}
        if kind == "seq":
            p["labels"] = torch.randint(0, n, (rows,), generator=g)
        elif kind == "token":
            y = torch.randint(0, n, (rows, length), generator=g)
            y[mask == 0] = -100
            y[:, 0] = -100
            p["labels"] = y
        else:
            p["start_positions"] = torch.randint(0, length - 3, (rows,), generator=g)
            p["end_positions"] = p["start_positions"] + 2
            p["end_positions"][1] = length + 5  # outside the window: ignored, as transformers does
        parts.append((d, p))
    return parts


def _multitask(bank, seed=0):
    torch.manual_seed(seed)
    config = tf.BertConfig(**CONFIG)
    backbone = tf.BertModel(config).eval()
    fastprompt.patch(backbone, method="ptv2", num_tokens=3, num_tasks=len(KINDS) if bank else 1)
    with torch.no_grad():
        backbone.fastprompt.prefix.mul_(0.5)
    heads = [task_heads.make_head(kind, config, _Labels(n)) for kind, _, _, n in KINDS]
    for h in heads:
        with torch.no_grad():
            for p in h.parameters():
                p.normal_()  # trained-looking heads, not the near-zero initial ones
    return mt.MultiTaskModel(backbone, heads, bank, pad_id=0).eval()


def _task_model(model, d, tmp_path, trainable=False):
    """transformers' own task model for dataset d: the backbone's weights, d's head, d's prompt
    (save_prompts / load_prompts of the bank slot or the shared prompt)."""
    kind, cls, head_name, n = KINDS[d]
    config = tf.BertConfig(**CONFIG, num_labels=n if kind != "qa" else 2)
    ref = cls(config).eval()
    state = {k: v for k, v in model.backbone.state_dict().items()
             if not k.startswith("fastprompt") and not (k.startswith("pooler") and ref.bert.pooler is None)}
    ref.bert.load_state_dict(state)
    getattr(ref, head_name).load_state_dict(getattr(model.heads[d], head_name).state_dict())
    folder = tmp_path / f"task{d}"
    fastprompt.save_prompts(model.backbone, folder, task=d if model.bank else None)
    fastprompt.load_prompts(ref, folder, trainable=trainable)
    return ref


def _outputs(out):
    return [out["logits"]] if "logits" in out else [out["start_logits"], out["end_logits"]]


def _ref_outputs(o):
    return [o.logits] if hasattr(o, "logits") and o.logits is not None else [o.start_logits, o.end_logits]


@pytest.mark.parametrize("bank", [True, False], ids=["share none", "share prompt"])
def test_mixed_batch_equals_each_datasets_batch_alone_in_its_task_model(tmp_path, bank):
    model = _multitask(bank)
    parts = _parts()
    loss, outs = model(parts)
    total = sum(p["input_ids"].shape[0] for _, p in parts)
    expected = 0.0
    for (d, p), out in zip(parts, outs):
        ref = _task_model(model, d, tmp_path)
        o = ref(**p)
        for got, want in zip(_outputs(out), _ref_outputs(o)):
            real = p["attention_mask"].bool() if want.dim() > 2 else torch.ones(want.shape[0], dtype=torch.bool)
            torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-4)
        expected = expected + p["input_ids"].shape[0] / total * o.loss
    torch.testing.assert_close(loss, expected, atol=2e-5, rtol=1e-4)


def test_bank_rows_use_their_own_prompt():
    """share none: dataset 0's rows change when their own prompt changes, and only then."""
    model = _multitask(bank=True)
    parts = _parts()
    _, before = model(parts)
    with torch.no_grad():
        model.backbone.fastprompt.prefix[1].add_(1.0)
    _, after = model(parts)
    assert torch.equal(before[0]["logits"], after[0]["logits"]) and torch.equal(before[2]["start_logits"], after[2]["start_logits"])
    assert not torch.allclose(before[1]["logits"], after[1]["logits"])


def test_shared_prompt_gradient_is_the_weighted_sum_of_each_datasets_alone(tmp_path):
    model = _multitask(bank=False)
    parts = _parts(seed=3)
    loss, _ = model(parts)
    loss.backward()
    total = sum(p["input_ids"].shape[0] for _, p in parts)
    want = torch.zeros_like(model.backbone.fastprompt.prefix)
    for d, p in parts:
        ref = _task_model(model, d, tmp_path, trainable=True)
        ref(**p).loss.backward()
        w = p["input_ids"].shape[0] / total
        want += w * ref.fastprompt.prefix.grad
        head_name = KINDS[d][2]
        for got, ref_p in zip(getattr(model.heads[d], head_name).parameters(), getattr(ref, head_name).parameters()):
            torch.testing.assert_close(got.grad, w * ref_p.grad, atol=1e-6, rtol=1e-4)  # each head: its own rows only
    torch.testing.assert_close(model.backbone.fastprompt.prefix.grad, want, atol=1e-6, rtol=1e-4)


def test_mixing_weights_and_batches():
    assert mt.mix_weights([100, 300], 1.0) == pytest.approx([0.25, 0.75])
    assert mt.mix_weights([100, 400], 2.0) == pytest.approx([10 / 30, 20 / 30])  # sqrt(100), sqrt(400)
    assert mt.parse_mix("temperature") == 2.0 and mt.parse_mix("temperature:3.5") == 3.5 and mt.parse_mix("proportional") == 1.0
    batches = mt.MixedBatches([5, 50], [0.5, 0.5], 8, random.Random(0))
    seen0 = []
    counts = [0, 0]
    for _ in range(200):
        b = next(batches)
        assert sum(len(i) for _, i in b) == 8 and [d for d, _ in b] == sorted(d for d, _ in b)
        for d, idx in b:
            counts[d] += len(idx)
            if d == 0:
                seen0 += idx
    assert sorted(seen0[:5]) == list(range(5))  # a dataset is read whole before it repeats
    assert abs(counts[0] / sum(counts) - 0.5) < 0.05


def test_eval_files_match_by_order_or_by_name():
    assert mt.dataset_files(["a/train.tsv", "b.conll"], ["a/dev.tsv", "b_dev.conll"]) == [
        ("a", "a/train.tsv", "a/dev.tsv"), ("b", "b.conll", "b_dev.conll")]
    assert mt.dataset_files(["x=a/train.tsv", "y=b.conll"], ["y=b_dev.conll"]) == [("x", "a/train.tsv", None), ("y", "b.conll", "b_dev.conll")]


# ---------------------------------------------------------------- the command line


SENTENCES = [("a fine and lovely film", 1), ("dull , tedious and long", 0), ("wonderful acting throughout", 1),
             ("a boring mess", 0), ("great fun", 1), ("awful script", 0)] * 3


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return str(_write_model(tmp_path_factory.mktemp("mt_model") / "bert", "encoder", "seq"))


@pytest.fixture
def files(tmp_path):
    seq = tmp_path / "sent" / "train.tsv"
    seq.parent.mkdir()
    seq.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in SENTENCES), encoding="utf-8")
    conll = tmp_path / "ner.conll"
    conll.write_text(CONLL, encoding="utf-8")
    return {"sent": seq, "ner": conll, "qa": _squad_like(tmp_path / "towns.json")}


def _run(capsys, argv):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.mark.parametrize("share", ["prompt", "none"])
def test_train_several_datasets_then_predict_each(tmp_path, capsys, encoder, files, share):
    out = tmp_path / "out"
    argv = ["train", "--model", encoder, "--steps", "3", "--epochs", "1", "--max-length", "48", "--out", str(out), "--share", share]
    for f in files.values():
        argv += ["--data", str(f), "--eval", str(f)]  # evaluated on their training files: predict must reproduce it
    code, text = _run(capsys, argv)
    assert code == 0, text
    names = json.loads((out / "multitask.json").read_text())["datasets"]
    assert names == ["sent", "ner", "towns"]
    assert "sent            eval accuracy" in text and "ner             eval entity F1" in text and "towns           eval F1" in text, text
    for name, f in zip(names, files.values()):
        again = tmp_path / f"{name}.json"
        code, text = _run(capsys, ["predict", "--prompts", str(out), "--task", name, "--data", str(f), "--out", str(again)])
        assert code == 0, text
        evaluated = json.loads((out / name / "predictions.json").read_text())
        got = json.loads(again.read_text())
        if name == "sent":
            got = [r["label"] for r in got]
        elif name == "ner":
            got = [r["tags"] for r in got]
        assert got == evaluated


def _tagger(encoder, out):
    labels = json.loads((out / "task.json").read_text())["labels"]
    return tf.AutoModelForTokenClassification.from_pretrained(encoder, num_labels=len(labels), ignore_mismatched_sizes=True)


def test_init_from_starts_a_single_run_from_the_shared_prompt(tmp_path, capsys, encoder, files):
    multi = tmp_path / "multi"
    argv = ["train", "--model", encoder, "--steps", "2", "--epochs", "1", "--max-length", "48", "--out", str(multi)]
    for f in files.values():
        argv += ["--data", str(f)]
    assert _run(capsys, argv)[0] == 0
    single = tmp_path / "single"
    # a vanishing learning rate: the saved prompt is the one it started from
    code, text = _run(capsys, ["train", "--model", encoder, "--data", str(files["ner"]), "--steps", "1", "--epochs", "1", "--lr", "1e-12",
                               "--out", str(single), "--init-from", str(multi)])
    assert code == 0, text
    start = fastprompt.load_prompts(tf.AutoModel.from_pretrained(encoder), multi / "ner").fastprompt.prefix
    trained = fastprompt.load_prompts(_tagger(encoder, single), single).fastprompt.prefix
    torch.testing.assert_close(trained, start, atol=1e-8, rtol=0)
    fresh = tmp_path / "fresh"
    assert _run(capsys, ["train", "--model", encoder, "--data", str(files["ner"]), "--steps", "1", "--epochs", "1", "--lr", "1e-12",
                         "--out", str(fresh)])[0] == 0
    scratch = fastprompt.load_prompts(_tagger(encoder, fresh), fresh).fastprompt.prefix
    assert not torch.allclose(scratch, start)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--eval", "{sent}"], "--eval: 1 eval files for 2 --data files"),
        (["--eval", "nope={sent}"], "--eval nope="),
        (["--data", "{ner}"], "--data: two datasets are named 'ner'"),
        (["--mix", "temperature:0"], "--mix must be proportional, temperature or temperature:T"),
        (["--share", "all"], "argument --share: invalid choice"),
        (["--text-column", "sentence"], "--text-column applies to one --data"),
        (["--data", "{lm}"], "generation (lm) data cannot be mixed"),
        (["--init-from", "{sent}"], "--init-from starts a single-prompt run"),
    ],
)
def test_bad_multitask_input_exits_2_naming_the_flag(tmp_path, capsys, encoder, files, extra, message):
    lm = tmp_path / "gen.jsonl"
    lm.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n", encoding="utf-8")
    paths = {k: str(v) for k, v in files.items()} | {"lm": str(lm)}
    argv = ["train", "--model", encoder, "--steps", "1", "--out", str(tmp_path / "o"), "--data", paths["sent"], "--data", paths["ner"],
            *[a.format(**paths) for a in extra]]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()[-1]) > 0
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag, value", [("--share", "none"), ("--mix", "temperature")])
def test_multitask_flags_on_one_dataset_exit_2(tmp_path, capsys, encoder, files, flag, value):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--model", encoder, "--data", str(files["sent"]), "--steps", "1", "--out", str(tmp_path / "o"), flag, value])
    assert e.value.code == 2 and f"{flag} applies to several --data" in capsys.readouterr().err


def test_ensemble_of_generation_data_exits_2(tmp_path, capsys, encoder):
    """--ensemble is for classification, tagging and QA: generation data stops with one line."""
    lm = tmp_path / "gen.jsonl"
    lm.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--model", encoder, "--data", str(lm), "--steps", "1", "--out", str(tmp_path / "o"), "--ensemble", "2"])
    assert e.value.code == 2 and "--ensemble: generation (lm) is not ensembled" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_predict_task_errors_name_the_flag(tmp_path, capsys, encoder, files):
    out = tmp_path / "out"
    assert _run(capsys, ["train", "--model", encoder, "--steps", "1", "--epochs", "1", "--out", str(out), "--share", "none",
                         "--data", str(files["sent"]), "--data", str(files["ner"])])[0] == 0
    for argv, message in [(["--task", "nope"], "--task nope: "), ([], "--task: "), (["--task", "sent", "--prompts", str(files["sent"].parent)], "--prompts")]:
        with pytest.raises(SystemExit) as e:
            cli.main(["predict", "--prompts", str(out), "--data", str(files["sent"]), *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a --share none output has no one prompt to start from
        cli.main(["train", "--model", encoder, "--data", str(files["ner"]), "--steps", "1", "--out", str(tmp_path / "s"), "--init-from", str(out)])
    assert e.value.code == 2 and "--init-from" in capsys.readouterr().err


# ---------------------------------------------------------------- ensembles (--ensemble K)


def _ensemble(kind_index, k=3, seed=0):
    """K prompts (a bank) and K heads of one task kind."""
    torch.manual_seed(seed)
    config = tf.BertConfig(**CONFIG)
    backbone = tf.BertModel(config).eval()
    fastprompt.patch(backbone, method="ptv2", num_tokens=3, num_tasks=k)
    kind, _, _, n = KINDS[kind_index]
    heads = [task_heads.make_head(kind, config, _Labels(n)) for _ in range(k)]
    for h in heads:
        with torch.no_grad():
            for p in h.parameters():
                p.normal_()
    return mt.MultiTaskModel(backbone, heads, bank=True, pad_id=0).eval()


@pytest.mark.parametrize("kind_index", [0, 1, 2], ids=["seq", "token", "qa"])
def test_ensemble_pass_equals_each_members_own_model_and_combines_them(tmp_path, kind_index):
    model = _ensemble(kind_index)
    _, p = _parts()[kind_index]
    inputs = {k: v for k, v in p.items() if k in task_heads.MODEL_INPUTS}
    ens = ensemble.EnsembleModel(model.backbone, list(model.heads)).eval()
    calls = []
    ens.backbone.register_forward_hook(lambda m, a, kw, out: calls.append(kw["input_ids"].shape[0]), with_kwargs=True)
    with torch.no_grad():
        members = ens.members(inputs)
        combined = ens(**inputs)
    rows = inputs["input_ids"].shape[0]
    assert calls == [3 * rows, 3 * rows]  # one batched pass per call: each example once per member
    refs = []
    for k in range(3):
        ref = _member_model(model, k, kind_index, tmp_path / str(k))
        with torch.no_grad():
            o = ref(**inputs)
        refs.append(_ref_outputs(o))
        for got, want in zip(_outputs(members[k]), refs[-1]):
            real = p["attention_mask"].bool() if want.dim() > 2 else torch.ones(want.shape[0], dtype=torch.bool)
            torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-4)
    if kind_index == 2:  # spans: the mean of the members' start and end logits
        torch.testing.assert_close(combined.start_logits, sum(r[0] for r in refs) / 3, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(combined.end_logits, sum(r[1] for r in refs) / 3, atol=2e-5, rtol=1e-4)
    else:  # labels and tags: the majority of the members' argmax, counted here
        votes = torch.stack([r[0].argmax(-1) for r in refs])
        for idx in torch.cartesian_prod(*[torch.arange(s) for s in votes.shape[1:]]) if votes.dim() > 2 else torch.arange(rows)[:, None]:
            picks = votes[(slice(None), *idx.tolist())].tolist()
            top = max(picks.count(c) for c in set(picks))
            assert picks.count(int(combined.logits[tuple(idx.tolist())].argmax())) == top


def _member_model(model, k, kind_index, folder):
    """transformers' task model for ensemble member k (its bank slot and its head)."""
    kind, cls, head_name, n = KINDS[kind_index]
    ref = cls(tf.BertConfig(**CONFIG, num_labels=n if kind != "qa" else 2)).eval()
    state = {key: v for key, v in model.backbone.state_dict().items()
             if not key.startswith("fastprompt") and not (key.startswith("pooler") and ref.bert.pooler is None)}
    ref.bert.load_state_dict(state)
    getattr(ref, head_name).load_state_dict(getattr(model.heads[k], head_name).state_dict())
    fastprompt.save_prompts(model.backbone, folder, task=k)
    fastprompt.load_prompts(ref, folder)
    return ref


def test_majority_vote_by_hand():
    # 3 members, 2 examples, 3 classes: votes [2, 2, 0] -> class 2 wins 2 to 1; [0, 1, 2] -> a three-way tie
    logits = torch.tensor([[[0.0, 0.0, 5.0], [9.0, 0.0, 0.0]],
                           [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]],
                           [[4.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    combined = ensemble.vote_logits(logits)
    assert combined.argmax(-1).tolist() == [2, 0]  # the tie goes to the highest mean probability: member 0's confident class 0
    torch.testing.assert_close(combined.softmax(-1)[0], torch.tensor([1 / 3, 0.0, 2 / 3]), atol=1e-3, rtol=0)


def test_ensemble_members_train_as_their_own_runs(tmp_path):
    """reduction "sum": each member's prompt gradient is its own model's gradient on the batch."""
    model = _ensemble(0)
    _, p = _parts(seed=5)[0]
    loss, _ = model([(k, p) for k in range(3)], "sum")
    loss.backward()
    for k in range(3):
        ref = _member_model(model, k, 0, tmp_path / str(k))
        for q in fastprompt.prompt_parameters(ref):
            q.requires_grad_(True)
        ref(**p).loss.backward()
        torch.testing.assert_close(model.backbone.fastprompt.prefix.grad[k], ref.fastprompt.prefix.grad[0], atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(model.heads[k].classifier.weight.grad, ref.classifier.weight.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", ["sent", "ner", "qa"])
def test_train_ensemble_then_predict_in_one_pass(tmp_path, capsys, encoder, files, name):
    out = tmp_path / "ens"
    data = str(files[name])
    code, text = _run(capsys, ["train", "--model", encoder, "--data", data, "--eval", data, "--ensemble", "3", "--max-length", "48",
                               "--steps", "3", "--epochs", "1", "--out", str(out)])
    assert code == 0, text
    assert "ensemble        eval " in text and all(f"member {k}        eval " in text for k in range(3)), text
    info = json.loads((out / "multitask.json").read_text())
    assert info["ensemble"] == 3 and len(info["member_metrics"]) == 3
    folder = out / info["datasets"][0]
    again = tmp_path / "again.json"
    code, text = _run(capsys, ["predict", "--prompts", str(out), "--data", data, "--out", str(again)])
    assert code == 0, text
    got = json.loads(again.read_text())
    got = {"sent": lambda: [r["label"] for r in got], "ner": lambda: [r["tags"] for r in got], "qa": lambda: got}[name]()
    assert got == json.loads((folder / "predictions.json").read_text())
