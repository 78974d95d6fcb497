"""pytest-benchmark suite for the prefix-attention op: every backend present against PyTorch SDPA on
explicitly concatenated, batch-expanded keys/values (what a user would otherwise write).

Run through `python bench/kernels_report.py` (or `fastprompt bench kernels`), which prints the
ratios and writes JSON; or directly: `pytest bench/test_kernels.py --benchmark-json out.json`.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastprompt.ops import prefix_attention, runnable

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    torch.set_num_threads(min(2, os.cpu_count() or 1))

# (B, H, Hkv, S, P, D)
SHAPES = [(8, 12, 12, 128, 32, 64), (8, 8, 2, 256, 32, 64), (4, 16, 16, 512, 16, 64)]
if DEVICE == "cuda":
    SHAPES += [(8, 32, 8, 1024, 64, 128), (2, 32, 32, 2048, 128, 128)]
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cpu" else [torch.bfloat16, torch.float16]


def _impls():
    names = ["sdpa_concat"] + runnable(DEVICE)
    if DEVICE == "cuda":
        try:
            import flash_attn  # noqa: F401

            names.append("flash_attn_concat")
        except ImportError:
            pass
        try:
            from torch.nn.attention.flex_attention import flex_attention  # noqa: F401

            names.append("flex_concat")
        except ImportError:
            pass
    return names


IMPLS = _impls()


def make_inputs(shape, dtype, seed=0):
    b, h, hkv, s, p, d = shape
    g = torch.Generator().manual_seed(seed)

    def r(*sh):
        return torch.randn(*sh, generator=g).to(DEVICE, dtype).requires_grad_(True)

    # transformers' memory layout: (B, S, H, D) viewed as (B, H, S, D)
    q, k, v = r(b, s, h, d).transpose(1, 2), r(b, s, hkv, d).transpose(1, 2), r(b, s, hkv, d).transpose(1, 2)
    return q, k, v, r(hkv, p, d), r(hkv, p, d)


def _concat(q, k, v, pk, pv, repeat=True):
    b, h = q.shape[:2]
    g = h // k.shape[1] if repeat else 1
    kk = torch.cat([pk.unsqueeze(0).expand(b, -1, -1, -1), k], 2).repeat_interleave(g, 1)
    vv = torch.cat([pv.unsqueeze(0).expand(b, -1, -1, -1), v], 2).repeat_interleave(g, 1)
    return kk, vv


def run(impl, inputs, causal):
    q, k, v, pk, pv = inputs
    s, p = q.shape[2], pk.shape[1]
    if impl == "sdpa_concat":
        kk, vv = _concat(q, k, v, pk, pv)
        mask = torch.ones(s, p + s, dtype=torch.bool, device=q.device).tril(diagonal=p) if causal else None
        return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
    if impl == "flex_concat":  # GPU only; not run on the CPU machines this was written on
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        kk, vv = _concat(q, k, v, pk, pv, repeat=False)
        block_mask = None
        if causal:
            block_mask = create_block_mask(lambda b, h, qi, ki: ki <= qi + p, None, None, s, p + s, device=q.device)
        return flex_attention(q, kk, vv, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])
    if impl == "flash_attn_concat":  # GPU only; flash-attn aligns causal masks bottom-right, as prefix attention needs
        from flash_attn import flash_attn_func

        kk, vv = _concat(q, k, v, pk, pv, repeat=False)
        return flash_attn_func(q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), causal=causal).transpose(1, 2)
    return prefix_attention(q, k, v, pk, pv, causal=causal, backend=impl)


def step(impl, inputs, causal, backward, grad):
    out = run(impl, inputs, causal)
    if backward:
        out.backward(grad)
        for t in inputs:
            t.grad = None
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}-Hkv{}-S{}-P{}-D{}".format(*s))
@pytest.mark.parametrize("impl", IMPLS)
def test_prefix_attention(benchmark, impl, shape, dtype, causal, backward):
    inputs = make_inputs(shape, dtype)
    grad = torch.randn(shape[0], shape[3], shape[1], shape[5], generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype).transpose(1, 2)
    benchmark.extra_info.update(impl=impl, shape=list(shape), dtype=str(dtype), causal=causal, backward=backward, device=DEVICE)
    if not backward:
        with torch.no_grad():
            benchmark(step, impl, inputs, causal, False, grad)
    else:
        benchmark(step, impl, inputs, causal, True, grad)
