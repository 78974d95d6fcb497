"""The `cuda` backend: loading (or JIT-building) the csrc/ extension, a CUDA C++ forward kernel and
its torch binding, the call into it, and its declaration.

Forward only, for inference: training on GPU uses the aten (or Triton) backend. The extension is built
by setup.py when torch has CUDA (FASTPROMPT_BUILD_CUDA=1 pip install --no-build-isolation .) as
`fastprompt.kernels._cuda_ext`, beside this file, which imports it from there; or just in time with
ninja from csrc/ in a source checkout (`build`).
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import torch

from .declaration import Backend
from .inputs import AttentionInputs

CSRC = Path(__file__).resolve().parents[2] / "csrc"
EXTENSION = "fastprompt_cuda_ext"


def build(build_dir: str | None = None, with_cuda: bool | None = None, verbose: bool = False):
    """JIT-builds the extension from csrc/ with ninja; with_cuda=False builds only the binding
    (it then refuses every call), which is what a CPU-only torch can build."""
    from torch.utils.cpp_extension import load

    if with_cuda is None:
        with_cuda = torch.cuda.is_available() and shutil.which("nvcc") is not None
    sources = [str(CSRC / "prefix_attention_binding.cpp")]
    flags = ["-O2"]
    if with_cuda:
        sources.append(str(CSRC / "prefix_attention.cu"))
        flags.append("-DFASTPROMPT_WITH_CUDA")
    return load(
        name=EXTENSION + ("" if with_cuda else "_nocuda"), sources=sources, extra_include_paths=[str(CSRC)],
        extra_cflags=flags, extra_cuda_cflags=["-O3", "-DFASTPROMPT_WITH_CUDA"], build_directory=build_dir,
        with_cuda=with_cuda, verbose=verbose,
    )


@functools.cache
def _extension():
    try:
        from . import _cuda_ext  # built by setup.py beside this file (fastprompt.kernels._cuda_ext)

        return _cuda_ext
    except ImportError:
        pass
    if not (CSRC / "prefix_attention.cu").exists():
        return None
    try:
        return build()
    except Exception:  # no compiler or no CUDA toolkit: the backend reports itself unavailable
        return None


def available() -> bool:
    return torch.cuda.is_available() and _extension() is not None


def prefix_attention_cuda(x: AttentionInputs) -> torch.Tensor:
    """Normalised inputs -> (B, H, S, D), forward only (no autograd), no dropout."""
    if x.dropout_p:
        raise ValueError("the cuda backend does not support dropout; use backend='torch'")
    if x.needs_grad:
        raise ValueError("the cuda backend is forward-only (inference); use backend='aten' or 'triton' to train")
    mask = x.bool_mask()  # one strided bool mask; the kernel applies causal itself
    out, _ = _extension().forward(x.q, x.k, x.v, x.prefix_k, x.prefix_v, x.prompt_ids, mask, x.bias, bool(x.causal), float(x.scale))
    return out


BACKEND = Backend(
    name="cuda",
    devices=frozenset({"cuda"}),
    dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
    fn=prefix_attention_cuda,
    available=available,
    head_dims=(32, 128),
    gradients=False,
    dropout=False,
    notes="the csrc/ extension: forward only (inference), head dims 32..128, no dropout; chosen only by name",
)
