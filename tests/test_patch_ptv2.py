"""P-Tuning v2 deep prefixes on every supported architecture, against explicit concatenation."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, DECODERS, ENCODERS, model_inputs, output_tensor, tiny_model
from reference import PREFIX, REF_IMPL, self_attention_modules

import fastprompt


def _reference_run(model, arch, prefixes, start_layer, inputs):
    """prefixes: (n_slots, 2, Hkv, P, D) leaf; runs the unpatched model with the reference attention."""
    PREFIX.clear()
    slot = 0
    for stack in self_attention_modules(model, arch):
        for i, module in enumerate(stack):
            if i >= start_layer:
                PREFIX[id(module)] = (prefixes[slot, 0], prefixes[slot, 1])
                slot += 1
    assert slot == prefixes.shape[0]
    original = model.config._attn_implementation
    model.set_attn_implementation(REF_IMPL)
    try:
        return output_tensor(model(**inputs))
    finally:
        model.set_attn_implementation(original)
        PREFIX.clear()


@pytest.mark.parametrize("start_layer", [0, 1])
@pytest.mark.parametrize("arch", ARCHS)
def test_outputs_and_prefix_grads_match_concat_reference(arch, start_layer):
    model = tiny_model(arch)
    inputs = model_inputs(arch)
    fastprompt.patch(model, method="ptv2", num_tokens=5, start_layer=start_layer)
    out = output_tensor(model(**inputs))
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    prefix = model.fastprompt.prefix  # (T=1, slots, 2, Hkv, P, D)
    grad = prefix.grad[0].clone()

    ref_prefix = prefix[0].detach().clone().requires_grad_(True)
    fastprompt.unpatch(model)
    ref = _reference_run(model, arch, ref_prefix, start_layer, inputs)
    (ref * weights).sum().backward()

    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(grad, ref_prefix.grad, atol=2e-5, rtol=1e-4)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["bert", "llama", "t5"])
def test_reparam_matches_handwritten_mlp(arch):
    model = tiny_model(arch)
    inputs = model_inputs(arch)
    fastprompt.patch(model, method="ptv2", num_tokens=4, start_layer=1, reparam=True, reparam_hidden=16)
    out = output_tensor(model(**inputs))
    enc = model.fastprompt
    emb = enc.embedding[0].detach().clone().requires_grad_(True)
    w1, b1 = enc.mlp[0].weight.detach(), enc.mlp[0].bias.detach()
    w2, b2 = enc.mlp[2].weight.detach(), enc.mlp[2].bias.detach()
    (out.square().sum()).backward()
    grad = enc.embedding.grad[0].clone()

    # P-Tuning v2 / PEFT layout: (P, layers * 2 * Hkv * D) read as [P, layer, K|V, Hkv, D]
    flat = torch.tanh(emb @ w1.T + b1) @ w2.T + b2
    n_slots, _, hkv, p, d = enc.num_slots, 2, enc.kv_heads, enc.num_tokens, enc.head_dim
    prefixes = flat.view(p, n_slots, 2, hkv, d).permute(1, 2, 3, 0, 4)
    fastprompt.unpatch(model)
    ref = _reference_run(model, arch, prefixes, 1, inputs)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(grad, emb.grad, atol=2e-5, rtol=1e-4)


def test_reparam_prefix_folded_once_at_inference():
    model = tiny_model("llama")
    fastprompt.patch(model, method="ptv2", num_tokens=4, reparam=True)
    calls = []
    model.fastprompt.mlp[0].register_forward_hook(lambda *a: calls.append(1))
    inputs = model_inputs("llama")
    with torch.no_grad():
        model.fastprompt.mlp[2].bias.add_(0.5)  # an in-place update, as an optimizer step makes
        first = output_tensor(model(**inputs))
        second = output_tensor(model(**inputs))
    assert torch.equal(first, second)
    # one fold evaluates the MLP once per layer slot; the second forward reuses it
    assert len(calls) == model.fastprompt.num_slots
    with torch.no_grad():
        model.fastprompt.mlp[2].bias.add_(1.0)
        third = output_tensor(model(**inputs))
    assert len(calls) == 2 * model.fastprompt.num_slots
    assert not torch.equal(first, third)
    out = output_tensor(model(**inputs))  # with grad: computed per call, differentiable
    out.sum().backward()
    assert model.fastprompt.embedding.grad is not None


def _pad(arch, ids, length, left):
    pad = torch.zeros(length - ids.shape[0], dtype=ids.dtype) + (1 if arch == "roberta" else 0)
    mask = torch.cat([torch.zeros_like(pad), torch.ones_like(ids)]) if left else torch.cat([torch.ones_like(ids), torch.zeros_like(pad)])
    return (torch.cat([pad, ids]) if left else torch.cat([ids, pad])), mask


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_and_unpadded_examples_agree(arch):
    model = tiny_model(arch)
    fastprompt.patch(model, method="ptv2", num_tokens=3)
    left = arch in DECODERS  # decoders pad on the left, encoders (and T5's encoder) on the right
    long_ids = torch.randint(3, 99, (7,))
    short_ids = torch.randint(3, 99, (4,))
    padded, mask = _pad(arch, short_ids, 7, left)
    batch = {"input_ids": torch.stack([long_ids, padded]), "attention_mask": torch.stack([torch.ones(7, dtype=torch.long), mask])}
    alone = {"input_ids": short_ids[None], "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    if arch in DECODERS:
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        alone["position_ids"] = torch.arange(4)[None]
    if arch == "t5":
        dec = torch.randint(3, 99, (1, 3))
        batch["decoder_input_ids"] = dec.expand(2, -1)
        alone["decoder_input_ids"] = dec
    with torch.no_grad():
        out_batch = output_tensor(model(**batch))[1]
        out_alone = output_tensor(model(**alone))[0]
    if arch in DECODERS:
        out_batch = out_batch[-4:]
    elif arch != "t5":
        out_batch = out_batch[:4]
    torch.testing.assert_close(out_batch, out_alone, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", DECODERS + ("t5",))
def test_generate_cached_equals_uncached_and_beams_run(arch):
    model = tiny_model(arch)
    fastprompt.patch(model, method="ptv2", num_tokens=4, start_layer=1)
    ids = torch.randint(3, 99, (2, 5))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    cached = model.generate(ids, use_cache=True, output_scores=True, return_dict_in_generate=True, **kw)
    uncached = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached)
    beams = model.generate(ids, num_beams=3, **kw)
    assert beams.shape[0] == 2
    fastprompt.unpatch(model)
    plain = model.generate(ids, use_cache=True, output_scores=True, return_dict_in_generate=True, **kw)
    assert not torch.allclose(plain.scores[0], cached.scores[0])  # the prefix really reached generation


@pytest.mark.parametrize("arch", ARCHS)
def test_unpatch_restores_outputs_bitwise(arch):
    model = tiny_model(arch)
    inputs = model_inputs(arch)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        before = output_tensor(model(**inputs))
    fastprompt.patch(model, method="ptv2", num_tokens=3)
    with torch.no_grad():
        patched = output_tensor(model(**inputs))
    assert not torch.allclose(before, patched)
    fastprompt.unpatch(model)
    with torch.no_grad():
        after = output_tensor(model(**inputs))
    assert torch.equal(before, after)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert "fastprompt" not in dict(model.named_children())


@pytest.mark.parametrize("arch", ENCODERS + ("gpt2", "llama"))
def test_only_prompts_and_head_train(arch):
    model = tiny_model(arch, kind="seqcls")
    fastprompt.patch(model, method="ptv2", num_tokens=3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = "score" if arch in ("gpt2", "llama") else "classifier"
    assert trainable == {"fastprompt.prefix"} | {n for n in trainable if n.startswith(head + ".")}
    assert any(n.startswith(head + ".") for n in trainable)
    assert {id(p) for p in fastprompt.prompt_parameters(model)} == {id(p) for n, p in model.named_parameters() if p.requires_grad}
    fastprompt.unpatch(model)
    fastprompt.patch(model, method="ptv2", num_tokens=3, train_head=False)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fastprompt.prefix"}


def test_real_positions_not_shifted_bert_takes_full_length():
    model = tiny_model("bert")  # max_position_embeddings=64
    fastprompt.patch(model, method="ptv2", num_tokens=20)
    ids = torch.randint(3, 99, (1, 64))
    with torch.no_grad():
        out = model(input_ids=ids).last_hidden_state
    assert out.shape == (1, 64, 32)


def test_token_classification_logits_keep_input_length():
    import transformers as tf

    config = tf.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, num_labels=5)
    model = tf.BertForTokenClassification(config)
    fastprompt.patch(model, method="ptv2", num_tokens=6)
    ids = torch.randint(3, 99, (2, 9))
    labels = torch.randint(0, 5, (2, 9))
    out = model(input_ids=ids, labels=labels)
    assert out.logits.shape == (2, 9, 5)
    out.loss.backward()
    assert model.fastprompt.prefix.grad is not None and model.classifier.weight.grad is not None


def test_cross_attention_left_untouched():
    model = tiny_model("t5")
    fastprompt.patch(model, method="ptv2", num_tokens=3)
    for block in model.decoder.block:
        assert "_fastprompt" not in block.layer[1].EncDecAttention.__dict__
        assert "_fastprompt" in block.layer[0].SelfAttention.__dict__
