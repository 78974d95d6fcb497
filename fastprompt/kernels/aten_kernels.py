"""The raw fused-attention kernels the `aten` backend calls, and a plain-PyTorch stand-in for them.

`CUDA_KERNELS` are one-line calls into PyTorch's own CUDA kernels: FlashAttention-2
(`aten::_flash_attention_forward/_backward`, dense or variable-length) and the memory-efficient
kernel (`aten::_scaled_dot_product_efficient_attention[_backward]`, for an additive bias).
`REFERENCE_KERNELS` compute the same thing in float32 math with the same signatures, layouts and
LSE shapes, on any device, and answer rows that see no key the worst way a kernel might (NaN
output, infinite LSE). With them the aten backend's packing, unpacking, LSE merge and backward
run and are checked numerically on CPU; only the kernels themselves need a GPU.
"""

from __future__ import annotations

import math

import torch

_aten = torch.ops.aten


class CudaKernels:
    """Layouts: flash q (B, S, H, D) dense or (Nq, H, D) packed with cu_q (B+1,) int32 offsets,
    k, v likewise with Hkv heads; its LSE is (B, H, S) dense, (H, Nq) packed. Efficient: q
    (B, H, S, D), k, v (B, H, Sk, D) (same heads), bias (B, H, S, Sk) in q's dtype with 16-aligned
    rows; its LSE is (B, H, ceil(S / 32) * 32)."""

    @staticmethod
    def flash_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        out, lse, rng, unused, _ = _aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale)
        return out, lse, rng, unused

    @staticmethod
    def flash_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, rng, unused, scale):
        return _aten._flash_attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, causal, rng, unused, scale=scale)

    @staticmethod
    def efficient_forward(q, k, v, bias, scale, causal=False):
        # causal: the kernel's own top-left causal mask type (callers pass it only when S == Sk,
        # where top-left and bottom-right agree), so no (S, Sk) mask is built or saved
        out, lse, seed, offset = _aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, causal, scale=scale)
        return out, lse, seed, offset

    @staticmethod
    def efficient_backward(dout, q, k, v, bias, out, lse, seed, offset, scale, causal=False):
        dq, dk, dv, _ = _aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, bias, out, lse, seed, offset, 0.0, [True, True, True, False], causal, scale=scale
        )
        return dq, dk, dv


def _attn(q, k, v, bias, scale):
    """q: (H, S, D), k, v: (Hkv, Sk, D), bias: (H, S, Sk) or None -> out (H, S, D), lse (H, S), float32;
    rows with no finite score: NaN output and +inf LSE (the worst a kernel might leave there)."""
    g = q.shape[0] // k.shape[0]
    k, v = k.float().repeat_interleave(g, 0), v.float().repeat_interleave(g, 0)
    s = q.float() @ k.transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias.float()
    lse = torch.logsumexp(s, -1)
    out = torch.exp(s - lse.unsqueeze(-1)) @ v
    dead = torch.isneginf(lse)
    return out.masked_fill(dead.unsqueeze(-1), float("nan")), lse.masked_fill(dead, float("inf"))


def _attn_backward(dout, q, k, v, out, lse, bias, scale):
    """Flash-style backward from the given out and LSE: (dq (H, S, D), dk, dv (Hkv, Sk, D)) float32."""
    hkv = k.shape[0]
    g = q.shape[0] // hkv
    kf, vf = k.float().repeat_interleave(g, 0), v.float().repeat_interleave(g, 0)
    s = q.float() @ kf.transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias.float()
    p = torch.exp(s - lse.float().unsqueeze(-1)).nan_to_num(0.0)
    delta = (dout.float() * out.float()).sum(-1, keepdim=True)
    dv = p.transpose(-1, -2) @ dout.float()
    ds = p * (dout.float() @ vf.transpose(-1, -2) - delta)
    dq = ds @ kf * scale
    dk = ds.transpose(-1, -2) @ q.float() * scale
    return dq, dk.unflatten(0, (hkv, g)).sum(1), dv.unflatten(0, (hkv, g)).sum(1)


def _causal_bias(s, sk, device):
    """(S, Sk) 0/-inf, bottom-right aligned (FlashAttention-2's convention for S != Sk)."""
    vis = torch.arange(sk, device=device).unsqueeze(0) <= torch.arange(s, device=device).unsqueeze(1) + (sk - s)
    return torch.zeros(s, sk, device=device).masked_fill(~vis, float("-inf"))


