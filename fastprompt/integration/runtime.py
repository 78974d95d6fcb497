"""The per-model state of a patched model: the prompt module, the method, and the values that live
for one forward pass (per thread), which the attention function and the hooks read."""

from __future__ import annotations

import threading

import torch
import torch.nn as nn

from . import attention
from .architectures import Stack
from .back_references import weak_hook
from .prompts import FoldCache

PROMPT_MODULE = "fastprompt"  # the prompt module's name on the patched model


class _ForwardState(threading.local):
    """Values that live for one forward pass, per thread: concurrent forwards of one patched
    model from several threads (different prompt_ids) do not see each other's."""

    computing = False  # the prompt's own pass (decoder input prompts) is running
    prompt_kv = None  # decoder input prompts: ([(K, V) per layer, each (n, Hkv, P, D)], ids into n)
    inserted_in_flight = 0
    mask2d = None  # the (B, T) padding mask the stack was called with
    prompt_ids = None  # (B,) task of each example, or None (task 0)
    example_ids = None  # (B,) dataset index of each example, for the lower-layer cache
    skip_lower = False  # every example of this forward is in the lower-layer cache
    source_len = None  # decoders: the input's length inside generate(), or (B,) tokens before each row's first target in
    # a training forward with token labels; late prompts read only those tokens


def _state_property(name):
    return property(lambda self: getattr(self._state, name), lambda self, v: setattr(self._state, name, v))


class PromptRuntime:
    """Per-model state the attention function reads: the prompt module and per-forward values."""

    computing = _state_property("computing")
    prompt_kv = _state_property("prompt_kv")
    inserted_in_flight = _state_property("inserted_in_flight")
    mask2d = _state_property("mask2d")
    prompt_ids = _state_property("prompt_ids")
    example_ids = _state_property("example_ids")
    skip_lower = _state_property("skip_lower")
    source_len = _state_property("source_len")

    def __init__(self, model, config, stacks: list[Stack], prompts: nn.Module, method):
        self.config = config
        self.stacks = stacks
        self.prompts = prompts
        self.method = method  # the methods.Method that built prompts
        self.mode = method.mode  # how attention reads the prompt: "prefix" | "prompt_kv" | "insert"
        self._state = _ForwardState()
        self.handles: list = []
        self.wrapped_forwards: list = []
        self.bnb_cpu_packing: list = []
        self.bnb_forwards: list = []
        self.bound: list[nn.Module] = []
        self.requires_grad: dict[str, bool] = {}
        self.attn_implementation = model.config._attn_implementation
        self.head_names: list[str] = []
        self.replaced_heads: list[tuple[str, nn.Module]] = []
        self.model_attrs: list[tuple[str, object]] = []
        self._kv_cache = FoldCache()
        self.lower_cache = None

    def snapshot(self):
        """What a checkpointed layer's recompute in backward must see again (maybe in another thread)."""
        return (self.prompt_ids, self.prompt_kv)

    def restore(self, snap):
        old = self.snapshot()
        self.prompt_ids, self.prompt_kv = snap
        return old

    def prefix(self, slot, dtype, device):
        """(K, V, ids) for a slot: K, V (Hkv, P, D) with ids None, or banks (T, Hkv, P, D) with
        ids (B,) choosing one per example; None when this call adds no prefix."""
        if slot is None or self.computing:
            return None
        if self.mode == "prefix":
            k, v = self.prompts.slot(slot, dtype, device)
            ids = self.prompt_ids
        elif self.mode == "prompt_kv" and self.prompt_kv is not None:
            kv, ids = self.prompt_kv
            k, v = kv[slot]
            k, v = k.to(dtype), v.to(dtype)
        else:
            return None
        if k.shape[0] == 1:
            return k[0], v[0], None
        if ids is None:
            raise ValueError(f"this model holds {self.config.num_tasks} prompts (num_tasks): pass prompt_ids=LongTensor[batch] to its forward")
        return k, v, ids.to(device)

    def check_example_ids(self, example_ids, batch: int | None):
        """example_ids: (B,) integer dataset indices, used by the lower-layer cache."""
        if self.lower_cache is None:
            raise ValueError("example_ids is for the lower-layer cache: call fastprompt.cache_lower_layers(model) first")
        if not isinstance(example_ids, torch.Tensor) or example_ids.dim() != 1 or example_ids.is_floating_point():
            raise ValueError(f"example_ids must be a 1-D integer tensor (one dataset index per example), got {example_ids!r}")
        if batch is not None and example_ids.shape[0] != batch:
            raise ValueError(f"example_ids has {example_ids.shape[0]} entries for a batch of {batch} examples")
        return example_ids.cpu()

    def check_prompt_ids(self, prompt_ids, batch: int | None):
        """Validates a forward's prompt_ids: (B,) integer tensor in [0, num_tasks)."""
        t = self.config.num_tasks
        if prompt_ids is None:
            if t > 1:
                raise ValueError(f"this model holds {t} prompts (num_tasks={t}): pass prompt_ids=LongTensor[batch] choosing one per example")
            return None
        if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 1 or prompt_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            got = f"{prompt_ids.dtype} tensor of shape {tuple(prompt_ids.shape)}" if isinstance(prompt_ids, torch.Tensor) else type(prompt_ids).__name__
            raise ValueError(f"prompt_ids must be a 1-D integer tensor (one task index per example), got {got}")
        if batch is not None and prompt_ids.shape[0] != batch:
            raise ValueError(f"prompt_ids has {prompt_ids.shape[0]} entries for a batch of {batch} examples")
        if prompt_ids.device.type == "cpu" and prompt_ids.numel():  # a range check on GPU would sync
            lo, hi = int(prompt_ids.min()), int(prompt_ids.max())
            if lo < 0 or hi >= t:
                raise ValueError(f"prompt_ids must lie in [0, {t}) (num_tasks={t}), got values from {lo} to {hi}")
        return prompt_ids.long()


def bind(runtime, module, slot, inserted=0, causal=False):
    # a plain attribute, not a submodule: the model's state_dict and module tree stay as they were
    module.__dict__["_fastprompt"] = attention.Binding(runtime, slot, inserted, causal)
    runtime.bound.append(module)


def capture_mask(runtime, stack: Stack) -> None:
    """Keeps the (B, T) padding mask the stack's owner is called with (inserted tokens and the
    lower-layer cache place themselves by it)."""

    def prehook(runtime, module, args, kwargs):
        if runtime.computing:  # a decoder prompt's own pass, inside the real forward
            return None
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        runtime.mask2d = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        runtime.inserted_in_flight = 0  # a forward that raised midway leaves nothing behind
        return None

    runtime.handles.append(stack.owner.register_forward_pre_hook(weak_hook(runtime, prehook), with_kwargs=True))


def runtime_of(model: nn.Module) -> PromptRuntime | None:
    return model.__dict__.get("_fastprompt_runtime")
