"""Late Prompt Tuning (method="lpt") against hand-written references on BERT and Llama."""

from __future__ import annotations

import pytest
import torch
from conftest import output_tensor, tiny_model
from reference import REF_IMPL

import fastprompt

N, L = 3, 1


def _generator(g):
    return lambda x: torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, g.down.weight, g.down.bias)), g.up.weight, g.up.bias)


def _bert_reference(model, ids, mask2d, gen):
    """Layers < L, then n tokens from [CLS] at layer L prepended, mask widened, stripped at the end."""
    base = model.base_model
    b, t = ids.shape
    keys = mask2d.bool()[:, None, None, :].expand(b, 1, t, t)
    h = base.embeddings(input_ids=ids)
    original = model.config._attn_implementation
    model.set_attn_implementation(REF_IMPL)
    try:
        for layer in base.encoder.layer[:L]:
            h = layer(h, keys)
        tokens = gen(h[:, 0]).view(b, N, -1)
        h = torch.cat([tokens, h], dim=1)
        keys = torch.cat([torch.ones(b, N, dtype=torch.bool), mask2d.bool()], dim=1)[:, None, None, :].expand(b, 1, N + t, N + t)
        for layer in base.encoder.layer[L:]:
            h = layer(h, keys)
    finally:
        model.set_attn_implementation(original)
    return h[:, N:]


def _llama_reference(model, ids, mask2d, gen):
    """The same on a causal model: tokens from the last real token, rotary positions -n..-1 for them."""
    base = model.model
    b, t = ids.shape
    pos = (mask2d.cumsum(-1) - 1).clamp(min=0)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    mask = causal[None, None] & mask2d.bool()[:, None, None, :] | torch.eye(t, dtype=torch.bool)  # pad rows see themselves: no NaN
    h = base.embed_tokens(ids)
    original = model.config._attn_implementation
    model.set_attn_implementation(REF_IMPL)
    try:
        pe = base.rotary_emb(h, position_ids=pos)
        for layer in base.layers[:L]:
            h = layer(h, attention_mask=mask, position_embeddings=pe)
        last = (torch.arange(t) * mask2d).argmax(-1)
        tokens = gen(h[torch.arange(b), last]).view(b, N, -1)
        h = torch.cat([tokens, h], dim=1)
        pos2 = torch.cat([torch.arange(-N, 0)[None].expand(b, -1), pos], dim=1)
        pe = base.rotary_emb(h, position_ids=pos2)
        keys = torch.cat([torch.ones(b, N, dtype=torch.bool), mask2d.bool()], dim=1)
        mask = torch.ones(N + t, N + t, dtype=torch.bool).tril()[None, None] & keys[:, None, None, :]
        for layer in base.layers[L:]:
            h = layer(h, attention_mask=mask, position_embeddings=pe)
    finally:
        model.set_attn_implementation(original)
    return model.lm_head(base.norm(h[:, N:]))


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_lpt_matches_handwritten_reference(arch, padded):
    model = tiny_model(arch)
    fastprompt.patch(model, method="lpt", num_tokens=N, start_layer=L, generator="npg", generator_hidden=8)
    ids = torch.randint(3, 99, (2, 6))
    mask2d = torch.ones(2, 6, dtype=torch.long)
    if padded:
        if arch == "llama":
            mask2d[1, :2] = 0  # decoders pad on the left
        else:
            mask2d[1, 4:] = 0
    kw = {"position_ids": (mask2d.cumsum(-1) - 1).clamp(min=0)} if arch == "llama" else {}
    out = output_tensor(model(input_ids=ids, attention_mask=mask2d, **kw))
    w = torch.randn_like(out) * mask2d[..., None]
    (out * w).sum().backward()
    generator = model.fastprompt.generators[0]
    grads = [p.grad.clone() for p in generator.parameters()]
    generator.zero_grad()
    fastprompt.unpatch(model)
    ref = (_llama_reference if arch == "llama" else _bert_reference)(model, ids, mask2d, _generator(generator))
    (ref * w).sum().backward()
    real = mask2d.bool()
    torch.testing.assert_close(out[real], ref[real], atol=2e-5, rtol=1e-4)
    for got, p in zip(grads, generator.parameters()):
        torch.testing.assert_close(got, p.grad, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("generator", ["avgpool", "maxpool"])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_pooled_generators_pad_invariant(arch, generator):
    model = tiny_model(arch)
    fastprompt.patch(model, method="lpt", num_tokens=2, start_layer=1, generator=generator, generator_hidden=8)
    ids = torch.randint(3, 99, (1, 5))
    pad = torch.zeros(1, 3, dtype=torch.long)
    if arch == "llama":
        batch_ids, mask = torch.cat([pad, ids], 1), torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
        kw = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
        sl = slice(3, 8)
    else:
        batch_ids, mask = torch.cat([ids, pad], 1), torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
        kw, sl = {}, slice(0, 5)
    with torch.no_grad():
        alone = output_tensor(model(input_ids=ids))
        padded = output_tensor(model(input_ids=batch_ids, attention_mask=mask, **kw))
    torch.testing.assert_close(padded[:, sl], alone, atol=2e-5, rtol=1e-4)


def test_pool_bins_match_adaptive_pooling():
    from fastprompt.integration.prompts import _pool_bins

    x = torch.randn(7, 4)
    for length in (1, 3, 7):
        for n in (1, 2, 3, 5):
            real = torch.zeros(1, 9, dtype=torch.bool)
            real[0, 2 : 2 + length] = True
            xs = torch.zeros(1, 9, 4)
            xs[0, 2 : 2 + length] = x[:length]
            bins = _pool_bins(real, n)
            got = torch.bmm(bins / bins.sum(-1, keepdim=True).clamp(min=1), xs)[0]
            want = torch.nn.functional.adaptive_avg_pool1d(x[:length].T[None], n)[0].T
            if length >= n:  # adaptive pooling of fewer tokens than bins repeats tokens; compare the regular case
                torch.testing.assert_close(got, want)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_lpt_generate_cached_equals_uncached(arch):
    model = tiny_model(arch)
    fastprompt.patch(model, method="lpt", num_tokens=3, start_layer=1)
    ids = torch.randint(3, 99, (2, 5))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    assert torch.equal(model.generate(ids, use_cache=True, **kw), model.generate(ids, use_cache=False, **kw))
    assert model.generate(ids, num_beams=2, **kw).shape[0] == 2


def test_lpt_outputs_keep_input_length_for_token_and_sequence_heads():
    m = tiny_model("bert", kind="seqcls")
    fastprompt.patch(m, method="lpt", num_tokens=4, start_layer=2)
    out = m(input_ids=torch.randint(3, 99, (2, 7)), labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3)
    out.loss.backward()
    assert m.classifier.weight.grad is not None and m.fastprompt.generators[0].up.weight.grad is not None
