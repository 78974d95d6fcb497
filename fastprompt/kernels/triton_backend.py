"""The `triton` backend's declaration: what it refuses, the decode calls it hands to `aten`, and the
call into its kernels. Apart from the kernels (triton_prefix_attention.py) so that asking the
dispatcher what runs does not import Triton (a second of start-up)."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from .declaration import Backend, Handoff
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


def _interpreting() -> bool:
    """Triton's own reading of TRITON_INTERPRET (imports Triton: asked only of CUDA decode calls)."""
    import triton

    return bool(triton.knobs.runtime.interpret)


def _decode_on_gpu(x: AttentionInputs) -> str | None:
    if x.q.shape[2] == 1 and x.q.device.type == "cuda" and not _interpreting():
        return (
            "decode (S=1) leaves these kernels one program per (batch, head) with a single query row; "
            "FlashAttention's split-KV decode in the aten backend serves it"
        )
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
    hands_off=Handoff(to="aten", when=_decode_on_gpu),
    notes=(
        "fused Triton kernels, no dropout; not the CUDA default until a GPU measurement shows it faster; decode "
        "(S=1) on a GPU is handed to the aten backend; CPU tensors only under TRITON_INTERPRET=1 (fp32/fp16: the "
        "interpreter's bf16 dot is wrong)"
    ),
)
