"""A one-slot memo keyed by a tensor's identity and version: what every layer of one forward
derives from the same tensor (a padding plan, a bank's grouping) is computed, with its host sync,
once per forward rather than once per layer."""

from __future__ import annotations

import weakref
from typing import Callable, Hashable

import torch


class LastForTensor:
    """Remembers build(t) for the last tensor t seen (held weakly), while t is the same object, at
    the same version (not modified in place), under the same extra key."""

    def __init__(self):
        self._ref, self._key, self._value = None, None, None

    def get(self, t: torch.Tensor, build: Callable[[], object], key: Hashable = None):
        k = (t._version, key)
        if self._ref is not None and self._ref() is t and self._key == k:
            return self._value
        value = build()
        self._ref, self._key, self._value = weakref.ref(t), k, value
        return value
