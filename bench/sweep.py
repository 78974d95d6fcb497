"""`fastprompt train --sweep` against running its configurations one by one, on real data (MiniLM).

The sweep: one process, the model and data loaded once, every (P, lr) of the grid trained for
--steps steps from layer --start-layer with the lower-layer cache carried from one configuration
to the next (only the first runs the layers below). One by one: each configuration as its own
`fastprompt train --num-tokens P --lr LR --start-layer L --cache-lower-layers --steps S` process
(each fills its own cache). Both read the same data and evaluate on the first --eval-rows dev
rows. Reported: wall and CPU seconds (user + system of the process; the cores here are shared, so
CPU seconds are the steadier measure), peak RSS, each configuration's metric (equal between the
two up to dropout draws). JSON after every row (bench/results/sweep.json).

    python bench/sweep.py --data sst2 --steps 40 --tokens 8,16 --lrs 1e-2,2e-2 --start-layer 3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multitask import DATA, FILES, HERE, eval_subset, recorder, run  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=list(FILES), default="sst2")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--tokens", default="8,16")
    ap.add_argument("--lrs", default="1e-2,2e-2")
    ap.add_argument("--start-layer", type=int, default=3)
    ap.add_argument("--eval-rows", type=int, default=400)
    ap.add_argument("--out", default=str(HERE / "results" / "sweep.json"))
    args = ap.parse_args(argv)
    train, dev = FILES[args.data]
    result = {"meta": {**vars(args), "batch_size": 16, "max_length": 64,
                       "command": "python bench/sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])}, "rows": []}
    out = Path(args.out)
    record = recorder(result, out)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        evalf = eval_subset(args.data, DATA / dev, args.eval_rows, tmp)
        common = ["--data", str(DATA / train), "--eval", str(evalf), "--steps", str(args.steps), "--epochs", "1000", "--batch-size", "16",
                  "--max-length", "64", "--save-every", "0", "--start-layer", str(args.start_layer)]
        r = run([*common, "--sweep", "--sweep-tokens", args.tokens, "--sweep-lrs", args.lrs, "--out", str(tmp / "sweep")])
        table = json.loads((tmp / "sweep" / "sweep.json").read_text())
        record({"row": "fastprompt train --sweep (one process, cache carried)", **r, "table": table["rows"], "best": table["best"]})
        for p in args.tokens.split(","):
            for lr in args.lrs.split(","):
                r = run([*common, "--num-tokens", p, "--lr", lr, "--cache-lower-layers", "--out", str(tmp / f"p{p}-lr{lr}")])
                record({"row": f"one by one: P={p} lr={lr}", "metric": r["metrics"]["_"], **r})
    rows = result["rows"]
    result["summary"] = {"sweep_wall_s": rows[0]["wall_s"], "one_by_one_wall_s": round(sum(r["wall_s"] for r in rows[1:]), 1),
                         "sweep_cpu_s": rows[0]["cpu_s"], "one_by_one_cpu_s": round(sum(r["cpu_s"] for r in rows[1:]), 1),
                         "sweep_peak_rss_mib": rows[0]["peak_rss_mib"], "one_by_one_peak_rss_mib_max": max(r["peak_rss_mib"] for r in rows[1:])}
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
