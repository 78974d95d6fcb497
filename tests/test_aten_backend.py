"""The aten (CUDA default) backend without a GPU.

1. Numerics on CPU: every sequence path (FlashAttention dense, variable-length causal and
   non-causal, memory-efficient with a bias) runs with `REFERENCE_KERNELS`, plain-PyTorch
   stand-ins with the CUDA kernels' signatures and layouts, through the shared LSE merge, the
   matrix-product prefix part and their backward; checked against attention over the explicitly
   concatenated keys in float64 (forward and every gradient).
2. Shapes, dtypes and devices on fake CUDA tensors (FakeTensorMode): the real aten CUDA ops,
   forward and the backward function called directly (the autograd engine aborts on fake CUDA).
"""

from __future__ import annotations

import pytest
import torch
from reference import concat_attention_per_example

from fastprompt.kernels import aten_prefix_attention as aten
from fastprompt.kernels.aten_kernels import CUDA_KERNELS, REFERENCE_KERNELS
from fastprompt.kernels.lse_merge import MergedPrefixAttention
from fastprompt.kernels.prefix_matmul import PrefixByMatmul
from fastprompt.ops import prefix_attention_inputs


def _inputs(b, h, hkv, s, sk, p, d, dtype=torch.float32, bank=0, seed=0, layout="bshd"):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(True)

    if layout == "bshd":  # transformers' projections: (B, S, H, D) memory seen as (B, H, S, D)
        q = torch.randn(b, s, h, d, generator=g).to(dtype).transpose(1, 2).detach().requires_grad_(True)
    else:
        q = r(b, h, s, d)
    k, v = r(b, hkv, sk, d), r(b, hkv, sk, d)
    shape = (bank, hkv, p, d) if bank else (hkv, p, d)
    return q, k, v, r(*shape), r(*shape)


_reference = concat_attention_per_example  # per example, the bank row picked, float64


def _padding(b, sk, kind, seed=0):
    kp = torch.ones(b, sk, dtype=torch.bool)
    if kind == "left":
        kp[1, :3] = False
        kp[2, :sk - 1] = False
    elif kind == "right":
        kp[1, sk - 2 :] = False
        kp[2, 1:] = False
    elif kind == "left-dead":
        kp[1, :3] = False
        kp[2, :] = False
    elif kind == "holes":
        kp = torch.rand(b, sk, generator=torch.Generator().manual_seed(seed)) > 0.3
        kp[:, -1] = True
    return kp


def _visible(kp, s, sk, causal):
    """The op's contract written out: key padding, bottom-right causal, and on a causal call a
    padded query row (the token at key position Sk - S + i) sees no sequence key."""
    vis = kp[:, None, None, :]
    if causal:
        c = torch.arange(sk)[None, :] <= torch.arange(s)[:, None] + (sk - s)
        vis = vis & c[None, None] & kp[:, sk - s :][:, None, :, None]
    return vis


def _check(out, ref, tensors, atol=1e-5):
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=atol)
    w = torch.randn_like(ref)
    got = torch.autograd.grad((out.double() * w).sum(), tensors)
    want = torch.autograd.grad((ref * w).sum(), tensors)
    for name, a, e in zip("q k v prefix_k prefix_v".split(), got, want):
        torch.testing.assert_close(a.double(), e.double(), atol=atol, rtol=atol, msg=lambda m: f"grad {name}: {m}")


PATHS = [
    # name, b, h, hkv, s, sk, causal, padding kind
    ("dense", 2, 4, 4, 6, 6, False, None),
    ("dense-causal-gqa", 2, 8, 2, 7, 7, True, None),
    ("dense-decode", 3, 4, 1, 1, 9, True, None),
    ("varlen-causal-left", 3, 4, 2, 6, 6, True, "left"),
    ("varlen-causal-right", 3, 4, 2, 6, 6, True, "right"),
    ("varlen-causal-holes", 3, 4, 4, 7, 7, True, "holes"),
    ("varlen-bidirectional-right", 3, 4, 2, 6, 6, False, "right"),
    ("decode-left", 3, 4, 2, 1, 8, True, "left"),  # DecodeGrouped: the cache in place, query heads as rows
    ("decode-left-all-padding", 3, 8, 2, 1, 40, True, "left-dead"),  # one example's cache is all padding
    ("efficient-chunked-prefill", 3, 4, 2, 3, 7, True, "left"),
    ("dense-chunked-prefill", 2, 8, 2, 3, 7, True, None),  # flash's bottom-right causal, no padding
]


