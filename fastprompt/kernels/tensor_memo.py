"""A one-slot memo keyed by a tensor's identity and version (`LastForTensor`), kept per context:
what every layer of one forward derives from the same tensor (a padding plan, a bank's grouping)
is computed, with its host sync, once per forward rather than once per layer.

The slot is per-forward state, so it lives in a `contextvars.ContextVar`, not in the process:
forwards running concurrently in different threads (or asyncio tasks) each keep their own slot
and never read, or evict, each other's."""

from __future__ import annotations

import weakref
from contextvars import ContextVar
from typing import Callable, Hashable

import torch


class LastForTensor:
    """Remembers build(t) for the last tensor t seen (held weakly) in this context (thread, or
    asyncio task), while t is the same object, at the same version (not modified in place), under
    the same extra key. Within one thread's forward, and a checkpointed recompute on the same
    thread, every layer after the first hits; another thread's calls neither hit nor evict it.
    Create instances at module level (each holds one ContextVar, which lives as long as the process)."""

    def __init__(self, name: str = "fastprompt_last_for_tensor"):
        # (weakref to t, key, value) or None; a ContextVar because the slot is per-forward state
        self._slot: ContextVar[tuple | None] = ContextVar(name, default=None)

    def get(self, t: torch.Tensor, build: Callable[[], object], key: Hashable = None):
        k = (t._version, key)
        slot = self._slot.get()
        if slot is not None and slot[0]() is t and slot[1] == k:
            return slot[2]
        value = build()
        self._slot.set((weakref.ref(t), k, value))
        return value
