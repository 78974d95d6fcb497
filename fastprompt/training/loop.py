"""`fastprompt train`: read the task's data, load and patch the model, train the prompts (and the
task head), evaluate each epoch (and at the end of a --steps run), keep the best prompts; resumable,
stops cleanly on a signal. `train(TrainSettings(...))` is the library entry; bad input raises a
`TrainError` before anything is written."""

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

from .. import cache_lower_layers, load_prompts, patch, prompt_config, prompt_parameters, save_prompts
from ..storage import PromptLoadError
from .errors import SettingsError
from .model_loading import default_model_path, load_model, pick_device
from .settings import RUN_SETTINGS, TrainSettings, flag
from .signals import Stop, StopBetweenSteps
from .sweep import run_sweep
from .tasks import TASKS, infer_task, to_device, write_json
from .train_state import load_checkpoint, read_checkpoint, save_checkpoint

TASK_FILE = "task.json"  # beside the prompts: what `fastprompt predict` needs to rebuild the task


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def batches(items, batch_size, shuffle, rng):
    """(dataset indices, items) per batch."""
    order = list(range(len(items)))
    if shuffle:
        rng.shuffle(order)
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size], [items[j] for j in order[i : i + batch_size]]


def _headline(metrics: dict, task) -> str:
    """"accuracy 0.812 (f1 0.870)": the task's selection metric first, under its display name."""
    rest = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k != task.metric and not k.endswith("_thresh"))
    return f"{task.metric_label} {metrics[task.metric]:.3f}" + (f" ({rest})" if rest else "")


def _resumed(settings: TrainSettings):
    """The checkpoint's state, with the run's settings taken from it (a setting added after the
    checkpoint was written keeps its default)."""
    try:
        folder, meta, _ = read_checkpoint(settings.resume)
    except ValueError as e:
        raise SettingsError(f"--resume: {e}") from None
    saved = meta["state"]["args"]
    for k in RUN_SETTINGS:
        setattr(settings, k, saved.get(k, getattr(settings, k)))
    return meta["state"]


def _several(settings: TrainSettings) -> bool:
    """Several --data (a multi-task run) or --ensemble K: the multi-task trainer; a one-element list
    is the single-dataset run."""
    if isinstance(settings.data, (list, tuple)) and len(settings.data) > 1:
        return True
    for name in ("data", "eval"):
        value = getattr(settings, name)
        if isinstance(value, (list, tuple)) and len(value) == 1:
            setattr(settings, name, value[0])
    if settings.mix != "proportional" or (settings.share != "prompt" and settings.ensemble == 1):
        name = "--mix" if settings.mix != "proportional" else "--share"
        raise SettingsError(f"{name} applies to several --data (a multi-task run)")
    if settings.ensemble > 1 and settings.resume is None:
        if settings.sweep:
            raise SettingsError("--sweep tries prompt lengths and learning rates for one prompt; --ensemble trains K: use one")
        return True
    if settings.sweep:
        for name, bad in (("resume", settings.resume is not None), ("init_from", settings.init_from is not None),
                          ("cache_lower_layers", settings.cache_lower_layers), ("num_tokens", settings.num_tokens is not None)):
            if bad:
                why = "(--sweep uses the cache itself with --start-layer > 0)" if name == "cache_lower_layers" else \
                    "(--sweep-tokens gives the lengths)" if name == "num_tokens" else "(a sweep starts every configuration afresh)"
                raise SettingsError(f"{flag(name)} does not apply to --sweep {why}")
    if isinstance(settings.eval, (list, tuple)):
        raise SettingsError(f"--eval: {len(settings.eval)} eval files for one --data")
    return False


def train(settings: TrainSettings) -> int:
    """Runs `fastprompt train`; returns the exit code (0, or 130/143 when stopped by a signal).
    Raises TrainError (SettingsError, DataError, ModelLoadError) for input it cannot use, before
    anything is written to settings.out."""
    from tqdm import tqdm

    from .multitask import resolve_init_from, train_multitask

    args = settings
    if _several(args):
        return train_multitask(args)
    resumed = _resumed(args) if args.resume else None
    args.check()
    ckpt_dir = args.resume or args.checkpoint_dir or f"{args.out}.ckpt"
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    args.task = args.task or infer_task(args.data, args.target_column)
    task = TASKS[args.task].read(args)
    args.max_length = args.max_length or task.default_max_length
    device = pick_device(args.device)
    model_path = args.model or default_model_path()
    tokenizer, model = load_model(task, model_path, args.int8, args.int4, device)
    task.prepare(tokenizer, args.max_length)
    train_set, eval_set = task.train_items, task.eval_items
    if not train_set:
        raise SettingsError(f"--data {args.data}: no trainable examples")
    if args.sweep:
        quantization = "int8" if args.int8 else "int4" if args.int4 else None
        return run_sweep(args, task, tokenizer, model, {"task": args.task, "model": model_path, "max_length": args.max_length,
                                                         "quantization": quantization, **task.settings()})
    try:
        patch(model, method=args.method, num_tokens=args.num_tokens, start_layer=args.start_layer, reparam=args.reparam,
              checkpointing=args.checkpointing, init_text=args.init_text, prefix_init=args.prefix_init, tokenizer=tokenizer)
    except ValueError as e:
        raise SettingsError(str(e)) from None
    if args.init_from is not None:
        source = resolve_init_from(args.init_from)
        try:
            load_prompts(model, source, trainable=True)
        except (PromptLoadError, ValueError) as e:
            raise SettingsError(f"--init-from {args.init_from}: {str(e).splitlines()[0]}") from None
    if args.cache_lower_layers:
        try:
            cache_lower_layers(model)
        except ValueError as e:
            raise SettingsError(f"--cache-lower-layers: {e}") from None
    params = prompt_parameters(model)
    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())
    num_tokens = prompt_config(model).num_tokens  # with --init-text: the text's length unless given
    data_name = args.data or "embedded sentiment set"
    labels = f", labels {task.labels}" if task.labels is not None else ""
    print(f"model {model_path}\ndata {data_name}: {task.describe()}, {len(train_set)} {'train' if task.unit == 'examples' else task.unit}, "
          f"{len(eval_set)} eval{labels}")
    print(f"task {args.task}; method {args.method}, P={num_tokens}, start_layer={args.start_layer}: {n_trainable:,} trainable of {n_total:,} parameters")

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
    # the backbone's precision too: predict loads it the same way, so its outputs are the evaluation's
    quantization = "int8" if args.int8 else "int4" if args.int4 else None
    task_info = {"task": args.task, "model": model_path, "max_length": args.max_length, "quantization": quantization, **task.settings()}
    out_dir = Path(args.out)

    def checkpoint():
        state = {"args": {k: getattr(args, k) for k in RUN_SETTINGS}, "best": best, "best_metrics": best_metrics,
                 "best_epoch": best_epoch, "step": step, "seen": seen, **position}
        save_checkpoint(ckpt_dir, model, opt, sched, step, state)

    def keep(predictions=None):
        save_prompts(model, out_dir)
        write_json(out_dir / TASK_FILE, task_info)
        if predictions is not None:
            task.write_predictions(out_dir / task.predictions_file, predictions)

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
                    loss = model(**to_device(task.encode(tokenizer, batch), model), **extra).loss
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
    print(f"  steps           {step} in {elapsed:.1f} s ({seen / elapsed:.0f} {task.unit}/s)")
    print(f"  peak memory     {peak_rss_mib():.0f} MiB (process RSS)")
    print(f"  saved           {os.path.abspath(args.out)}")
    return 0