@pytest.mark.parametrize("case", PATHS, ids=[c[0] for c in PATHS])
def test_every_sequence_path_matches_concat_reference_fp32(case):
    """fp32 through each path: the path is forced by building its part (flash itself needs fp16/bf16)."""
    name, b, h, hkv, s, sk, causal, kind = case
    q, k, v, pk, pv = _inputs(b, h, hkv, s, sk, 5, 16)
    kp = None if kind is None else _padding(b, sk, kind)
    x = prefix_attention_inputs(q, k, v, pk, pv, mask=kp, causal=causal)
    if name.startswith("efficient"):
        seq, dead = aten.EfficientBias(REFERENCE_KERNELS, x.additive_bias(align=16), x.scale), x.dead_rows()
    else:
        flash = x.__class__(**{**x.__dict__, "q": x.q.detach().bfloat16()})  # what decides the path
        assert aten._flash_fits(flash)
        seq, dead = aten.sequence_part(flash, REFERENCE_KERNELS)
        assert type(seq).__name__ == ("DecodeGrouped" if kind and s == 1 else "FlashVarlen" if kind else "FlashDense")
        seq.kernels = REFERENCE_KERNELS
    out = MergedPrefixAttention.apply(q, k, v, pk, pv, seq, PrefixByMatmul(x.scale), dead, False)
    visible = None if kp is None else _visible(kp, s, sk, x.causal)
    if kp is None and x.causal:
        visible = (torch.arange(sk)[None] <= torch.arange(s)[:, None] + (sk - s))[None, None]
    _check(out, _reference(q, k, v, pk, pv, visible=visible), (q, k, v, pk, pv))


def test_dense_mask_float_bias_and_bank_through_the_public_composition():
    """The aten backend's own choice (memory-efficient, repeated GQA heads) with a bank, a dense
    mask composed with causal and a float bias, in fp32 on CPU."""
    b, h, hkv, s, p, d = 4, 4, 2, 6, 3, 8
    q, k, v, pk, pv = _inputs(b, h, hkv, s, s, p, d, bank=3)
    ids = torch.tensor([2, 0, 2, 2])
    mask = torch.rand(b, 1, s, s, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[0, 0, 4] = False  # a row with no sequence key once causal is applied
    bias = torch.randn(1, h, s, s)
    x = prefix_attention_inputs(q, k, v, pk, pv, prompt_ids=ids, mask=mask, causal=True, bias=bias)
    out = aten.prefix_attention_aten(x, REFERENCE_KERNELS)
    c = (torch.arange(s)[None] <= torch.arange(s)[:, None])[None, None]
    ref = _reference(q, k, v, pk, pv, ids=ids, visible=mask & c, bias=bias)
    _check(out, ref, (q, k, v, pk, pv))


@pytest.mark.parametrize("kind", [None, "left", "holes"])
def test_fp32_causal_uses_the_kernels_own_causal_mask(kind):
    """float32 causal (S == Sk) runs the memory-efficient kernel with its causal mask type: no
    (S, Sk) causal mask is built (without padding, no bias at all), and the result still matches
    the concatenation with bottom-right causal and the padded-query rule, gradients included."""
    b, h, hkv, s, p, d = 3, 4, 2, 7, 3, 8
    q, k, v, pk, pv = _inputs(b, h, hkv, s, s, p, d)
    kp = None if kind is None else _padding(b, s, kind)
    x = prefix_attention_inputs(q, k, v, pk, pv, mask=kp, causal=True)
    seq, _ = aten.sequence_part(x, REFERENCE_KERNELS)
    assert type(seq).__name__ == "EfficientBias" and seq.causal
    if kind is None:
        assert seq.bias is None
    elif kind == "left":  # example 0 has no padding: its bias holds no causal -inf
        assert not torch.isneginf(seq.bias[0]).any()
    out = aten.prefix_attention_aten(x, REFERENCE_KERNELS)
    c = (torch.arange(s)[None] <= torch.arange(s)[:, None])[None, None]
    visible = c if kp is None else _visible(kp, s, s, True)
    _check(out, _reference(q, k, v, pk, pv, visible=visible), (q, k, v, pk, pv))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", [None, "right", "holes"])
def test_low_precision_flash_paths_within_twice_reference_error(dtype, kind):
    """What the backend runs for bf16/fp16 (flash dense or varlen), the flash-attention rule."""
    b, h, hkv, s, p, d = 3, 4, 2, 9, 5, 16
    q, k, v, pk, pv = _inputs(b, h, hkv, s, s, p, d, dtype)
    kp = None if kind is None else _padding(b, s, kind)
    out = aten.prefix_attention_aten(prefix_attention_inputs(q, k, v, pk, pv, mask=kp, causal=True), REFERENCE_KERNELS)
    vis = _visible(kp if kp is not None else torch.ones(b, s, dtype=torch.bool), s, s, True)
    exact = _reference(q, k, v, pk, pv, visible=vis)
    g = h // hkv
    kk = torch.cat([pk.unsqueeze(0).expand(b, -1, -1, -1), k], 2).repeat_interleave(g, 1)
    vv = torch.cat([pv.unsqueeze(0).expand(b, -1, -1, -1), v], 2).repeat_interleave(g, 1)
    full = torch.cat([torch.ones(b, 1, s, p, dtype=torch.bool), vis.expand(b, 1, s, s)], -1)
    low = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=full)
    real = vis.any(-1, keepdim=True).expand_as(exact)  # SDPA's rows without sequence keys are fine too
    floor = 1e-3
    assert (out.double() - exact).abs().max() <= 2 * (low.double() - exact)[real].abs().max() + floor
    w = torch.randn_like(exact)
    ts = (q, k, v, pk, pv)
    got, lo, want = (torch.autograd.grad((t.double() * w).sum(), ts) for t in (out, low, exact))
    for name, a, l_, e in zip("q k v prefix_k prefix_v".split(), got, lo, want):
        assert (a.double() - e).abs().max() <= 3 * (l_.double() - e).abs().max() + floor, name