def _segments(t, cu, dense_b):
    """Per example: (H, n, D) views of a packed (N, H, D) or dense (B, S, H, D) tensor."""
    if cu is None:
        return [t[i].transpose(0, 1) for i in range(dense_b)]
    c = cu.tolist()
    return [t[c[i] : c[i + 1]].transpose(0, 1) for i in range(len(c) - 1)]


class ReferenceKernels:
    """`CudaKernels`' signatures and layouts in float32 PyTorch math (any device; slow)."""

    @staticmethod
    def flash_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        n = q.shape[0] if cu_q is None else cu_q.numel() - 1
        outs, lses = [], []
        for qi, ki, vi in zip(_segments(q, cu_q, n), _segments(k, cu_k, n), _segments(v, cu_k, n)):
            bias = _causal_bias(qi.shape[1], ki.shape[1], q.device) if causal else None
            if ki.shape[1] == 0:
                o, l = torch.full(qi.shape, float("nan")), torch.full(qi.shape[:2], float("inf"))
            else:
                o, l = _attn(qi, ki, vi, bias, scale)
            outs.append(o.transpose(0, 1).to(q.dtype))
            lses.append(l)
        if cu_q is None:
            out, lse = torch.stack(outs), torch.stack(lses)
        else:
            out, lse = torch.cat(outs), torch.cat(lses, 1)
        return out, lse, torch.zeros(2, dtype=torch.int64), torch.zeros((), dtype=torch.int64)

    @staticmethod
    def flash_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, rng, unused, scale):
        n = q.shape[0] if cu_q is None else cu_q.numel() - 1
        seg = lambda t, cu: _segments(t, cu, n)  # noqa: E731
        lse_seg = [lse[i] for i in range(n)] if cu_q is None else [lse[:, a:b] for a, b in zip(cu_q.tolist(), cu_q.tolist()[1:])]
        dqs, dks, dvs = [], [], []
        for doi, qi, ki, vi, oi, li in zip(seg(dout, cu_q), seg(q, cu_q), seg(k, cu_k), seg(v, cu_k), seg(out, cu_q), lse_seg):
            bias = _causal_bias(qi.shape[1], ki.shape[1], q.device) if causal else None
            dq, dk, dv = _attn_backward(doi, qi, ki, vi, oi, li, bias, scale)
            dqs.append(dq.transpose(0, 1).to(q.dtype))
            dks.append(dk.transpose(0, 1).to(k.dtype))
            dvs.append(dv.transpose(0, 1).to(v.dtype))
        join = torch.stack if cu_q is None else torch.cat
        return join(dqs), join(dks), join(dvs)

    @staticmethod
    def _with_causal(bias, b, h, s, sk, causal, device):
        """The kernel's top-left causal mask type added to the bias: (B, H, S, Sk) float32 or None."""
        if not causal:
            return bias
        c = torch.zeros(s, sk, device=device).masked_fill(torch.ones(s, sk, dtype=torch.bool, device=device).triu(1), float("-inf"))
        return c.expand(b, h, s, sk) if bias is None else bias.float() + c

    @staticmethod
    def efficient_forward(q, k, v, bias, scale, causal=False):
        assert q.shape[1] == k.shape[1], "the memory-efficient kernel takes repeated K/V heads"
        assert bias is None or bias.stride(-2) % 16 == 0 or bias.shape[-2] == 1, "bias rows must be 16-aligned"
        b, h, s, d = q.shape
        bias = ReferenceKernels._with_causal(bias, b, h, s, k.shape[2], causal, q.device)
        outs, lses = zip(*(_attn(q[i], k[i], v[i], None if bias is None else bias[i], scale) for i in range(b)))
        lse = torch.zeros(b, h, math.ceil(s / 32) * 32, dtype=torch.float32)
        lse.narrow(-1, 0, s).copy_(torch.stack(lses).masked_fill(torch.isinf(torch.stack(lses)), float("-inf")))
        return torch.stack(outs).to(q.dtype), lse, torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64)

    @staticmethod
    def efficient_backward(dout, q, k, v, bias, out, lse, seed, offset, scale, causal=False):
        b, h, s, d = q.shape
        assert lse.shape[-1] == math.ceil(s / 32) * 32, "the memory-efficient backward takes its padded LSE"
        bias = ReferenceKernels._with_causal(bias, b, h, s, k.shape[2], causal, q.device)
        grads = [
            _attn_backward(dout[i], q[i], k[i], v[i], out[i], lse[i].narrow(-1, 0, s), None if bias is None else bias[i], scale)
            for i in range(b)
        ]
        return tuple(torch.stack([g[j] for g in grads]).to(q.dtype) for j in range(3))


CUDA_KERNELS = CudaKernels()
REFERENCE_KERNELS = ReferenceKernels()
