"""The `aten` backend (the CUDA default): PyTorch's own fused attention for the sequence, the prefix
merged by log-sum-exp.

The merge, its backward and the prefix part are shared code (`lse_merge`, `prefix_matmul`), the
same the CPU backend's tests exercise; this file only chooses and drives the sequence kernel:

- FlashAttention-2, dense, when nothing but causal masks the sequence (fp16/bf16).
- FlashAttention-2, variable-length, for a (B, Sk) key-padding mask: the real tokens are packed
  so padding costs nothing and composes with causal. On a causal call queries are packed by the
  same mask (a padded query row is padding: it sees only the prefix); on a non-causal one every
  query row is kept and only the keys are packed.
- FlashAttention-2, dense, also for causal chunked prefill (S < Sk) without padding: its causal
  is bottom-right aligned, as the op defines it.
- Decode (S == 1) on a padded cache: the memory-efficient kernel over the cache where it lies, a
  broadcast key-padding bias, the query heads of each kv head as rows (`DecodeGrouped`): no gather
  of the cache and no host sync per token.
- The memory-efficient kernel with one additive bias for everything else: a dense mask, a float
  bias (T5's position bias), padded chunked prefill, float32. With S == Sk causal is the kernel's
  own mask type, not part of the bias, so float32 causal calls build no (S, Sk) mask. It takes
  repeated K/V heads, so grouped-query K/V are repeated on this path only.

This file also holds the variable-length plan (`VarlenPlan`, memoised per forward in the
calling thread), the split of memory-efficient calls that would reach PyTorch 2.13's 2^32 bug,
and the backend's declaration (`BACKEND`). The kernels are called through a `kernels` object
(`aten_kernels.CUDA_KERNELS`); tests pass `REFERENCE_KERNELS` to run every line here on CPU.
Refused (declared below): attention dropout
(the flash kernels' RNG state would have to be replayed for the prefix part too), head dims
that are not multiples of 8 or above 256, GPUs before sm_80.
"""

from __future__ import annotations

import math

import torch

from .aten_kernels import CUDA_KERNELS
from .declaration import Backend
from .inputs import AttentionInputs
from .lse_merge import MergedPrefixAttention
from .prefix_matmul import PrefixByMatmul, prompt_groups
from .tensor_memo import LastForTensor


def _lastdim(t: torch.Tensor) -> torch.Tensor:
    """Fused kernels need unit stride in the head dim; any other strides are fine."""
    return t if t.stride(-1) == 1 else t.clone(memory_format=torch.contiguous_format)


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.clone(memory_format=torch.contiguous_format)


class FlashDense:
    """`SequencePart`: FlashAttention-2 over (B, S, H, D) views, causal only when S == Sk."""

    def __init__(self, kernels, causal: bool, scale: float, state=()):
        self.kernels, self.causal, self.scale, self.state = kernels, causal, scale, state

    def tensors(self):
        return self.state

    def with_tensors(self, tensors):
        return FlashDense(self.kernels, self.causal, self.scale, tuple(tensors))

    def forward(self, q, k, v):
        s, sk = q.shape[2], k.shape[2]
        out, lse, rng, unused = self.kernels.flash_forward(
            _lastdim(q.transpose(1, 2)), _lastdim(k.transpose(1, 2)), _lastdim(v.transpose(1, 2)),
            None, None, s, sk, self.causal, self.scale,
        )
        self.state = (rng, unused)
        return out.transpose(1, 2), lse

    def backward(self, dout, q, k, v, out, lse):
        s, sk = q.shape[2], k.shape[2]
        rng, unused = self.state
        dq, dk, dv = self.kernels.flash_backward(
            _lastdim(dout.transpose(1, 2)), _lastdim(q.transpose(1, 2)), _lastdim(k.transpose(1, 2)),
            _lastdim(v.transpose(1, 2)), _lastdim(out.transpose(1, 2)), _dense(lse),
            None, None, s, sk, self.causal, rng, unused, self.scale,
        )
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


class VarlenPlan:
    """Where the real tokens sit: k_idx (Nk,) int64 positions in the flattened (B*Sk) keys, cu_k
    (B+1,) int32 offsets, max_k; and likewise for the queries (q_idx None: every row kept)."""

    def __init__(self, q_idx, cu_q, max_q, k_idx, cu_k, max_k):
        self.q_idx, self.cu_q, self.max_q, self.k_idx, self.cu_k, self.max_k = q_idx, cu_q, max_q, k_idx, cu_k, max_k

    @staticmethod
    def from_padding(key_padding: torch.Tensor, s: int, causal: bool) -> "VarlenPlan":
        """key_padding: (B, Sk) bool. One host sync (how many real tokens). Causal calls need
        S == Sk (the queries are the key tokens, packed by the same mask)."""
        b, sk = key_padding.shape
        counts = key_padding.sum(-1, dtype=torch.int32)
        cu_k = torch.nn.functional.pad(torch.cumsum(counts, 0, dtype=torch.int32), (1, 0))
        k_idx = key_padding.flatten().nonzero().squeeze(1)
        max_k = int(counts.max()) if b else 0
        if causal:
            return VarlenPlan(k_idx, cu_k, max_k, k_idx, cu_k, max_k)
        cu_q = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=key_padding.device)
        return VarlenPlan(None, cu_q, s, k_idx, cu_k, max_k)


