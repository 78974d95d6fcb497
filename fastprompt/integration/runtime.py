"""PromptRuntime, the state a patched model carries: its prompt module and method, the layer stacks,
the undo log of everything `patch` changed, the per-forward values (ForwardState, one per thread)
the attention function and the hooks read, and the checks on a forward's prompt_ids / example_ids.
Also `capture_mask` (the hook every method gets) and `runtime_of`."""

from __future__ import annotations

import dataclasses
import threading

import torch
import torch.nn as nn

from . import attention
from .architectures import Stack
from .back_references import weak_hook
from .model_shape import ModelShape
from .undo_log import UndoLog

PROMPT_MODULE = "fastprompt"  # the prompt module's name on the patched model
RUNTIME_ATTRIBUTE = "_fastprompt_runtime"  # where the model keeps its runtime (an instance attribute)


class ForwardState(threading.local):
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

    def snapshot(self):
        """What a checkpointed layer's recompute in backward must see again (maybe in another thread)."""
        return (self.prompt_ids, self.prompt_kv)

    def restore(self, snap):
        """Puts a snapshot back; returns the values it replaced."""
        old = self.snapshot()
        self.prompt_ids, self.prompt_kv = snap
        return old


class PromptRuntime:
    """What a patched model carries (as an instance attribute, `runtime_of(model)`).

    config: the PromptConfig; stacks: the model's layer stacks; prompts: the prompt module (also
    the model's `fastprompt` submodule); method: the methods.Method that built it; shape: the
    model's ModelShape; head_names: the trained head modules; forward: the per-forward
    ForwardState; undo: the UndoLog unpatch replays; bound: the attention modules given a Binding;
    lower_cache: the LowerLayerCache once `cache_lower_layers` attached one.
    """

    def __init__(self, config, stacks: list[Stack], prompts: nn.Module, method, shape: ModelShape, head_names):
        self.config = config
        self.stacks = stacks
        self.prompts = prompts
        self.method = method
        self.shape = shape
        self.head_names = tuple(head_names)
        self.forward = ForwardState()
        self.undo = UndoLog()
        self.bound: list[nn.Module] = []
        self.lower_cache = None

    def bind(self, module: nn.Module, slot: int | None, inserted: int = 0, causal: bool = False) -> None:
        """Gives an attention module its Binding: a plain attribute, not a submodule, so the model's
        state_dict and module tree stay as they were."""
        if not self.bound:
            bound = self.bound  # the list, not the runtime: steps hold neither model nor runtime
            self.undo.push(lambda model: bound.clear())
        self.undo.set_attribute(module, "_fastprompt", attention.Binding(self, slot, inserted, causal))
        self.bound.append(module)

    def attach_lower_cache(self, cache) -> None:
        """The lower-layer cache `cache_lower_layers` installed; closed on unpatch."""
        self.lower_cache = cache
        self.undo.push(lambda model: cache.close())

    def task_added(self, name: str | None = None, num_labels: int | None = None) -> None:
        """The bank grew by one task (banks.add_task grew its tensors): num_tasks + 1, and with
        per-task heads the new task's name and label count."""
        heads = self.config.heads and (*self.config.heads, (name, num_labels))
        self.config = dataclasses.replace(self.config, num_tasks=self.config.num_tasks + 1, heads=heads)

    def prefix(self, slot, dtype, device):
        """(K, V, ids) for a slot: K, V (Hkv, P, D) with ids None, or banks (T, Hkv, P, D) with
        ids (B,) choosing one per example; None when this call adds no prefix."""
        if slot is None or self.forward.computing:
            return None
        return self.method.prefix(self, slot, dtype, device)

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


def capture_mask(runtime: PromptRuntime, stack: Stack) -> None:
    """Keeps the (B, T) padding mask the stack's owner is called with (inserted tokens and the
    lower-layer cache place themselves by it)."""

    def prehook(runtime, module, args, kwargs):
        state = runtime.forward
        if state.computing:  # a decoder prompt's own pass, inside the real forward
            return None
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        state.mask2d = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        state.inserted_in_flight = 0  # a forward that raised midway leaves nothing behind
        return None

    runtime.undo.hook(stack.owner.register_forward_pre_hook(weak_hook(runtime, prehook), with_kwargs=True))


def runtime_of(model: nn.Module) -> PromptRuntime | None:
    """The runtime of a patched model (not through wrappers), or None."""
    return model.__dict__.get(RUNTIME_ATTRIBUTE)
