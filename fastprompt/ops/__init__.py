"""Ops: the public prefix-attention op (`prefix_attention`, its validation `prefix_attention_inputs`,
`explain_backend`) and the dispatcher's public face: the registry (`backends`), the read-only
per-device order (`priority`), the context-local override (`prefer`), `runnable` and `Choice`."""

from .dispatch import Choice, backends, prefer, priority, runnable
from .prefix_attention import explain_backend, prefix_attention, prefix_attention_inputs

__all__ = ["prefix_attention", "prefix_attention_inputs", "explain_backend", "backends", "Choice", "priority", "prefer", "runnable"]
