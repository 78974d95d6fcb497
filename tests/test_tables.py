"""Classification tables as `fastprompt train` reads them: sentence pairs with their columns inferred,
the wild-file traps of GLUE's MRPC (a byte-order mark, unbalanced quotes), string labels, pair
encoding, the metrics, and the errors naming the flag to fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastprompt.training.metrics import classification_metrics, positive_label
from fastprompt.training.tables import DataError, read_classification

MRPC = Path(__file__).resolve().parents[2] / "shared" / "data" / "mrpc"


def _independent_mrpc(name):
    """MRPC parsed by hand: bytes split on newlines and tabs, no csv module, no quote handling."""
    raw = (MRPC / name).read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")  # the BOM this test is about
    lines = raw[3:].decode("utf-8").splitlines()
    header = lines[0].split("\t")
    rows = [dict(zip(header, line.split("\t"))) for line in lines[1:] if line]
    return [(r["#1 String"], r["#2 String"], r["Quality"]) for r in rows]


@pytest.mark.skipif(not MRPC.is_dir(), reason="../shared/data/mrpc is not on this machine")
def test_mrpc_reads_every_pair_with_its_columns_inferred():
    train, labels, cols = read_classification(MRPC / "train.tsv")
    assert (cols.text, cols.pair, cols.label) == ("#1 String", "#2 String", "Quality")
    want = _independent_mrpc("train.tsv")
    assert len(train) == len(want) == 3668  # PROVENANCE.md's count: csv's default quoting loses about 100
    assert [(e.text, e.pair, labels[e.label]) for e in train] == want
    dev, _, _ = read_classification(MRPC / "dev.tsv", labels)
    assert len(dev) == 408
    assert any('"' in e.text for e in train)  # the unbalanced quotes survived as text


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_premise_hypothesis_with_string_labels(tmp_path):
    rows = [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": ["not_entailment", "entailment"][i % 2], "idx": i} for i in range(6)]
    data, labels, cols = read_classification(_jsonl(tmp_path / "rte.jsonl", rows))
    assert (cols.text, cols.pair) == ("premise", "hypothesis")
    assert labels == ["entailment", "not_entailment"]
    assert [labels[e.label] for e in data] == [r["label"] for r in rows]
    assert positive_label(labels) == 0  # "entailment" is the positive class, wherever it sorts


def test_boolq_json_booleans_and_named_columns(tmp_path):
    rows = [{"q": "is it?", "doc": "it is.", "answer": i % 2 == 0} for i in range(4)]
    path = _jsonl(tmp_path / "boolq.jsonl", rows)
    data, labels, cols = read_classification(path, text_column="q", pair_column="doc", label_column="answer")
    assert labels == ["false", "true"] and [e.label for e in data] == [1, 0, 1, 0]
    assert data[0].pair == "it is."


def test_csv_with_bom_and_quoted_commas(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_bytes('\ufeffsentence1,sentence2,label\n"a, b",c,1\nd,"e ""f""",0\n'.encode())
    data, labels, cols = read_classification(path)
    assert cols.text == "sentence1"
    assert [(e.text, e.pair, labels[e.label]) for e in data] == [("a, b", "c", "1"), ("d", 'e "f"', "0")]


@pytest.mark.parametrize(
    "content, kwargs, message",
    [
        ("a\tb\n1\t2\n", {}, "--text-column"),
        ("text\tlabel\nhello\t1\n", {"text_column": "body"}, "--text-column 'body' is not a column"),
        ("text\tname\nhello\t1\n", {}, "--label-column"),
        ("text\tlabel\nhello\t\n", {}, "row 2: empty label"),
        ("sentence1\tsentence2\tlabel\nhello\t\t1\n", {}, "row 2: empty or missing 'sentence2'"),
        ("sentence1\tsentence2\tlabel\nhello\n", {}, "row 2: empty or missing 'sentence2'"),
    ],
)
def test_bad_tables_name_the_row_or_the_flag(tmp_path, content, kwargs, message):
    path = tmp_path / "bad.tsv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        read_classification(path, **kwargs)


def test_unknown_eval_label_is_refused(tmp_path):
    path = tmp_path / "eval.tsv"
    path.write_text("text\tlabel\nhello\tmaybe\n", encoding="utf-8")
    with pytest.raises(DataError, match="unknown label 'maybe'"):
        read_classification(path, ["no", "yes"])


def test_pair_encoding_keeps_both_parts_with_token_types():
    import transformers as tf

    from fastprompt.training.loop import default_model_path
    from fastprompt.training.tables import Example
    from fastprompt.training.tasks import Classification

    tok = tf.AutoTokenizer.from_pretrained(default_model_path())
    task = Classification([], [], ["0", "1"])
    task.max_length = 16
    long, short = " ".join(["word"] * 40), "a short second sentence"
    enc = task.encode(tok, [Example(long, short, 1), Example("hi", "there", 0)])
    assert enc["input_ids"].shape[1] == 16 and enc["labels"].tolist() == [1, 0]
    # longest-first: the long text is cut, the short one is whole; token types mark the second part
    second = enc["input_ids"][0][enc["token_type_ids"][0] == 1].tolist()
    assert tok.decode(second, skip_special_tokens=True) == short
    assert enc["token_type_ids"][0].sum() > 0 and (enc["token_type_ids"][0] == 0).sum() > 2


def test_classification_metrics_against_hand_counts():
    gold = [1, 1, 0, 0, 1, 0]
    pred = [1, 0, 0, 1, 1, 0]
    m = classification_metrics(gold, pred, ["0", "1"])
    # positive class 1: tp 2, fp 1, fn 1 -> precision 2/3, recall 2/3
    assert m["accuracy"] == pytest.approx(4 / 6) and m["f1"] == pytest.approx(2 / 3)
    assert "f1" not in classification_metrics([0, 1, 2], [0, 1, 1], ["a", "b", "c"])
