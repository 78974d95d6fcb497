"""`fastprompt train --sweep` (fastprompt/training/sweep.py): the table's first row is the saved
configuration, each row equals `fastprompt train` run alone with that configuration, the lower-layer
cache is filled once for the whole grid, and bad grids exit 2 naming the flag."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from test_cli_matrix import CONLL

import fastprompt
from fastprompt import cli
from fastprompt.training.loop import default_model_path


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """A tiny BERT without dropout, so a row and a separate run draw nothing differently."""
    folder = tmp_path_factory.mktemp("sweep_model") / "bert"
    tokenizer = tf.AutoTokenizer.from_pretrained(default_model_path())
    config = tf.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37,
                           max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)
    tf.AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


GRID = ["--sweep-tokens", "2,4", "--sweep-lrs", "1e-2,5e-2"]


def _train(capsys, argv):
    code = cli.main(["train", *argv])
    out = capsys.readouterr()
    return code, out.out + out.err


def _prefix(model_path, out):
    return fastprompt.load_prompts(tf.AutoModelForSequenceClassification.from_pretrained(model_path), out).fastprompt.prefix


def test_sweep_saves_its_first_ranked_row_and_each_row_equals_a_run_alone(tmp_path, capsys, encoder):
    out = tmp_path / "sweep"
    common = ["--model", encoder, "--steps", "3", "--epochs", "1", "--start-layer", "2"]
    code, text = _train(capsys, [*common, "--sweep", *GRID, "--out", str(out)])
    assert code == 0, text
    table = json.loads((out / "sweep.json").read_text())
    rows = table["rows"]
    assert [(r["num_tokens"], r["lr"]) for r in rows] == [(2, 1e-2), (2, 5e-2), (4, 1e-2), (4, 5e-2)]
    top = max(r["metric"] for r in rows)
    first = next(r for r in rows if r["metric"] == top)  # the highest metric, the earlier row on ties
    assert table["best"] == {"num_tokens": first["num_tokens"], "lr": first["lr"]}
    assert fastprompt.prompt_config(fastprompt.load_prompts(tf.AutoModelForSequenceClassification.from_pretrained(encoder), out)).num_tokens \
        == first["num_tokens"]
    # the cache is filled by the first configuration only
    assert rows[0]["cache_misses"] > 0 and all(r["cache_misses"] == 0 and r["cache_hits"] > 0 for r in rows[1:])
    for r in rows:
        alone = tmp_path / f"p{r['num_tokens']}-{r['lr']}"
        code, text = _train(capsys, [*common, "--num-tokens", str(r["num_tokens"]), "--lr", str(r["lr"]), "--out", str(alone)])
        assert code == 0, text
        assert f"eval accuracy {r['metric']:.3f}" in text, (r, text)
        if r is first:
            torch.testing.assert_close(_prefix(encoder, out), _prefix(encoder, alone), atol=1e-6, rtol=1e-5)


def test_sweep_output_loads_back_for_predict(tmp_path, capsys, encoder):
    data = tmp_path / "s.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in [("good fun", 1), ("bad film", 0)] * 6), encoding="utf-8")
    out = tmp_path / "sweep"
    code, text = _train(capsys, ["--model", encoder, "--data", str(data), "--eval", str(data), "--steps", "2", "--sweep", *GRID,
                                 "--out", str(out)])
    assert code == 0, text
    again = tmp_path / "again.json"
    assert cli.main(["predict", "--prompts", str(out), "--data", str(data), "--out", str(again)]) == 0
    assert [r["label"] for r in json.loads(again.read_text())] == json.loads((out / "predictions.json").read_text())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sweep", "--sweep-tokens", "8,x", "--steps", "2"], "--sweep-tokens must be distinct positive numbers"),
        (["--sweep", "--sweep-lrs", "0", "--steps", "2"], "--sweep-lrs must be"),
        (["--sweep", "--num-tokens", "8", "--steps", "2"], "--num-tokens does not apply to --sweep"),
        (["--sweep"], "--sweep trains every configuration for --steps steps"),
        (["--sweep", "--steps", "2", "--data", "{conll}"], "--sweep ranks configurations by their eval metric"),
        (["--sweep", "--steps", "2", "--ensemble", "2"], "--sweep tries prompt lengths"),
    ],
)
def test_bad_sweep_input_exits_2_naming_the_flag(tmp_path, capsys, encoder, argv, message):
    conll = tmp_path / "t.conll"
    conll.write_text(CONLL, encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--model", encoder, "--out", str(tmp_path / "o"), *[a.format(conll=conll) for a in argv]])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