# the same (B, Sk) mask reaches every layer of one forward: its plan (and host sync) is reused.
# Per-forward state, so held per context (thread / task): concurrent forwards never share it
_plans = LastForTensor("fastprompt_varlen_plan")


def _plan_for(key_padding: torch.Tensor, s: int, causal: bool) -> VarlenPlan:
    """`VarlenPlan.from_padding`, built once per forward (the last mask seen in this thread)."""
    return _plans.get(key_padding, lambda: VarlenPlan.from_padding(key_padding, s, causal), key=(s, causal, key_padding.shape))


def _pack(x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """(B, H, S, D) -> (N, H, D) rows idx of the flattened (B*S) tokens (all when idx is None)."""
    t = x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])
    return _lastdim(t) if idx is None else t.index_select(0, idx)


def _unpack(t: torch.Tensor, idx: torch.Tensor | None, b: int, s: int) -> torch.Tensor:
    """(N, H, D) -> (B, H, S, D), zeros at the rows not in idx."""
    if idx is not None:
        t = torch.zeros(b * s, *t.shape[1:], dtype=t.dtype, device=t.device).index_copy_(0, idx, t)
    return t.view(b, s, *t.shape[1:]).transpose(1, 2)


class FlashVarlen:
    """`SequencePart`: FlashAttention-2 over the packed real tokens of a padded batch."""

    def __init__(self, kernels, plan: VarlenPlan, causal: bool, scale: float, state=()):
        self.kernels, self.plan, self.causal, self.scale, self.state = kernels, plan, causal, scale, state

    def tensors(self):
        return self.state

    def with_tensors(self, tensors):
        return FlashVarlen(self.kernels, self.plan, self.causal, self.scale, tuple(tensors))

    def forward(self, q, k, v):
        b, h, s, _ = q.shape
        p = self.plan
        out, lse, rng, unused = self.kernels.flash_forward(
            _pack(q, p.q_idx), _pack(k, p.k_idx), _pack(v, p.k_idx), p.cu_q, p.cu_k, p.max_q, p.max_k, self.causal, self.scale
        )
        self.state = (rng, unused)
        if p.q_idx is not None:  # rows left out are padding: no sequence key (LSE -inf)
            lse = torch.full((h, b * s), float("-inf"), device=q.device).index_copy_(1, p.q_idx, lse)
        return _unpack(out, p.q_idx, b, s), lse.view(h, b, s).transpose(0, 1)

    def backward(self, dout, q, k, v, out, lse):
        b, h, s, _ = q.shape
        sk = k.shape[2]
        p = self.plan
        rng, unused = self.state
        lse_rows = lse.transpose(0, 1).reshape(h, b * s)
        if p.q_idx is not None:
            lse_rows = lse_rows.index_select(1, p.q_idx)
        dq, dk, dv = self.kernels.flash_backward(
            _pack(dout, p.q_idx), _pack(q, p.q_idx), _pack(k, p.k_idx), _pack(v, p.k_idx), _pack(out, p.q_idx),
            _dense(lse_rows), p.cu_q, p.cu_k, p.max_q, p.max_k, self.causal, rng, unused, self.scale,
        )
        return _unpack(dq, p.q_idx, b, s), _unpack(dk, p.k_idx, b, sk), _unpack(dv, p.k_idx, b, sk)


# PyTorch 2.13's memory-efficient forward returns garbage once a call's query rows times Sk reach
# 2^32 (pytorch/pytorch#187227, fixed for 2.14): calls are split by examples, then by heads, to
# stay below 2^31 elements of scores (a margin over the bug; chunks that big lose no speed)
_EFFICIENT_MAX_SCORES = 1 << 31


