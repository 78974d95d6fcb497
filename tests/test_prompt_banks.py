"""Prompt banks: mixed-task batches against per-task hand-written references, heads, export, threads."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from conftest import model_inputs, output_tensor, tiny_model
from test_late_prompts import L as LPT_LAYER
from test_late_prompts import N as LPT_TOKENS
from test_late_prompts import _bert_reference as _lpt_bert_reference
from test_late_prompts import _generator
from test_patch_prompt import _bert_reference as _prompt_bert_reference
from test_patch_prompt import _decoder_reference
from test_patch_ptv2 import _reference_run

import fastprompt

IDS = torch.tensor([2, 0, 2, 1])


def _rows(inputs, rows):
    return {k: v[rows] for k, v in inputs.items()}


def _check_each_task(model, out, bank, tasks, reference):
    """Backward through the mixed batch, unpatch, then per task: outputs and the bank's gradient
    against reference(leaf prompt of that task, its rows), which runs the unpatched model."""
    w = torch.randn_like(out)
    (out * w).sum().backward()
    grad = bank.grad.clone()
    fastprompt.unpatch(model)
    for t in range(tasks):
        rows = (IDS == t).nonzero(as_tuple=True)[0]
        leaf = bank[t].detach().clone().requires_grad_(True)
        if len(rows) == 0:
            assert grad[t].abs().sum() == 0  # a task not in the batch gets no gradient
            continue
        ref = reference(leaf, rows)
        (ref * w[rows]).sum().backward()
        torch.testing.assert_close(out[rows], ref, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(grad[t], leaf.grad, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("start_layer", [0, 1])
@pytest.mark.parametrize("arch", ["bert", "llama", "t5"])
def test_ptv2_mixed_batch_matches_each_tasks_concat_reference(arch, start_layer):
    model = tiny_model(arch)
    inputs = model_inputs(arch, batch=4)
    fastprompt.patch(model, method="ptv2", num_tokens=3, start_layer=start_layer, num_tasks=4)
    out = output_tensor(model(**inputs, prompt_ids=IDS))
    _check_each_task(model, out, model.fastprompt.prefix, 4,
                     lambda leaf, rows: _reference_run(model, arch, leaf, start_layer, _rows(inputs, rows)))


def test_decoder_prompt_bank_matches_per_task_prompt_in_cache():
    model = tiny_model("llama")
    inputs = model_inputs("llama", batch=4)
    fastprompt.patch(model, method="prompt", num_tokens=3, num_tasks=3)
    out = model(**inputs, prompt_ids=IDS).logits
    _check_each_task(model, out, model.fastprompt.embedding, 3, lambda leaf, rows: _decoder_reference(model, "llama", leaf, _rows(inputs, rows)))


def test_encoder_prompt_bank_matches_per_task_insertion():
    model = tiny_model("bert")
    inputs = model_inputs("bert", batch=4)
    inputs["attention_mask"][1, 4:] = 0
    fastprompt.patch(model, method="prompt", num_tokens=3, num_tasks=3)
    out = model(**inputs, prompt_ids=IDS).last_hidden_state
    _check_each_task(model, out, model.fastprompt.embedding, 3,
                     lambda leaf, rows: _prompt_bert_reference(model, leaf, inputs["input_ids"][rows], inputs["attention_mask"][rows]))


def test_lpt_bank_uses_each_examples_generator():
    model = tiny_model("bert")
    ids = torch.randint(3, 99, (4, 6))
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[2, 3:] = 0
    fastprompt.patch(model, method="lpt", num_tokens=LPT_TOKENS, start_layer=LPT_LAYER, generator_hidden=8, num_tasks=3)
    out = model(input_ids=ids, attention_mask=mask, prompt_ids=IDS).last_hidden_state
    w = torch.randn_like(out) * mask[..., None]
    (out * w).sum().backward()
    gens = model.fastprompt.generators
    grads = [[p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in g.parameters()] for g in gens]
    fastprompt.unpatch(model)
    for t in range(3):
        rows = (IDS == t).nonzero(as_tuple=True)[0]
        gens[t].zero_grad()
        ref = _lpt_bert_reference(model, ids[rows], mask[rows], _generator(gens[t]))
        (ref * w[rows]).sum().backward()
        real = mask[rows].bool()
        torch.testing.assert_close(out[rows][real], ref[real], atol=2e-5, rtol=1e-4)
        for got, p in zip(grads[t], gens[t].parameters()):
            torch.testing.assert_close(got, p.grad, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["ptv2", "prompt", "lpt"])
def test_checkpointed_bank_grads_equal_plain(method):
    grads = []
    for ckpt in (False, True):
        model = tiny_model("llama")
        torch.manual_seed(0)
        kw = dict(start_layer=1) if method != "prompt" else {}
        fastprompt.patch(model, method=method, num_tokens=2, num_tasks=3, checkpointing=ckpt, **kw)
        inputs = model_inputs("llama", batch=4)
        model(**inputs, prompt_ids=IDS).logits.square().sum().backward()
        grads.append([p.grad.clone() if p.grad is not None else None for p in model.fastprompt.parameters()])
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["ptv2", "prompt"])
@pytest.mark.parametrize("beams", [1, 2])
def test_generate_mixed_batch_equals_each_example_alone(method, beams):
    model = tiny_model("llama")
    fastprompt.patch(model, method=method, num_tokens=3, num_tasks=2)
    with torch.no_grad():
        for p in model.fastprompt.parameters():
            p.mul_(3.0)  # tasks far apart, so their continuations differ
    inputs = model_inputs("llama", batch=2)
    ids = torch.tensor([1, 0])
    kw = dict(max_new_tokens=5, do_sample=False, num_beams=beams, pad_token_id=0)
    mixed = model.generate(**inputs, prompt_ids=ids, **kw)
    alone = [model.generate(**_rows(inputs, [b]), prompt_ids=ids[[b]], **kw) for b in range(2)]
    torch.testing.assert_close(mixed, torch.cat(alone))
    other = model.generate(**inputs, prompt_ids=1 - ids, **kw)
    assert not torch.equal(mixed, other)


def test_per_task_heads_logits_and_loss_match_manual_heads():
    model = tiny_model("bert", kind="seqcls")  # num_labels 3 = the largest task
    fastprompt.patch(model, method="ptv2", num_tokens=2, heads={"sst2": 2, "nli": 3})
    with torch.no_grad():
        model.classifier.weight.add_(torch.randn_like(model.classifier.weight))
    inputs = model_inputs("bert", batch=4)
    ids = torch.tensor([0, 1, 1, 0])
    labels = torch.tensor([1, 2, 0, 0])
    out = model(**inputs, labels=labels, prompt_ids=ids, output_hidden_states=True)
    pooled = model.bert.pooler(out.hidden_states[-1])
    w, b = model.classifier.weight, model.classifier.bias
    counts = [2, 3, 3, 2]
    loss = 0.0
    for i in range(4):
        n = counts[i]
        ref = pooled[i] @ w[ids[i], :n].T + b[ids[i], :n]
        torch.testing.assert_close(out.logits[i, :n], ref)
        assert (out.logits[i, n:] == torch.finfo(out.logits.dtype).min).all()
        loss = loss + F.cross_entropy(ref[None], labels[i : i + 1])
    torch.testing.assert_close(out.loss, loss / 4)
    out.loss.backward()
    assert model.classifier.weight.grad[0, 2].abs().sum() == 0  # task sst2 has no third label
    with pytest.raises(ValueError, match="label 2 but its task 'sst2' has 2 labels"):
        model(**inputs, labels=torch.tensor([2, 0, 0, 0]), prompt_ids=ids)
    fastprompt.unpatch(model)
    assert isinstance(model.classifier, torch.nn.Linear) and model.classifier.weight.shape == (3, 32)


def test_heads_need_the_largest_label_count():
    with pytest.raises(ValueError, match="num_labels=4"):
        fastprompt.patch(tiny_model("bert", kind="seqcls"), heads={"a": 2, "b": 4})


@pytest.mark.parametrize(
    "prompt_ids, match",
    [
        (None, "holds 3 prompts"),
        (torch.zeros(4, 1, dtype=torch.long), "1-D integer tensor"),
        (torch.zeros(4), "1-D integer tensor"),
        ([0, 1, 2, 0], "1-D integer tensor"),
        (torch.tensor([0, 1, 3, 0]), r"in \[0, 3\)"),
        (torch.tensor([0, -1, 2, 0]), r"in \[0, 3\)"),
        (torch.tensor([0, 1]), "2 entries for a batch of 4"),
    ],
)
def test_bad_prompt_ids_are_refused(prompt_ids, match):
    model = fastprompt.patch(tiny_model("llama"), num_tokens=2, num_tasks=3)
    with pytest.raises(ValueError, match=match):
        model(**model_inputs("llama", batch=4), prompt_ids=prompt_ids)


def test_concurrent_threads_each_get_their_tasks_result():
    model = tiny_model("llama")
    fastprompt.patch(model, num_tokens=3, num_tasks=3)
    inputs = model_inputs("llama", batch=2)
    bank = model.fastprompt.prefix.detach().clone()
    fastprompt.unpatch(model)
    with torch.no_grad():
        expected = [_reference_run(model, "llama", bank[t], 0, inputs) for t in range(3)]
    fastprompt.patch(model, num_tokens=3, num_tasks=3)
    with torch.no_grad():
        model.fastprompt.prefix.copy_(bank)
    errors, barrier = [], threading.Barrier(6)

    def worker(t):
        try:
            barrier.wait()
            for _ in range(5):
                with torch.no_grad():
                    got = model(**inputs, prompt_ids=torch.full((2,), t)).logits
                torch.testing.assert_close(got, expected[t], atol=2e-5, rtol=1e-4)
        except Exception as e:  # reported in the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i % 3,)) for i in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]


def _perturbed(model):
    with torch.no_grad():
        for p in fastprompt.prompt_parameters(model):
            p.add_(torch.randn_like(p))
    return model


@pytest.mark.parametrize("method", ["ptv2", "prompt", "lpt"])
def test_export_one_task_and_import_it_into_a_grown_bank(tmp_path, method):
    kw = dict(start_layer=1) if method == "lpt" else {}
    model = _perturbed(fastprompt.patch(tiny_model("llama"), method=method, num_tokens=2, num_tasks=2, **kw))
    inputs = model_inputs("llama", batch=2)
    with torch.no_grad():
        task1 = model(**inputs, prompt_ids=torch.tensor([1, 1])).logits
    fastprompt.save_prompts(model, tmp_path / "t1", task=1)
    alone = fastprompt.load_prompts(tiny_model("llama"), tmp_path / "t1")
    assert fastprompt.prompt_config(alone).num_tasks == 1
    with torch.no_grad():
        torch.testing.assert_close(alone(**inputs).logits, task1)
    assert fastprompt.add_task(model) == 2
    fastprompt.load_prompts(model, tmp_path / "t1", task=2, trainable=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs, prompt_ids=torch.tensor([2, 2])).logits, task1)
        torch.testing.assert_close(model(**inputs, prompt_ids=torch.tensor([1, 2])).logits, task1)
    fastprompt.save_prompts(model, tmp_path / "bank")
    fresh = fastprompt.load_prompts(tiny_model("llama"), tmp_path / "bank")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs, prompt_ids=torch.tensor([0, 2])).logits,
                                   model(**inputs, prompt_ids=torch.tensor([0, 2])).logits)


def test_task_export_cuts_its_head_to_its_labels(tmp_path):
    model = _perturbed(fastprompt.patch(tiny_model("bert", kind="seqcls"), num_tokens=2, heads={"a": 2, "b": 3}))
    inputs = model_inputs("bert", batch=2)
    with torch.no_grad():
        bank_logits = model(**inputs, prompt_ids=torch.tensor([0, 0])).logits[:, :2]
    fastprompt.save_prompts(model, tmp_path / "a", task=0)
    two = tiny_model("bert", kind="seqcls", num_labels=2)
    fastprompt.load_prompts(two, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(two(**inputs).logits, bank_logits)
    assert fastprompt.add_task(model, name="c", num_labels=2) == 2
    fastprompt.load_prompts(model, tmp_path / "a", task=2)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs, prompt_ids=torch.tensor([2, 2])).logits[:, :2], bank_logits)
    with pytest.raises(ValueError, match="new task name"):
        fastprompt.add_task(model, name="a", num_labels=2)


def test_load_trainable_flag_and_reparam_weights(tmp_path):
    model = _perturbed(fastprompt.patch(tiny_model("llama"), num_tokens=2, reparam=True, reparam_hidden=8))
    inputs = model_inputs("llama")
    with torch.no_grad():
        expected = model(**inputs).logits
    fastprompt.save_prompts(model, tmp_path / "folded")
    fastprompt.save_prompts(model, tmp_path / "full", reparam_weights=True)
    frozen = fastprompt.load_prompts(tiny_model("llama"), tmp_path / "folded")
    assert not fastprompt.prompt_config(frozen).reparam
    assert not any(p.requires_grad for p in fastprompt.prompt_parameters(frozen))
    with torch.no_grad():
        torch.testing.assert_close(frozen(**inputs).logits, expected, atol=2e-5, rtol=1e-4)
    resumed = fastprompt.load_prompts(tiny_model("llama"), tmp_path / "full", trainable=True)
    assert fastprompt.prompt_config(resumed).reparam
    out = resumed(**inputs).logits
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    out.square().sum().backward()
    assert resumed.fastprompt.mlp[0].weight.grad is not None


def test_bank_groups_examples_once_per_forward(monkeypatch):
    """Which prompts a batch uses costs a host sync: one per forward and one per backward at most,
    not one per layer (3 layers here, checkpointed so the backward recomputes them)."""
    model = tiny_model("llama")
    inputs = model_inputs("llama", batch=4)
    fastprompt.patch(model, method="ptv2", num_tokens=3, num_tasks=4, checkpointing=True)
    calls = []
    unique = torch.unique
    monkeypatch.setattr(torch, "unique", lambda *a, **k: calls.append(1) or unique(*a, **k))
    out = output_tensor(model(**inputs, prompt_ids=IDS.clone()))
    assert len(calls) == 1
    out.sum().backward()
    assert len(calls) <= 2
    model(**inputs, prompt_ids=IDS.clone())  # a new batch's ids are grouped anew
    assert len(calls) in (2, 3)
