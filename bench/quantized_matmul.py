"""bitsandbytes linear layers on this CPU: int8 and nf4 forward/backward speed by activation dtype.

One 4096 -> 11008 layer (a 7B Llama MLP projection), 128 tokens, frozen quantised weight,
input gradient only (what prompt training needs). Picks the activation dtype bench/big_model.py
uses for each format. Median of 5, after a warm-up.

    python bench/quantized_matmul.py
"""

from __future__ import annotations

import logging
import sys
import warnings

import torch
from measure import median_seconds  # bench/ is on the path when run as a script


def main() -> int:
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    import bitsandbytes as bnb

    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    tokens, n_in, n_out = 128, 4096, 11008
    flops = 2 * tokens * n_in * n_out
    w = torch.randn(n_out, n_in) * 0.02
    print(f"bitsandbytes {bnb.__version__}, {tokens} x {n_in} @ {n_in} x {n_out}, 2 threads; GFLOP/s (forward / input gradient)")
    for fmt in ("int8", "nf4"):
        for dtype in (torch.float32, torch.bfloat16):
            if fmt == "int8":
                q = bnb.nn.Linear8bitLt(n_in, n_out, bias=False, has_fp16_weights=False, threshold=0.0, device="meta")
                q.weight = bnb.nn.Int8Params(w.half(), requires_grad=False, has_fp16_weights=False).to("cpu")
            else:
                q = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=dtype, quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(w.to(dtype), requires_grad=False, quant_type="nf4", compress_statistics=False, module=q).to("cpu")
                q.support_avx512bf16_for_cpu = False  # the training path (no inference repack)
            x = torch.randn(tokens, n_in, dtype=dtype, requires_grad=True)
            fwd = median_seconds(lambda: q(x))
            y = q(x)
            g = torch.ones_like(y)
            bwd = median_seconds(lambda: torch.autograd.grad(y, x, g, retain_graph=True))
            print(f"  {fmt:<5}{str(dtype)[6:]:<10}{flops / fwd / 1e9:8.1f} / {flops / bwd / 1e9:6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
