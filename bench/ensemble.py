"""Prompt ensembles (`--ensemble K`) against K separate single-prompt runs, on real data (MiniLM).

One `fastprompt train --ensemble K` run (K prompts as a bank and K heads, each batch's examples
once per member, STEPS steps) against K separate `fastprompt train` runs of STEPS steps each
(seeds 0..K-1, so each starts from another draw), every run in its own process: training seconds
(the summary's), whole-process wall seconds, peak RSS, each member's and the ensemble's metric.
The eval file is the first --eval-rows rows of the dev split. JSON after every row
(bench/results/ensemble.json).

    python bench/ensemble.py --data sst2 --steps 60 --k 3
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multitask import DATA, FILES, HERE, eval_subset, recorder, run  # noqa: E402

STEPS = re.compile(r"steps\s+(\d+) in ([0-9.]+) s")
MEMBER = re.compile(r"member (\d+)\s+eval (?:accuracy|entity F1|F1) ([0-9.]+)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=list(FILES), default="sst2")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--eval-rows", type=int, default=400)
    ap.add_argument("--out", default=str(HERE / "results" / "ensemble.json"))
    args = ap.parse_args(argv)
    train, dev = FILES[args.data]
    result = {"meta": {"data": args.data, "steps": args.steps, "k": args.k, "eval_rows": args.eval_rows, "batch_size": 16, "max_length": 64,
                       "command": "python bench/ensemble.py " + " ".join(argv if argv is not None else sys.argv[1:])}, "rows": []}
    out = Path(args.out)
    record = recorder(result, out)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        evalf = eval_subset(args.data, DATA / dev, args.eval_rows, tmp)
        common = ["--data", str(DATA / train), "--eval", str(evalf), "--steps", str(args.steps), "--epochs", "1000", "--batch-size", "16",
                  "--max-length", "64", "--save-every", "0"]
        r = run([*common, "--ensemble", str(args.k), "--out", str(tmp / "ensemble")], keep_text=True)
        text = r.pop("text")
        steps, seconds = STEPS.search(text[text.rindex("summary") :]).groups()
        members = {int(k): float(v) for k, v in MEMBER.findall(text[text.rindex("summary") :])}
        record({"row": f"--ensemble {args.k}", "train_s": float(seconds), "ensemble_metric": r["metrics"]["ensemble"],
                "member_metrics": [members[k] for k in sorted(members)], **r})
        for seed in range(args.k):
            r = run([*common, "--seed", str(seed), "--out", str(tmp / f"single{seed}")], keep_text=True)
            text = r.pop("text")
            steps, seconds = STEPS.search(text[text.rindex("summary") :]).groups()
            record({"row": f"single run, seed {seed}", "train_s": float(seconds), "metric": r["metrics"]["_"], **r})
    rows = result["rows"]
    separate = rows[1:]
    result["summary"] = {
        "ensemble_train_s": rows[0]["train_s"], "separate_train_s_total": round(sum(r["train_s"] for r in separate), 1),
        "ensemble_wall_s": rows[0]["wall_s"], "separate_wall_s_total": round(sum(r["wall_s"] for r in separate), 1),
        "ensemble_peak_rss_mib": rows[0]["peak_rss_mib"], "separate_peak_rss_mib_max": max(r["peak_rss_mib"] for r in separate),
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
