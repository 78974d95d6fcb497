"""The attention function fastprompt registers with transformers' AttentionInterface.

Patched self-attention modules carry a `Binding` in their `__dict__` (not a submodule, so
state_dict and module trees are untouched). The function asks the binding's runtime for the
layer's prefix and runs `ops.prefix_attention`; modules without a binding (cross-attention,
layers below `start_layer`) take transformers' own SDPA path unchanged.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..ops import prefix_attention

ATTN_IMPLEMENTATION = "fastprompt"


class Binding:
    """What one self-attention module needs at call time.

    runtime: the model's PromptRuntime (supplies prefixes); slot: index of this layer's prefix,
    or None for none; inserted: number of prompt tokens inserted into this layer's hidden states
    ahead of the real tokens (input prompts on bidirectional stacks), whose rows and columns
    the model's mask does not cover yet.
    """

    __slots__ = ("runtime", "slot", "inserted", "calls")

    def __init__(self, runtime, slot: int | None, inserted: int = 0):
        self.runtime, self.slot, self.inserted, self.calls = runtime, slot, inserted, 0


def extend_mask_for_inserted(mask: torch.Tensor, p: int) -> torch.Tensor:
    """(B, h, T, T) mask over real tokens -> (B, h, P+T, P+T) with P inserted tokens in front.

    Inserted tokens see and are seen by every real key that some query may see (i.e. all
    non-padding keys) and each other.
    """
    visible = mask if mask.dtype == torch.bool else mask == 0
    b, h, t, _ = visible.shape
    keys = visible.any(dim=-2, keepdim=True).expand(b, h, p, t)
    right = torch.cat([keys, visible], dim=-2)
    left = torch.ones(b, h, p + t, p, dtype=torch.bool, device=mask.device)
    return torch.cat([left, right], dim=-1)


def fastprompt_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function: query (B, H, Q, D), key/value (B, Hkv, K, D) -> ((B, Q, H, D), None)."""
    binding = module.__dict__.get("_fastprompt")
    if binding is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    binding.calls += 1
    if binding.inserted and attention_mask is not None and attention_mask.shape[-1] == key.shape[-2] - binding.inserted:
        attention_mask = extend_mask_for_inserted(attention_mask, binding.inserted)
    kv = binding.runtime.prefix(binding.slot, query.dtype, query.device)
    if kv is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", False)
    out = prefix_attention(
        query, key, value, kv[0], kv[1],
        mask=attention_mask,
        causal=bool(is_causal) and attention_mask is None,
        scale=scaling,
        bias=kwargs.get("position_bias"),
        dropout_p=dropout,
    )
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Registers the attention and mask functions (class-level in transformers; idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, fastprompt_attention)
    # without a mask function of the same name transformers drops padding masks silently
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
