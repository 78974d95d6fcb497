"""ops.prefix_attention against attention over the explicitly concatenated keys/values."""

from __future__ import annotations

import pytest
import torch
from reference import concat_attention_per_example

from fastprompt.ops import prefix_attention, runnable


def _inputs(b, h, hkv, s, sk, p, d, dtype, bank=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g).to(dtype).requires_grad_(True)  # noqa: E731
    q, k, v = r(b, h, s, d), r(b, hkv, sk, d), r(b, hkv, sk, d)
    shape = (bank, hkv, p, d) if bank else (hkv, p, d)
    return q, k, v, r(*shape), r(*shape)


_reference = concat_attention_per_example  # per example, the bank row picked, float64


def _grads(out, tensors, w):
    return torch.autograd.grad((out.double() * w).sum(), tensors)


# every backend that runs on this machine's CPU
BACKENDS = runnable("cpu", head_dim=8)


CASES = [
    # b, h, hkv, s, sk, p, d, causal, mask
    (2, 4, 4, 5, 5, 3, 8, False, None),
    (3, 6, 2, 7, 7, 4, 16, True, None),  # GQA + causal
    (2, 4, 1, 1, 9, 5, 8, True, None),  # decode step: one query over a cache, multi-query
    (2, 4, 2, 3, 6, 2, 8, True, None),  # chunked prefill: causal aligned bottom-right
    (2, 4, 2, 6, 6, 3, 40, False, "pad"),  # key padding, odd head dim
    (2, 2, 2, 5, 5, 7, 8, False, "full"),  # a 4-D bool mask with a fully masked row
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_matches_concat_reference_fp32(case, backend):
    b, h, hkv, s, sk, p, d, causal, mask_kind = case
    q, k, v, pk, pv = _inputs(b, h, hkv, s, sk, p, d, torch.float32)
    mask = visible = None
    if causal:
        visible = (torch.arange(sk)[None] <= torch.arange(s)[:, None] + (sk - s))[None, None]
    if mask_kind == "pad":
        mask = torch.ones(b, sk, dtype=torch.bool)
        mask[1, 4:] = False
        visible = mask[:, None, None, :]
    elif mask_kind == "full":
        mask = torch.rand(b, 1, s, sk) > 0.4
        mask[0, 0, 2] = False  # this row sees only the prefix
        visible = mask
    out = prefix_attention(q, k, v, pk, pv, mask=mask, causal=causal, backend=backend)
    ref = _reference(q, k, v, pk, pv, visible=visible)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(ref)
    got = _grads(out, (q, k, v, pk, pv), w)
    want = _grads(ref, (q, k, v, pk, pv), w)
    for name, a, e in zip("q k v prefix_k prefix_v".split(), got, want):
        torch.testing.assert_close(a.double(), e.double(), atol=1e-5, rtol=1e-5, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_scale_and_float_mask(backend):
    q, k, v, pk, pv = _inputs(2, 4, 4, 5, 5, 3, 8, torch.float32)
    bias = torch.randn(1, 4, 5, 5)
    fmask = torch.zeros(2, 1, 5, 5)
    fmask[1, ..., 3:] = torch.finfo(torch.float32).min
    out = prefix_attention(q, k, v, pk, pv, mask=fmask, bias=bias, scale=1.0, backend=backend)
    ref = _reference(q, k, v, pk, pv, visible=fmask == 0, bias=bias, scale=1.0)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_bias_that_requires_grad_gets_its_gradient_or_a_named_refusal():
    """A trainable bias (T5's position bias in an unfrozen model): the default dispatch returns its
    gradient, as the float64 concatenation does; a backend that cannot is refused by name."""
    q, k, v, pk, pv = _inputs(2, 4, 2, 5, 5, 3, 8, torch.float32)
    bias = torch.randn(1, 4, 5, 5, requires_grad=True)
    w = torch.randn(2, 4, 5, 8, dtype=torch.float64)
    (got,) = _grads(prefix_attention(q, k, v, pk, pv, bias=bias), (bias,), w)
    (want,) = _grads(_reference(q, k, v, pk, pv, bias=bias), (bias,), w)
    torch.testing.assert_close(got.double(), want.double(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="backend='cpu' computes no gradient for an additive bias that requires grad"):
        prefix_attention(q, k, v, pk, pv, bias=bias, backend="cpu")
    with torch.no_grad():  # no gradient asked for: the fused backend runs
        assert prefix_attention(q, k, v, pk, pv, bias=bias, backend="cpu").shape == q.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_prompt_bank_with_repeated_ids(backend):
    q, k, v, pk, pv = _inputs(4, 4, 2, 5, 5, 3, 8, torch.float32, bank=3)
    ids = torch.tensor([2, 0, 2, 2])
    out = prefix_attention(q, k, v, pk, pv, prompt_ids=ids, causal=True, backend=backend)
    visible = (torch.arange(5)[None] <= torch.arange(5)[:, None])[None, None]
    ref = _reference(q, k, v, pk, pv, ids=ids, visible=visible)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(ref)
    got, want = _grads(out, (pk, pv), w), _grads(ref, (pk, pv), w)
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e.double(), atol=1e-5, rtol=1e-5)
    assert got[0][1].abs().sum() == 0  # prompt 1 unused: no gradient


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["causal", "padding-mask"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_reference_error(dtype, kind, backend):
    """flash-attention rule: error <= 2x the low-precision reference's own error (3x for gradients)."""
    b, s, p = 3, 9, 5
    q, k, v, pk, pv = _inputs(b, 4, 2, s, s, p, 16, dtype)
    if kind == "causal":
        mask, causal = None, True
        visible = (torch.arange(s)[None] <= torch.arange(s)[:, None])[None, None]
    else:
        keys = torch.ones(b, s, dtype=torch.bool)
        keys[1, 6:] = False
        keys[2, 2:] = False
        mask, causal = keys[:, None, None, :], False
        visible = mask
    out = prefix_attention(q, k, v, pk, pv, mask=mask, causal=causal, backend=backend)
    exact = _reference(q, k, v, pk, pv, visible=visible)
    # the low-precision reference: PyTorch SDPA on the concatenated, repeated keys in `dtype`
    kk = torch.cat([pk.unsqueeze(0).expand(b, -1, -1, -1), k], 2).repeat_interleave(2, 1)
    vv = torch.cat([pv.unsqueeze(0).expand(b, -1, -1, -1), v], 2).repeat_interleave(2, 1)
    full_vis = torch.cat([torch.ones(visible.shape[0], 1, s, p, dtype=torch.bool), visible.expand(-1, -1, s, -1)], -1)
    low = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=full_vis)
    floor = 1e-3
    assert (out.double() - exact).abs().max() <= 2 * (low.double() - exact).abs().max() + floor
    w = torch.randn_like(exact)
    got, low_g, want = _grads(out, (q, k, v, pk, pv), w), _grads(low, (q, k, v, pk, pv), w), _grads(exact, (q, k, v, pk, pv), w)
    for name, a, lo, e in zip("q k v prefix_k prefix_v".split(), got, low_g, want):
        assert (a.double() - e).abs().max() <= 3 * (lo.double() - e).abs().max() + floor, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_batch_sized_prefix_is_saved_for_backward(backend):
    """The prefix is never expanded per example: nothing saved for backward holds B copies of it."""
    b, p, d, hkv = 8, 6, 16, 2
    q, k, v, pk, pv = _inputs(b, 4, hkv, 5, 5, p, d, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        prefix_attention(q, k, v, pk, pv, backend=backend)
    assert saved
    for t in saved:
        # a per-example prefix, alone (B, Hkv, P, D) or concatenated (B, Hkv, P + S, D), would show here
        assert not (t.shape[-2:] in ((p, d), (p + 5, d)) and t.numel() >= b * hkv * p * d), tuple(t.shape)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(q=torch.zeros(2, 4, 5)), "q must be"),
        (dict(k=torch.zeros(2, 3, 5, 8), v=torch.zeros(2, 3, 5, 8)), "multiple of k/v heads"),
        (dict(prefix_k=torch.zeros(2, 3, 4)), "prefix_k must have Hkv"),
        (dict(prompt_ids=torch.tensor([0, 5])), "must be a bank"),
        (dict(mask=torch.ones(3, 5, dtype=torch.bool)), "key padding"),
        (dict(dropout_p=1.5), "dropout_p"),
        (dict(backend="nope"), "backend must be one of"),
    ],
)
def test_bad_arguments_named(kwargs, match):
    args = dict(q=torch.zeros(2, 4, 5, 8), k=torch.zeros(2, 2, 5, 8), v=torch.zeros(2, 2, 5, 8), prefix_k=torch.zeros(2, 3, 8), prefix_v=torch.zeros(2, 3, 8))
    args.update(kwargs)
    if "prefix_k" in kwargs:
        args["prefix_v"] = kwargs["prefix_k"]
    q, k, v, pk, pv = (args.pop(n) for n in ("q", "k", "v", "prefix_k", "prefix_v"))
    with pytest.raises(ValueError, match=match):
        prefix_attention(q, k, v, pk, pv, **args)


