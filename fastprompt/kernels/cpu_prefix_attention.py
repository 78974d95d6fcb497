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


def _per_head(prefix: torch.Tensor, g: int) -> torch.Tensor:
    """(..., Hkv, P, D) -> (..., H, P, D): each query head's kv-head prefix (G copies, never B)."""
    return prefix if g == 1 else prefix.repeat_interleave(g, dim=-3)


def _bank_bmm(x_rows, prefix, prompt_ids, b, transpose):
    """x_rows: (H, B*S, X); prefix: (H, P, D) or bank (T, H, P, D) -> x @ prefix^T or x @ prefix per example's prompt."""
    if prompt_ids is None:
        return torch.bmm(x_rows, prefix.transpose(1, 2) if transpose else prefix)
    h, bs, _ = x_rows.shape
    s = bs // b
    xs = x_rows.view(h, b, s, -1)
    out = None
    for t in torch.unique(prompt_ids).tolist():
        idx = (prompt_ids == t).nonzero(as_tuple=True)[0]
        pt = prefix[t].transpose(1, 2) if transpose else prefix[t]
        part = torch.bmm(xs.index_select(1, idx).reshape(h, -1, xs.shape[-1]), pt).view(h, idx.numel(), s, -1)
        if out is None:
            out = part.new_empty(h, b, s, part.shape[-1])
        out[:, idx] = part
    return out.view(h, bs, -1)


def _bank_grad(a_rows, x_rows, prompt_ids, b, bank_shape):
    """sum over the examples of each prompt of a^T x: (H, B*S, P), (H, B*S, D) -> (H, P, D) or (T, H, P, D)."""
    if prompt_ids is None:
        return torch.bmm(a_rows.transpose(1, 2), x_rows)
    h, bs, _ = a_rows.shape
    s = bs // b
    out = a_rows.new_zeros(bank_shape)
    for t in torch.unique(prompt_ids).tolist():
        idx = (prompt_ids == t).nonzero(as_tuple=True)[0]
        a = a_rows.view(h, b, s, -1).index_select(1, idx).reshape(h, -1, a_rows.shape[-1])
        x = x_rows.view(h, b, s, -1).index_select(1, idx).reshape(h, -1, x_rows.shape[-1])
        out[t] = torch.bmm(a.transpose(1, 2), x)
    return out


class _MergedPrefixAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pk, pv, prompt_ids, attn_bias, causal, scale, dead_rows):
        b, h, s, d = q.shape
        g = h // k.shape[1]
        kr, vr = (k, v) if g == 1 else (k.repeat_interleave(g, 1), v.repeat_interleave(g, 1))
        out_s, lse_raw = _FWD(q, kr, vr, 0.0, causal, attn_mask=attn_bias, scale=scale)
        lse_s = _rows(lse_raw.float().unsqueeze(-1)).squeeze(-1)  # (H, B*S)
        if dead_rows is not None:  # the kernel reports LSE 0 for rows that see no sequence key
            lse_s = lse_s.masked_fill(_rows(dead_rows.expand(b, h, s).unsqueeze(-1)).squeeze(-1), float("-inf"))
        pk_h, pv_h = _per_head(pk, g), _per_head(pv, g)
        sp = _bank_bmm(_rows(q), pk_h, prompt_ids, b, True).float() * scale  # (H, B*S, P)
        lse = torch.logaddexp(lse_s, sp.logsumexp(-1))
        pp = torch.exp(sp - lse[..., None])
        weight = torch.exp(lse_s - lse)[..., None]
        out_rows = _rows(out_s)  # a view when q came in transformers' (B, S, H, D) layout
        if prompt_ids is None and q.dtype == torch.float32 and out_rows._base is not None:
            # in place, one fused product-and-add: out = out_s * w + P_prefix @ V_prefix
            out_rows.mul_(weight).baddbmm_(pp, pv_h)
            out = out_s
        else:
            mixed = out_rows.float() * weight + _bank_bmm(pp.to(q.dtype), pv_h, prompt_ids, b, False).float()
            out = torch.empty(b, s, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)  # transformers' layout
            _rows(out).copy_(mixed)
        lse_saved = torch.empty_like(lse_raw)  # the backward kernel expects the forward's LSE layout
        _rows(lse_saved.unsqueeze(-1)).squeeze(-1).copy_(lse)
        # the prefix probabilities (B*S*H*P, small next to q, k, v, out) are kept rather than recomputed
        ctx.save_for_backward(q, k, v, pk, pv, out, lse_saved, pp.to(q.dtype), prompt_ids, attn_bias)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, pk, pv, out, lse, pp, prompt_ids, attn_bias = ctx.saved_tensors
        b, h, s, d = q.shape
        hkv = k.shape[1]
        g = h // hkv
        scale = ctx.scale
        kr, vr = (k, v) if g == 1 else (k.repeat_interleave(g, 1), v.repeat_interleave(g, 1))
        dq, dk, dv = _BWD(dout, q, kr, vr, out, lse, 0.0, ctx.causal, attn_mask=attn_bias, scale=scale)
        if g > 1:
            dk = dk.unflatten(1, (hkv, g)).sum(2)
            dv = dv.unflatten(1, (hkv, g)).sum(2)
        # prefix part: P = exp(s - LSE), dS = P * (dO V^T - rowsum(dO * O))
        pk_h, pv_h = _per_head(pk, g), _per_head(pv, g)
        q_r, do_r = _rows(q), _rows(dout)
        dp = _bank_bmm(do_r, pv_h, prompt_ids, b, True).float()
        row = torch.linalg.vecdot(do_r.float(), _rows(out).float()).unsqueeze(-1)
        ds = (pp.float() * (dp - row)).to(q.dtype)
        dq.add_(_unrows(_bank_bmm(ds, pk_h, prompt_ids, b, False), b), alpha=scale)
        dpk = _bank_grad(ds, q_r, prompt_ids, b, pk_h.shape) * scale
        dpv = _bank_grad(pp, do_r, prompt_ids, b, pv_h.shape)
        if g > 1:
            dpk = dpk.unflatten(-3, (hkv, g)).sum(-3)
            dpv = dpv.unflatten(-3, (hkv, g)).sum(-3)
        return dq, dk, dv, dpk, dpv, None, None, None, None, None


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
