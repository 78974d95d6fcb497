"""`fastprompt train --sweep`: a grid of prompt lengths and learning rates on a budget of steps.

The model and the data are loaded once. Each configuration (P, lr) is patched onto the same model,
trained for --steps steps from the same start (the random state right after loading, the loaded
head, the same batch order) and evaluated once; the model is then unpatched and its head restored.
Each configuration is a row of one table (metric, training seconds, memory saved for backward in
one step, process peak RSS) printed and written to OUT/sweep.json after every row; the best row's
prompts are written to OUT as a normal run's (prompts, task.json, eval predictions), so `fastprompt
predict` applies them. A row equals `fastprompt train` run alone with that P and lr (same seed and
steps), up to dropout: rows after the first skip the lower layers (see below), so they draw fewer
dropout masks.

With --start-layer L > 0 the lower-layer cache (`fastprompt.cache_lower_layers`) is turned on for
every configuration, and what earlier configurations stored is carried into the next one's cache:
the hidden states entering layer L depend on the input alone (the frozen layers below L have no
prompt), so only the first configuration runs layers < L, once per example. The cache is kept in
float32, so rows equal runs without a cache.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch

from .. import cache_lower_layers, patch, prompt_parameters, save_prompts, unpatch
from ..integration.facade import HEAD_NAMES
from .errors import SettingsError
from .tasks import to_device, write_json

SWEEP_FILE = "sweep.json"


def parse_grid(text: str, flag: str, kind) -> list:
    """"8,16,32" -> [8, 16, 32]; SettingsError naming the flag for anything else."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values) or len(set(values)) != len(values):
        raise SettingsError(f"{flag} must be distinct positive numbers separated by commas, got {text!r}")
    return values


def saved_bytes(step) -> int:
    """Bytes autograd keeps for backward during `step()` (each storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def _head_state(model) -> dict[str, dict]:
    """Copies of the task head modules' tensors (the trained ones): each configuration starts from the loaded head."""
    return {n: {k: v.detach().clone() for k, v in getattr(model, n).state_dict().items()}
            for n in HEAD_NAMES if isinstance(getattr(model, n, None), torch.nn.Module)}


def _restore_heads(model, state) -> None:
    with torch.no_grad():
        for n, tensors in state.items():
            for k, p in getattr(model, n).state_dict(keep_vars=True).items():
                p.copy_(tensors[k])


