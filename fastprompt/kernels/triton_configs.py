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

# (BLOCK_M, BLOCK_N, num_warps, num_stages) for the forward and dQ kernels, then (num_warps,
# BLOCK_N_KV, BLOCK_M_KV) for dK/dV: the tutorial's large fixed key block and small streamed query
# block. The first of each list is the default. Left out because they spill on sm_80 (checked with
# tests/triton_compile.py): forward/dQ tiles 128x32 and 64x64 at D=64, dK/dV key blocks of 128 with
# 32 query rows at D=64 and of 128 at D=128, 64-key blocks in fp32.
_LOW_D64 = [(64, 32, 8, 3, 8, 128, 16), (64, 32, 8, 3, 4, 64, 16), (32, 32, 4, 3, 8, 128, 16)]
_LOW_D128 = [(32, 32, 8, 2, 8, 64, 16), (32, 32, 8, 2, 8, 64, 32), (64, 16, 8, 2, 8, 64, 16), (32, 16, 4, 2, 8, 64, 16)]
_FP32 = [(16, 16, 4, 2, 8, 32, 16), (16, 32, 4, 2, 4, 32, 16), (16, 32, 8, 2, 8, 32, 16)]


def candidates(dtype: torch.dtype, head_dim: int) -> list[dict]:
    """The configs tried for this dtype and head dim, the default first."""
    rows = _FP32 if dtype == torch.float32 else _LOW_D128 if head_dim > 64 else _LOW_D64
    return [
        {"BLOCK_M": r[0], "BLOCK_N": r[1], "num_warps": r[2], "num_stages": r[3], "num_warps_dkdv": r[4],
         "BLOCK_N_KV": r[5], "BLOCK_M_KV": r[6]}
        for r in rows
    ]


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
