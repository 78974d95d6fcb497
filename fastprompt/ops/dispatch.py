"""The prefix-attention dispatcher: which backend runs a call, and why the others do not.

Holds the registry of backends (each declares what it supports in its kernels file,
`fastprompt.kernels.*.BACKEND`), the per-device priority (`priority()`, read-only), the rows of GPU
measurements that put Triton first (`TRITON_MEASURED_FASTER`), `select` (the first backend in the
device's order that accepts the inputs, following a backend's declared handoff), `choose` and
`Choice` (the same with every other backend's reason: what `explain_backend` prints), `runnable`
and `prefer` (a context-local override of the order, per thread and per asyncio task).

Why this order: on CUDA the `aten` backend (PyTorch's FlashAttention-2 / memory-efficient kernels
plus the LSE-merged prefix) is the default until a GPU measurement shows the Triton kernels win
for some shapes (none has been taken yet: bench/gpu_check.py records it when run on a GPU);
`triton` and the forward-only `cuda` extension run when named. On CPU the fused `cpu` backend;
`torch` (plain autograd) everywhere else and for what the fused ones refuse (attention dropout,
float64).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType

from ..kernels import aten_prefix_attention, cpu_prefix_attention, cuda_prefix_attention, torch_prefix_attention, triton_backend
from ..kernels.declaration import Backend
from ..kernels.inputs import AttentionInputs

BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        aten_prefix_attention.BACKEND,
        triton_backend.BACKEND,
        cuda_prefix_attention.BACKEND,
        cpu_prefix_attention.BACKEND,
        torch_prefix_attention.BACKEND,
    )
}

# tried in this order when no backend is named; a backend absent from a device's list runs there
# only when named (the forward-only `cuda` extension; `triton` until measured faster). Immutable:
# `prefer` overrides it per context, `priority()` reads it.
_PRIORITY: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "cuda": ("aten", "torch"),
    "cpu": ("cpu", "torch"),
})
_DEFAULT_PRIORITY: tuple[str, ...] = ("torch",)

# the order in force in this context: `prefer` sets it for its thread (or asyncio task) only, so an
# override in one thread never changes which backend runs in another
_CURRENT: ContextVar[Mapping[str, tuple[str, ...]]] = ContextVar("fastprompt_backend_priority", default=_PRIORITY)


def priority() -> Mapping[str, tuple[str, ...]]:
    """The backend order per device type in force here (read-only): the defaults, or what an
    enclosing `prefer` made of them in this thread / task. A device not listed uses ("torch",)."""
    return _CURRENT.get()


def _device_order(device_type: str) -> tuple[str, ...]:
    return _CURRENT.get().get(device_type, _DEFAULT_PRIORITY)


# Where a GPU measurement (bench/gpu_check.py's "winners" table) showed the Triton kernels faster
# than the aten backend: rows {"device_capability": (major, minor), "dtypes": {...}, "head_dims":
# {...}, "seq": (lo, hi), "causal": bool | None, "training": bool | None}; a call matching a row tries
# triton first. Empty: no GPU measurement has been taken yet, so aten stays the CUDA default.
TRITON_MEASURED_FASTER: list[dict] = []


def _measured_faster(x: AttentionInputs) -> bool:
    if x.q.device.type != "cuda" or not TRITON_MEASURED_FASTER:
        return False
    import torch

    cap = torch.cuda.get_device_capability(x.q.device)
    _, _, _, s, _, d = x.shape
    for row in TRITON_MEASURED_FASTER:
        lo, hi = row.get("seq", (0, 1 << 62))
        if (
            tuple(row.get("device_capability", cap)) == cap
            and x.q.dtype in row.get("dtypes", {x.q.dtype})
            and d in row.get("head_dims", {d})
            and lo <= s <= hi
            and row.get("causal") in (None, x.causal)
            and row.get("training") in (None, x.needs_grad)
        ):
            return True
    return False


@dataclass(frozen=True)
class Choice:
    """backend: the name that runs; refused: {name: reason} for every other backend (the ones
    ahead of it in the device's priority list first); order: the priority list used."""

    backend: str
    refused: dict[str, str]
    order: list[str]

    def __str__(self) -> str:
        lines = [f"{self.backend} runs (priority: {' > '.join(self.order)})"]
        lines += [f"  {n}: {r}" for n, r in self.refused.items()]
        return "\n".join(lines)


def backends() -> list[Backend]:
    return list(BACKENDS.values())


def _order(x: AttentionInputs) -> list[str]:
    order = list(_device_order(x.q.device.type))
    if "triton" not in order[:1] and _measured_faster(x):
        order = ["triton"] + [n for n in order if n != "triton"]  # measured faster for these inputs
    return order


def _handoff(b: Backend, x: AttentionInputs) -> tuple[Backend, str] | None:
    """(the backend b hands x to, why) when b, accepting x, declares a handoff for x (see
    `Handoff`) and the other backend accepts x too; else None (b runs x itself)."""
    if b.hands_off is None:
        return None
    why = b.hands_off.when(x)
    if why is None:
        return None
    to = BACKENDS[b.hands_off.to]
    if to.why_not(x) is not None:
        return None
    return to, f"hands these inputs to {to.name}: {why}"


def select(x: AttentionInputs, name: str | None = None) -> Backend:
    """The backend that runs x: the one named, or the first in x's device's priority list that
    accepts it (asking only until one does: this runs for every layer of every forward). Raises
    ValueError naming the reason when none can run."""
    if name is not None:
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)} or None, got {name!r}")
        reason = BACKENDS[name].why_not(x)
        if reason:
            raise ValueError(f"backend={name!r} {reason}")
        handed = _handoff(BACKENDS[name], x)
        return BACKENDS[name] if handed is None else handed[0]
    order = _order(x)
    reasons = {}
    for n in order:
        reasons[n] = BACKENDS[n].why_not(x)
        if reasons[n] is None:
            handed = _handoff(BACKENDS[n], x)
            return BACKENDS[n] if handed is None else handed[0]
    detail = "; ".join(f"{n} {reasons[n]}" for n in order)
    raise ValueError(f"no prefix-attention backend supports these inputs: {detail}")


