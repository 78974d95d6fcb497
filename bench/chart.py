"""Draws a benchmark result as a PNG, PEFT prefix tuning as the baseline.

An e2e result (bench/e2e_vs_peft.py): step time, saved activations and peak memory per
configuration, each relative to PEFT measured in the same run. An accuracy-parity result
(bench/accuracy_parity.py): per task, the metric, training speed x PEFT and peak memory. A
generation result (bench/generation_parity.py): BLEU, ROUGE-L, step time and peak memory per row.

    python bench/chart.py                                   # bench/results/e2e_llama_cpu.json
    python bench/chart.py bench/results/e2e_minilm_cpu.json --out chart.png
    python bench/chart.py bench/results/accuracy_parity_sst2.json
    python bench/chart.py bench/results/generation_parity.json
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
    if all("metric" in r for r in results.values()):
        return _draw_accuracy(plt, meta, results, out)
    if any("bleu" in r for r in results.values()):
        return _draw_generation(plt, data, out)
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


def _draw_accuracy(plt, meta, results, out: Path) -> Path:
    """results: {"task/configuration": {metric, speed_vs_peft, peak_mib}} -> one row of panels per task."""
    tasks = sorted({k.split("/", 1)[0] for k in results})
    metric_name = {"sst2": "dev accuracy", "conll": "valid entity F1", "mrpc": "dev accuracy", "squad": "eval F1"}
    panels = [("metric", "{metric}\n(higher is better)", "{:.4f}"),
              ("speed_vs_peft", "training speed (x PEFT prefix tuning,\nhigher is better)", "{:.2f}x"),
              ("peak_mib", "peak RSS MiB\n(lower is better)", "{:.0f}")]
    names = sorted({k.split("/", 1)[1] for k in results}, key=lambda n: (not n.startswith("peft"), n))
    fig, axes = plt.subplots(len(tasks), 3, figsize=(15, (0.45 * len(names) + 1.6) * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        present = [n for n in names if f"{task}/{n}" in results]
        for ax, (key, title, fmt) in zip(row, panels):
            raw = [results[f"{task}/{n}"].get(key) for n in present]  # None: no PEFT row to compare with
            values = [0 if v is None else v for v in raw]
            colors = ["#9a9a9a" if n.startswith("peft") else "#2b6cb0" for n in present]
            bars = ax.barh(present, values, color=colors)
            base = results.get(f"{task}/peft prefix", {}).get(key)
            if base is not None:
                ax.axvline(base, color="#444444", linewidth=1, linestyle="--")
            ax.bar_label(bars, labels=["-" if v is None else fmt.format(v) for v in raw], padding=3, fontsize=8)
            lo = min(values) * 0.9 if key == "metric" else 0
            ax.set_xlim(lo, max(max(values) * (1.02 if key == "metric" else 1.25), 1e-9))
            ax.set_title(f"{task}: " + title.format(metric=metric_name.get(task, "metric")), fontsize=10)
            ax.invert_yaxis()
    fig.suptitle(f"MiniLM, one fixed budget per task, PEFT prefix tuning dashed (bench/accuracy_parity.py, {meta['date'][:10]})", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _draw_generation(plt, data, out: Path) -> Path:
    """A generation-parity result (bench/generation_parity.py): BLEU, ROUGE-L, step time (from its
    quiet `timing` pass when every row has one) and peak RSS per row."""
    meta, results = data["meta"], data["results"]
    names = [n for n, r in results.items() if "bleu" in r]
    timing = data.get("timing", {})
    alone = all("step_s" in timing.get(n, {}) for n in names)  # the quiet step-time pass, when taken
    panels = [("bleu", "BLEU (higher is better)", "{:.1f}"), ("rougeL", "ROUGE-L (higher is better)", "{:.1f}"),
              ("step_s", "step s" + (", alone" if alone else "") + " (lower is better)", "{:.2f}"),
              ("peak_mib", "peak RSS MiB (lower is better)", "{:.0f}")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 0.45 * len(names) + 1.8), sharey=True)
    for ax, (key, title, fmt) in zip(axes, panels):
        values = [(timing[n] if key == "step_s" and alone else results[n])[key] for n in names]
        colors = ["#9a9a9a" if n.startswith("peft") else "#2b6cb0" for n in names]
        bars = ax.barh(names, values, color=colors)
        ax.bar_label(bars, labels=[fmt.format(v) for v in values], padding=3, fontsize=8)
        ax.set_xlim(0, max(max(values), 1e-9) * 1.25)
        ax.set_title(title, fontsize=10)
        ax.invert_yaxis()
    settings, first = meta.get("settings", {}), results[names[0]]
    fig.suptitle(f"{meta['model']}, {meta['data']}: {first.get('steps', settings.get('steps'))} steps of "
                 f"{first.get('batch_size', settings.get('batch_size'))}, P={settings.get('num_tokens')}, greedy ({meta['date'][:10]})",
                 fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="*", default=[str(HERE / "results" / "e2e_llama_cpu.json")],
                    help="result JSON files; several accuracy results (one per task) are drawn together")
    ap.add_argument("--out", default=None, help="PNG path (default: next to the (first) results, .png)")
    args = ap.parse_args(argv)
    srcs = [Path(r) for r in args.results]
    for src in srcs:
        if not src.is_file():
            print(f"chart: error: {src} not found; run the benchmark first", file=sys.stderr)
            return 2
    src = srcs[0]
    if len(srcs) > 1:  # one chart of several runs: their results side by side
        import tempfile

        merged = {"meta": dict(json.loads(srcs[0].read_text())["meta"]), "results": {}}
        merged["meta"]["command"] = " ; ".join(json.loads(p.read_text())["meta"]["command"] for p in srcs)
        for p in srcs:
            merged["results"].update(json.loads(p.read_text())["results"])
        src = Path(tempfile.mkdtemp()) / "merged.json"
        src.write_text(json.dumps(merged))
    out = Path(args.out) if args.out else srcs[0].with_suffix(".png")
    print(f"wrote {draw(src, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