def test_varlen_plan_is_reused_across_layers_and_rebuilt_for_a_new_mask():
    kp = _padding(3, 6, "right")
    a = aten._plan_for(kp, 6, True)
    assert aten._plan_for(kp, 6, True) is a
    assert aten._plan_for(kp.clone(), 6, True) is not a
    assert a.max_k == 6 and a.cu_k.tolist() == [0, 6, 10, 11] and a.k_idx.numel() == 11


def test_varlen_plan_memo_is_per_thread():
    """The plan is per-forward state: a forward in another thread builds its own and leaves this
    thread's in place (this thread's next layer still hits)."""
    import threading

    kp = _padding(3, 6, "right")
    mine = aten._plan_for(kp, 6, True)
    theirs = {}

    def other():
        theirs["first"] = aten._plan_for(kp, 6, True)
        theirs["second"] = aten._plan_for(kp, 6, True)

    t = threading.Thread(target=other)
    t.start()
    t.join(20)
    assert theirs["first"] is not mine and theirs["second"] is theirs["first"]
    assert aten._plan_for(kp, 6, True) is mine


# ---------------------------------------------------------------- fake CUDA tensors, real aten ops


class _Ctx:
    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def _fake_run(seq, prefix, b, h, hkv, s, sk, p, d, dtype, bank=0, dead=None):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        dev = "cuda"
        q = torch.empty(b, s, h, d, dtype=dtype, device=dev).transpose(1, 2)  # transformers' layout
        k = torch.empty(b, hkv, sk, d, dtype=dtype, device=dev)
        v = torch.empty(b, hkv, sk, d, dtype=dtype, device=dev)
        shape = (bank, hkv, p, d) if bank else (hkv, p, d)
        pk, pv = torch.empty(shape, dtype=dtype, device=dev), torch.empty(shape, dtype=dtype, device=dev)
        seq, prefix, dead = seq(dev), prefix(dev), None if dead is None else dead(dev)
        ctx = _Ctx()
        out = MergedPrefixAttention.forward(ctx, q, k, v, pk, pv, seq, prefix, dead, False)
        assert out.shape == (b, h, s, d) and out.dtype == dtype and out.device.type == "cuda"
        grads = MergedPrefixAttention.backward(ctx, torch.empty(b, s, h, d, dtype=dtype, device=dev).transpose(1, 2))
        for g, t in zip(grads[:5], (q, k, v, pk, pv)):
            assert g.shape == t.shape and g.dtype == dtype and g.device.type == "cuda", (g.shape, t.shape, g.dtype)
        return ctx


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_fake_cuda_flash_dense_with_gqa(dtype, causal):
    _fake_run(lambda dev: aten.FlashDense(CUDA_KERNELS, causal, 0.125), lambda dev: PrefixByMatmul(0.125), 2, 8, 2, 64, 64, 16, 64, dtype)


