"""The public prefix-attention op and its companions: `prefix_attention_inputs` validates and
normalises the arguments once at the boundary, `prefix_attention` makes one call into the backend
the dispatcher selects, `explain_backend` says which backend that is and why the others are not."""

from __future__ import annotations

import torch

from ..kernels.inputs import AttentionInputs
from .dispatch import Choice, choose, select


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def prefix_attention_inputs(
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
) -> AttentionInputs:
    """Validates `prefix_attention`'s arguments (see there) and normalises them once: the
    `AttentionInputs` every backend receives. Raises ValueError naming the argument at fault."""
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
        _check(prompt_ids.device == q.device, f"prompt_ids is on {prompt_ids.device}, q on {q.device}")
        n = prefix_k.shape[0]
        in_range = ((prompt_ids >= 0) & (prompt_ids < n)).all()
        if prompt_ids.device.type == "cpu":
            _check(bool(in_range), f"prompt_ids must lie in [0, {n}), got {prompt_ids.tolist()}")
        else:  # no host sync: a device-side assert stops the stream before any kernel reads the bank
            torch._assert_async(in_range, f"prompt_ids must lie in [0, {n}) (the bank has {n} prompts)")
        prompt_ids = prompt_ids.long()
    _check(prefix_k.shape[-3] == hkv and prefix_k.shape[-1] == d, f"prefix_k must have Hkv={hkv} heads and D={d}, got {tuple(prefix_k.shape)}")
    _check(prefix_k.shape[-2] > 0, "the prefix must have at least one position")
    for name, t in (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        _check(t.dtype == q.dtype, f"{name} dtype {t.dtype} differs from q dtype {q.dtype}")
        _check(t.device == q.device, f"{name} is on {t.device}, q on {q.device}")
    sk = k.shape[2]
    key_padding = dense = None
    if mask is not None and mask.dim() == 2:
        _check(mask.shape == (b, sk), f"a 2-D mask must be key padding (B={b}, Sk={sk}), got {tuple(mask.shape)}")
        key_padding = mask if mask.dtype == torch.bool else mask != 0  # transformers' attention_mask: 1 = real
    elif mask is not None:
        _check(mask.dim() == 4, f"mask must be (B, Sk) key padding or broadcast to (B, H, S, Sk), got shape {tuple(mask.shape)}")
        _check(_broadcasts(mask.shape, (b, h, s, sk)), f"mask shape {tuple(mask.shape)} does not broadcast to (B, H, S, Sk) = {(b, h, s, sk)}")
        dense = mask
    if bias is not None:
        _check(bias.dim() == 4 and bias.is_floating_point(),
               f"bias must be a float tensor broadcastable to (B, H, S, Sk), got {bias.dtype} {tuple(bias.shape)}")
        _check(_broadcasts(bias.shape, (b, h, s, sk)), f"bias shape {tuple(bias.shape)} does not broadcast to (B, H, S, Sk) = {(b, h, s, sk)}")
    for name, t in (("mask", mask), ("bias", bias)):
        _check(t is None or t.device == q.device, f"{name} is on {t.device if t is not None else None}, q on {q.device}")
    if dense is not None and dense.dtype != torch.bool:
        # an additive float mask is part of the bias (one normalisation: backends see bool masks only)
        fm = dense.to(q.dtype if q.is_floating_point() else torch.float32)
        bias = fm if bias is None else bias.to(fm.dtype) + fm
        dense = None
    _check(0.0 <= dropout_p < 1.0, f"dropout_p must be in [0, 1), got {dropout_p}")
    return AttentionInputs(
        q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v, prompt_ids=prompt_ids, key_padding=key_padding,
        mask=dense, bias=bias, causal=bool(causal) and s > 1,  # one query row sees every earlier key
        scale=float(d**-0.5 if scale is None else scale), dropout_p=float(dropout_p),
    )


def _broadcasts(shape, full) -> bool:
    return len(shape) == len(full) and all(a in (1, f) for a, f in zip(shape, full))


def prefix_attention(q, k, v, prefix_k, prefix_v, *, backend: str | None = None, **kwargs) -> torch.Tensor:
    """Attention of each query over a shared key/value prefix followed by the sequence's own keys.

    q: (B, H, S, D); k, v: (B, Hkv, Sk, D) with H a multiple of Hkv (grouped-query attention,
    kv heads never repeated); prefix_k, prefix_v: (Hkv, P, D) shared by the batch, or
    (T, Hkv, P, D) a bank of T prompts with prompt_ids: (B,) int64 choosing one per example.
    mask: a (B, Sk) key-padding mask (True / nonzero = a real token, as transformers' attention_mask), or bool (True = attend) /
    additive float broadcastable to (B, H, S, Sk), for the sequence keys only: the prefix is
    visible to every query. causal: causal within the sequence, bottom-right aligned when
    Sk > S (cached decoding, chunked prefill); it composes with any mask. With key padding on a
    causal call a padded query row is padding too and sees only the prefix. bias: additive float
    on the sequence scores (T5's position bias), broadcastable to (B, H, S, Sk). scale: default
    D ** -0.5. dropout_p: attention dropout (the torch backend applies it).
    backend: a name from `fastprompt.ops.backends()` ("aten", "triton", "cuda", "cpu", "torch")
    or None for the first in the device's priority list that supports the call
    (`fastprompt.ops.priority()`; `explain_backend` says which and why).
    Returns (B, H, S, D) in q's dtype.
    """
    x = prefix_attention_inputs(q, k, v, prefix_k, prefix_v, **kwargs)
    return select(x, backend).fn(x)


def explain_backend(q, k, v, prefix_k, prefix_v, *, backend: str | None = None, **kwargs) -> Choice:
    """Which backend `prefix_attention` would run for these arguments, and why each other one
    refused (same arguments; nothing is computed). `print(explain_backend(...))` reads well."""
    x = prefix_attention_inputs(q, k, v, prefix_k, prefix_v, **kwargs)
    return choose(x, backend)[1]
