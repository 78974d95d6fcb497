"""The `triton` backend's declaration, apart from its kernels (triton_prefix_attention.py) so that
asking the dispatcher what runs does not import Triton (a second of start-up)."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from .declaration import Backend
from .inputs import AttentionInputs


def _run(x: AttentionInputs) -> torch.Tensor:
    from .triton_prefix_attention import prefix_attention_triton

    return prefix_attention_triton(x)


@functools.cache
def _installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _refuses(x: AttentionInputs) -> str | None:
    if x.q.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "runs on CPU tensors only under TRITON_INTERPRET=1 (Triton's interpreter, for debugging)"
        if x.q.dtype == torch.bfloat16:
            return "does not run bf16 under Triton's interpreter (its bf16 tl.dot is wrong, triton issue #11584)"
    return None


BACKEND = Backend(
    name="triton",
    devices=frozenset({"cuda", "cpu"}),
    dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}),
    fn=_run,
    available=_installed,
    head_dims=(16, 256),
    dropout=False,
    refuses=_refuses,
    notes=(
        "fused Triton kernels, no dropout; not the CUDA default until a GPU measurement shows it faster; decode "
        "(S=1) on a GPU is handed to the aten backend; CPU tensors only under TRITON_INTERPRET=1 (fp32/fp16: the "
        "interpreter's bf16 dot is wrong)"
    ),
)