def choose(x: AttentionInputs, name: str | None = None) -> tuple[Backend, Choice]:
    """`select`, with the explanation: why every other backend refused (asks them all; a backend
    that hands these inputs to another says so)."""
    chosen = select(x, name).name
    order = _order(x) if name is None else list(_device_order(x.q.device.type))
    reasons = {}
    for n, b in BACKENDS.items():
        reasons[n] = b.why_not(x)
        if reasons[n] is None and (handed := _handoff(b, x)) is not None:
            reasons[n] = handed[1]
    refused = {n: reasons[n] or "can run, but comes later in the priority list" for n in order if n != chosen}
    refused.update({n: reasons[n] or "runs only when named" for n in BACKENDS if n not in order and n != chosen})
    return BACKENDS[chosen], Choice(chosen, refused, order)


def runnable(device: str = "cpu", dtype=None, head_dim: int = 64, needs_grad: bool = True) -> list[str]:
    """Names of the backends that accept a plain call (no mask, no dropout) on this device."""
    import torch

    dtype = dtype or torch.float32
    q = torch.zeros(1, 1, 1, head_dim, dtype=dtype, device=device, requires_grad=needs_grad)
    kv = torch.zeros(1, 1, 1, head_dim, dtype=dtype, device=device)
    pkv = torch.zeros(1, 1, head_dim, dtype=dtype, device=device)
    x = AttentionInputs(q, kv, kv, pkv, pkv, None, None, None, None, False, head_dim**-0.5, 0.0)
    return [n for n, b in BACKENDS.items() if b.why_not(x) is None]


class prefer:
    """Puts a backend first for its devices in the current context (this thread, or this asyncio
    task), e.g. to run a patched model's attention through Triton:
    ``with fastprompt.ops.prefer("triton"): model(...)``. Other threads keep their own order.
    Nested uses stack; leaving one restores the order it found. As a plain call
    (``p = prefer("triton")``) the change lasts until ``p.restore()``."""

    def __init__(self, name: str):
        if name not in BACKENDS:
            raise ValueError(f"name must be one of {sorted(BACKENDS)}, got {name!r}")
        self._saved = _CURRENT.get()
        order = dict(self._saved)
        for dev in BACKENDS[name].devices:
            current = order.get(dev, _DEFAULT_PRIORITY)
            order[dev] = (name,) + tuple(n for n in current if n != name)
        _CURRENT.set(MappingProxyType(order))

    def restore(self) -> None:
        """Puts back the order in force when this override was made (in this context)."""
        _CURRENT.set(self._saved)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()