def run_sweep(args, task, tokenizer, model, task_info: dict) -> int:
    """The grid over --sweep-tokens x --sweep-lrs (args: TrainSettings, already checked; the model
    loaded and unpatched; the task prepared). Returns the exit code."""
    from .loop import TASK_FILE, _headline, batches, peak_rss_mib

    tokens = parse_grid(args.sweep_tokens, "--sweep-tokens", int)
    lrs = parse_grid(args.sweep_lrs, "--sweep-lrs", float)
    if not task.eval_items:
        raise SettingsError("--sweep ranks configurations by their eval metric: give --eval")
    if args.steps is None:
        raise SettingsError("--sweep trains every configuration for --steps steps: give --steps (the budget per configuration)")
    train_set = task.train_items
    heads = _head_state(model)
    start_rng = torch.get_rng_state()
    out_dir = Path(args.out)
    late = args.start_layer > 0
    carried = None  # the lower-layer cache of the last configuration, adopted by the next
    rows, best = [], None
    print(f"sweep: P in {tokens} x lr in {lrs}, {args.steps} steps each"
          + (f"; lower-layer cache from layer {args.start_layer}, shared by every configuration" if late else ""))
    for num_tokens in tokens:
        for lr in lrs:
            torch.set_rng_state(start_rng)
            _restore_heads(model, heads)
            try:
                patch(model, method=args.method, num_tokens=num_tokens, start_layer=args.start_layer, reparam=args.reparam,
                      checkpointing=args.checkpointing, init_text=args.init_text, prefix_init=args.prefix_init, tokenizer=tokenizer)
            except ValueError as e:
                raise SettingsError(str(e)) from None
            cache = None
            if late:
                try:
                    cache = cache_lower_layers(model, dtype=torch.float32)
                except ValueError as e:
                    raise SettingsError(f"--sweep with --start-layer: {e}") from None
                if carried is not None:
                    cache.adopt(carried)  # in memory: the tensors shared, not copied
            params = prompt_parameters(model)
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            steps_per_epoch = math.ceil(len(train_set) / args.batch_size)
            total = min(args.steps, steps_per_epoch * args.epochs)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(total, 1))
            rng = random.Random(args.seed)
            model.train()
            step, saved, started, cpu = 0, 0, time.perf_counter(), time.process_time()
            for _ in range(args.epochs):
                for index, batch in batches(train_set, args.batch_size, True, rng):
                    if step >= total:
                        break
                    extra = {"example_ids": torch.tensor(index)} if late else {}
                    inputs = to_device(task.encode(tokenizer, batch), model)

                    def one_step():
                        model(**inputs, **extra).loss.backward()

                    if step == 1:  # the first step may fill the cache; the second is a steady one
                        saved = saved_bytes(one_step)
                    else:
                        one_step()
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    step += 1
                if step >= total:
                    break
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
            metrics, predictions = task.evaluate(model, tokenizer)
            row = {"num_tokens": num_tokens, "lr": lr, "metric": metrics[task.metric], "metrics": metrics, "steps": step,
                   "train_s": round(seconds, 2), "train_cpu_s": round(cpu, 2), "saved_for_backward_mib": round(saved / 2**20, 2),
                   "peak_rss_mib": round(peak_rss_mib()),
                   "cache_misses": cache.misses if cache is not None else None, "cache_hits": cache.hits if cache is not None else None}
            rows.append(row)
            if best is None or row["metric"] > best["metric"]:  # ties: the earlier row, as the ranking lists them
                best = row
                save_prompts(model, out_dir)
                write_json(out_dir / TASK_FILE, {**task_info, "sweep": {"num_tokens": num_tokens, "lr": lr}})
                task.write_predictions(out_dir / task.predictions_file, predictions)
            if cache is not None:
                carried = cache  # an in-memory cache stays readable after unpatch closes it
            unpatch(model)
            ranking = sorted(rows, key=lambda r: -r["metric"])  # stable: ties keep grid order
            write_json(out_dir / SWEEP_FILE, {"metric": task.metric, "steps": args.steps, "start_layer": args.start_layer, "rows": rows,
                                              "ranking": [[r["num_tokens"], r["lr"]] for r in ranking],
                                              "best": {"num_tokens": best["num_tokens"], "lr": best["lr"]}})
            print(f"  P={num_tokens:<4} lr={lr:<8g} eval {_headline(metrics, task)}  {seconds:6.1f} s  saved {row['saved_for_backward_mib']:.1f} MiB"
                  + (f"  cache misses {cache.misses}" if cache is not None else ""), flush=True)
    _restore_heads(model, heads)
    print("summary")
    print(f"  {'P':>4} {'lr':>9} {task.metric_label:>10} {'train s':>8} {'saved MiB':>10} {'peak RSS MiB':>13}")
    for r in sorted(rows, key=lambda r: -r["metric"]):
        print(f"  {r['num_tokens']:>4} {r['lr']:>9g} {r['metric']:>10.3f} {r['train_s']:>8.1f} {r['saved_for_backward_mib']:>10.1f} "
              f"{r['peak_rss_mib']:>13}")
    print(f"  best            P={best['num_tokens']}, lr={best['lr']:g}: prompts saved to {out_dir.resolve()}")
    print(f"  table           {(out_dir / SWEEP_FILE).resolve()}")
    return 0


__all__ = ["SWEEP_FILE", "parse_grid", "run_sweep", "saved_bytes"]
