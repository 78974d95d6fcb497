"""Lower-layer cache: with a frozen backbone and prompts from layer L on, the hidden states
entering layer L depend on the input alone. The first time an example is seen they are stored
(its real tokens only, in memory or in a memory-mapped file, in a chosen dtype); a batch whose
examples are all stored skips layers < L: they return their input untouched and a pre-hook on
layer L puts the stored states back, placed by the batch's own padding mask.
"""

from __future__ import annotations

import mmap
import os
import warnings
from pathlib import Path

import torch

from .back_references import weak_hook


class LowerLayerCache:
    """Hidden states (real tokens only) entering the first prompted layer, keyed by example id.

    dtype: storage dtype (bf16/fp16 halve the memory of fp32; fp32 keeps results bit-identical).
    path: a file to hold them memory-mapped (for sets larger than memory); None keeps them in memory.
    """

    def __init__(self, hidden: int, dtype: torch.dtype = torch.bfloat16, path: str | os.PathLike | None = None):
        self.hidden, self.dtype = hidden, dtype
        self.index: dict[int, tuple[int, int]] = {}  # id -> (offset in elements, tokens) in the file
        self.memory: dict[int, torch.Tensor] = {}
        self.path = Path(path) if path is not None else None
        self._file = self._map = None
        self._elem = torch.empty(0, dtype=dtype).element_size()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "w+b")
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self.index) if self.path is not None else len(self.memory)

    @property
    def nbytes(self) -> int:
        if self.path is not None:
            return sum(n for _, n in self.index.values()) * self.hidden * self._elem
        return sum(t.numel() * t.element_size() for t in self.memory.values())

    def has_all(self, ids: torch.Tensor) -> bool:
        store = self.index if self.path is not None else self.memory
        return all(int(i) in store for i in ids.tolist())

    def put(self, ids: torch.Tensor, hidden: torch.Tensor, real: torch.Tensor) -> None:
        """ids (B,), hidden (B, T, H), real (B, T) bool: stores each example's real-token rows."""
        hs = hidden.detach().to(device="cpu", dtype=self.dtype)
        real = real.cpu()
        self._write({i: hs[b][real[b]].contiguous() for b, i in enumerate(ids.tolist())})
        self.misses += len(ids)

    def _write(self, rows_by_id: dict[int, torch.Tensor]) -> None:
        """Stores (n_i, H) rows per example id, in memory or appended to the file."""
        if self.path is None:
            self.memory.update(rows_by_id)
            return
        for i, rows in rows_by_id.items():
            self._file.seek(0, os.SEEK_END)
            offset = self._file.tell() // self._elem
            self._file.write(rows.view(torch.uint8).numpy().tobytes() if rows.numel() else b"")
            self.index[i] = (offset, rows.shape[0])
        self._file.flush()
        self._map = None  # the file grew: map it again on the next read

    def _read(self, i: int) -> torch.Tensor:
        """Example i's (n, H) rows from the file (a view of the read-only map)."""
        if self._map is None:
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        offset, n = self.index[i]
        with warnings.catch_warnings():  # a read-only map: the rows are only read (and copied by the caller)
            warnings.simplefilter("ignore", UserWarning)
            rows = torch.frombuffer(self._map, dtype=self.dtype, count=n * self.hidden, offset=offset * self._elem)
        return rows.view(n, self.hidden)

    def get(self, ids: torch.Tensor, real: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The stored states for ids, placed at real (B, T) positions; (B, T, H) like `like`."""
        out = torch.zeros(*real.shape, self.hidden, dtype=like.dtype, device=like.device)
        for b, i in enumerate(ids.tolist()):
            rows = self.memory[i] if self.path is None else self._read(i)
            out[b][real[b].to(out.device)] = rows.to(device=out.device, dtype=out.dtype)
        self.hits += len(ids)
        return out

    def adopt(self, other: "LowerLayerCache") -> None:
        """Takes every example `other` stored (another configuration's cache over the same frozen
        lower layers, e.g. in a sweep): in memory the tensors are shared, not copied; into a file
        they are written. Hits and misses are not counted. Raises ValueError for another hidden
        size or dtype, or an `other` whose file is closed."""
        if not isinstance(other, LowerLayerCache) or (other.hidden, other.dtype) != (self.hidden, self.dtype):
            got = f"hidden {other.hidden}, {other.dtype}" if isinstance(other, LowerLayerCache) else type(other).__name__
            raise ValueError(f"other must be a LowerLayerCache of hidden {self.hidden}, {self.dtype}, got {got}")
        if other.path is not None and other._file is None:
            raise ValueError(f"other's file {other.path} is closed (its model was unpatched): adopt before unpatching it")
        ids = list(other.index if other.path is not None else other.memory)
        if not ids:
            return
        if other.path is None and self.path is None:
            self.memory.update(other.memory)
            return
        for i in ids:
            rows = other.memory[i] if other.path is None else other._read(i)
            self._write({i: rows})

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._file is not None:
            self._file.close()
            self._file = None


def install_lower_cache(runtime, stack, start: int, cache: LowerLayerCache) -> None:
    """Hooks the cache into a patched stack whose first prompted layer is `start` (> 0)."""
    from .insertion import real_tokens

    def decide(runtime, module, args, kwargs):
        ids = runtime.forward.example_ids
        runtime.forward.skip_lower = ids is not None and cache.has_all(ids)
        return None

    def at_start(runtime, module, args, kwargs):
        ids = runtime.forward.example_ids
        if ids is None:
            return None
        hs = args[0] if args else kwargs["hidden_states"]
        real = real_tokens(runtime.forward.mask2d, hs)  # the padding mask patching captures for the stack
        if runtime.forward.skip_lower:
            hs = cache.get(ids, real, hs)
            if args:
                return (hs, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hs}
        cache.put(ids, hs, real)
        return None

    runtime.undo.hook(stack.owner.register_forward_pre_hook(weak_hook(runtime, decide), with_kwargs=True))
    # before any other pre-hook of that layer (Late Prompt insertion reads the restored states)
    runtime.undo.hook(stack.layers[start].register_forward_pre_hook(weak_hook(runtime, at_start), with_kwargs=True, prepend=True))
