"""The `cpu` backend: PyTorch's fused CPU flash kernel for the sequence, merged with the prefix by LSE.

The merge and its backward are `lse_merge`'s, shared with the CUDA backend; this file supplies
the two parts. Sequence part: `aten::_scaled_dot_product_flash_attention_for_cpu`, which returns
its output and per-row LSE and takes grouped-query K/V and transformers' (B, S, H, D) memory
layout as they are. Prefix part: the same kernel with all B*S query rows of a kv head as one
"batch" against the P prefix keys (faster on CPU than the generic matrix-product part), the
prefix gradients batch-reduced inside its backward. Then the backend's entry point
(`prefix_attention_cpu`) and declaration (`BACKEND`).
"""

from __future__ import annotations

import torch

from .declaration import Backend
from .inputs import AttentionInputs
from .lse_merge import MergedPrefixAttention
from .prefix_matmul import prompt_groups
from .rows import fold_rows, unfold_rows

_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

# measured with bench/kernels_report.py (torch 2.13, AVX512/AMX Xeon): upcasting the backward wins
# at 128 and 256 keys (bf16 fwd+bwd 1.27x -> 0.73x, 1.31x -> 1.08x of SDPA) and loses at 512
_UPCAST_MAX_KEYS = 256


def _kernel_lse(lse: torch.Tensor) -> torch.Tensor:
    """(B, H, S) float32 in the memory layout the backward kernel expects (the forward's: B, S, H)."""
    b, h, s = lse.shape
    return torch.empty(b, s, h, dtype=torch.float32, device=lse.device).transpose(1, 2).copy_(lse)


class CpuFlashSequence:
    """`SequencePart`: the fused CPU kernel over the sequence keys. attn_bias: additive float
    (B, H|1, S, Sk) or None; causal: the kernel's own (top-left) flag, used only when S == Sk."""

    def __init__(self, attn_bias, causal: bool, scale: float):
        self.attn_bias, self.causal, self.scale = attn_bias, causal, scale

    def tensors(self):
        return () if self.attn_bias is None else (self.attn_bias,)

    def with_tensors(self, tensors):
        return CpuFlashSequence(tensors[0] if tensors else None, self.causal, self.scale)

    def upcast(self):
        return CpuFlashSequence(None if self.attn_bias is None else self.attn_bias.float(), self.causal, self.scale)

    def forward(self, q, k, v):
        out, lse = _FWD(q, k, v, 0.0, self.causal, attn_mask=self.attn_bias, scale=self.scale)
        return out, lse

    def backward(self, dout, q, k, v, out, lse):
        return _BWD(dout, q, k, v, out, _kernel_lse(lse), 0.0, self.causal, attn_mask=self.attn_bias, scale=self.scale)


def _rows_of(x, idx, b):
    """x: (B, H, S, X) -> (1, H, n*S, X) rows of the examples idx (all when None): the prefix
    attention is one 'batch' whose queries are every row of those examples."""
    r = fold_rows(x)
    if idx is None:
        return r.unsqueeze(0)
    h, _, d = r.shape
    # select on the (H, B, S, X) view of the folded rows: one copy, already in folded order
    return unfold_rows(r, b).transpose(0, 1).index_select(1, idx).reshape(h, -1, d).unsqueeze(0)


class PrefixByCpuFlash:
    """`PrefixPart` on CPU: the fused kernel with the batch's query rows as one sequence."""

    def __init__(self, scale: float, groups):
        self.scale, self.groups = scale, groups

    def forward(self, q, pk, pv):
        b, h, s, d = q.shape
        if self.groups is None:
            o, l = _FWD(_rows_of(q, None, b), pk.unsqueeze(0), pv.unsqueeze(0), 0.0, False, scale=self.scale)
            return unfold_rows(o[0], b), unfold_rows(l[0].float().unsqueeze(-1), b).squeeze(-1)
        out = q.new_empty(h, b, s, d)
        lse = torch.empty(h, b, s, dtype=torch.float32, device=q.device)
        for idx, t in self.groups:
            o, l = _FWD(_rows_of(q, idx, b), pk[t].unsqueeze(0), pv[t].unsqueeze(0), 0.0, False, scale=self.scale)
            out[:, idx] = o[0].reshape(h, idx.numel(), s, d)
            lse[:, idx] = l[0].float().reshape(h, idx.numel(), s)
        return out.transpose(0, 1), lse.transpose(0, 1)

    def backward(self, dout, q, pk, pv, out, lse):
        b, h, s, d = q.shape
        lse4 = lse.unsqueeze(-1)
        scale = self.scale
        if self.groups is None:
            dq, dpk, dpv = _BWD(
                _rows_of(dout, None, b), _rows_of(q, None, b), pk.unsqueeze(0), pv.unsqueeze(0),
                _rows_of(out, None, b), _rows_of(lse4, None, b).squeeze(-1).contiguous(), 0.0, False, scale=scale,
            )
            return unfold_rows(dq[0], b), dpk[0], dpv[0]
        dq = q.new_empty(h, b, s, d)
        dpk, dpv = torch.zeros_like(pk), torch.zeros_like(pv)
        for idx, t in self.groups:
            gq, gk, gv = _BWD(
                _rows_of(dout, idx, b), _rows_of(q, idx, b), pk[t].unsqueeze(0), pv[t].unsqueeze(0),
                _rows_of(out, idx, b), _rows_of(lse4, idx, b).squeeze(-1).contiguous(), 0.0, False, scale=scale,
            )
            dq[:, idx] = gq[0].reshape(h, idx.numel(), s, d)
            dpk[t], dpv[t] = gk[0], gv[0]
        return dq.transpose(0, 1), dpk, dpv


def prefix_attention_cpu(x: AttentionInputs) -> torch.Tensor:
    """Normalised inputs -> (B, H, S, D); no dropout (the fused kernel has none)."""
    b, h, hkv, s, sk, d = x.shape
    attn_bias = dead = None
    causal = x.causal
    if x.has_masking or (causal and s != sk):
        # one additive bias: key padding, mask, bottom-right causal (the kernel's flag is top-left)
        attn_bias = x.additive_bias(x.q.dtype)
        causal = False
        dead = x.dead_rows_of(attn_bias)
        dead = dead if dead is not None and bool(dead.any()) else None
        if attn_bias is not None and attn_bias.shape[0] != b:
            attn_bias = attn_bias.expand(b, *attn_bias.shape[1:])
    upcast = x.q.dtype in (torch.float16, torch.bfloat16) and sk <= _UPCAST_MAX_KEYS
    # no .contiguous(): the kernel takes transformers' (B, S, H, D) memory layout as it is
    return MergedPrefixAttention.apply(
        x.q, x.k, x.v, x.prefix_k, x.prefix_v,
        CpuFlashSequence(attn_bias, causal, x.scale), PrefixByCpuFlash(x.scale, prompt_groups(x.prompt_ids)),
        dead, upcast,
    )


BACKEND = Backend(
    name="cpu",
    devices=frozenset({"cpu"}),
    dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}),
    fn=prefix_attention_cpu,
    available=lambda: hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"),
    dropout=False,
    notes="no attention dropout (the fused CPU kernel has none; the torch backend applies it)",
)
