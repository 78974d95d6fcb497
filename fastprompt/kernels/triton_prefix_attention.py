"""Prefix-concat attention in Triton: a prefix phase, then a sequence phase, one online softmax.

Forward (one program per BLOCK_M queries of one (batch, head)): the running max, sum and
accumulator are fp32 and in base 2 (scale folded into qk_scale); the P prefix keys/values are
read from the one shared prefix (or the example's prompt of a bank) and the sequence keys from
the example's own K/V; nothing is concatenated or copied per example. The base-2 log-sum-exp
of each row is stored for the backward.

Backward: `_bwd_preprocess` computes delta = rowsum(dO * O); `_bwd_dq` (per query block)
recomputes probabilities from the LSE and accumulates dQ over the prefix and the sequence;
`_bwd_dkdv` (per key block of one (batch, kv head), all G query heads of the group inside, so no
atomics; S^T = K Q^T as in Triton's tutorial, a large fixed key block and a small streamed
query block, BLOCK_N_KV x BLOCK_M_KV) writes dK/dV for sequence blocks and, for prefix blocks, adds the example's partial
prefix gradient into an fp32 (T, Hkv, P, D) buffer with atomics: the batch reduction happens
there, with no (B, ...) prefix-sized buffer anywhere.

Masks: `mask` is any bool tensor broadcastable to (B, H, S, Sk) read through strides (stride 0
for broadcast dims), `bias` likewise (float, T5's position bias); `causal` is bottom-right
aligned. Both apply to the sequence keys only: the prefix is visible to every query.

Below the kernels: config validation, the launchers (`prefix_attention_forward` /
`prefix_attention_backward`), the autograd Function over them, and `prefix_attention_triton`, the
backend's entry point (its declaration is in triton_backend.py, which imports no Triton).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .inputs import AttentionInputs
from .triton_configs import candidates, s_bucket, tuned

LOG2E = 1.4426950408889634


@triton.jit
def _scores(q, k, qk_scale, FP32_IEEE: tl.constexpr):
    """(BLOCK_M, D) x (BLOCK_N, D) -> (BLOCK_M, BLOCK_N) fp32 scores in base 2."""
    if FP32_IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    return s * qk_scale


@triton.jit
def _tile(base, offs_r, n_rows, stride_r, offs_d, D):
    """(len(offs_r), BLOCK_D) rows of a (rows, D) matrix with unit-stride columns; zeros outside."""
    return tl.load(base + offs_r[:, None] * stride_r + offs_d[None, :], mask=(offs_r[:, None] < n_rows) & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _query_program(Ids, H, G, HAS_BANK: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's query block: (block index, b*H+h, b, h, kv head, prompt index, row offsets).
    The batch, head and prompt indices are int64: base offsets such as b * stride pass 2^31
    elements on large batches (a B*S*Sk mask at B=16, S=Sk=12k)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    t = pid_bh * 0
    if HAS_BANK:
        t = tl.load(Ids + b).to(tl.int64)
    return pid_m, pid_bh, b, h, h // G, t, pid_m * BLOCK_M + tl.arange(0, BLOCK_M)


@triton.jit
def _mm(a, b, FP32_IEEE: tl.constexpr):
    """a @ b with fp32 accumulation; exact fp32 (no TF32) when the inputs are fp32."""
    if FP32_IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _seq_valid(offs_m, offs_n, S, SK, b, h, Mask, smb, smh, smm, smn,
               CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: which sequence keys each query may see."""
    valid = (offs_n[None, :] < SK) & (offs_m[:, None] < S)
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None] + (SK - S))
    if HAS_MASK:
        mptr = Mask + b * smb + h * smh + offs_m[:, None].to(tl.int64) * smm + offs_n[None, :] * smn
        m = tl.load(mptr, mask=(offs_m[:, None] < S) & (offs_n[None, :] < SK), other=0)
        valid = valid & (m != 0)
    return valid


