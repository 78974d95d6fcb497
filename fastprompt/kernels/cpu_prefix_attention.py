"""Prefix attention on CPU: PyTorch's fused flash kernel for the sequence, merged with the prefix by log-sum-exp.

Forward: the sequence part runs in `aten::_scaled_dot_product_flash_attention_for_cpu`, which
returns its output and per-row log-sum-exp; the prefix part is one matrix product of all B*S
queries of a kv head against the P prefix keys. The two partial attentions merge by their LSE
(xformers' `merge_attentions` math). Only q, k, v, the prefix, the merged output and the merged
LSE are saved: no score matrix, no concatenated or batch-expanded prefix.

Backward: the flash backward kernel, given the merged output and merged LSE, computes exactly the
full softmax's gradients restricted to the sequence keys (its probabilities are exp(s - LSE) and
its row term rowsum(dO * O) is the full one). The prefix's gradients come from recomputing its
(B*S, P) probabilities, reduced over the batch inside the matrix products.
"""

from __future__ import annotations

import torch

_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, H, S, X) -> (H, B * S, X); a view, no copy, when x is laid out (B, S, H, X) as
    transformers' projections produce q, k, v and expect the attention output."""
    b, h, s, d = x.shape
    return x.transpose(0, 1).reshape(h, b * s, d)


def _unrows(x: torch.Tensor, b: int) -> torch.Tensor:
    """(H, B * S, X) -> (B, H, S, X) view."""
    h, bs, d = x.shape
    return x.view(h, b, bs // b, d).transpose(0, 1)


class _MergedPrefixAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pk, pv, prompt_ids, attn_bias, causal, scale, dead_rows):
        b, h, s, d = q.shape
        # the kernel takes grouped-query K/V as they are (no repeat), forward and backward
        out_s, lse_raw = _FWD(q, k, v, 0.0, causal, attn_mask=attn_bias, scale=scale)
        lse_s = _rows(lse_raw.float().unsqueeze(-1)).squeeze(-1)  # (H, B*S)
        if dead_rows is not None:  # the kernel reports LSE 0 for rows that see no sequence key
            lse_s = lse_s.masked_fill(_rows(dead_rows.expand(b, h, s).unsqueeze(-1)).squeeze(-1), float("-inf"))
        out_p, lse_p = _prefix_forward(q, pk, pv, prompt_ids, scale)  # (H, B*S, D), (H, B*S)
        lse = torch.logaddexp(lse_s, lse_p)
        w_s = torch.exp(lse_s - lse)[..., None]
        w_p = torch.exp(lse_p - lse)[..., None]
        out_rows = _rows(out_s)  # a view when q came in transformers' (B, S, H, D) layout
        if q.dtype == torch.float32 and out_rows._base is not None:
            out_rows.mul_(w_s).addcmul_(out_p, w_p)  # in place: out_s becomes the merged output
            out = out_s
        else:
            out = torch.empty(b, s, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)  # transformers' layout
            _rows(out).copy_(out_rows.float() * w_s + out_p.float() * w_p)
        lse_saved = torch.empty_like(lse_raw)  # the backward kernel expects the forward's LSE layout
        _rows(lse_saved.unsqueeze(-1)).squeeze(-1).copy_(lse)
        ctx.save_for_backward(q, k, v, pk, pv, out, lse_saved, prompt_ids, attn_bias)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, pk, pv, out, lse, prompt_ids, attn_bias = ctx.saved_tensors
        b = q.shape[0]
        low = q.dtype if q.dtype in (torch.float16, torch.bfloat16) and k.shape[2] <= _UPCAST_MAX_KEYS else None
        if low is not None:
            # for short sequences PyTorch's fp32 flash backward beats its bf16/fp16 one on CPU by
            # more than the casts cost; they are transient: the saved tensors stay low precision
            q, k, v, pk, pv, out, dout = (_float_like(t) for t in (q, k, v, pk, pv, out, dout))
            attn_bias = None if attn_bias is None else attn_bias.float()
        # given the merged output and LSE, each kernel call yields the full softmax's gradients
        # restricted to its own keys: the sequence's, then the prefix's (batch-reduced inside)
        dq, dk, dv = _BWD(dout, q, k, v, out, lse, 0.0, ctx.causal, attn_mask=attn_bias, scale=ctx.scale)
        dq_p, dpk, dpv = _prefix_backward(dout, q, pk, pv, out, lse, prompt_ids, ctx.scale)
        dq.add_(_unrows(dq_p, b))
        if low is not None:
            dq, dk, dv, dpk, dpv = (t.to(low) for t in (dq, dk, dv, dpk, dpv))
        return dq, dk, dv, dpk, dpv, None, None, None, None, None


# measured with bench/kernels_report.py (torch 2.13, AVX512/AMX Xeon): upcasting the backward wins
# at 128 and 256 keys (bf16 fwd+bwd 1.27x -> 0.73x, 1.31x -> 1.08x of SDPA) and loses at 512
_UPCAST_MAX_KEYS = 256


def _float_like(t: torch.Tensor) -> torch.Tensor:
    """t in float32 with the same strides (so transformers' (B, S, H, D) layout survives the cast)."""
    return torch.empty_like(t, dtype=torch.float32).copy_(t)  # empty_like keeps dense strides


