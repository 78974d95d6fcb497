"""What a prefix-attention backend declares about itself (`Backend`, and the `Handoff` by which
it leaves some inputs to another backend); each backend's file defines one `BACKEND`.

The dispatcher (`fastprompt.ops.dispatch`) reads these declarations and a per-device priority
list; it never special-cases a backend by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .inputs import AttentionInputs


@dataclass(frozen=True)
class Handoff:
    """Inputs a backend accepts but leaves to another: when(x) returns why (or None to run x
    itself), and the dispatcher then runs the backend named `to`, if that one accepts x, also
    when this backend was named or preferred. `explain_backend` reports the reason."""

    to: str
    when: Callable[[AttentionInputs], str | None]


@dataclass(frozen=True)
class Backend:
    """One implementation of prefix attention.

    name: what users pass as ``backend=``. devices, dtypes: what it runs on. head_dims: (lo, hi)
    inclusive, head_dim_multiple: D must be a multiple of it. gradients, dropout: whether it
    trains and applies attention dropout. bias: whether it takes an additive bias or float mask;
    bias_gradients: whether it also returns the bias's gradient (a bias that requires grad, T5's
    position bias in an unfrozen model, goes only to backends that do).
    min_capability: lowest CUDA compute capability. available: whether its runtime (compiler,
    extension, GPU) is present. refuses: further input-dependent refusals, returning the reason
    or None. hands_off: a `Handoff`, inputs it accepts but leaves to another backend (`why_not`
    still accepts them: a direct call of fn runs them). fn: the implementation, called with
    normalised `AttentionInputs`, returning (B, H, S, D) in q's dtype. notes: what it refuses and why, for people reading the registry.
    """

    name: str
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    fn: Callable[[AttentionInputs], torch.Tensor]
    available: Callable[[], bool] = lambda: True
    head_dims: tuple[int, int] = (1, 1 << 16)
    head_dim_multiple: int = 1
    gradients: bool = True
    dropout: bool = True
    bias: bool = True
    bias_gradients: bool = False
    min_capability: tuple[int, int] | None = None
    refuses: Callable[[AttentionInputs], str | None] | None = None
    hands_off: Handoff | None = None
    notes: str = ""

    def why_not(self, x: AttentionInputs) -> str | None:
        """None when this backend can run x, else the reason it refuses."""
        q = x.q
        if q.device.type not in self.devices:
            return f"runs on {'/'.join(sorted(self.devices))}, not {q.device.type}"
        if q.dtype not in self.dtypes:
            return f"does not support {q.dtype}"
        d = q.shape[-1]
        lo, hi = self.head_dims
        if not lo <= d <= hi or d % self.head_dim_multiple:
            mult = f" (multiples of {self.head_dim_multiple})" if self.head_dim_multiple > 1 else ""
            return f"supports head dims {lo}..{hi}{mult}, not {d}"
        if x.dropout_p > 0 and not self.dropout:
            return "does not support attention dropout"
        if x.bias is not None and not self.bias:
            return "does not support an additive bias or float mask"
        if x.bias is not None and x.bias.requires_grad and torch.is_grad_enabled() and not self.bias_gradients:
            return "computes no gradient for an additive bias that requires grad"
        if not self.gradients and x.needs_grad:
            return "is forward-only (no gradients)"
        if not self.available():
            return "is not available in this install (runtime or device missing)"
        if self.min_capability is not None and q.device.type == "cuda":
            cap = torch.cuda.get_device_capability(q.device)
            if cap < self.min_capability:
                return f"needs compute capability {self.min_capability}, the device has {cap}"
        if self.refuses is not None:
            return self.refuses(x)
        return None
