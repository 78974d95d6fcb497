"""One measured run for bench/adapters_compare.py, in whichever environment runs it.

fastprompt needs transformers >= 5 and AdapterHub's `adapters` 1.3.0 pins transformers ~=4.57.6,
so the two cannot share a process: the driver runs this file once with the project's Python
(--lib fastprompt) and once with the adapters environment's (--lib adapters), on the same model
configuration, inputs and seeds. It imports only torch, transformers, bench/measure.py and the
library under test, and prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure  # noqa: E402  (torch only: safe in both environments)

TASKS = 4  # the mixed batch's task count


def build(args):
    """The model with its classification head, before any prompt: the Llama-like benchmark config
    (random init, seeded) or MiniLM from the folder given."""
    import transformers as tf

    torch.manual_seed(args.seed)
    kw = {"attn_implementation": args.attn} if args.attn else {}
    if args.model == "llama":
        config = tf.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                num_attention_heads=8, num_key_value_heads=2, num_labels=2, pad_token_id=0, **kw)
        return tf.LlamaForSequenceClassification(config)
    return tf.AutoModelForSequenceClassification.from_pretrained(args.minilm, num_labels=2, **kw)


def inputs(args, vocab):
    """A right-padded batch: example i keeps S - i*S/(2B) tokens (pads are token 0, never drawn)."""
    g = torch.Generator().manual_seed(args.seed + 1)
    b, s = args.batch, args.seq
    ids = torch.randint(1, vocab, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    for i in range(b):
        mask[i, s - (i * s) // (2 * b) :] = 0
    ids = ids * mask
    labels = torch.randint(0, 2, (b,), generator=g)
    tasks = torch.arange(b) % TASKS
    if args.mode == "batchsplit":  # BatchSplit takes contiguous slices: the same rows, grouped by task
        order = torch.argsort(tasks, stable=True)
        ids, mask, labels, tasks = ids[order], mask[order], labels[order], tasks[order]
    return {"input_ids": ids, "attention_mask": mask}, labels, tasks


def prepare_fastprompt(model, args, tasks):
    import fastprompt

    n = TASKS if args.mode != "single" else 1
    fastprompt.patch(model, method="ptv2", num_tokens=args.p, num_tasks=n, checkpointing=args.ckpt)
    extra = {"prompt_ids": tasks} if n > 1 else {}
    return fastprompt.prompt_parameters(model), extra, f"fastprompt {fastprompt.__version__}"


def prepare_adapters(model, args, tasks):
    import adapters
    from adapters import PrefixTuningConfig
    from adapters.composition import BatchSplit, MultiTask

    adapters.init(model)
    names = [f"t{i}" for i in range(TASKS if args.mode != "single" else 1)]
    for name in names:
        # flat: a plain prefix tensor, as fastprompt's ptv2 default (no MLP reparameterisation)
        model.add_adapter(name, config=PrefixTuningConfig(prefix_length=args.p, flat=True))
    extra = {}
    if args.mode == "single":
        setup = names[0]
    elif args.mode == "multitask":
        setup = MultiTask(*names)
        extra = {"task_ids": tasks}
    else:
        setup = BatchSplit(*names, batch_sizes=torch.bincount(tasks, minlength=TASKS).tolist())
    model.train_adapter(setup)  # freezes the base model's weights, keeps the HF head trainable
    if args.ckpt:
        model.gradient_checkpointing_enable()
    return [p for p in model.parameters() if p.requires_grad], extra, f"adapters {adapters.__version__}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", choices=["fastprompt", "adapters"], required=True)
    ap.add_argument("--model", choices=["llama", "minilm"], required=True)
    ap.add_argument("--minilm", default=None, help="MiniLM's folder")
    ap.add_argument("--mode", choices=["single", "multitask", "batchsplit", "bank"], default="single")
    ap.add_argument("--phase", choices=["train", "infer"], default="train")
    ap.add_argument("--p", type=int, default=16)
    ap.add_argument("--ckpt", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attn", default=None, help="attn_implementation for the model (default: transformers')")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dump", action="store_true", help="include the eval logits (B, 2) in the JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    model = build(args)
    batch, labels, tasks = inputs(args, model.get_input_embeddings().weight.shape[0])
    prepare = prepare_fastprompt if args.lib == "fastprompt" else prepare_adapters
    params, extra, version = prepare(model, args, tasks)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    if args.phase == "train":
        model.train()
        opt = torch.optim.AdamW(params, lr=1e-3)

        def step():
            loss = model(**batch, **extra, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        saved, _ = measure.saved_bytes(lambda: model(**batch, **extra, labels=labels).loss, [*frozen, *params, *batch.values()])
    else:
        model.eval()

        def step():
            with torch.no_grad():
                return model(**batch, **extra).logits

        saved = 0
    step()  # warm-up
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    with torch.no_grad():
        model.eval()
        logits = model(**batch, **extra).logits.float()
    print(json.dumps({
        "lib": version, "transformers": transformers.__version__, "torch": torch.__version__,
        "step_s": statistics.median(times), "times": times, "saved_mib": saved / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "trainable": n_trainable,
        "logits_finite": bool(torch.isfinite(logits).all()), "pid": os.getpid(),
        **({"logits": logits.tolist()} if args.dump else {}),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
