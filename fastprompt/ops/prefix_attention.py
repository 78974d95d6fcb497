"""The public prefix-attention op: validates at the boundary, then one call into a backend."""

from __future__ import annotations

import torch

import importlib.util

from ..kernels.cpu_prefix_attention import prefix_attention_cpu
from ..kernels.torch_prefix_attention import prefix_attention_torch
from .dispatch import Backend, register_backend, select_backend

_FLOATS = frozenset({torch.float32, torch.float16, torch.bfloat16})


def _triton(*args):
    # imported on first use: importing triton costs a second, and only GPU runs need it
    from ..kernels.triton_prefix_attention import prefix_attention_triton

    return prefix_attention_triton(*args)


def _cuda(*args):
    from ..kernels.cuda_prefix_attention import prefix_attention_cuda

    return prefix_attention_cuda(*args)


def _cuda_extension_available() -> bool:
    from ..kernels.cuda_prefix_attention import available

    return available()


register_backend(
    Backend(
        name="torch",
        devices=frozenset({"cpu", "cuda", "xpu", "mps"}),
        dtypes=_FLOATS | {torch.float64},
        available=lambda: True,
        fn=prefix_attention_torch,
    )
)
register_backend(
    Backend(
        name="cuda",
        devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        available=_cuda_extension_available,
        fn=_cuda,
        head_dims=(32, 128),
        dropout=False,
    )
)
register_backend(
    Backend(
        name="triton",
        devices=frozenset({"cuda"}),
        dtypes=_FLOATS,
        available=lambda: importlib.util.find_spec("triton") is not None,
        fn=_triton,
        head_dims=(16, 256),
        dropout=False,
    )
)
register_backend(
    Backend(
        name="cpu",
        devices=frozenset({"cpu"}),
        dtypes=_FLOATS,
        available=lambda: hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"),
        fn=prefix_attention_cpu,
        dropout=False,
    )
)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    *,
    prompt_ids: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention of each query over a shared key/value prefix followed by the sequence's own keys.

    q: (B, H, S, D); k, v: (B, Hkv, Sk, D) with H a multiple of Hkv (grouped-query attention,
    kv heads never repeated); prefix_k, prefix_v: (Hkv, P, D) shared by the batch, or
    (T, Hkv, P, D) a bank of T prompts with prompt_ids: (B,) int64 choosing one per example.
    mask: for the sequence keys only, bool (True = attend) or additive float, broadcastable to
    (B, H, S, Sk), or a (B, Sk) key-padding mask; the prefix is visible to every query.
    causal: causal within the sequence (bottom-right aligned when Sk > S, as in cached decoding);
    ignored when a mask is given (the mask already says it). bias: additive float on the sequence
    scores (T5's position bias), broadcastable to (B, H, S, Sk). scale: default D ** -0.5.
    backend: "triton" (fused kernels; CUDA, no dropout), "cuda" (the csrc/ extension, forward
    only; CUDA), "cpu" (PyTorch's fused flash kernel + LSE merge; CPU, no dropout), "torch"
    (plain autograd, any device, dropout, float64), or None for the first that supports the call
    (in that order of preference).
    Returns (B, H, S, D) in q's dtype.
    """
    _check(q.dim() == 4, f"q must be (B, H, S, D), got shape {tuple(q.shape)}")
    b, h, s, d = q.shape
    _check(k.dim() == 4 and k.shape == v.shape, f"k and v must both be (B, Hkv, Sk, D), got {tuple(k.shape)} and {tuple(v.shape)}")
    _check(k.shape[0] == b and k.shape[3] == d, f"k must be (B={b}, Hkv, Sk, D={d}), got {tuple(k.shape)}")
    hkv = k.shape[1]
    _check(h % hkv == 0, f"q heads ({h}) must be a multiple of k/v heads ({hkv})")
    _check(prefix_k.shape == prefix_v.shape, f"prefix_k and prefix_v shapes differ: {tuple(prefix_k.shape)} vs {tuple(prefix_v.shape)}")
    if prompt_ids is None:
        _check(prefix_k.dim() == 3, f"prefix_k must be (Hkv, P, D) without prompt_ids, got {tuple(prefix_k.shape)}")
    else:
        _check(prefix_k.dim() == 4, f"prefix_k must be a bank (T, Hkv, P, D) with prompt_ids, got {tuple(prefix_k.shape)}")
        _check(
            prompt_ids.dim() == 1 and prompt_ids.shape[0] == b and prompt_ids.dtype in (torch.int64, torch.int32),
            f"prompt_ids must be an integer tensor of shape ({b},), got {prompt_ids.dtype} {tuple(prompt_ids.shape)}",
        )
        if prompt_ids.device.type == "cpu":  # a range check on GPU would sync; the gather there is bounds-checked
            n = prefix_k.shape[0]
            _check(bool(((prompt_ids >= 0) & (prompt_ids < n)).all()), f"prompt_ids must lie in [0, {n}), got {prompt_ids.tolist()}")
        prompt_ids = prompt_ids.long()
    _check(prefix_k.shape[-3] == hkv and prefix_k.shape[-1] == d, f"prefix_k must have Hkv={hkv} heads and D={d}, got {tuple(prefix_k.shape)}")
    _check(prefix_k.shape[-2] > 0, "the prefix must have at least one position")
    for name, t in (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        _check(t.dtype == q.dtype, f"{name} dtype {t.dtype} differs from q dtype {q.dtype}")
        _check(t.device == q.device, f"{name} is on {t.device}, q on {q.device}")
    if mask is not None and mask.dim() == 2:
        _check(mask.shape == (b, k.shape[2]), f"a 2-D mask must be key padding (B={b}, Sk={k.shape[2]}), got {tuple(mask.shape)}")
        mask = mask[:, None, None, :] if mask.dtype == torch.bool else mask.bool()[:, None, None, :]
    if mask is not None:
        _check(mask.dim() == 4, f"mask must broadcast to (B, H, S, Sk), got shape {tuple(mask.shape)}")
    _check(0.0 <= dropout_p < 1.0, f"dropout_p must be in [0, 1), got {dropout_p}")
    impl = select_backend(q, backend, dropout_p)
    return impl.fn(
        q, k, v, prefix_k, prefix_v, prompt_ids, mask, bool(causal),
        float(d**-0.5 if scale is None else scale), bias, float(dropout_p),
    )
