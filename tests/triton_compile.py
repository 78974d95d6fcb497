"""Subprocess helper for tests: lowers the Triton kernels for real GPU targets (no GPU needed),
specialised exactly as triton's JIT specialises a real launch.

The Python launchers run on CPU tensors with the kernels replaced by recorders; each recorded
launch's arguments go through triton's own specialisation (`native_specialize_impl`: i32/i64 by
value, divisibility by 16 for pointers and ints, ints equal to 1 as constants), and the kernel is
compiled with that signature and those attributes, as `kernel[grid](...)` would on a GPU.

argv: cases.json, a scratch folder. Prints one JSON line: the cases with "registers", "spill_stores",
"spill_loads", "stack" (ptxas -v), "shared" (triton's metadata), "cp_async" and "divisible_args", or "error".
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


class _Recorder:
    """Stands in for a @triton.jit kernel: `rec[grid](*args, **kwargs)` records the launch."""

    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.fn, args, kwargs))


def recorded_launches(dtype, head_dim, config=None):
    """{kernel name: (fn, args, kwargs)} of one real forward + backward launched by the Python
    launchers (with a bank, a padding mask with its key range, and causal) on CPU tensors of a realistic shape in
    transformers' layout; the kernels themselves are replaced by recorders."""
    calls = []
    names = ("_fwd_kernel", "_bwd_preprocess", "_bwd_dq", "_bwd_dkdv")
    saved = {n: getattr(kern, n) for n in names}
    for n in names:
        setattr(kern, n, _Recorder(saved[n], calls))
    try:
        b, h, hkv, s, p = 2, 8, 2, 256, 32

        def bshd(n_heads):
            return torch.randn(b, s, n_heads, head_dim).to(dtype).transpose(1, 2)

        q, k, v = bshd(h), bshd(hkv), bshd(hkv)
        pk, pv = torch.randn(3, hkv, p, head_dim).to(dtype), torch.randn(3, hkv, p, head_dim).to(dtype)
        ids = torch.tensor([2, 0])
        mask = torch.ones(b, 1, 1, s, dtype=torch.bool)
        mask[1, ..., :17] = False
        out = torch.empty(b, s, h, head_dim, dtype=dtype).transpose(1, 2)
        lse = torch.empty(b, h, s, dtype=torch.float32)
        krange = kern.key_range(mask[:, 0, 0])  # padded blocks skipped, as the public op launches it
        kern.prefix_attention_forward(q, k, v, pk, pv, ids, mask, None, True, config=config, krange=krange)
        kern.prefix_attention_backward(torch.randn_like(q), q, k, v, pk, pv, out, lse, ids, mask, None, True, config=config, krange=krange)
    finally:
        for n in names:
            setattr(kern, n, saved[n])
    return {fn.fn.__name__: (fn, args, kwargs) for fn, args, kwargs in calls}


def jit_specialisation(fn, args, kwargs):
    """(signature, constexprs, attrs, options) as triton's JIT builds them for this launch:
    pointer and int arguments divisible by 16 get tt.divisibility=16, ints equal to 1 become
    constants, i32 or i64 by value (triton's own native_specialize_impl decides)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    params = list(inspect.signature(fn.fn).parameters.values())
    bound = dict(zip([p.name for p in params], args))
    options = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")}
    bound.update({k: v for k, v in kwargs.items() if k not in options})
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(params):
        value = bound[p.name] if p.name in bound else p.default
        if "constexpr" in str(p.annotation):
            signature[p.name] = "constexpr"
            constexprs[p.name] = value
            continue
        ty, key = native_specialize_impl(BaseBackend, value, False, True, True)
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[p.name] = key
        elif isinstance(key, str):
            attrs[(i,)] = BaseBackend.parse_attr(key)
    return signature, constexprs, attrs, options


def main():
    cases = json.loads(Path(sys.argv[1]).read_text())
    tmp = Path(sys.argv[2])
    launches = {}
    for c in cases:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[c["dtype"]]
        key = (c["dtype"], c["head_dim"], json.dumps(c.get("config")))
        try:
            if key not in launches:
                launches[key] = recorded_launches(dtype, c["head_dim"], c.get("config"))
            fn, args, kwargs = launches[key][c["kernel"]]
            sig, constexprs, attrs, options = jit_specialisation(fn, args, kwargs)
            c["divisible_args"] = sorted(fn.arg_names[i[0]] for i, a in attrs.items() if a)
            compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                                      target=GPUTarget("cuda", c["cc"], 32), options=options)
            c.update(ptxas_report(compiled.asm["ptx"], c["cc"], tmp))
            c["shared"] = compiled.metadata.shared
            c["cp_async"] = "cp.async" in compiled.asm["ptx"]
        except Exception as e:  # reported per case, the test names it
            c["error"] = f"{type(e).__name__}: {e}"[:2000]
    print(json.dumps(cases))


if __name__ == "__main__":
    main()
