"""Backend registry for prefix attention: each backend states what it supports; the first that fits runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Backend:
    """One implementation of prefix attention.

    name: what users pass as ``backend=``; devices: device types it runs on; dtypes: dtypes it
    accepts; available: whether its runtime (compiler, extension) is importable here; fn: the
    implementation, called with validated arguments.
    """

    name: str
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    available: Callable[[], bool]
    fn: Callable[..., torch.Tensor]
    head_dims: tuple[int, int] = (1, 1 << 16)
    dropout: bool = True

    def why_not(self, q: torch.Tensor, dropout_p: float = 0.0) -> str | None:
        """None when this backend can run on q's device/dtype/head dim (and dropout), else the reason."""
        if q.device.type not in self.devices:
            return f"runs on {sorted(self.devices)}, not {q.device.type}"
        if q.dtype not in self.dtypes:
            return f"does not support {q.dtype}"
        lo, hi = self.head_dims
        if not lo <= q.shape[-1] <= hi:
            return f"supports head dims {lo}..{hi}, not {q.shape[-1]}"
        if dropout_p > 0 and not self.dropout:
            return "does not support attention dropout"
        if not self.available():
            return "is not available in this install"
        return None


_BACKENDS: list[Backend] = []


def register_backend(backend: Backend) -> None:
    """Adds a backend; later registrations are preferred over earlier ones."""
    _BACKENDS.insert(0, backend)


def backends() -> list[Backend]:
    return list(_BACKENDS)


def select_backend(q: torch.Tensor, name: str | None = None, dropout_p: float = 0.0) -> Backend:
    """The backend named ``name``, or the first that supports q (and dropout_p)."""
    if name is not None:
        for b in _BACKENDS:
            if b.name == name:
                reason = b.why_not(q, dropout_p)
                if reason:
                    raise ValueError(f"backend={name!r} {reason}")
                return b
        raise ValueError(f"backend must be one of {[b.name for b in _BACKENDS]}, got {name!r}")
    for b in _BACKENDS:
        if b.why_not(q, dropout_p) is None:
            return b
    raise ValueError(f"no prefix-attention backend supports {q.device.type} {q.dtype} head dim {q.shape[-1]}")
