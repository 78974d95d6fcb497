"""The `triton` backend's declaration, apart from its kernels (triton_prefix_attention.py) so that
asking the dispatcher what runs does not import Triton (a second of start-up)."""

from __future__ import annotations

import importlib.util

import torch

from .declaration import Backend
from .inputs import AttentionInputs


def _run(x: AttentionInputs) -> torch.Tensor:
    from .triton_prefix_attention import prefix_attention_triton

    return prefix_attention_triton(x)


BACKEND = Backend(
    name="triton",
    devices=frozenset({"cuda"}),
    dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}),
    fn=_run,
    available=lambda: importlib.util.find_spec("triton") is not None,
    head_dims=(16, 256),
    dropout=False,
    notes="fused Triton kernels, no dropout; not the CUDA default until a GPU measurement shows it faster",
)
