"""Ops: the prefix-attention dispatcher and its backends."""

from .dispatch import backends, select_backend
from .prefix_attention import prefix_attention

__all__ = ["prefix_attention", "backends", "select_backend"]