def test_fake_cuda_flash_dense_decode_against_a_long_cache():
    _fake_run(lambda dev: aten.FlashDense(CUDA_KERNELS, False, 0.1), lambda dev: PrefixByMatmul(0.1), 4, 32, 8, 1, 4096, 128, 128, torch.bfloat16)


@pytest.mark.parametrize("causal", [False, True])
def test_fake_cuda_flash_varlen_with_a_bank(causal):
    b, s, real = 3, 40, 100

    def seq(dev):
        i32 = dict(dtype=torch.int32, device=dev)
        idx = torch.empty(real, dtype=torch.long, device=dev)
        if causal:
            plan = aten.VarlenPlan(idx, torch.empty(b + 1, **i32), s, idx, torch.empty(b + 1, **i32), s)
        else:
            plan = aten.VarlenPlan(None, torch.empty(b + 1, **i32), s, idx, torch.empty(b + 1, **i32), s)
        return aten.FlashVarlen(CUDA_KERNELS, plan, causal, 0.125)

    def prefix(dev):  # groups as prompt_groups returns them (its torch.unique needs real data)
        return PrefixByMatmul(0.125, [(torch.empty(2, dtype=torch.long, device=dev), 0), (torch.empty(1, dtype=torch.long, device=dev), 2)])

    dead = None if causal else (lambda dev: torch.empty(b, 1, 1, dtype=torch.bool, device=dev))
    _fake_run(seq, prefix, b, 8, 2, s, s, 16, 64, torch.bfloat16, bank=3, dead=dead)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_cuda_memory_efficient_with_bias_and_gqa(dtype):
    b, h, s, sk = 2, 8, 33, 70

    def seq(dev):
        bias = torch.zeros(b, 1, s, 80, dtype=dtype, device=dev).narrow(-1, 0, sk)  # 16-aligned rows
        return aten.EfficientBias(CUDA_KERNELS, bias, 0.125)

    ctx = _fake_run(seq, lambda dev: PrefixByMatmul(0.125), b, h, 2, s, sk, 16, 64, dtype,
                    dead=lambda dev: torch.empty(b, 1, s, dtype=torch.bool, device=dev))
    assert any(t.shape == (b, 1, s, sk) for t in ctx.saved_tensors)  # the bias is saved through autograd


