"""Triton prefix-attention kernels: run under TRITON_INTERPRET=1 against a float32 reference, and
compiled for sm_80 and sm_90 (register, spill and shared-memory report). On a GPU the same
cases run natively."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from reference import concat_attention  # noqa: E402
from triton_harness import compile_report, interpreted_kernels, ptxas_available  # noqa: E402

ON_GPU = torch.cuda.is_available()


def _kernels():
    if ON_GPU:
        from fastprompt.kernels import triton_prefix_attention

        return triton_prefix_attention
    return interpreted_kernels()


def _device():
    return "cuda" if ON_GPU else "cpu"


def _make(b, h, hkv, s, sk, p, d, dtype, bank=0, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, layout=None):
        x = torch.randn(*shape, generator=g)
        if layout == "bshd":  # transformers' memory layout for q, k, v
            x = torch.randn(shape[0], shape[2], shape[1], shape[3], generator=g).transpose(1, 2)
        return x.to(device=_device(), dtype=dtype).requires_grad_(True)

    shape = (bank, hkv, p, d) if bank else (hkv, p, d)
    return r(b, h, s, d, layout="bshd"), r(b, hkv, sk, d, layout="bshd"), r(b, hkv, sk, d, layout="bshd"), r(*shape), r(*shape)


def _reference(q, k, v, pk, pv, ids, visible, bias, scale, dtype=torch.float64):
    outs = []
    for i in range(q.shape[0]):
        a, c = (pk, pv) if ids is None else (pk[ids[i]], pv[ids[i]])
        vis = None if visible is None else visible[i : i + 1] if visible.shape[0] > 1 else visible
        bi = None if bias is None else bias[i : i + 1] if bias.shape[0] > 1 else bias
        cast = lambda t: t.to(dtype)  # noqa: E731
        if dtype == torch.float64:
            outs.append(concat_attention(cast(q[i : i + 1]), cast(k[i : i + 1]), cast(v[i : i + 1]), cast(a), cast(c), vis, bi, scale))
        else:  # the same math in the low-precision dtype: the reference's own error
            kk = torch.cat([a.unsqueeze(0), k[i : i + 1]], 2).repeat_interleave(q.shape[1] // k.shape[1], 1)
            vv = torch.cat([c.unsqueeze(0), v[i : i + 1]], 2).repeat_interleave(q.shape[1] // k.shape[1], 1)
            p_ = a.shape[-2]
            full = torch.ones(1, 1, q.shape[2], kk.shape[2], dtype=torch.bool, device=q.device)
            if vis is not None:
                full = torch.cat([full[..., :p_].expand(vis.shape[0], vis.shape[1], -1, -1), vis.expand(-1, -1, q.shape[2], -1)], -1)
            mask = torch.zeros(full.shape, dtype=q.dtype, device=q.device).masked_fill(~full, float("-inf"))
            if bi is not None:
                mask = mask + torch.cat([torch.zeros(*bi.shape[:3], p_, dtype=q.dtype, device=q.device), bi.to(q.dtype)], -1)
            outs.append(torch.nn.functional.scaled_dot_product_attention(q[i : i + 1], kk, vv, attn_mask=mask, scale=scale))
    return torch.cat(outs)


CASES = {
    # name: (b, h, hkv, s, sk, p, d, causal, mask kind, bank, bias)
    "odd-S50-P7-D40": (2, 4, 2, 50, 50, 7, 40, False, None, 0, False),
    "causal-gqa": (2, 4, 1, 37, 37, 5, 32, True, None, 0, False),
    "decode-cache": (2, 4, 2, 1, 19, 3, 32, True, None, 0, False),
    "chunked-prefill": (1, 2, 2, 9, 23, 4, 32, True, None, 0, False),
    "key-padding": (3, 2, 2, 21, 21, 6, 64, False, "pad", 0, False),
    "bank-repeated-ids": (4, 2, 2, 17, 17, 5, 32, True, None, 3, False),
    "t5-bias-4d-mask": (2, 2, 2, 13, 13, 4, 32, False, "4d", 0, True),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CONFIGS = [{"BLOCK_M": 16, "BLOCK_N": 16}, None]


def _setup(case, dtype):
    b, h, hkv, s, sk, p, d, causal, mask_kind, bank, with_bias = CASES[case]
    q, k, v, pk, pv = _make(b, h, hkv, s, sk, p, d, dtype, bank)
    dev = _device()
    ids = torch.tensor([2, 0, 2, 2], device=dev)[:b] if bank else None
    mask = visible = bias = None
    if causal:
        visible = (torch.arange(sk, device=dev)[None] <= torch.arange(s, device=dev)[:, None] + (sk - s))[None, None]
    if mask_kind == "pad":
        keys = torch.ones(b, sk, dtype=torch.bool, device=dev)
        keys[1, 15:] = False
        keys[2, 3:] = False
        mask = keys[:, None, None, :]
        visible = mask
    elif mask_kind == "4d":
        mask = torch.rand(b, 1, s, sk, generator=torch.Generator().manual_seed(3)).to(dev) > 0.3
        mask[0, 0, 4] = False  # a row that sees only the prefix
        visible = mask
    if with_bias:
        bias = torch.randn(1, h, s, sk, generator=torch.Generator().manual_seed(4)).to(dev)
    return (q, k, v, pk, pv), ids, mask, visible, bias, causal


@pytest.mark.parametrize("config", CONFIGS, ids=["block16", "default"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("case", list(CASES))
def test_kernels_against_float32_reference(case, dtype, config):
    kern = _kernels()
    (q, k, v, pk, pv), ids, mask, visible, bias, causal = _setup(case, dtype)
    scale = q.shape[-1] ** -0.5
    mask_arg = mask if mask is not None else None
    out, lse = kern.prefix_attention_forward(q, k, v, pk, pv, ids, mask_arg, bias, causal and mask is None, scale, config)
    exact = _reference(q, k, v, pk, pv, ids, visible, bias, scale).to(out.device)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(device=out.device, dtype=dtype)
    grads = kern.prefix_attention_backward(do, q, k, v, pk, pv, out, lse, ids, mask_arg, bias, causal and mask is None, scale, config)
    want = torch.autograd.grad(exact, (q, k, v, pk, pv), do.double())
    names = ["dq", "dk", "dv", "dprefix_k", "dprefix_v"]
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), exact, atol=2e-5, rtol=2e-5)
        for n, g, w in zip(names, grads, want):
            torch.testing.assert_close(g.double(), w.double(), atol=5e-5, rtol=5e-5, msg=lambda m: f"{n}: {m}")
        return
    # flash-attention rule: within 2x the low-precision reference's own error (3x for gradients)
    low = _reference(q, k, v, pk, pv, ids, visible, bias, scale, dtype=dtype)
    low_grads = torch.autograd.grad(low, (q, k, v, pk, pv), do)
    floor = 1e-3 if dtype == torch.float16 else 8e-3
    err, ref_err = (out.double() - exact).abs().max(), (low.double() - exact).abs().max()
    assert err <= 2 * ref_err + floor, (err, ref_err)
    for n, g, lo, w in zip(names, grads, low_grads, want):
        e, re_ = (g.double() - w.double()).abs().max(), (lo.double() - w.double()).abs().max()
        assert e <= 3 * re_ + floor, (n, e, re_)


def test_autograd_function_and_prefix_grad_is_batch_reduced():
    """Through the autograd.Function: the prefix gradient is one (Hkv, P, D) tensor, the batch summed."""
    kern = _kernels()
    (q, k, v, pk, pv), ids, mask, visible, bias, causal = _setup("causal-gqa", torch.float32)
    from fastprompt.ops import prefix_attention_inputs

    out = kern.prefix_attention_triton(prefix_attention_inputs(q, k, v, pk, pv, causal=True))
    out.sum().backward()
    assert pk.grad.shape == pk.shape and pv.grad.shape == pv.shape
    ref_pk = pk.detach().double().requires_grad_(True)
    exact = _reference(q, k, v, ref_pk, pv, None, visible, None, q.shape[-1] ** -0.5)
    exact.sum().backward()
    torch.testing.assert_close(pk.grad.double(), ref_pk.grad, atol=5e-5, rtol=5e-5)


# ---- compiled for real GPUs: registers, spills, shared memory ----

SMEM_LIMIT = {80: 166912, 90: 232448}
KERNEL_NAMES = ["_fwd_kernel", "_bwd_preprocess", "_bwd_dq", "_bwd_dkdv"]
COMPILE_CASES = [
    {"kernel": k, "dtype": dt, "head_dim": d, "cc": cc}
    for k in KERNEL_NAMES for dt, d in (("fp16", 64), ("bf16", 128), ("fp32", 64)) for cc in (80, 90)
]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    if not ptxas_available():
        pytest.skip("ptxas (bundled with triton's NVIDIA backend) not found")
    report = compile_report(COMPILE_CASES, tmp_path_factory.mktemp("cubin"))
    return {(c["kernel"], c["dtype"], c["head_dim"], c["cc"]): c for c in report}


@pytest.mark.parametrize("case", COMPILE_CASES, ids=lambda c: f"{c['kernel']}-{c['dtype']}-D{c['head_dim']}-sm{c['cc']}")
def test_compiles_for_gpu_without_spills(compiled, case, record_property):
    c = compiled[(case["kernel"], case["dtype"], case["head_dim"], case["cc"])]
    assert "error" not in c, c.get("error")
    report = (f"{c['kernel']} {c['dtype']} D={c['head_dim']} sm_{c['cc']}: {c['registers']} registers, "
              f"{c['spill_stores']} B spill stores, {c['spill_loads']} B spill loads, stack {c['stack']} B, shared {c['shared']} B")
    print(report)
    record_property("resources", report)
    assert c["registers"] > 0, c
    assert c["spill_stores"] == 0 and c["spill_loads"] == 0, f"register spills: {report}"
    assert c["shared"] <= SMEM_LIMIT[c["cc"]], f"shared memory overflow: {report}"
