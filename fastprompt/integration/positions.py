"""Position ids under prompts: rotary decoders called without position_ids on padded batches, and
PEFT's shift of real tokens by the prefix length (peft_positions=True)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .architectures import Stack
from .compat import find_cache


def positions_from_mask(runtime, kwargs) -> None:
    """Rotary decoders called without position_ids on a left-padded batch: positions from the mask.

    transformers then numbers every row 0..T-1, pads included. Unpatched, that is harmless
    (rotary scores depend on distances only), but prefix keys carry no rotation and prompt tokens
    sit at -P..-1, so an example's output would depend on how much padding its batch has.
    Counting positions from each row's first real token (as generate() does) keeps a padded
    example equal to the same example alone; on unpadded and right-padded rows it gives the real
    tokens the same 0..n-1 (no check for left padding: that would sync a GPU every forward).
    Calls with a KV cache continue its positions and are left as they are."""
    stack = runtime.stacks[0]
    mask = kwargs.get("attention_mask")
    if stack.rotary is None or not stack.causal or kwargs.get("position_ids") is not None:
        return
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and find_cache((), kwargs) is None:
        kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)


def position_shift_hooks(model, stacks: list[Stack], shift: int, prompt_pass=lambda: False) -> list:
    """Forward pre-hooks adding `shift` to every position id (PEFT numerics: its prefix occupies
    positions 0..P-1 of the KV cache). Rotary stacks: on the rotary module; learned absolute
    positions: on the position embedding table, except while `prompt_pass()` (a decoder input
    prompt's own pass already sits at 0..P-1, where PEFT puts it)."""
    def rotary_hook(module, args, kwargs):
        if "position_ids" in kwargs:
            return args, {**kwargs, "position_ids": kwargs["position_ids"] + shift}
        return (args[0], args[1] + shift, *args[2:]), kwargs

    def table_hook(module, args):
        if prompt_pass():
            return None
        return (args[0] + shift, *args[1:])

    base = model.base_model
    table = getattr(getattr(base, "embeddings", None), "position_embeddings", None)
    if table is None and model.config.model_type == "gpt2":
        table = base.wpe
    handles = []
    if stacks[0].rotary is not None:
        handles.append(stacks[0].rotary.register_forward_pre_hook(rotary_hook, with_kwargs=True))
    elif isinstance(table, nn.Embedding):
        handles.append(table.register_forward_pre_hook(table_hook))
    else:
        raise ValueError(f"peft_positions is not available for model_type={model.config.model_type!r} (rotary or learned absolute positions only)")
    return handles
