"""The attention and mask functions fastprompt registers with transformers (AttentionInterface,
AttentionMaskInterface), the per-module Binding they read, and widening a mask for inserted tokens.

Patched self-attention modules carry a `Binding` in their `__dict__` (not a submodule, so
state_dict and module trees are untouched). The function asks the binding's runtime for the
layer's prefix and runs `ops.prefix_attention`; modules without a binding (cross-attention,
layers below `start_layer`) take transformers' own SDPA path unchanged.
"""

from __future__ import annotations

import threading
import weakref

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
    prepare_padding_mask,
    sdpa_mask,
)

from ..ops import prefix_attention

ATTN_IMPLEMENTATION = "fastprompt"


class Binding:
    """What one self-attention module needs at call time.

    runtime: the model's PromptRuntime (supplies prefixes); slot: index of this layer's prefix,
    or None for none; inserted: number of prompt tokens inserted into this layer's hidden states
    ahead of the real tokens, whose rows and columns the model's mask does not cover yet;
    causal: whether the stack is causal (inserted tokens then see only each other).
    """

    __slots__ = ("_runtime", "slot", "inserted", "causal", "calls")

    def __init__(self, runtime, slot: int | None, inserted: int = 0, causal: bool = False):
        self._runtime = weakref.ref(runtime)  # the module holds the binding: see back_references.py
        self.slot, self.inserted, self.causal, self.calls = slot, inserted, causal, 0

    @property
    def runtime(self):
        """The PromptRuntime, or None once it is gone (a module kept after its model was dropped)."""
        return self._runtime()


def extend_mask_for_inserted(mask: torch.Tensor, n: int, causal: bool, q_len: int) -> torch.Tensor:
    """Widens a mask over real tokens for n tokens inserted in front of them.

    mask: (B, h, Q, K) bool (True = attend) or additive float over the real keys. When the
    queries include the inserted tokens (q_len == Q + n) rows are added too: inserted tokens see
    each other (causally on a causal stack) and, on a bidirectional stack, every real key that
    any query may see (the non-padding keys). Real queries always see the inserted tokens.
    Returns a bool mask (B, h, q_len, n + K).
    """
    visible = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    b, h, q, k = visible.shape
    front = torch.ones(b, h, q, n, dtype=torch.bool, device=mask.device)
    real_rows = torch.cat([front, visible], dim=-1)
    if q_len == q:  # decoding: the queries are real tokens only
        return real_rows
    own = torch.ones(n, n, dtype=torch.bool, device=mask.device)
    own = own.tril() if causal else own
    if causal:
        to_real = torch.zeros(b, h, n, k, dtype=torch.bool, device=mask.device)
    else:
        to_real = visible.any(dim=-2, keepdim=True).expand(b, h, n, k)
    inserted_rows = torch.cat([own.expand(b, h, n, n), to_real], dim=-1)
    return torch.cat([inserted_rows, real_rows], dim=-2)


class _MaskPadding(threading.local):
    """Dense masks built from a plain causal or bidirectional pattern plus padding -> their (B, Sk)
    key-padding mask, so the op gets key padding + causal (variable-length kernels) instead of a
    (B, 1, S, Sk) mask. Keyed by the mask object itself: a model that edits the mask (T5 adds it to
    its position bias) hands the attention a new tensor and keeps the dense path. Per thread: the
    masks of one forward, never another thread's (transformers builds them in the forward's thread)."""

    def __init__(self):
        self.entries: list[tuple[weakref.ref, torch.Tensor]] = []


_PADDING = _MaskPadding()
_PADDING_SLOTS = 8  # masks alive at once in one forward (causal + sliding, encoder + decoder, ...)


def fastprompt_mask(
    batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=causal_mask_function, attention_mask=None, **kwargs
):
    """transformers' mask function (AttentionMaskInterface): sdpa's dense mask, remembering the
    key padding behind it when the pattern is plain causal (aligned as the op's bottom-right
    causal) or bidirectional."""
    dense = sdpa_mask(
        batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
        attention_mask=attention_mask, **kwargs,
    )
    aligned = mask_function is bidirectional_mask_function or (
        mask_function is causal_mask_function and q_offset + q_length == kv_offset + kv_length
    )
    if dense is not None and aligned and attention_mask is not None and attention_mask.dim() == 2:
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        if padding is not None and padding.shape == (batch_size, kv_length):
            live = [e for e in _PADDING.entries if e[0]() is not None][-(_PADDING_SLOTS - 1) :]
            _PADDING.entries = [*live, (weakref.ref(dense), padding.bool())]
    return dense


def key_padding_of(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The (B, Sk) key padding behind a dense mask `fastprompt_mask` built, else None."""
    if mask is None:
        return None
    for ref, padding in _PADDING.entries:
        if ref() is mask:
            return padding
    return None


def fastprompt_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function: query (B, H, Q, D), key/value (B, Hkv, K, D) -> ((B, Q, H, D), None)."""
    binding = module.__dict__.get("_fastprompt")
    runtime = None if binding is None else binding.runtime
    if runtime is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    binding.calls += 1
    n = binding.inserted
    bias = kwargs.get("position_bias")
    if n and bias is not None and bias.shape[-1] == key.shape[-2] - n:
        # a relative position bias computed below the inserted tokens: they get none
        rows = n if bias.shape[-2] == query.shape[-2] - n else 0
        kwargs["position_bias"] = bias = torch.nn.functional.pad(bias, (n, 0, rows, 0))
    kv = runtime.prefix(binding.slot, query.dtype, query.device)
    padding = None if kv is None else key_padding_of(attention_mask)
    if padding is not None:
        if n and padding.shape[-1] == key.shape[-2] - n:  # inserted prompt tokens are real tokens
            padding = torch.nn.functional.pad(padding, (n, 0), value=True)
        if padding.shape != (key.shape[0], key.shape[-2]):
            padding = None  # not the keys this layer sees: keep the dense mask
    if padding is None and n and attention_mask is not None and attention_mask.shape[-1] == key.shape[-2] - n:
        attention_mask = extend_mask_for_inserted(attention_mask, n, binding.causal, query.shape[-2])
    if kv is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", False)
    out = prefix_attention(
        query, key, value, kv[0], kv[1],
        prompt_ids=kv[2],
        # key padding composes with causal in the op; a dense mask already says what is causal
        mask=padding if padding is not None else attention_mask,
        causal=bool(is_causal) and (padding is not None or attention_mask is None),
        scale=scaling,
        bias=bias,
        dropout_p=dropout,
    )
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Registers the attention and mask functions (class-level in transformers; idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, fastprompt_attention)
    # without a mask function of the same name transformers drops padding masks silently
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, fastprompt_mask)
