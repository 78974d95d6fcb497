"""Multi-task prompt training on real data (MiniLM): each dataset's metric after one multi-task run
against its own single-task run at the same total steps, and a single-task CoNLL run started from
the multi-task prompt (`--init-from`) against one from scratch.

Datasets: CoNLL-2003 (token tagging), MRPC (pairs) and SST-2 (sentences) from ../shared/data.
Every row is one `fastprompt train` command in its own process, as a user runs it, with
`--steps STEPS --batch-size 16 --max-length 64` and the trainer's defaults otherwise (ptv2, P=16,
lr 2e-2, seed 0); the eval files are the first --eval-rows rows (sentences for CoNLL) of each
dev split, written to a temporary folder. Rows:

- single: one run per dataset;
- multi-task --share prompt (one prompt, a head each) and --share none (a prompt per dataset),
  proportional mixing, STEPS steps in all;
- transfer: CoNLL alone, started from the --share prompt run's prompt (`--init-from`), against
  the single CoNLL row (the same run from scratch).

JSON (bench/results/multitask.json) after every row: metrics, wall seconds, peak RSS.

    python bench/multitask.py --steps 100            # the short form (README)
    python bench/multitask.py --steps 1500 --eval-rows 0
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = ROOT.parent / "shared" / "data"
FILES = {"conll": ("conll2003/train.txt", "conll2003/valid.txt"), "mrpc": ("mrpc/train.tsv", "mrpc/dev.tsv"),
         "sst2": ("sst2/train.tsv", "sst2/dev.tsv")}
METRIC = re.compile(r"eval (accuracy|entity F1|F1) ([0-9.]+)")


def recorder(result: dict, out: Path):
    """record(row): appends a row to result["rows"] and rewrites `out` with everything so far (an
    interrupted run keeps its rows), printing the row."""

    def record(row: dict) -> None:
        result["rows"].append(row)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(row), flush=True)

    return record


def eval_subset(name: str, src: Path, rows: int, folder: Path) -> Path:
    """The first `rows` rows of a TSV (header kept) or sentences of a CoNLL file; 0: the whole file."""
    if rows <= 0:
        return src
    text = src.read_text(encoding="utf-8")
    if src.suffix == ".tsv":
        kept = "".join(text.splitlines(keepends=True)[: rows + 1])
    else:
        blocks = [b for b in text.split("\n\n") if b.strip() and not b.startswith("-DOCSTART-")]
        kept = "\n\n".join(blocks[:rows]) + "\n"
    dst = folder / f"{name}{'.tsv' if src.suffix == '.tsv' else '.conll'}"
    dst.write_text(kept, encoding="utf-8")
    return dst


def run(argv: list[str], keep_text: bool = False) -> dict:
    """One `fastprompt train` in its own process: its summary's metrics, wall seconds, peak RSS."""
    cmd = [sys.executable, "-m", "fastprompt.cli", "train", *argv]
    t = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        log.seek(0)
        text = log.read()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"failed ({code}): {' '.join(cmd)}\n{text[-2000:]}")
    summary = text[text.rindex("summary") :]
    metrics = {}
    for line in summary.splitlines():
        m = METRIC.search(line)
        if m:
            name = line.split()[0] if not line.strip().startswith("eval") else "_"
            metrics[name] = float(m.group(2))
    # CPU seconds (user + system, all threads) as well as wall: this machine's cores are shared, so wall time varies with the load
    row = {"metrics": metrics, "wall_s": round(time.perf_counter() - t, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
           "peak_rss_mib": round(usage.ru_maxrss / 1024)}
    return {**row, "text": text} if keep_text else row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--eval-rows", type=int, default=400, help="eval rows (CoNLL sentences) per dataset; 0: the whole dev split")
    ap.add_argument("--mix", default="proportional", help="the multi-task rows' --mix")
    ap.add_argument("--multi-only", action="store_true", help="only the two multi-task rows (the single rows of another JSON apply)")
    ap.add_argument("--out", default=str(HERE / "results" / "multitask.json"))
    args = ap.parse_args(argv)
    for train, dev in FILES.values():
        for f in (train, dev):
            if not (DATA / f).is_file():
                raise SystemExit(f"{DATA / f} not found (../shared/data beside the repository)")
    common = ["--steps", str(args.steps), "--epochs", "1000", "--batch-size", "16", "--max-length", "64", "--save-every", "0"]
    result = {"meta": {"steps": args.steps, "eval_rows": args.eval_rows, "batch_size": 16, "max_length": 64,
                       "command": "python bench/multitask.py " + " ".join(argv if argv is not None else sys.argv[1:])},
              "rows": []}
    out = Path(args.out)
    record = recorder(result, out)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        evals = {n: eval_subset(n, DATA / dev, args.eval_rows, tmp) for n, (_, dev) in FILES.items()}
        for name, (train, _) in FILES.items() if not args.multi_only else []:
            r = run(["--data", str(DATA / train), "--eval", str(evals[name]), "--out", str(tmp / f"single-{name}"), *common])
            record({"row": f"single {name}", "metric": r["metrics"]["_"], **r})
        multi = ["--mix", args.mix]
        for name, (train, _) in FILES.items():
            multi += ["--data", f"{name}={DATA / train}", "--eval", f"{name}={evals[name]}"]
        for share in ("prompt", "none"):
            r = run([*multi, "--share", share, "--out", str(tmp / f"multi-{share}"), *common])
            record({"row": f"multi-task --share {share} --mix {args.mix}", **r})
        if args.multi_only:
            return 0
        r = run(["--data", str(DATA / FILES["conll"][0]), "--eval", str(evals["conll"]), "--init-from", str(tmp / "multi-prompt"),
                 "--out", str(tmp / "transfer-conll"), *common])
        record({"row": "conll from the --share prompt run's prompt (--init-from)", "metric": r["metrics"]["_"], **r})
    return 0


if __name__ == "__main__":
    sys.exit(main())