def _efficient_chunks(b: int, h: int, s: int, sk: int) -> list[tuple[int, int, int, int]]:
    """(first example, examples, first head, heads) per memory-efficient call, examples outer;
    one chunk when one call is safe. One (example, head) pair beyond the bound alone
    (S * Sk >= 2^31) is not split further."""
    if b * h * s * sk < _EFFICIENT_MAX_SCORES:
        return [(0, b, 0, h)]
    per_example = h * s * sk
    if per_example < _EFFICIENT_MAX_SCORES:
        step = (_EFFICIENT_MAX_SCORES - 1) // per_example
        return [(i, min(step, b - i), 0, h) for i in range(0, b, step)]
    step = max(1, (_EFFICIENT_MAX_SCORES - 1) // (s * sk))
    return [(i, 1, j, min(step, h - j)) for i in range(b) for j in range(0, h, step)]


class EfficientBias:
    """`SequencePart`: the memory-efficient kernel with one additive bias (B|1, H|1, S, Sk) in q's
    dtype and 16-aligned rows, or None; causal: the kernel's own causal mask type (S == Sk only),
    so the causal pattern is never materialised. Grouped-query K/V are repeated for this kernel."""

    def __init__(self, kernels, bias, scale: float, state=(), has_bias: bool | None = None, causal: bool = False):
        self.kernels, self.bias, self.scale, self.state, self.causal = kernels, bias, scale, state, causal
        self.has_bias = bias is not None if has_bias is None else has_bias

    def tensors(self):
        return ((self.bias,) if self.has_bias else ()) + tuple(self.state)

    def with_tensors(self, tensors):
        t = tuple(tensors)
        bias, state = ((t[0] if t else None), t[1:]) if self.has_bias else (None, t)
        return EfficientBias(self.kernels, bias, self.scale, state, self.has_bias, self.causal)

    def _causal_kw(self):
        return {"causal": True} if self.causal else {}

    def _expand(self, q, k, v):
        b, h, s, _ = q.shape
        g = h // k.shape[1]
        if g > 1:
            k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        bias = None if self.bias is None else self.bias.expand(b, h, s, k.shape[2])
        return _lastdim(k), _lastdim(v), bias

    def forward(self, q, k, v):
        b, h, s, _ = q.shape
        k, v, bias = self._expand(q, k, v)
        chunks = _efficient_chunks(b, h, s, k.shape[2])
        rows = []  # per example chunk: [(out, lse)] over its head chunks
        for b0, bn, h0, hn in chunks:
            part = lambda t: t if len(chunks) == 1 else t.narrow(0, b0, bn).narrow(1, h0, hn)  # noqa: E731
            out, lse, seed, offset = self.kernels.efficient_forward(
                _lastdim(part(q)), _lastdim(part(k)), _lastdim(part(v)), None if bias is None else part(bias), self.scale,
                **self._causal_kw())
            if h0 == 0:
                rows.append([])
            rows[-1].append((out, lse.narrow(-1, 0, s)))
        self.state = (seed, offset)  # dropout is refused, so no chunk's RNG state is needed again
        if len(chunks) == 1:
            return rows[0][0]
        joined = [(torch.cat([o for o, _ in r], 1), torch.cat([x for _, x in r], 1)) for r in rows]
        return torch.cat([o for o, _ in joined], 0), torch.cat([x for _, x in joined], 0)

    def backward(self, dout, q, k, v, out, lse):
        b, h, s, _ = q.shape
        hkv, g = k.shape[1], h // k.shape[1]
        ke, ve, bias = self._expand(q, k, v)
        seed, offset = self.state
        lse_k = torch.nn.functional.pad(lse, (0, math.ceil(s / 32) * 32 - s))  # the kernel's padded LSE
        dq, dk, dv = self.kernels.efficient_backward(_lastdim(dout), _lastdim(q), ke, ve, bias, _lastdim(out), lse_k, seed, offset,
                                                     self.scale, **self._causal_kw())
        if g > 1:  # fold the repeated heads back onto their kv head
            dk, dv = dk.unflatten(1, (hkv, g)).sum(2), dv.unflatten(1, (hkv, g)).sum(2)
        return dq, dk, dv


class DecodeGrouped:
    """`SequencePart` for decode (S == 1) with key padding: the memory-efficient kernel reads the
    padded cache where it lies, masked by a (B, 1, 1, Sk) bias broadcast without copies, and the
    G = H // Hkv query heads of each kv head ride as G query rows of one kv head, so grouped K/V
    are never repeated. Against the varlen path: no per-token gather of the whole cache and no
    host sync (no count of real tokens), every generated token, in every layer."""

    def __init__(self, kernels, key_bias, scale: float, state=()):
        self.kernels, self.key_bias, self.scale, self.state = kernels, key_bias, scale, state

    def tensors(self):
        return (self.key_bias,) + tuple(self.state)

    def with_tensors(self, tensors):
        t = tuple(tensors)  # () strips the tensors (the merge saves them itself)
        return DecodeGrouped(self.kernels, t[0] if t else None, self.scale, t[1:])

    def _grouped(self, q, k):
        b, h, _, d = q.shape
        hkv = k.shape[1]
        qg = _lastdim(q.reshape(b, hkv, h // hkv, d))  # query head i uses kv head i // G
        return qg, self.key_bias.expand(b, hkv, h // hkv, k.shape[2])

    def forward(self, q, k, v):
        b, h, _, d = q.shape
        qg, bias = self._grouped(q, k)
        out, lse, seed, offset = self.kernels.efficient_forward(qg, _lastdim(k), _lastdim(v), bias, self.scale)
        self.state = (seed, offset)
        g = qg.shape[2]
        return out.reshape(b, h, 1, d), lse.narrow(-1, 0, g).reshape(b, h, 1)

    def backward(self, dout, q, k, v, out, lse):
        b, h, _, d = q.shape
        hkv = k.shape[1]
        g = h // hkv
        qg, bias = self._grouped(q, k)
        seed, offset = self.state
        lse_k = torch.nn.functional.pad(lse.reshape(b, hkv, g), (0, math.ceil(g / 32) * 32 - g))
        dq, dk, dv = self.kernels.efficient_backward(
            _lastdim(dout.reshape(b, hkv, g, d)), qg, _lastdim(k), _lastdim(v), bias, _lastdim(out.reshape(b, hkv, g, d)), lse_k,
            seed, offset, self.scale,
        )
        return dq.reshape(b, h, 1, d), dk, dv


def _key_bias(key_padding: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, 1, Sk) 0 / -inf from a (B, Sk) key-padding mask, rows in 16-aligned storage."""
    b, sk = key_padding.shape
    width = -(-sk // 16) * 16
    bias = torch.zeros(b, 1, 1, width, dtype=dtype, device=key_padding.device).narrow(-1, 0, sk)
    return bias.masked_fill(key_padding.logical_not().view(b, 1, 1, sk), float("-inf"))


def _flash_fits(x: AttentionInputs) -> bool:
    _, _, _, s, sk, d = x.shape
    # causal with S != Sk (chunked prefill): flash aligns causal bottom-right, as the op defines it;
    # the varlen plan packs queries by the key mask, so a padded one needs S == Sk
    chunked = x.causal and s != sk
    return (
        x.q.dtype in (torch.float16, torch.bfloat16) and x.mask is None and x.bias is None
        and not (chunked and (x.key_padding is not None or s > sk))
    )


def sequence_part(x: AttentionInputs, kernels=CUDA_KERNELS):
    """(the `SequencePart` for x, dead rows (B|1, H|1, S) bool or None)."""
    b, h, hkv, s, sk, d = x.shape
    if s == 1 and x.key_padding is not None and x.mask is None and x.bias is None:
        # decode on a padded cache: an example whose cache is all padding sees only the prefix
        return DecodeGrouped(kernels, _key_bias(x.key_padding, x.q.dtype), x.scale), x.key_padding.any(-1).logical_not().view(b, 1, 1)
    if _flash_fits(x):
        if x.key_padding is None:
            return FlashDense(kernels, x.causal, x.scale), None
        plan = _plan_for(x.key_padding, s, x.causal)
        # non-causal: an example without real keys sees only the prefix
        dead = None if x.causal else x.key_padding.any(-1).logical_not().view(b, 1, 1)
        return FlashVarlen(kernels, plan, x.causal, x.scale), dead
    # S == Sk without a dense mask: the kernel's causal mask type (top-left = bottom-right there),
    # the bias holds padding and the float bias; a real query then always sees its own key, so
    # every row causal leaves without keys is already dead in the bias (a dense mask could hide
    # all of a row's earlier keys: that call keeps causal in the bias)
    own_causal = x.causal and s == sk and x.mask is None
    bias = x.additive_bias(x.q.dtype, align=16, causal=not own_causal)
    return EfficientBias(kernels, bias, x.scale, causal=own_causal), x.dead_rows_of(bias)


def prefix_attention_aten(x: AttentionInputs, kernels=CUDA_KERNELS) -> torch.Tensor:
    """Normalised inputs -> (B, H, S, D). kernels: `CUDA_KERNELS`, or `REFERENCE_KERNELS` to run on CPU."""
    seq, dead = sequence_part(x, kernels)
    prefix = PrefixByMatmul(x.scale, prompt_groups(x.prompt_ids))
    return MergedPrefixAttention.apply(x.q, x.k, x.v, x.prefix_k, x.prefix_v, seq, prefix, dead, False)


BACKEND = Backend(
    name="aten",
    devices=frozenset({"cuda"}),
    dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
    fn=prefix_attention_aten,
    available=lambda: torch.cuda.is_available(),
    head_dims=(8, 256),
    head_dim_multiple=8,
    dropout=False,
    min_capability=(8, 0),
    notes=(
        "FlashAttention-2 (dense or variable-length) or the memory-efficient kernel for the sequence, the prefix by "
        "matrix products, merged by LSE; refuses dropout (the kernels' RNG would have to be replayed for the prefix "
        "too), head dims not a multiple of 8 or above 256, GPUs before sm_80; float32 and dense masks run on the "
        "memory-efficient kernel"
    ),
)
