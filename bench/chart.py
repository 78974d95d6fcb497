"""Draws the end-to-end benchmark as a PNG: step time, saved activations and peak memory per
configuration, each relative to PEFT prefix tuning measured in the same run.

    python bench/chart.py                                   # bench/results/e2e_llama_cpu.json
    python bench/chart.py bench/results/e2e_minilm_cpu.json --out chart.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def draw(results_path: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    data = json.loads(results_path.read_text())
    meta, results = data["meta"], data["results"]
    names = [n for n in results if not n.startswith("int8")]
    metrics = [("step_ratio", "step time"), ("saved_ratio", "activations saved for backward"), ("peak_ratio", "peak memory")]
    metrics = [m for m in metrics if all(m[0] in results[n] for n in names)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 0.45 * len(names) + 1.8), sharey=True)
    axes = [axes] if len(metrics) == 1 else axes
    for ax, (key, title) in zip(axes, metrics):
        values = [results[n][key] for n in names]
        colors = ["#9a9a9a" if n.startswith("peft") else "#2b6cb0" for n in names]
        bars = ax.barh(names, values, color=colors)
        ax.axvline(1.0, color="#444444", linewidth=1, linestyle="--")
        ax.set_title(f"{title}\n(x PEFT prefix tuning, lower is better)", fontsize=10)
        ax.bar_label(bars, labels=[f"{v:.2f}x" for v in values], padding=3, fontsize=8)
        ax.set_xlim(0, max(values) * 1.25)
        ax.invert_yaxis()
    fig.suptitle(f"{meta['model']}: batch {meta['batch']}, sequence {meta['seq']}, P={meta['num_tokens']}, "
                 f"{meta['device']}, {meta['threads']} threads ({meta['command'].strip()})", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="?", default=str(HERE / "results" / "e2e_llama_cpu.json"))
    ap.add_argument("--out", default=None, help="PNG path (default: next to the results, .png)")
    args = ap.parse_args(argv)
    src = Path(args.results)
    if not src.is_file():
        print(f"chart: error: {src} not found; run bench/e2e_vs_peft.py first", file=sys.stderr)
        return 2
    print(f"wrote {draw(src, Path(args.out) if args.out else src.with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
