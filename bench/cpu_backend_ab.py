"""Interleaved A/B of the CPU backend against an earlier revision's and SDPA on the concatenated keys.

    python bench/cpu_backend_ab.py                      # against 584b9a9 (before the shared LSE merge)
    python bench/cpu_backend_ab.py --baseline REV --shapes 8,12,12,128,32,64

The baseline is `fastprompt/kernels/cpu_prefix_attention.py` at REV, loaded from git (its
positional signature of that time). Each round runs SDPA, the baseline and the current backend
back to back, so the machine's drift hits all three alike; medians over the rounds, ratios
against SDPA. Writes bench/results/cpu_backend_ab.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def _baseline(rev: str):
    src = subprocess.run(["git", "show", f"{rev}:fastprompt/kernels/cpu_prefix_attention.py"], cwd=HERE.parent,
                         capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "baseline_cpu.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("baseline_cpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return lambda q, k, v, pk, pv, c: mod.prefix_attention_cpu(q, k, v, pk, pv, None, None, c, q.shape[-1] ** -0.5, None, 0.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="584b9a9")
    ap.add_argument("--shapes", default="8,12,12,128,32,64;8,8,2,256,32,64", help="B,H,Hkv,S,P,D separated by ;")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--out", default=str(HERE / "results" / "cpu_backend_ab.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    sys.path.insert(0, str(HERE))
    import test_kernels as tk  # the kernel benchmarks' inputs and their SDPA-on-concatenation peer

    from fastprompt.ops import prefix_attention

    impls = {"sdpa_concat": lambda q, k, v, pk, pv, c: tk.run("sdpa_concat", (q, k, v, pk, pv), c), f"cpu@{args.baseline}": _baseline(args.baseline),
             "cpu": lambda q, k, v, pk, pv, c: prefix_attention(q, k, v, pk, pv, causal=c, backend="cpu")}
    rows = []
    for shape in [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")]:
        for dtype in (torch.float32, torch.bfloat16):
            for causal in (False, True):
                x = tk.make_inputs(shape, dtype)
                dout = torch.randn_like(x[0])
                for mode in ("fwd", "fwd+bwd"):
                    times = {n: [] for n in impls}
                    for _ in range(args.rounds):
                        for n, f in impls.items():
                            t = time.perf_counter()
                            if mode == "fwd":
                                with torch.no_grad():
                                    f(*x, causal)
                            else:
                                torch.autograd.grad(f(*x, causal), x, dout)
                            times[n].append(time.perf_counter() - t)
                    med = {n: statistics.median(v[2:]) for n, v in times.items()}
                    row = dict(shape=shape, dtype=str(dtype)[6:], causal=causal, mode=mode,
                               **{f"{n}_ms": med[n] * 1e3 for n in med}, **{f"{n}_x_sdpa": med[n] / med["sdpa_concat"] for n in med})
                    rows.append(row)
                    print(f"{','.join(map(str, shape)):<20} {row['dtype']:<9} {'causal' if causal else 'full':<7} {mode:<8} "
                          + "  ".join(f"{n} x{row[f'{n}_x_sdpa']:.2f}" for n in impls if n != "sdpa_concat"), flush=True)
    meta = {"command": "python bench/cpu_backend_ab.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rounds": args.rounds}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
