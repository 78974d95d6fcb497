"""Prefix attention as two partial attentions merged by log-sum-exp, written once for every device.

The sequence part (the queries over the example's own keys, with its masks) runs in a fused
kernel that returns its output and per-row LSE; the prefix part (the queries over the P prefix
keys, shared by the batch) is its own small attention. They merge as xformers'
`merge_attentions` does:

    lse = logaddexp(lse_s, lse_p),   out = exp(lse_s - lse) * out_s + exp(lse_p - lse) * out_p

Backward: a flash-style backward kernel given the *merged* output and LSE computes exactly the
full softmax's gradients restricted to its own keys (its probabilities are exp(s - LSE) and its
row term rowsum(dO * O) is the full one). So the sequence kernel's backward yields dK, dV and the
sequence half of dQ, and the prefix part's backward the rest, with the prefix gradients reduced
over the batch inside its matrix products (deterministic: no atomics).

A backend supplies the two parts (objects with `forward`/`backward`, below); the CPU backend's
and the CUDA (aten) backend's differ only in the kernels they call, so the CPU tests prove the
merge and its backward for both.
"""

from __future__ import annotations

from typing import Protocol

import torch


class SequencePart(Protocol):
    """Attention of q over the sequence keys only, with the call's masks, in a fused kernel."""

    def forward(self, q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        """q: (B, H, S, D), k, v: (B, Hkv, Sk, D) -> out (B, H, S, D) in q's dtype, LSE (B, H, S)
        float32 (natural log). Rows without a visible key may hold anything: `dead` fixes them."""

    def backward(self, dout, q, k, v, out, lse) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Given the merged out (B, H, S, D) and LSE (B, H, S): dq (B, H, S, D), dk, dv (B, Hkv, Sk, D)."""

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Tensors the part holds (masks, bias, plans), saved for backward through autograd."""

    def with_tensors(self, tensors) -> "SequencePart":
        """The same part holding the unpacked saved tensors."""

    def upcast(self) -> "SequencePart":
        """The same part for float32 inputs; needed only by backends that ask for upcast_backward."""


class PrefixPart(Protocol):
    """Attention of every query over the prefix alone (or its example's prompt of a bank); it holds
    no tensors of its own (only the prompt grouping), so it is kept as it is for backward."""

    def forward(self, q, pk, pv) -> tuple[torch.Tensor, torch.Tensor]:
        """-> out (B, H, S, D) (any float dtype), LSE (B, H, S) float32."""

    def backward(self, dout, q, pk, pv, out, lse) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Given the merged out and LSE: dq (B, H, S, D) and the prefix gradients, batch-reduced.
        dq may be float32 for low-precision inputs: the merge adds it to the sequence part's dq
        before the one rounding to the input dtype."""



def merge(out_s, lse_s, out_p, lse_p, dead=None):
    """The merged output and LSE of two partial attentions.

    out_s, out_p: (B, H, S, D); lse_s, lse_p: (B, H, S) float32 (lse_p finite: P >= 1).
    dead: bool broadcastable to (B, H, S), rows with no sequence key: their sequence part is
    dropped whatever the kernel left there (0, NaN, any LSE). out_s is the sequence kernel's own
    fresh buffer and may be overwritten (float32 merges in place). Returns out (B, H, S, D) in out_s's
    dtype and memory layout (transformers' (B, S, H, D) when the kernel wrote that) and LSE
    (B, H, S) float32.
    """
    lse_s = lse_s.float()
    if dead is not None:
        lse_s = lse_s.masked_fill(dead, float("-inf"))
        out_s = torch.where(dead.unsqueeze(-1), 0.0, out_s)
    lse = torch.logaddexp(lse_s, lse_p)
    w_p = torch.exp(lse_p - lse).unsqueeze(-1)
    if out_s.dtype == torch.float32:
        # out_s is the kernel's fresh buffer: merge in place, one pass (w_s = 1 - w_p)
        return out_s.lerp_(out_p.float(), w_p), lse
    # two passes, the casts fused into them; empty_like keeps out_s's layout (no copy_: fake CUDA
    # tensors refuse it in tests)
    out = torch.empty_like(out_s)
    return torch.addcmul(out_s * torch.exp(lse_s - lse).unsqueeze(-1), out_p, w_p, out=out), lse


def _float_like(t: torch.Tensor) -> torch.Tensor:
    """t in float32 with the same strides (so transformers' (B, S, H, D) layout survives the cast)."""
    return torch.empty_like(t, dtype=torch.float32).copy_(t)


class MergedPrefixAttention(torch.autograd.Function):
    """apply(q, k, v, pk, pv, seq, prefix, dead, upcast_backward) -> out (B, H, S, D).

    seq, prefix: the parts (above); dead: (B|1, H|1, S) bool or None; upcast_backward: run both
    backward kernels in float32 (the CPU backend asks for it where fp32 kernels are faster).
    Only q, k, v, the prefix, the sequence part's own tensors, the merged output and LSE are saved.
    """

    @staticmethod
    def forward(ctx, q, k, v, pk, pv, seq, prefix, dead, upcast_backward):
        out_s, lse_s = seq.forward(q, k, v)
        out_p, lse_p = prefix.forward(q, pk, pv)
        out, lse = merge(out_s, lse_s, out_p, lse_p, dead)
        ctx.upcast = upcast_backward
        ctx.save_for_backward(q, k, v, pk, pv, out, lse, *seq.tensors())
        # the parts are rebuilt from the saved tensors in backward: checkpointing may drop and
        # recompute them, so the objects must not keep their own references alive
        ctx.parts = (seq.with_tensors(()), prefix)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, pk, pv, out, lse, *rest = ctx.saved_tensors
        seq, prefix = ctx.parts
        seq = seq.with_tensors(rest)
        low = q.dtype if ctx.upcast and q.dtype in (torch.float16, torch.bfloat16) else None
        if low is not None:
            # transient casts: the saved tensors stay low precision
            q, k, v, pk, pv, out, dout = (_float_like(t) for t in (q, k, v, pk, pv, out, dout))
            seq = seq.upcast()
        dq, dk, dv = seq.backward(dout, q, k, v, out, lse)
        dq_p, dpk, dpv = prefix.backward(dout, q, pk, pv, out, lse)
        if dq_p.dtype == dq.dtype:
            dq = dq.add_(dq_p)  # dq is the kernel's fresh buffer
        else:
            # the prefix part's float32 dq takes the sum, rounded once: adding two rounded halves
            # in bf16 took dq's error past 3x the concatenated SDPA's (bench/gpu_check.py)
            dq = dq_p.add_(dq).to(dq.dtype)
        if low is not None:
            dq, dk, dv, dpk, dpv = (t.to(low) for t in (dq, dk, dv, dpk, dpv))
        return dq, dk, dv, dpk, dpv, None, None, None, None
