"""Inserting prompt tokens into the hidden states of a layer stack, and removing them again.

Used by input prompts on bidirectional stacks (static tokens ahead of layer 0) and by Late
Prompt Tuning (tokens generated per example ahead of layer L). The tokens go in front of the
real tokens by a forward pre-hook on the first prompted layer; the registered attention
function widens the model's mask to cover them (see `attention.extend_mask_for_inserted`);
pre-hooks on rotary models extend the (cos, sin) position embeddings with positions -n..-1,
so real tokens keep 0..T-1; a forward hook on the last layer removes them, so final norms,
heads, losses and labels see the input's own length. A decoding step (the layer's KV cache
already holds the inserted tokens) inserts nothing.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .architectures import Stack
from .back_references import weak_hook
from .compat import find_cache


def _hidden(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, hs):
    if args:
        return (hs, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hs}


def _cache_filled(args, kwargs, layer_idx: int) -> bool:
    cache = find_cache(args, kwargs)
    if cache is None:
        return False
    cache = getattr(cache, "self_attention_cache", cache)
    return cache.get_seq_length(layer_idx) > 0


def real_tokens(mask2d: torch.Tensor | None, hs: torch.Tensor) -> torch.Tensor:
    """(B, T) bool, True for real tokens of the hidden states hs: (B, T, H)."""
    b, t = hs.shape[:2]
    if mask2d is None or mask2d.dim() != 2 or mask2d.shape != (b, t):
        return torch.ones(b, t, dtype=torch.bool, device=hs.device)
    return mask2d.to(device=hs.device).bool()


def install_insertion(
    runtime,
    stack: Stack,
    start: int,
    n: int,
    make_tokens: Callable[..., torch.Tensor],
    rotary: nn.Module | None,
) -> None:
    """Inserts make_tokens(runtime, hidden (B,T,H), real (B,T), source (B,)) -> (B, n, H) ahead of
    stack.layers[start]. The hooks get the runtime as an argument (they hold it weakly)."""
    causal = stack.causal
    for attn in stack.self_attention[start:]:
        runtime.bind(attn, None, inserted=n, causal=causal)
    layer_idx = getattr(stack.self_attention[start], "layer_idx", None)
    layer_idx = start if layer_idx is None else layer_idx

    def insert(runtime, module, args, kwargs):
        if _cache_filled(args, kwargs, layer_idx):
            return None
        hs = _hidden(args, kwargs)
        real = real_tokens(runtime.forward.mask2d, hs)
        positions = torch.arange(hs.shape[1], device=hs.device)
        limit = runtime.forward.source_len
        if causal and limit is not None:
            # inside generate(): only the input given to generate() makes the prompt, not the tokens
            # generated since (a generate() without KV cache recomputes them all each step); in a
            # causal LM's training forward, per row, the tokens before its first target
            if isinstance(limit, torch.Tensor):
                limit = limit.to(hs.device)[:, None]
            real = real & (positions < limit)
        # decoders read the last real token (it has seen the whole input), encoders the first ([CLS])
        source = (positions * real).argmax(-1) if causal else real.long().argmax(-1)
        tokens = make_tokens(runtime, hs, real, source)
        runtime.forward.inserted_in_flight += 1
        return _with_hidden(args, kwargs, torch.cat([tokens.to(hs.dtype), hs], dim=1))

    def extend_rotary(module, args, kwargs):
        pe = kwargs.get("position_embeddings")
        hs = _hidden(args, kwargs)
        if pe is None or pe[0].shape[-2] != hs.shape[1] - n:
            return None
        pos = torch.arange(-n, 0, device=hs.device)[None]
        cos, sin = rotary(hs, position_ids=pos)
        b = pe[0].shape[0]
        cos = torch.cat([cos.expand(b, -1, -1).to(pe[0].dtype), pe[0]], dim=-2)
        sin = torch.cat([sin.expand(b, -1, -1).to(pe[1].dtype), pe[1]], dim=-2)
        return args, {**kwargs, "position_embeddings": (cos, sin)}

    def strip(runtime, module, args, kwargs, output):
        if runtime.forward.inserted_in_flight == 0:
            return None
        runtime.forward.inserted_in_flight -= 1
        if isinstance(output, torch.Tensor):
            return output[:, n:]
        return (output[0][:, n:], *output[1:])

    runtime.undo.hook(stack.layers[start].register_forward_pre_hook(weak_hook(runtime, insert), with_kwargs=True))
    if rotary is not None:
        # registered after `insert`, so the first prompted layer sees the longer hidden states
        for layer in stack.layers[start:]:
            runtime.undo.hook(layer.register_forward_pre_hook(extend_rotary, with_kwargs=True))
    runtime.undo.hook(stack.layers[-1].register_forward_hook(weak_hook(runtime, strip), with_kwargs=True))
