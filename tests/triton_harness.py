"""Running and compiling fastprompt's Triton kernels without a GPU.

`interpreted_kernels()` loads the kernel module with TRITON_INTERPRET=1 so its kernels run on CPU
tensors; `compiled_kernels()` loads it normally so `triton.compile` can lower them for real
GPU targets. Two known interpreter bugs are fixed here, in the harness only (the kernels are
untouched and tolerances are not loosened): bf16 `tl.dot` multiplies raw bit patterns
(triton issue #11584), and fp32 -> bf16 casts truncate where the GPU rounds to nearest even.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

KERNELS = Path(__file__).resolve().parents[1] / "fastprompt" / "kernels" / "triton_prefix_attention.py"


@contextlib.contextmanager
def _env(name, value):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _load(tag: str, interpret: bool):
    with _env("TRITON_INTERPRET", "1" if interpret else "0"):
        spec = importlib.util.spec_from_file_location(f"_fastprompt_triton_{tag}", KERNELS)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return mod


def _patch_interpreter():
    from triton.runtime import interpreter as it
    import triton.language as tl

    if getattr(it.InterpreterBuilder, "_fastprompt_patched", False):
        return
    original_dot = it.InterpreterBuilder.create_dot
    original_cast = it.InterpreterBuilder.cast_impl

    def as_f32(h):
        if h.dtype.scalar == tl.bfloat16:
            return it.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, as_f32(a), as_f32(b), d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return it.TensorHandle(rounded, tl.bfloat16)
        return original_cast(self, src, dst_type)

    it.InterpreterBuilder.create_dot = create_dot
    it.InterpreterBuilder.cast_impl = cast_impl
    # the builder binds these names in __init__ in some versions
    it.InterpreterBuilder.create_fp_trunc = lambda self, src, dst_type: self.cast_impl(src, dst_type)
    it.InterpreterBuilder._fastprompt_patched = True


_CACHE: dict[str, object] = {}


def interpreted_kernels():
    if "interp" not in _CACHE:
        _patch_interpreter()
        _CACHE["interp"] = _load("interp", True)
    return _CACHE["interp"]


def compiled_kernels():
    if "compiled" not in _CACHE:
        _CACHE["compiled"] = _load("compiled", False)
    return _CACHE["compiled"]


def cuobjdump() -> str | None:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else shutil.which("cuobjdump")


def resource_usage(cubin: bytes, tmp: Path) -> dict[str, int]:
    """{REG, STACK, SHARED, LOCAL, ...} of the one kernel in a cubin, from cuobjdump."""
    path = tmp / "kernel.cubin"
    path.write_bytes(cubin)
    text = subprocess.run([cuobjdump(), "--dump-resource-usage", str(path)], capture_output=True, text=True, check=True).stdout
    usage = {}
    for line in text.splitlines():
        if "REG:" in line:
            for item in line.replace("Resource usage:", "").split():
                if ":" in item:
                    key, _, value = item.partition(":")
                    if value.isdigit():
                        usage[key] = int(value)
    return usage
