"""Launch configurations for the Triton kernels: candidates per dtype and head dim, and a tuner that
measures them on the GPU once per (GPU, dtype, D, S bucket, causal, training) key.

Every candidate compiles for sm_80 and sm_90 without register spills at the JIT's real
specialisation (tests/test_kernels_triton.py compiles each one). On CUDA, the first call with a
new key times every candidate (triton.testing.do_bench on the call's own tensors, forward or
forward+backward) and keeps the fastest; later calls reuse it. Under the interpreter, or with
FASTPROMPT_TRITON_AUTOTUNE=0, the first candidate (the default) runs. This file imports no Triton.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

# (BLOCK_M, BLOCK_N, num_warps, num_stages[, num_warps_dkdv]); the first of each list is the default
# (larger tiles, e.g. 128x32 or 64x64, spill in the dK/dV kernel on sm_80: it holds a key block's
# dK, dV, K and V for all G query heads; the tutorial's backward shape would lift that)
_LOW_D64 = [(64, 32, 8, 3), (32, 32, 4, 3)]
_LOW_D128 = [(32, 32, 8, 2), (64, 16, 8, 2), (32, 16, 4, 2), (16, 32, 4, 2)]
_FP32 = [(16, 16, 4, 2, 8), (16, 32, 4, 2, 8), (16, 32, 8, 2, 8)]


def candidates(dtype: torch.dtype, head_dim: int) -> list[dict]:
    """The configs tried for this dtype and head dim, the default first."""
    rows = _FP32 if dtype == torch.float32 else _LOW_D128 if head_dim > 64 else _LOW_D64
    out = []
    for r in rows:
        c = {"BLOCK_M": r[0], "BLOCK_N": r[1], "num_warps": r[2], "num_stages": r[3]}
        if len(r) > 4:
            c["num_warps_dkdv"] = r[4]
        out.append(c)
    return out


def s_bucket(s: int) -> int:
    """Sequence lengths tuned together: powers of two from 128 to 8192."""
    return min(8192, max(128, 1 << max(0, (s - 1).bit_length())))


_TUNED: dict[tuple, dict] = {}


def tuned(key: tuple, dtype: torch.dtype, head_dim: int, run: Callable[[dict], None], on_gpu: bool) -> dict:
    """The config for key: measured over the candidates by timing run(config) on a GPU (once per
    key), else the default. A candidate that fails to launch (too much shared memory on a smaller
    GPU) is skipped."""
    options = candidates(dtype, head_dim)
    if not on_gpu or os.environ.get("FASTPROMPT_TRITON_AUTOTUNE", "1") == "0" or len(options) == 1:
        return options[0]
    if key not in _TUNED:
        from triton.testing import do_bench

        best, best_t = options[0], float("inf")
        for config in options:
            try:
                t = do_bench(lambda: run(config), warmup=5, rep=20)
            except Exception:  # out of resources for this GPU: not a candidate here
                continue
            if t < best_t:
                best, best_t = config, t
        _TUNED[key] = best
    return _TUNED[key]