@pytest.mark.parametrize("kind", ["causal", "dense-mask+causal", "t5-bias", "fp32"])
def test_fake_cuda_forward_through_the_public_normalisation(kind):
    """prefix_attention_inputs -> aten backend on fake CUDA tensors (inference: no grad)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        dtype = torch.float32 if kind == "fp32" else torch.bfloat16
        b, h, hkv, s, d = 2, 8, 2, 48, 64
        q = torch.empty(b, s, h, d, dtype=dtype, device="cuda").transpose(1, 2)
        k, v = (torch.empty(b, hkv, s, d, dtype=dtype, device="cuda") for _ in range(2))
        pk, pv = (torch.empty(hkv, 16, d, dtype=dtype, device="cuda") for _ in range(2))
        kw = dict(causal=True)
        if kind == "dense-mask+causal":
            kw["mask"] = torch.empty(b, 1, s, s, dtype=torch.bool, device="cuda")
        if kind == "t5-bias":
            kw = dict(bias=torch.empty(1, h, s, s, dtype=dtype, device="cuda"))
        x = prefix_attention_inputs(q, k, v, pk, pv, **kw)
        seq, _ = aten.sequence_part(x)
        assert type(seq).__name__ == ("FlashDense" if kind == "causal" else "EfficientBias")
        out = aten.prefix_attention_aten(x)
        assert out.shape == (b, h, s, d) and out.dtype == dtype and out.device.type == "cuda"


@pytest.mark.parametrize("with_bias", [False, True])
def test_fake_cuda_memory_efficient_with_its_own_causal_mask(with_bias):
    """The real aten op takes is_causal with and without a bias (float32 causal, S == Sk)."""
    b, h, s = 2, 8, 48

    def seq(dev):
        bias = torch.zeros(b, 1, s, s, dtype=torch.float32, device=dev) if with_bias else None
        return aten.EfficientBias(CUDA_KERNELS, bias, 0.125, causal=True)

    _fake_run(seq, lambda dev: PrefixByMatmul(0.125), b, h, 2, s, s, 16, 64, torch.float32,
              dead=(lambda dev: torch.empty(b, 1, s, dtype=torch.bool, device=dev)) if with_bias else None)


def test_fake_cuda_flash_dense_causal_chunked_prefill():
    """Causal S < Sk on flash (bottom-right), as sequence_part now routes unpadded chunked prefill."""
    _fake_run(lambda dev: aten.FlashDense(CUDA_KERNELS, True, 0.125), lambda dev: PrefixByMatmul(0.125), 2, 8, 2, 16, 64, 16, 64,
              torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_cuda_decode_on_a_padded_cache_needs_no_host_sync(dtype):
    """The whole backend call for one decode token against a left-padded cache, on fake CUDA
    tensors, where data-dependent ops (nonzero: the varlen plan's count of real tokens) raise:
    so the decode path gathers nothing and never waits on the device."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    b, h, hkv, sk, d = 4, 32, 8, 4096, 128
    with FakeTensorMode(), torch.no_grad():
        q = torch.empty(b, 1, h, d, dtype=dtype, device="cuda").transpose(1, 2)
        k, v = (torch.empty(b, hkv, sk, d, dtype=dtype, device="cuda") for _ in range(2))
        pk, pv = (torch.empty(hkv, 16, d, dtype=dtype, device="cuda") for _ in range(2))
        kp = torch.ones(b, sk, dtype=torch.bool, device="cuda")
        x = prefix_attention_inputs(q, k, v, pk, pv, mask=kp, causal=True)
        assert type(aten.sequence_part(x)[0]).__name__ == "DecodeGrouped"
        out = aten.prefix_attention_aten(x)
        assert out.shape == (b, h, 1, d) and out.dtype == dtype


@pytest.mark.parametrize("limit", [4 * 7 * 7 * 2, 7 * 7 * 3])  # chunks of two examples; of three heads
def test_memory_efficient_calls_are_split_below_the_row_bound(monkeypatch, limit):
    """Above PyTorch 2.13's bound (query rows x Sk, pytorch#187227) the forward runs in chunks of
    examples, then heads; output and gradients equal the concatenation reference."""
    b, h, hkv, s, p, d = 5, 4, 2, 7, 3, 8
    q, k, v, pk, pv = _inputs(b, h, hkv, s, s, p, d)
    bias = torch.randn(1, h, s, s)
    monkeypatch.setattr(aten, "_EFFICIENT_MAX_SCORES", limit)
    calls = []
    forward = REFERENCE_KERNELS.efficient_forward
    monkeypatch.setattr(REFERENCE_KERNELS, "efficient_forward", lambda *a, **kw: calls.append(a[0].shape) or forward(*a, **kw))
    x = prefix_attention_inputs(q, k, v, pk, pv, causal=True, bias=bias)
    out = aten.prefix_attention_aten(x, REFERENCE_KERNELS)
    assert len(calls) > 1 and all(c[0] * c[1] * c[2] * s < limit or c[:2] == (1, 1) for c in calls)
    c = (torch.arange(s)[None] <= torch.arange(s)[:, None])[None, None]
    _check(out, _reference(q, k, v, pk, pv, visible=c, bias=bias), (q, k, v, pk, pv))