def test_cpu_backend_refuses_dropout_by_name():
    q, k, v, pk, pv = _inputs(2, 4, 2, 5, 5, 3, 8, torch.float32)
    with pytest.raises(ValueError, match="backend='cpu' does not support attention dropout"):
        prefix_attention(q, k, v, pk, pv, dropout_p=0.1, backend="cpu")
    assert prefix_attention(q, k, v, pk, pv, dropout_p=0.1).shape == q.shape  # the dispatcher picks torch


def test_prompt_ids_out_of_range():
    q, k, v, pk, pv = _inputs(2, 4, 2, 5, 5, 3, 8, torch.float32, bank=2)
    with pytest.raises(ValueError, match=r"prompt_ids must lie in \[0, 2\)"):
        prefix_attention(q, k, v, pk, pv, prompt_ids=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="prompt_ids must be an integer tensor"):
        prefix_attention(q, k, v, pk, pv, prompt_ids=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="prompt_ids is on meta, q on cpu"):
        prefix_attention(q, k, v, pk, pv, prompt_ids=torch.tensor([0, 1], device="meta"))


def _run(backend, q, k, v, pk, pv, **kw):
    if backend == "aten-reference":  # the CUDA backend's code with plain-PyTorch kernels
        from fastprompt.kernels.aten_kernels import REFERENCE_KERNELS
        from fastprompt.kernels.aten_prefix_attention import prefix_attention_aten
        from fastprompt.ops import prefix_attention_inputs

        return prefix_attention_aten(prefix_attention_inputs(q, k, v, pk, pv, **kw), REFERENCE_KERNELS)
    return prefix_attention(q, k, v, pk, pv, backend=backend, **kw)


