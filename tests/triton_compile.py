"""Subprocess helper for tests: lowers the Triton kernels for real GPU targets (no GPU needed).

argv: cases.json, a scratch folder. Prints one JSON line: the cases with "registers", "spill_stores",
"spill_loads", "stack" (ptxas -v) and "shared" (triton's metadata), or "error".
"""

import inspect
import json
import sys
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent))
from triton_harness import ptxas_report  # noqa: E402

from fastprompt.kernels import triton_prefix_attention as kern  # noqa: E402

FLOAT_PTRS = {"Q", "K", "V", "PK", "PV", "Out", "DO", "DQ", "DK", "DV", "Bias"}
FP32_PTRS = {"Lse", "Delta", "DPK", "DPV"}


def signature(fn, dtype, flags):
    sig, constexprs = {}, {}
    for name in inspect.signature(fn.fn).parameters:
        if name in flags:
            constexprs[name] = flags[name]
        elif name in ("HAS_BANK", "HAS_MASK", "HAS_BIAS", "CAUSAL", "FP32_IEEE", "BLOCK_M", "BLOCK_N", "BLOCK_D"):
            continue
        elif name in FLOAT_PTRS:
            sig[name] = "*" + dtype
        elif name in FP32_PTRS:
            sig[name] = "*fp32"
        elif name == "Ids":
            sig[name] = "*i64"
        elif name == "Mask":
            sig[name] = "*i8"
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig, constexprs


def main():
    cases = json.loads(Path(sys.argv[1]).read_text())
    tmp = Path(sys.argv[2])
    for c in cases:
        fn = getattr(kern, c["kernel"])
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[c["dtype"]]
        default = kern.default_config(dtype, c["head_dim"])
        config = {k: v for k, v in default.items() if k.startswith("BLOCK")}
        options = {"num_warps": default["num_warps"], "num_stages": default["num_stages"]}
        if c["kernel"] == "_bwd_dkdv":
            options["num_warps"] = default.get("num_warps_dkdv", default["num_warps"])
        if c["kernel"] == "_bwd_preprocess":
            config = {"BLOCK_M": kern.PRE_BLOCK_M}
            options = {"num_warps": 4}
        flags = dict(HAS_BANK=True, HAS_MASK=True, HAS_BIAS=False, CAUSAL=True, FP32_IEEE=c["dtype"] == "fp32",
                     BLOCK_D=kern._block_d(c["head_dim"]), **config)
        try:
            sig, constexprs = signature(fn, c["dtype"], flags)
            compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", c["cc"], 32), options=options)
            c.update(ptxas_report(compiled.asm["ptx"], c["cc"], tmp))
            c["shared"] = compiled.metadata.shared
        except Exception as e:  # reported per case, the test names it
            c["error"] = f"{type(e).__name__}: {e}"[:2000]
    print(json.dumps(cases))


if __name__ == "__main__":
    main()
