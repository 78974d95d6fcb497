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
        for b, i in enumerate(ids.tolist()):
            rows = hs[b][real[b]].contiguous()
            if self.path is None:
                self.memory[i] = rows
                continue
            self._file.seek(0, os.SEEK_END)
            offset = self._file.tell() // self._elem
            self._file.write(rows.view(torch.uint8).numpy().tobytes() if rows.numel() else b"")
            self.index[i] = (offset, rows.shape[0])
        if self.path is not None:
            self._file.flush()
            self._map = None  # the file grew: map it again on the next read
        self.misses += len(ids)

    def get(self, ids: torch.Tensor, real: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The stored states for ids, placed at real (B, T) positions; (B, T, H) like `like`."""
        out = torch.zeros(*real.shape, self.hidden, dtype=like.dtype, device=like.device)
        if self.path is not None and self._map is None:
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        for b, i in enumerate(ids.tolist()):
            if self.path is None:
                rows = self.memory[i]
            else:
                offset, n = self.index[i]
                with warnings.catch_warnings():  # a read-only map: the rows are only read (and copied below)
                    warnings.simplefilter("ignore", UserWarning)
                    rows = torch.frombuffer(self._map, dtype=self.dtype, count=n * self.hidden, offset=offset * self._elem)
                rows = rows.view(n, self.hidden)
            out[b][real[b].to(out.device)] = rows.to(device=out.device, dtype=out.dtype)
        self.hits += len(ids)
        return out

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
