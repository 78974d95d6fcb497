"""Runs the kernel microbenchmarks (bench/test_kernels.py) and prints each backend's time and
saved-for-backward memory as ratios against SDPA on the concatenated keys, measured in one run.

    python bench/kernels_report.py            # writes bench/results/kernels_<device>.json
    python bench/kernels_report.py -k "S128"  # a subset (pytest -k expression)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def saved_bytes(impl, shape, dtype, causal) -> int:
    """Bytes autograd keeps for backward (by storage, the inputs themselves excluded)."""
    sys.path.insert(0, str(HERE))
    import measure
    import test_kernels as tk

    inputs = tk.make_inputs(shape, dtype)
    return measure.saved_bytes(lambda: tk.run(impl, inputs, causal), inputs)[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-k", default=None, help="pytest -k expression selecting cases")
    ap.add_argument("--max-time", default="0.5", help="pytest-benchmark --benchmark-max-time per case (s)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    raw = Path(tempfile.mkdtemp()) / "raw.json"
    cmd = [sys.executable, "-m", "pytest", str(HERE / "test_kernels.py"), "-q", "-p", "no:cacheprovider",
           f"--benchmark-json={raw}", f"--benchmark-max-time={args.max_time}", "--benchmark-min-rounds=5",
           "--benchmark-warmup=on", "--benchmark-disable-gc", "--benchmark-sort=name", "--benchmark-columns=median"]
    if args.k:
        cmd += ["-k", args.k]
    subprocess.run(cmd, check=True, cwd=HERE.parent)
    data = json.loads(raw.read_text())
    cases: dict[tuple, dict[str, float]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        key = (tuple(info["shape"]), info["dtype"], info["causal"], info["backward"])
        cases[key][info["impl"]] = bench["stats"]["median"]
    rows = []
    print(f"\nprefix attention on {device}, median times; ratio = backend / sdpa_concat (< 1 is faster)")
    print(f"{'B,H,Hkv,S,P,D':<22}{'dtype':<10}{'mask':<8}{'pass':<9}{'backend':<10}{'ms':>9}{'x sdpa':>9}{'saved MiB':>11}{'x sdpa':>9}")
    dtype_of = {"torch.float32": torch.float32, "torch.bfloat16": torch.bfloat16, "torch.float16": torch.float16}
    for key in sorted(cases):
        shape, dtype, causal, backward = key
        times = cases[key]
        base = times.get("sdpa_concat")
        mem = {}
        if backward:
            mem = {impl: saved_bytes(impl, shape, dtype_of[dtype], causal) for impl in times}
        for impl, t in sorted(times.items(), key=lambda kv: kv[0] != "sdpa_concat"):
            row = {"shape": list(shape), "dtype": dtype, "causal": causal, "backward": backward, "impl": impl,
                   "median_s": t, "time_ratio": t / base if base else None}
            line = (f"{','.join(map(str, shape)):<22}{dtype.removeprefix('torch.'):<10}{'causal' if causal else 'full':<8}"
                    f"{'fwd+bwd' if backward else 'fwd':<9}{impl:<10}{t * 1e3:>9.2f}{row['time_ratio']:>9.2f}")
            if mem:
                row["saved_bytes"] = mem[impl]
                row["saved_ratio"] = mem[impl] / mem["sdpa_concat"]
                line += f"{mem[impl] / 2**20:>11.1f}{row['saved_ratio']:>9.2f}"
            rows.append(row)
            print(line)
    out = Path(args.out or HERE / "results" / f"kernels_{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python bench/kernels_report.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "device": device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
