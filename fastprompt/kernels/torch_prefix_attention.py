"""Prefix-concat attention in plain PyTorch (CPU, and the fallback on every device).

The prefix keys/values are never concatenated to the sequence's own nor copied per example:
the prefix scores are one matrix product of all ``B * S`` queries (per kv head) against the
``P`` prefix keys, the sequence scores are the usual batched product, and the two score blocks
share one softmax. Autograd reduces the prefix gradients over the batch inside the same
matrix products, so no ``(B, P, D)``-sized prefix buffer exists in forward or backward.
The file holds that computation (`_attention`), its entry point (`prefix_attention_torch`) and the
backend's declaration (`BACKEND`).
"""

from __future__ import annotations

import torch

from .declaration import Backend
from .inputs import AttentionInputs
from .prefix_matmul import prompt_groups
from .rows import fold_rows, unfold_rows


def _prefix_scores(qg, prefix_k, prompt_ids):
    """qg: (B, Hkv, G*S, D); prefix_k: (Hkv, P, D) or (T, Hkv, P, D) -> (B, Hkv, G*S, P)."""
    b = qg.shape[0]
    if prompt_ids is None:
        return unfold_rows(torch.bmm(fold_rows(qg), prefix_k.transpose(1, 2)), b)
    out = qg.new_empty(*qg.shape[:3], prefix_k.shape[-2])
    for idx, t in prompt_groups(prompt_ids):
        sub = qg.index_select(0, idx)
        out[idx] = unfold_rows(torch.bmm(fold_rows(sub), prefix_k[t].transpose(1, 2)), sub.shape[0])
    return out


def _prefix_values(probs, prefix_v, prompt_ids):
    """probs: (B, Hkv, G*S, P); prefix_v: (Hkv, P, D) or (T, Hkv, P, D) -> (B, Hkv, G*S, D)."""
    b = probs.shape[0]
    if prompt_ids is None:
        return unfold_rows(torch.bmm(fold_rows(probs), prefix_v), b)
    out = probs.new_empty(*probs.shape[:3], prefix_v.shape[-1])
    for idx, t in prompt_groups(prompt_ids):
        sub = probs.index_select(0, idx)
        out[idx] = unfold_rows(torch.bmm(fold_rows(sub), prefix_v[t]), sub.shape[0])
    return out


def _attention(q, k, v, prefix_k, prefix_v, prompt_ids, visible, bias, scale, dropout_p):
    """q: (B, H, S, D); k, v: (B, Hkv, Sk, D); visible: bool broadcastable to (B, H, S, Sk) or
    None; bias: float broadcastable likewise or None -> (B, H, S, D)."""
    if q.dtype in (torch.float16, torch.bfloat16):
        # scores, softmax and products in fp32, as fused kernels accumulate: rounding the scores
        # to 8 bits of mantissa before the softmax would double the error of a bf16 kernel
        out = _attention(
            q.float(), k.float(), v.float(), prefix_k.float(), prefix_v.float(), prompt_ids, visible,
            None if bias is None else bias.float(), scale, dropout_p,
        )
        return out.to(q.dtype)
    b, h, s, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = h // hkv
    qg = q.reshape(b, hkv, g * s, d)  # head h = kv_head * G + g, as transformers' repeat_kv

    seq = torch.matmul(qg, k.transpose(-1, -2)).view(b, h, s, sk)
    pre = _prefix_scores(qg, prefix_k, prompt_ids).reshape(b, h, s, -1)
    seq = seq * scale
    pre = pre * scale
    if bias is not None:
        seq = seq + bias.to(seq.dtype)
    if visible is not None:
        seq = seq.masked_fill(~visible, float("-inf"))

    probs = torch.softmax(torch.cat([pre, seq], dim=-1), dim=-1)
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p, training=True)
    n_pre = pre.shape[-1]
    p_pre = probs[..., :n_pre].reshape(b, hkv, g * s, n_pre)
    p_seq = probs[..., n_pre:].reshape(b, hkv, g * s, sk)
    out = torch.matmul(p_seq, v) + _prefix_values(p_pre, prefix_v, prompt_ids)
    return out.reshape(b, h, s, d)


def prefix_attention_torch(x: AttentionInputs) -> torch.Tensor:
    """Normalised inputs -> (B, H, S, D): plain autograd, any device, dropout, float64."""
    return _attention(x.q, x.k, x.v, x.prefix_k, x.prefix_v, x.prompt_ids, x.visible(), x.bias, x.scale, x.dropout_p)


BACKEND = Backend(
    name="torch",
    devices=frozenset({"cpu", "cuda", "xpu", "mps"}),
    dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64}),
    fn=prefix_attention_torch,
    bias_gradients=True,  # plain autograd over the materialised scores
    notes="the fallback everywhere: materialises the (B, H, S, P + Sk) scores, so slower and heavier",
)
