"""The `cuda` backend: the csrc/ extension (a CUDA C++ forward kernel and its torch binding).

Forward only, for inference: training on GPU uses the Triton backend. The extension is built
by setup.py when torch has CUDA (FASTPROMPT_BUILD_CUDA=1 pip install --no-build-isolation .),
or just in time with ninja from csrc/ in a source checkout.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import torch

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
        from fastprompt import _cuda_ext  # built by setup.py

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


def prefix_attention_cuda(q, k, v, prefix_k, prefix_v, prompt_ids, mask, causal, scale, bias, dropout_p):
    """Same contract as `prefix_attention_torch`, forward only (no autograd), no dropout."""
    if dropout_p:
        raise ValueError("the cuda backend does not support dropout; use backend='torch'")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, prefix_k, prefix_v)):
        raise ValueError("the cuda backend is forward-only (inference); use backend='triton' to train")
    if mask is not None and mask.dtype != torch.bool:
        bias = mask if bias is None else bias + mask
        mask = None
    if mask is not None:
        causal = False
    out, _ = _extension().forward(q, k, v, prefix_k, prefix_v, prompt_ids, mask, bias, bool(causal), float(scale))
    return out
