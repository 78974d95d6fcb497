"""Which prefix-attention backend runs: a priority list per device over the backends' own declarations.

Each backend declares what it supports in its kernels file (`fastprompt.kernels.*.BACKEND`); the
first backend in the device's list that accepts the inputs runs. `explain` says which one that
is and why each earlier one refused.

Why this order: on CUDA the `aten` backend (PyTorch's FlashAttention-2 / memory-efficient kernels
plus the LSE-merged prefix) is the default until a GPU measurement shows the Triton kernels win
for some shapes (none has been taken yet: bench/gpu_check.py records it when run on a GPU);
`triton` and the forward-only `cuda` extension run when named. On CPU the fused `cpu` backend;
`torch` (plain autograd) everywhere else and for what the fused ones refuse (attention dropout,
float64).
"""

from __future__ import annotations

from dataclasses import dataclass

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
# only when named (the forward-only `cuda` extension; `triton` until measured faster)
PRIORITY: dict[str, list[str]] = {
    "cuda": ["aten", "torch"],
    "cpu": ["cpu", "torch"],
}
DEFAULT_PRIORITY = ["torch"]

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
    order = PRIORITY.get(x.q.device.type, DEFAULT_PRIORITY)
    if "triton" not in order[:1] and _measured_faster(x):
        order = ["triton"] + [n for n in order if n != "triton"]  # measured faster for these inputs
    return order


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
        return BACKENDS[name]
    order = _order(x)
    reasons = {}
    for n in order:
        reasons[n] = BACKENDS[n].why_not(x)
        if reasons[n] is None:
            return BACKENDS[n]
    detail = "; ".join(f"{n} {reasons[n]}" for n in order)
    raise ValueError(f"no prefix-attention backend supports these inputs: {detail}")


def choose(x: AttentionInputs, name: str | None = None) -> tuple[Backend, Choice]:
    """`select`, with the explanation: why every other backend refused (asks them all)."""
    chosen = select(x, name).name
    order = _order(x) if name is None else PRIORITY.get(x.q.device.type, DEFAULT_PRIORITY)
    reasons = {n: b.why_not(x) for n, b in BACKENDS.items()}
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
    """Context manager (or plain call) putting a backend first for its devices, e.g. to run a
    patched model's attention through Triton: ``with fastprompt.ops.prefer("triton"): model(...)``.
    As a plain call (``prefer("triton")``) the change lasts until ``.restore()``."""

    def __init__(self, name: str):
        if name not in BACKENDS:
            raise ValueError(f"name must be one of {sorted(BACKENDS)}, got {name!r}")
        self._saved = {dev: list(order) for dev, order in PRIORITY.items()}
        for dev in BACKENDS[name].devices:
            order = PRIORITY.setdefault(dev, list(DEFAULT_PRIORITY))
            PRIORITY[dev] = [name] + [n for n in order if n != name]

    def restore(self) -> None:
        PRIORITY.clear()
        PRIORITY.update(self._saved)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()