COMPOSE = [
    # s, sk, what masks
    (6, 6, "left"), (6, 6, "right"), (7, 7, "holes"), (1, 8, "left"), (3, 8, "left"), (6, 6, "dense"), (6, 6, "float"),
]


@pytest.mark.parametrize("backend", BACKENDS + ["aten-reference"])
@pytest.mark.parametrize("case", COMPOSE, ids=[f"S{c[0]}-Sk{c[1]}-{c[2]}" for c in COMPOSE])
def test_masks_and_causal_compose(case, backend):
    """causal=True with any mask is causal AND the mask (the op once dropped causal when a mask
    came). With (B, Sk) key padding a padded query row (the token at key position Sk - S + i)
    sees only the prefix; decode (S=1) and chunked prefill (S < Sk) align causal bottom-right."""
    s, sk, kind = case
    b, h, hkv = 3, 4, 2
    q, k, v, pk, pv = _inputs(b, h, hkv, s, sk, 3, 8, torch.float32)
    causal = (torch.arange(sk)[None] <= torch.arange(s)[:, None] + (sk - s))[None, None] if s > 1 else torch.ones(1, 1, 1, sk, dtype=torch.bool)
    g = torch.Generator().manual_seed(3)
    if kind in ("left", "right", "holes"):
        kp = torch.ones(b, sk, dtype=torch.bool)
        if kind == "left":
            kp[1, :2], kp[2, : sk - 1] = False, False
        elif kind == "right":
            kp[1, sk - 2 :], kp[2, 1:] = False, False
        else:
            kp = torch.rand(b, sk, generator=g) > 0.3
            kp[:, -1] = True
        mask = kp.long() if kind == "right" else kp  # transformers' int attention_mask works too
        visible = kp[:, None, None, :] & causal
        if s > 1:
            visible = visible & kp[:, sk - s :][:, None, :, None]
    elif kind == "dense":
        mask = torch.rand(b, 1, s, sk, generator=g) > 0.3
        visible = mask & causal
    else:
        keep = torch.rand(b, 1, s, sk, generator=g) > 0.3
        mask = torch.zeros(b, 1, s, sk).masked_fill(~keep, torch.finfo(torch.float32).min)
        visible = keep & causal
    out = _run(backend, q, k, v, pk, pv, mask=mask, causal=True)
    ref = _reference(q, k, v, pk, pv, visible=visible)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(ref)
    got, want = _grads(out, (q, k, v, pk, pv), w), _grads(ref, (q, k, v, pk, pv), w)
    for name, a, e in zip("q k v prefix_k prefix_v".split(), got, want):
        torch.testing.assert_close(a.double(), e.double(), atol=1e-5, rtol=1e-5, msg=lambda m: f"grad {name}: {m}")
