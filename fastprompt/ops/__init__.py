"""Ops: the prefix-attention op, its dispatcher and the backends' registry."""

from .dispatch import PRIORITY, Choice, backends, prefer, runnable
from .prefix_attention import explain_backend, prefix_attention, prefix_attention_inputs

__all__ = ["prefix_attention", "prefix_attention_inputs", "explain_backend", "backends", "Choice", "PRIORITY", "prefer", "runnable"]
