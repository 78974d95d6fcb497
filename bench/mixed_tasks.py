"""Inference cost of a mixed-task batch against running each task's examples as its own batch.

One frozen Llama-like model (8 layers, hidden 512, 8/2 heads) patched with a bank of T deep
prompts (ptv2, P=32). A batch of B examples from T tasks (B/T each) runs as one forward with
`prompt_ids`, against T forwards of B/T examples (one per task, what PEFT can do), and against one
forward of B examples that all use one prompt (the cost a mixed batch should match). No grad,
fp32, round-robin timing, median of the repeats. Writes JSON.

    python bench/mixed_tasks.py                    # T=4, B=32, S=128
    python bench/mixed_tasks.py --tasks 8 --batch 64
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--num-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "mixed_tasks_cpu.json"))
    args = ap.parse_args(argv)
    if args.batch % args.tasks:
        ap.error(f"--batch ({args.batch}) must be a multiple of --tasks ({args.tasks})")
    torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForSequenceClassification

    import fastprompt

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=2, num_labels=2, pad_token_id=0)
    model = LlamaForSequenceClassification(config).eval()
    fastprompt.patch(model, num_tokens=args.num_tokens, num_tasks=args.tasks)
    ids = torch.randint(1, 32000, (args.batch, args.seq))
    mask = torch.ones_like(ids)
    per = args.batch // args.tasks
    mixed_ids = torch.arange(args.tasks).repeat_interleave(per)[torch.randperm(args.batch)]

    def mixed():
        return model(input_ids=ids, attention_mask=mask, prompt_ids=mixed_ids).logits

    def one_prompt():
        return model(input_ids=ids, attention_mask=mask, prompt_ids=torch.zeros(args.batch, dtype=torch.long)).logits

    def separate():
        outs = torch.empty(args.batch, 2)
        for t in range(args.tasks):
            rows = (mixed_ids == t).nonzero(as_tuple=True)[0]
            outs[rows] = model(input_ids=ids[rows], attention_mask=mask[rows], prompt_ids=mixed_ids[rows]).logits
        return outs

    runs = {"mixed batch (one forward)": mixed, "one prompt, same batch": one_prompt, f"{args.tasks} separate batches": separate}
    with torch.no_grad():
        torch.testing.assert_close(mixed(), separate(), atol=1e-4, rtol=1e-4)  # the same answer either way
        times = {k: [] for k in runs}
        for fn in runs.values():
            fn()  # warm-up
        for _ in range(args.repeats):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["mixed batch (one forward)"]
    print(f"Llama-like 8 layers, hidden 512; T={args.tasks} tasks, B={args.batch} (B/T each), S={args.seq}, "
          f"P={args.num_tokens}; no grad, fp32, {args.threads} threads")
    print(f"{'run':<28}{'median ms':>11}{'x mixed':>9}")
    for k, v in med.items():
        print(f"{k:<28}{1000 * v:>11.1f}{v / base:>9.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python bench/mixed_tasks.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
    out.write_text(json.dumps({"meta": meta, "args": vars(args), "median_s": med, "all_s": times}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