def _prefix_groups(b, prompt_ids):
    """[(example indices or None, prompt index or None)]: one call per prompt of a bank."""
    if prompt_ids is None:
        return [(None, None)]
    return [((prompt_ids == t).nonzero(as_tuple=True)[0], t) for t in torch.unique(prompt_ids).tolist()]


def _rows_of(x, idx, b):
    """x: (B, H, S, X) -> (1, H, n*S, X) rows of the examples idx (all when None): the prefix
    attention is one 'batch' whose queries are every row of those examples."""
    r = _rows(x)
    if idx is None:
        return r.unsqueeze(0)
    h, bs, d = r.shape
    return r.view(h, b, bs // b, d).index_select(1, idx).reshape(h, -1, d).unsqueeze(0)


def _prefix_forward(q, pk, pv, prompt_ids, scale):
    """Attention of every query row over the prefix alone: (H, B*S, D) output and (H, B*S) LSE."""
    b, h, s, d = q.shape
    groups = _prefix_groups(b, prompt_ids)
    if groups[0][0] is None:
        o, l = _FWD(_rows_of(q, None, b), pk.unsqueeze(0), pv.unsqueeze(0), 0.0, False, scale=scale)
        return o[0], l[0].float()
    out = q.new_empty(h, b, s, d)
    lse = torch.empty(h, b, s, dtype=torch.float32, device=q.device)
    for idx, t in groups:
        o, l = _FWD(_rows_of(q, idx, b), pk[t].unsqueeze(0), pv[t].unsqueeze(0), 0.0, False, scale=scale)
        out[:, idx] = o[0].reshape(h, idx.numel(), s, d)
        lse[:, idx] = l[0].float().reshape(h, idx.numel(), s)
    return out.view(h, b * s, d), lse.view(h, b * s)


def _prefix_backward(dout, q, pk, pv, out, lse, prompt_ids, scale):
    """dq (H, B*S, D) from the prefix keys, and the prefix gradients summed over the batch."""
    b, h, s, d = q.shape
    lse4 = lse.unsqueeze(-1)  # (B, H, S, 1): rows() works on 4-D tensors
    groups = _prefix_groups(b, prompt_ids)
    if groups[0][0] is None:
        dq, dpk, dpv = _BWD(
            _rows_of(dout, None, b), _rows_of(q, None, b), pk.unsqueeze(0), pv.unsqueeze(0),
            _rows_of(out, None, b), _rows_of(lse4, None, b)[..., 0], 0.0, False, scale=scale,
        )
        return dq[0], dpk[0], dpv[0]
    dq = q.new_empty(h, b, s, d)
    dpk, dpv = torch.zeros_like(pk), torch.zeros_like(pv)
    for idx, t in groups:
        gq, gk, gv = _BWD(
            _rows_of(dout, idx, b), _rows_of(q, idx, b), pk[t].unsqueeze(0), pv[t].unsqueeze(0),
            _rows_of(out, idx, b), _rows_of(lse4, idx, b)[..., 0].contiguous(), 0.0, False, scale=scale,
        )
        dq[:, idx] = gq[0].reshape(h, idx.numel(), s, d)
        dpk[t], dpv[t] = gk[0], gv[0]
    return dq.view(h, b * s, d), dpk, dpv


def prefix_attention_cpu(q, k, v, prefix_k, prefix_v, prompt_ids, mask, causal, scale, bias, dropout_p):
    """Same contract as `prefix_attention_torch`; dropout_p must be 0 (the fused kernel has no dropout)."""
    if dropout_p:
        raise ValueError("the cpu backend does not support dropout; use backend='torch'")
    b, h, s, _ = q.shape
    sk = k.shape[2]
    attn_bias = dead = None
    if mask is not None:
        if mask.dtype == torch.bool:
            visible = mask
            attn_bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        else:
            attn_bias = mask.to(q.dtype)
            visible = attn_bias > torch.finfo(q.dtype).min / 2
        dead = ~visible.any(-1)  # rows that see no sequence key: only the prefix
        dead = dead if bool(dead.any()) else None
        causal = False
    elif causal and s > 1 and (s != sk or bias is not None):
        # the kernel aligns causal masks top-left; chunked/cached decoding needs bottom-right
        visible = torch.arange(sk, device=q.device)[None, :] <= torch.arange(s, device=q.device)[:, None] + (sk - s)
        attn_bias = torch.zeros(s, sk, dtype=q.dtype, device=q.device).masked_fill_(~visible, float("-inf"))[None, None]
        causal = False
    causal = causal and s > 1
    if bias is not None:
        attn_bias = bias.to(q.dtype) if attn_bias is None else attn_bias + bias.to(q.dtype)
    if attn_bias is not None and attn_bias.shape[0] != b:
        attn_bias = attn_bias.expand(b, *attn_bias.shape[1:])
    # no .contiguous(): the kernel takes transformers' (B, S, H, D) memory layout as it is
    return _MergedPrefixAttention.apply(q, k, v, prefix_k, prefix_v, prompt_ids, attn_bias, causal, scale, dead)
