"""Independent references: attention over an explicitly concatenated [prefix ; sequence], in float64.

Nothing here imports fastprompt: the reference is registered as its own attention implementation
and reads per-module prefixes from a dict the test fills.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

REF_IMPL = "fastprompt_test_reference"
PREFIX: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def self_attention_modules(model, arch):
    """The self-attention modules of every stack, in layer order (written independently of fastprompt)."""
    base = model.base_model
    if arch in ("bert", "roberta"):
        return [[l.attention.self for l in base.encoder.layer]]
    if arch == "distilbert":
        return [[l.attention for l in base.transformer.layer]]
    if arch == "gpt2":
        return [[l.attn for l in base.h]]
    if arch == "opt":
        return [[l.self_attn for l in base.decoder.layers]]
    if arch == "t5":
        return [[b.layer[0].SelfAttention for b in model.encoder.block], [b.layer[0].SelfAttention for b in model.decoder.block]]
    return [[l.self_attn for l in base.layers]]


def concat_attention(q, k, v, pk=None, pv=None, visible=None, bias=None, scale=None):
    """q (B,H,S,D), k/v (B,Hkv,Sk,D), pk/pv (Hkv,P,D) or None; visible bool broadcastable to (B,H,S,Sk)."""
    b, h, s, d = q.shape
    sk = k.shape[2]
    visible = torch.ones(1, 1, s, sk, dtype=torch.bool) if visible is None else visible
    bias = torch.zeros(1, 1, s, sk, dtype=torch.float64) if bias is None else bias.double()
    if pk is not None:
        p = pk.shape[-2]
        k = torch.cat([pk.to(k.dtype).unsqueeze(0).expand(b, -1, -1, -1), k], dim=2)
        v = torch.cat([pv.to(v.dtype).unsqueeze(0).expand(b, -1, -1, -1), v], dim=2)
        vb, vh = visible.shape[:2]
        visible = torch.cat([torch.ones(vb, vh, visible.shape[2], p, dtype=torch.bool), visible], dim=-1)
        bias = torch.cat([torch.zeros(*bias.shape[:3], p, dtype=torch.float64), bias], dim=-1)
    g = h // k.shape[1]
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    scale = d**-0.5 if scale is None else scale
    scores = q.double() @ k.double().transpose(-1, -2) * scale + bias
    scores = scores.masked_fill(~visible, float("-inf"))
    # a row with no visible key (a padding query below the prompted layers) attends to nothing, as
    # flash kernels do: its NaN would otherwise reach real tokens through 0 * NaN in later layers
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (probs @ v.double()).to(q.dtype)


def concat_attention_per_example(q, k, v, pk, pv, ids=None, visible=None, bias=None, scale=None):
    """concat_attention example by example, in float64: each example's prefix picked from the bank
    (T, Hkv, P, D) by ids (B,), or the shared (Hkv, P, D) one; visible / bias broadcastable to
    (B, H, S, Sk)."""
    outs = []
    for i in range(q.shape[0]):
        a, b_ = (pk, pv) if ids is None else (pk[ids[i]], pv[ids[i]])
        vis = None if visible is None else visible[i : i + 1] if visible.shape[0] > 1 else visible
        bi = None if bias is None else bias[i : i + 1] if bias.shape[0] > 1 else bias
        outs.append(concat_attention(q[i : i + 1].double(), k[i : i + 1].double(), v[i : i + 1].double(), a.double(), b_.double(), vis, bi, scale))
    return torch.cat(outs)


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    s, sk = query.shape[2], key.shape[2]
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", False)
    if attention_mask is None:
        visible = None
        if is_causal:
            visible = (torch.arange(sk)[None, :] <= torch.arange(s)[:, None] + (sk - s))[None, None]
    else:
        visible = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    pk, pv = PREFIX.get(id(module), (None, None))
    out = concat_attention(query, key, value, pk, pv, visible, kwargs.get("position_bias"), scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(REF_IMPL, reference_attention)
AttentionMaskInterface.register(REF_IMPL, sdpa_mask)
