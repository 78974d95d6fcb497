"""Running and compiling fastprompt's Triton kernels without a GPU.

The interpreter must be chosen before triton is first imported (triton.language's own @jit
helpers are built then), so conftest.py sets TRITON_INTERPRET=1 on machines without a GPU and
the kernels run in-process on CPU tensors; lowering for real GPU targets happens in a
subprocess without it (`compile_report`). Two interpreter bugs are fixed here, in the harness
only (the kernels are untouched and tolerances are not loosened): bf16 `tl.dot` multiplies raw
bit patterns (triton issue #11584), and fp32 -> bf16 casts truncate where GPUs round to nearest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch


def _patch_interpreter():
    import triton.language as tl
    from triton.runtime import interpreter as it

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


def interpreted_kernels():
    """The kernel module, its kernels interpreted on CPU (TRITON_INTERPRET=1 set before triton loaded)."""
    import triton

    if not triton.knobs.runtime.interpret:
        raise RuntimeError("TRITON_INTERPRET=1 must be set before triton is imported (tests/conftest.py does it)")
    _patch_interpreter()
    from fastprompt.kernels import triton_prefix_attention

    return triton_prefix_attention


def compile_report(cases: list[dict], tmp: Path) -> list[dict]:
    """Compiles kernels for GPU targets in a fresh process without the interpreter; returns the
    cases with their resource usage (or the error) filled in."""
    spec = tmp / "cases.json"
    spec.write_text(json.dumps(cases))
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("triton_compile.py")), str(spec), str(tmp)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"compile subprocess failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ptxas_report(ptx: str, cc: int, tmp: Path) -> dict[str, int]:
    """Registers and spills of a kernel's PTX for sm_<cc>, from the ptxas triton itself uses (-v)."""
    import re

    from triton.backends.nvidia.compiler import get_ptxas

    target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    src, obj = tmp / "kernel.ptx", tmp / "kernel.o"
    src.write_text(ptx)
    proc = subprocess.run([get_ptxas(cc).path, "-v", "--gpu-name", target, str(src), "-o", str(obj)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    text = proc.stderr
    num = lambda pattern: int(m.group(1)) if (m := re.search(pattern, text)) else 0  # noqa: E731
    return {
        "registers": num(r"Used (\d+) registers"),
        "spill_stores": num(r"(\d+) bytes spill stores"),
        "spill_loads": num(r"(\d+) bytes spill loads"),
        "stack": num(r"(\d+) bytes stack frame"),
    }


def ptxas_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return Path(get_ptxas(80).path).exists()
    except Exception:
        return False