@triton.jit
def _key_span(b, pid_m, S, SK, KRange, CAUSAL: tl.constexpr, HAS_RANGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of the sequence keys a query block can see: causal cuts the end; with HAS_RANGE the
    example's real keys lie in KRange[b] = (first, last + 1), so fully padded key blocks are skipped."""
    lo = pid_m * 0
    hi = pid_m * 0 + SK
    if CAUSAL:
        hi = tl.minimum(SK, (pid_m + 1) * BLOCK_M + SK - S)
    if HAS_RANGE:
        lo = tl.load(KRange + b * 2) // BLOCK_N * BLOCK_N
        hi = tl.minimum(hi, tl.load(KRange + b * 2 + 1))
    return lo, hi


@triton.jit
def _seq_bias(offs_m, offs_n, S, SK, b, h, Bias, sbb, sbh, sbm, sbn):
    ptr = Bias + b * sbb + h * sbh + offs_m[:, None].to(tl.int64) * sbm + offs_n[None, :] * sbn
    return tl.load(ptr, mask=(offs_m[:, None] < S) & (offs_n[None, :] < SK), other=0.0).to(tl.float32) * 1.4426950408889634


@triton.jit
def _softmax_block(s, v, m_i, l_i, acc, FP32_IEEE: tl.constexpr):
    """One key block of the online softmax, shared by the prefix and sequence phases: s (M, N)
    masked scores in log2 units, v (N, D) -> the running max m_i, sum l_i, output acc."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, FP32_IEEE)
    return m_new, l_i, acc


@triton.jit
def _dq_block(dq, do, k, v, p, delta, FP32_IEEE: tl.constexpr):
    """One key block of dq, shared by both phases: p (M, N) the probabilities (0 where masked)."""
    ds = p * (_scores(do, v, 1.0, FP32_IEEE) - delta[:, None])
    return dq + _mm(ds.to(k.dtype), k, FP32_IEEE)


@triton.jit
def _fwd_kernel(
    Q, K, V, PK, PV, Ids, Mask, Bias, KRange, Out, Lse,
    sqb, sqh, sqm,
    skb, skh, skn,
    svb, svh, svn,
    spt, sph, spn,
    svt, svph, svpn,
    smb, smh, smm, smn,
    sbb, sbh, sbm, sbn,
    sob, soh, som,
    H, G, S, SK, P, D, qk_scale,
    HAS_BANK: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
    FP32_IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_RANGE: tl.constexpr = False,
):
    pid_m, pid_bh, b, h, hkv, t, offs_m = _query_program(Ids, H, G, HAS_BANK, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D
    q = _tile(Q + b * sqb + h * sqh, offs_m, S, sqm, offs_d, D)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # prefix phase: visible to every query; P >= 1 makes every row's max finite from here on
    for start_n in range(0, P, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _tile(PK + t * spt + hkv * sph, offs_n, P, spn, offs_d, D)
        s = _scores(q, k, qk_scale, FP32_IEEE)
        s = tl.where(offs_n[None, :] < P, s, float("-inf"))
        v = _tile(PV + t * svt + hkv * svph, offs_n, P, svpn, offs_d, D)
        m_i, l_i, acc = _softmax_block(s, v, m_i, l_i, acc, FP32_IEEE)

    # sequence phase
    lo_n, hi = _key_span(b, pid_m, S, SK, KRange, CAUSAL, HAS_RANGE, BLOCK_M, BLOCK_N)
    for start_n in range(lo_n, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _tile(K + b * skb + hkv * skh, offs_n, SK, skn, offs_d, D)
        s = _scores(q, k, qk_scale, FP32_IEEE)
        if HAS_BIAS:
            s += _seq_bias(offs_m, offs_n, S, SK, b, h, Bias, sbb, sbh, sbm, sbn)
        valid = _seq_valid(offs_m, offs_n, S, SK, b, h, Mask, smb, smh, smm, smn, CAUSAL, HAS_MASK)
        s = tl.where(valid, s, float("-inf"))
        v = _tile(V + b * svb + hkv * svh, offs_n, SK, svn, offs_d, D)
        m_i, l_i, acc = _softmax_block(s, v, m_i, l_i, acc, FP32_IEEE)

    acc = acc / l_i[:, None]
    row_ok = offs_m < S
    tl.store(Lse + pid_bh * S + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok)


@triton.jit
def _bwd_preprocess(Out, DO, Delta, sob, soh, som, sdb, sdh, sdm, H, S, D,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _tile(Out + b * sob + h * soh, offs_m, S, som, offs_d, D).to(tl.float32)
    do = _tile(DO + b * sdb + h * sdh, offs_m, S, sdm, offs_d, D).to(tl.float32)
    tl.store(Delta + pid_bh * S + offs_m, tl.sum(o * do, 1), mask=offs_m < S)


@triton.jit
def _bwd_dq(
    Q, K, V, PK, PV, Ids, Mask, Bias, KRange, DO, Lse, Delta, DQ,
    sqb, sqh, sqm,
    skb, skh, skn,
    svb, svh, svn,
    spt, sph, spn,
    svt, svph, svpn,
    smb, smh, smm, smn,
    sbb, sbh, sbm, sbn,
    sdb, sdh, sdm,
    H, G, S, SK, P, D, qk_scale, sm_scale,
    HAS_BANK: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
    FP32_IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_RANGE: tl.constexpr = False,
):
    pid_m, pid_bh, b, h, hkv, t, offs_m = _query_program(Ids, H, G, HAS_BANK, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D
    row_ok = offs_m[:, None] < S
    q = _tile(Q + b * sqb + h * sqh, offs_m, S, sqm, offs_d, D)
    do = _tile(DO + b * sdb + h * sdh, offs_m, S, sdm, offs_d, D)
    lse = tl.load(Lse + pid_bh * S + offs_m, mask=offs_m < S, other=0.0)
    delta = tl.load(Delta + pid_bh * S + offs_m, mask=offs_m < S, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, P, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _tile(PK + t * spt + hkv * sph, offs_n, P, spn, offs_d, D)
        v = _tile(PV + t * svt + hkv * svph, offs_n, P, svpn, offs_d, D)
        s = _scores(q, k, qk_scale, FP32_IEEE)
        p = tl.where(offs_n[None, :] < P, tl.math.exp2(s - lse[:, None]), 0.0)
        dq = _dq_block(dq, do, k, v, p, delta, FP32_IEEE)
    lo_n, hi = _key_span(b, pid_m, S, SK, KRange, CAUSAL, HAS_RANGE, BLOCK_M, BLOCK_N)
    for start_n in range(lo_n, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _tile(K + b * skb + hkv * skh, offs_n, SK, skn, offs_d, D)
        v = _tile(V + b * svb + hkv * svh, offs_n, SK, svn, offs_d, D)
        s = _scores(q, k, qk_scale, FP32_IEEE)
        if HAS_BIAS:
            s += _seq_bias(offs_m, offs_n, S, SK, b, h, Bias, sbb, sbh, sbm, sbn)
        valid = _seq_valid(offs_m, offs_n, S, SK, b, h, Mask, smb, smh, smm, smn, CAUSAL, HAS_MASK)
        p = tl.where(valid, tl.math.exp2(s - lse[:, None]), 0.0)
        dq = _dq_block(dq, do, k, v, p, delta, FP32_IEEE)
    tl.store(DQ + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok & d_ok)


@triton.jit
def _bwd_dkdv(
    Q, K, V, PK, PV, Ids, Mask, Bias, KRange, DO, Lse, Delta, DK, DV, DPK, DPV,
    sqb, sqh, sqm,
    skb, skh, skn,
    svb, svh, svn,
    spt, sph, spn,
    svt, svph, svpn,
    smb, smh, smm, smn,
    sbb, sbh, sbm, sbn,
    sdb, sdh, sdm,
    H, G, S, SK, P, D, NP_BLOCKS, qk_scale, sm_scale,
    HAS_BANK: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
    FP32_IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DETERMINISTIC: tl.constexpr = False, HAS_RANGE: tl.constexpr = False,
):
    """Key blocks [0, NP_BLOCKS) are prefix blocks, the rest sequence blocks, of one (batch, kv head).
    Prefix gradients: atomically added into the (T, Hkv, P, D) fp32 buffer, or with DETERMINISTIC
    stored into a per-example (B, Hkv, P, D) one (each (b, kv head, block) has one program),
    reduced after the kernel in a fixed order."""
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1).to(tl.int64)  # int64 offsets, as in _query_program
    Hkv = H // G
    b = pid_bk // Hkv
    hkv = pid_bk % Hkv
    t = pid_bk * 0
    if HAS_BANK:
        t = tl.load(Ids + b).to(tl.int64)
    is_prefix = pid_n < NP_BLOCKS
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D
    if is_prefix:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < P
        k = _tile(PK + t * spt + hkv * sph, offs_n, P, spn, offs_d, D)
        v = _tile(PV + t * svt + hkv * svph, offs_n, P, svpn, offs_d, D)
    else:
        offs_n = (pid_n - NP_BLOCKS) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < SK
        k = _tile(K + b * skb + hkv * skh, offs_n, SK, skn, offs_d, D)
        v = _tile(V + b * svb + hkv * svh, offs_n, SK, svn, offs_d, D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = pid_n * 0
    if CAUSAL:
        if not is_prefix:
            # queries before this key block (bottom-right aligned) never see it
            lo = tl.maximum(0, ((pid_n - NP_BLOCKS) * BLOCK_N - (SK - S)) // BLOCK_M * BLOCK_M)
    if HAS_RANGE:
        if not is_prefix:
            # a key block wholly outside the example's real keys: no query sees it (dK = dV = 0)
            first = (pid_n - NP_BLOCKS) * BLOCK_N
            outside = (first >= tl.load(KRange + b * 2 + 1)) | (first + BLOCK_N <= tl.load(KRange + b * 2))
            lo = tl.where(outside, S, lo)
    for g in range(0, G):
        h = hkv * G + g
        for start_m in range(lo, S, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < S
            q = _tile(Q + b * sqb + h * sqh, offs_m, S, sqm, offs_d, D)
            do = _tile(DO + b * sdb + h * sdh, offs_m, S, sdm, offs_d, D)
            lse = tl.load(Lse + (b * H + h) * S + offs_m, mask=m_ok, other=0.0)
            delta = tl.load(Delta + (b * H + h) * S + offs_m, mask=m_ok, other=0.0)
            # the tutorial's orientation: S^T = K Q^T with the key block (fixed, large) as the MMA's
            # M dimension and the streamed query block (small) as N; no transposes of P or dS
            st = _scores(k, q, qk_scale, FP32_IEEE)  # (BLOCK_N, BLOCK_M)
            if is_prefix:
                valid = n_ok[:, None] & m_ok[None, :]
            else:
                if HAS_BIAS:
                    st += tl.trans(_seq_bias(offs_m, offs_n, S, SK, b, h, Bias, sbb, sbh, sbm, sbn))
                valid = tl.trans(_seq_valid(offs_m, offs_n, S, SK, b, h, Mask, smb, smh, smm, smn, CAUSAL, HAS_MASK))
            pt = tl.where(valid, tl.math.exp2(st - lse[None, :]), 0.0)
            dv += _mm(pt.to(do.dtype), do, FP32_IEEE)
            dpt = _scores(v, do, 1.0, FP32_IEEE)
            dst_ = pt * (dpt - delta[None, :])
            dk += _mm(dst_.to(q.dtype), q, FP32_IEEE)
    dk = dk * sm_scale
    ok = n_ok[:, None] & d_ok
    if is_prefix:
        if DETERMINISTIC:
            dst = b * (Hkv * P * D) + hkv * (P * D) + offs_n[:, None] * D + offs_d[None, :]
            tl.store(DPK + dst, dk, mask=ok)
            tl.store(DPV + dst, dv, mask=ok)
        else:
            # the batch (and the examples sharing a prompt) reduce here, into one fp32 prefix buffer
            dst = t * (Hkv * P * D) + hkv * (P * D) + offs_n[:, None] * D + offs_d[None, :]
            tl.atomic_add(DPK + dst, dk, mask=ok)
            tl.atomic_add(DPV + dst, dv, mask=ok)
    else:
        dst = b * (Hkv * SK * D) + hkv * (SK * D) + offs_n[:, None] * D + offs_d[None, :]
        tl.store(DK + dst, dk.to(DK.dtype.element_ty), mask=ok)
        tl.store(DV + dst, dv.to(DV.dtype.element_ty), mask=ok)


PRE_BLOCK_M = 32  # rows per program of the delta = rowsum(dO * O) preprocess


def default_config(dtype: torch.dtype, head_dim: int) -> dict:
    """The first candidate of `triton_configs` (num_stages 3 at D <= 64 in fp16/bf16: with the
    JIT's real specialisation 2 stages spill 8 B in the forward on sm_80)."""
    return candidates(dtype, head_dim)[0]


_CONFIG_KEYS = {"BLOCK_M", "BLOCK_N", "BLOCK_M_KV", "BLOCK_N_KV", "num_warps", "num_warps_dkdv", "num_stages", "deterministic"}


def _config(dtype: torch.dtype, head_dim: int, user: dict | None) -> dict:
    """The default config with the user's keys over it, validated: tl.dot needs every block
    dimension >= 16 (and a power of two)."""
    user = dict(user or {})
    unknown = set(user) - _CONFIG_KEYS
    if unknown:
        raise ValueError(f"config keys must be among {sorted(_CONFIG_KEYS)}, got {sorted(unknown)}")
    config = {**default_config(dtype, head_dim), **user}
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_M_KV", "BLOCK_N_KV"):
        if key not in config:
            continue
        v = config[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 16 or v & (v - 1):
            raise ValueError(f"config[{key!r}] must be a power of two >= 16 (tl.dot's smallest tile), got {v!r}")
    for key in ("num_warps", "num_warps_dkdv"):
        if key in config and config[key] not in (1, 2, 4, 8, 16):
            raise ValueError(f"config[{key!r}] must be 1, 2, 4, 8 or 16, got {config[key]!r}")
    return config


def _device(t: torch.Tensor):
    """Launch on the tensors' GPU, not the current one (device_map='auto' spreads layers over GPUs)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _s3(x: torch.Tensor):
    """The three outer strides; the head dim is unit-stride (the kernels index it directly,
    so loads vectorise and no per-element pointer arithmetic is spent on it)."""
    return tuple(x.stride()[:-1])


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _broadcast_strides(x: torch.Tensor | None, b, h, s, sk):
    """Strides of x read as (B, H, S, Sk), 0 where x broadcasts."""
    if x is None:
        return (0, 0, 0, 0)
    x = x.expand(b, h, s, sk)
    return tuple(x.stride())


def _bank_view(prefix: torch.Tensor) -> torch.Tensor:
    return prefix if prefix.dim() == 4 else prefix.unsqueeze(0)


def key_range(key_padding: torch.Tensor) -> torch.Tensor:
    """(B, Sk) bool -> (B, 2) int32: each example's first real key and last real key + 1 (no host
    sync). Keys outside are padding whatever the pattern inside, so their blocks can be skipped."""
    sk = key_padding.shape[1]
    idx = torch.arange(sk, device=key_padding.device, dtype=torch.int32)
    first = torch.where(key_padding, idx, sk).amin(-1)
    last = torch.where(key_padding, idx + 1, 0).amax(-1)
    return torch.stack([first, last], -1).to(torch.int32).contiguous()


def _common(q, k, v, pk, pv, prompt_ids, mask, bias, causal, scale, config, krange=None):
    b, h, s, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    pkb, pvb = _bank_view(pk), _bank_view(pv)
    p = pkb.shape[2]
    mask_i8 = None if mask is None else mask.to(torch.int8) if mask.dtype == torch.bool else mask
    dummy = q.new_empty(1)
    return dict(
        b=b, h=h, s=s, d=d, hkv=hkv, sk=sk, p=p, pkb=pkb, pvb=pvb,
        ids=prompt_ids if prompt_ids is not None else dummy,
        krange=krange if krange is not None else dummy,
        mask=mask_i8 if mask_i8 is not None else dummy,
        bias=bias if bias is not None else dummy,
        ms=_broadcast_strides(mask_i8, b, h, s, sk), bs=_broadcast_strides(bias, b, h, s, sk),
        flags=dict(
            HAS_BANK=prompt_ids is not None, HAS_MASK=mask is not None, HAS_BIAS=bias is not None, CAUSAL=bool(causal),
            HAS_RANGE=krange is not None,
            FP32_IEEE=q.dtype == torch.float32, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_D=_block_d(d),
            num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 2),
        ),
        dkdv_warps=config.get("num_warps_dkdv", config.get("num_warps", 4)),
        qk_scale=scale * LOG2E,
    )


def _reduce_per_prompt(partial: torch.Tensor, prompt_ids: torch.Tensor | None, n_prompts: int) -> torch.Tensor:
    """(B, Hkv, P, D) per-example gradients -> (T, Hkv, P, D): a sum, or a one-hot matrix product
    for a bank (both deterministic on CUDA, unlike index_add_)."""
    if prompt_ids is None:
        return partial.sum(0, keepdim=True)
    onehot = torch.nn.functional.one_hot(prompt_ids, n_prompts).to(partial.dtype).t()  # (T, B)
    return (onehot @ partial.flatten(1)).view(n_prompts, *partial.shape[1:])


def prefix_attention_forward(q, k, v, pk, pv, prompt_ids=None, mask=None, bias=None, causal=False, scale=None, config=None, krange=None):
    """Launches the forward kernel on q's device. Returns (out (B, H, S, D), lse2 (B, H, S) fp32, base 2)."""
    with _device(q):
        return _forward(q, k, v, pk, pv, prompt_ids, mask, bias, causal, scale, config, krange)


def _forward(q, k, v, pk, pv, prompt_ids, mask, bias, causal, scale, config, krange):
    config = _config(q.dtype, q.shape[-1], config)
    q, k, v, pk, pv = (_unit_last(t) for t in (q, k, v, pk, pv))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    c = _common(q, k, v, pk, pv, prompt_ids, mask, bias, causal, scale, config, krange)
    out = torch.empty(c["b"], c["s"], c["h"], c["d"], dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(c["b"], c["h"], c["s"], dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(c["s"], config["BLOCK_M"]), c["b"] * c["h"])
    _fwd_kernel[grid](
        q, k, v, c["pkb"], c["pvb"], c["ids"], c["mask"], c["bias"], c["krange"], out, lse,
        *_s3(q), *_s3(k), *_s3(v), *_s3(c["pkb"]), *_s3(c["pvb"]),
        *c["ms"], *c["bs"], *_s3(out),
        c["h"], c["h"] // c["hkv"], c["s"], c["sk"], c["p"], c["d"], c["qk_scale"],
        **c["flags"],
    )
    return out, lse


def prefix_attention_backward(do, q, k, v, pk, pv, out, lse, prompt_ids=None, mask=None, bias=None, causal=False, scale=None, config=None, krange=None):
    """Launches the backward kernels on q's device. Returns dq, dk, dv, dpk, dpv (prefix grads
    reduced over the batch; deterministically when config["deterministic"] or, by default, when
    torch.use_deterministic_algorithms(True) is on)."""
    with _device(q):
        return _backward(do, q, k, v, pk, pv, out, lse, prompt_ids, mask, bias, causal, scale, config, krange)


def _backward(do, q, k, v, pk, pv, out, lse, prompt_ids, mask, bias, causal, scale, config, krange):
    config = _config(q.dtype, q.shape[-1], config)
    q, k, v, pk, pv, out, do = (_unit_last(t) for t in (q, k, v, pk, pv, out, do))
    if torch.empty_like(q).stride() != q.stride():
        q = q.contiguous()  # _bwd_dq writes dq with q's strides: q must be dense
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    c = _common(q, k, v, pk, pv, prompt_ids, mask, bias, causal, scale, config, krange)
    b, h, s, d, hkv, sk, p = (c[x] for x in ("b", "h", "s", "d", "hkv", "sk", "p"))
    bm, bn, bd = config["BLOCK_M"], config["BLOCK_N"], c["flags"]["BLOCK_D"]
    delta = torch.empty_like(lse)
    _bwd_preprocess[(triton.cdiv(s, PRE_BLOCK_M), b * h)](out, do, delta, *_s3(out), *_s3(do), h, s, d, BLOCK_M=PRE_BLOCK_M, BLOCK_D=bd, num_warps=4)
    dq = torch.empty_like(q)  # same strides as q (dense), which _bwd_dq writes through
    strides = (*_s3(q), *_s3(k), *_s3(v), *_s3(c["pkb"]), *_s3(c["pvb"]), *c["ms"], *c["bs"], *_s3(do))
    _bwd_dq[(triton.cdiv(s, bm), b * h)](
        q, k, v, c["pkb"], c["pvb"], c["ids"], c["mask"], c["bias"], c["krange"], do, lse, delta, dq, *strides,
        h, h // hkv, s, sk, p, d, c["qk_scale"], scale, **c["flags"],
    )
    dk = torch.empty(b, hkv, sk, d, dtype=k.dtype, device=k.device)
    dv = torch.empty(b, hkv, sk, d, dtype=v.dtype, device=v.device)
    deterministic = config.get("deterministic")
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    buf = (b, *c["pkb"].shape[1:]) if deterministic else c["pkb"].shape
    dpk = torch.zeros(buf, dtype=torch.float32, device=q.device)
    dpv = torch.zeros(buf, dtype=torch.float32, device=q.device)
    # dK/dV: a large fixed key block and a small streamed query block (the tutorial's shape)
    bn_kv, bm_kv = config.get("BLOCK_N_KV", bn), config.get("BLOCK_M_KV", bm)
    n_prefix_blocks = triton.cdiv(p, bn_kv)
    _bwd_dkdv[(n_prefix_blocks + triton.cdiv(sk, bn_kv), b * hkv)](
        q, k, v, c["pkb"], c["pvb"], c["ids"], c["mask"], c["bias"], c["krange"], do, lse, delta, dk, dv, dpk, dpv, *strides,
        h, h // hkv, s, sk, p, d, n_prefix_blocks, c["qk_scale"], scale,
        DETERMINISTIC=bool(deterministic),
        **{**c["flags"], "num_warps": c["dkdv_warps"], "BLOCK_M": bm_kv, "BLOCK_N": bn_kv},
    )
    if deterministic:  # per-example partial gradients -> per prompt, in a fixed order
        dpk, dpv = _reduce_per_prompt(dpk, prompt_ids, c["pkb"].shape[0]), _reduce_per_prompt(dpv, prompt_ids, c["pkb"].shape[0])
    if pk.dim() == 3:
        dpk, dpv = dpk[0], dpv[0]
    return dq, dk, dv, dpk.to(pk.dtype), dpv.to(pv.dtype)


class _TritonPrefixAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pk, pv, prompt_ids, mask, bias, causal, scale, config, krange):
        out, lse = prefix_attention_forward(q, k, v, pk, pv, prompt_ids, mask, bias, causal, scale, config, krange)
        ctx.save_for_backward(q, k, v, pk, pv, out, lse, prompt_ids, mask, bias, krange)
        ctx.causal, ctx.scale, ctx.config = causal, scale, config
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, pk, pv, out, lse, prompt_ids, mask, bias, krange = ctx.saved_tensors
        dq, dk, dv, dpk, dpv = prefix_attention_backward(
            do, q, k, v, pk, pv, out, lse, prompt_ids, mask, bias, ctx.causal, ctx.scale, ctx.config, krange
        )
        return dq, dk, dv, dpk, dpv, None, None, None, None, None, None, None


def prefix_attention_triton(x: AttentionInputs) -> torch.Tensor:
    """Normalised inputs -> (B, H, S, D); no dropout. Runs on CUDA, or anywhere under TRITON_INTERPRET=1.
    Decode on a GPU reaches here only when called directly: the dispatcher hands it to aten
    (the backend's declared `Handoff`, triton_backend.py)."""
    if x.dropout_p:
        raise ValueError("the triton backend does not support dropout; use backend='torch'")
    mask = x.bool_mask()  # one strided bool mask; the kernel applies causal itself
    q, k, v, pk, pv = x.q, x.k, x.v, x.prefix_k, x.prefix_v
    krange = None if x.key_padding is None else key_range(x.key_padding)
    training = x.needs_grad
    on_gpu = q.is_cuda and not triton.knobs.runtime.interpret

    def run(config):  # one timed call of a candidate, on detached copies of the call's tensors
        qd, kd, vd, pkd, pvd = (t.detach() for t in (q, k, v, pk, pv))
        out, lse = prefix_attention_forward(qd, kd, vd, pkd, pvd, x.prompt_ids, mask, x.bias, x.causal, x.scale, config, krange)
        if training:
            prefix_attention_backward(out, qd, kd, vd, pkd, pvd, out, lse, x.prompt_ids, mask, x.bias, x.causal, x.scale, config, krange)

    key = (
        torch.cuda.get_device_capability(q.device) if on_gpu else None, q.dtype, q.shape[-1],
        s_bucket(q.shape[2]), s_bucket(k.shape[2]), x.causal, training,
    )
    config = tuned(key, q.dtype, q.shape[-1], run, on_gpu)
    return _TritonPrefixAttention.apply(q, k, v, pk, pv, x.prompt_ids, mask, x.bias, x.causal, x.scale, config, krange)
