"""Per-layer forward wrappers (`install_truncation`): no autograd below the first prompt, checkpointing
from it on (also under transformers' own gradient checkpointing), each undone by the undo log.

Wrappers are set as an instance attribute `forward` (not a submodule, not a class change), so
hooks still run once around them, state_dict names stay the same, and removal restores the
layer exactly. A layer below the first prompt layer of the first stack has only frozen inputs,
so running it without a graph loses no gradient and the backward pass stops there. The layer holds
its wrapper, so the wrapper holds the layer weakly (back_references.py).
"""

from __future__ import annotations

import functools
import inspect
import weakref

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import Cache

from .back_references import weak_method


def _set_forward(layer: nn.Module, make, undo) -> None:
    original = layer.forward
    forward = functools.wraps(original)(make(weak_method(layer, original)))
    if getattr(original, "__self__", None) is layer:
        # __wrapped__ names the function rather than the bound method, which would hold the layer
        forward.__wrapped__, forward.__signature__ = original.__func__, inspect.signature(original)
    undo.set_attribute(layer, "forward", forward)


def _no_grad(original, skip):
    returned = {"tuple": None}  # the layer's own output form, for skipped calls to copy

    def forward(*args, **kwargs):
        if skip():  # the lower-layer cache holds what this layer would compute
            hs = args[0] if args else kwargs["hidden_states"]
            n = returned["tuple"]
            return hs if n is None else (hs, *([None] * (n - 1)))
        with torch.no_grad():
            out = original(*args, **kwargs)
        returned["tuple"] = len(out) if isinstance(out, tuple) else None
        return out

    return forward


def _without_hf_checkpointing(layer: nn.Module):
    """The layer's forward function (unbound) with transformers' own checkpointing wrapper peeled off.

    transformers (5.x) wraps every `GradientCheckpointingLayer` subclass's forward in
    `forward_with_checkpointing` (FSDP2's subclasses once more); `__code__` is not copied by
    functools.wraps, so it tells the wrapper from the forward it wraps."""
    fn = type(layer).forward
    while getattr(getattr(fn, "__code__", None), "co_name", None) == "forward_with_checkpointing" and hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


def _checkpointed(layer, original, always, bypass, snapshot, restore):
    raw, layer_ref = _without_hf_checkpointing(layer), weakref.ref(layer)

    def forward(*args, **kwargs):
        layer = layer_ref()
        # checkpointing=True, or transformers' own switched on (gradient_checkpointing_enable(),
        # Trainer(gradient_checkpointing=True)), before or after patch: ours takes over, since
        # transformers' recompute would not see this forward's prompt state (prompt_ids, decoder
        # prompt K/V) again; both on at once checkpoints once
        if bypass():  # the prompt's own P-token pass fills a KV cache: never checkpointed (it is short)
            return raw(layer, *args, **kwargs)
        wanted = always or (getattr(layer, "gradient_checkpointing", False) and layer.training)
        if not wanted or not torch.is_grad_enabled():
            return original(*args, **kwargs)
        # the recompute must not write the KV cache a second time (as transformers' own checkpointing).
        # The cache is dropped by type, not by name: transformers calls it `past_key_values` up to
        # 5.23, `cache` from 5.24, `layer_past` in some layers, and GPT-2 passes it positionally
        args = tuple(None if isinstance(a, Cache) else a for a in args)
        kwargs = {k: (None if isinstance(v, Cache) else v) for k, v in kwargs.items()}
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        # the recompute runs in backward, maybe in another thread and after other forwards: it gets
        # this forward's per-call prompt state (prompt_ids, decoder prompt K/V) back; the graph
        # holds `run`, and `run` the layer (strongly: the graph is not the layer's)
        state = snapshot()

        def run(*a, **k):
            old = restore(state)
            try:
                return raw(layer, *a, **k)
            finally:
                restore(old)

        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    return forward


def install_truncation(layers_without_grad, layers_with_grad, undo, checkpointing: bool, bypass=lambda: False,
                       snapshot=lambda: None, restore=lambda s: None, skip=lambda: False) -> None:
    """layers_without_grad run under no_grad; layers_with_grad are checkpointed when `checkpointing`
    or when transformers' gradient checkpointing is on for them.
    bypass(): True while a call must run unwrapped (the prompt's own pass that fills a KV cache);
    snapshot() / restore(state) -> previous: the per-forward state a recompute must see again;
    skip(): True while layers without grad must pass their input through (lower-layer cache hit).
    undo: the runtime's UndoLog, which restores each layer's forward."""
    for layer in layers_without_grad:
        _set_forward(layer, lambda original: _no_grad(original, skip), undo)
    for layer in layers_with_grad:
        _set_forward(layer, lambda original, layer=layer: _checkpointed(layer, original, checkpointing, bypass, snapshot, restore), undo)

