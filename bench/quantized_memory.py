"""Peak and steady memory of loading and training a ~1B Llama-like model: float32, bf16, int8, nf4.

The model (random init, hidden 2048, 16 layers, 5632 intermediate, 32/8 heads, vocab 32000: 1.1 B
parameters) is written once to --dir as sharded bf16 safetensors, as checkpoints come. Each mode
then runs in its own fresh process (so one's allocations never count for another):
  load   `AutoModelForCausalLM.from_pretrained(dir, dtype=... | quantization_config=...)` (or
         `fastprompt.loading.build_quantized` with --loader build); peak = VmHWM during the load,
         steady = VmRSS after it;
  train  patch ptv2 (P=16, start layer N/2), AdamW, --steps steps of B x S tokens; peak = VmHWM
         over the steps (reset after loading), steady = VmRSS after them.
All numbers are process RSS in MiB, over the RSS before loading (the Python + torch baseline).

    python bench/quantized_memory.py                       # all four modes, from_pretrained
    python bench/quantized_memory.py --loader build        # int8/nf4 through build_quantized
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure  # noqa: E402

MODES = ("float32", "bf16", "int8", "nf4")


def _mib(field):
    return measure.proc_status_bytes(field) / 2**20


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")


def _config(args):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                       max_position_embeddings=2048, tie_word_embeddings=False)


def write_checkpoint(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(args.dir)
    if (folder / "model.safetensors.index.json").is_file():
        return
    print(f"writing the model to {folder} (once)", flush=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(args), dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="500MB")


def child(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import fastprompt

    torch.set_num_threads(2)
    torch.manual_seed(0)
    mode = args.child
    base = _mib("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    if mode in ("int8", "nf4") and args.loader == "build":
        from fastprompt.loading import build_quantized, safetensors_source

        model = build_quantized(_config(args), safetensors_source(args.dir), bits=8 if mode == "int8" else 4,
                                dtype=torch.float32 if mode == "int8" else torch.bfloat16)
    else:
        kw = {"float32": dict(dtype=torch.float32), "bf16": dict(dtype=torch.bfloat16),
              "int8": dict(quantization_config=BitsAndBytesConfig(load_in_8bit=True), dtype=torch.float32),
              "nf4": dict(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                 bnb_4bit_compute_dtype=torch.bfloat16), dtype=torch.bfloat16)}[mode]
        model = AutoModelForCausalLM.from_pretrained(args.dir, **kw)
    gc.collect()
    load_s = time.perf_counter() - t0
    load_peak, load_steady = _mib("VmHWM") - base, _mib("VmRSS") - base

    n = model.config.num_hidden_layers
    fastprompt.patch(model, method="ptv2", num_tokens=16, start_layer=n // 2)
    opt = torch.optim.AdamW(fastprompt.prompt_parameters(model), lr=1e-3)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.seq))
    _reset_peak()
    losses, t0 = [], time.perf_counter()
    model.train()
    for _ in range(args.steps):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
    step_s = (time.perf_counter() - t0) / args.steps
    gc.collect()
    return {"mode": mode, "loader": args.loader if mode in ("int8", "nf4") else "from_pretrained",
            "load_peak_mib": round(load_peak), "load_steady_mib": round(load_steady), "load_s": round(load_s, 1),
            "train_peak_mib": round(_mib("VmHWM") - base), "train_steady_mib": round(_mib("VmRSS") - base),
            "step_s": round(step_s, 2), "losses": losses,
            # RSS counts the checkpoint's memory-mapped pages that loading touched (clean page cache, not
            # allocations): RssAnon is what the process itself holds
            "rss_anon_mib": round(_mib("RssAnon")), "rss_file_mib": round(_mib("RssFile")),
            "params": sum(p.numel() for p in model.parameters())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/fastprompt_llama_1b", help="where the sharded checkpoint is written (once)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--loader", choices=["from_pretrained", "build"], default="from_pretrained",
                    help="how int8/nf4 are loaded (float modes always use from_pretrained)")
    ap.add_argument("--out", default="bench/results/quantized_memory_cpu.json")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    write_checkpoint(args)
    rows = []
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    for mode in args.modes.split(","):
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # large frees go back to the OS: RSS tracks live memory
        r = subprocess.run([sys.executable, __file__, *passthrough, "--child", mode], capture_output=True, text=True, env=env)
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            return r.returncode
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(f"{mode}: {rows[-1]}", flush=True)
    f32 = next((r for r in rows if r["mode"] == "float32"), None)
    print(f"\n{'mode':<9}{'loader':<17}{'load peak':>10}{'steady':>8}{'train peak':>11}{'steady':>8}{'x fp32 peak':>12}{'step s':>8}")
    for r in rows:
        ratio = f"{r['train_peak_mib'] / f32['train_peak_mib']:.2f}" if f32 else "-"
        print(f"{r['mode']:<9}{r['loader']:<17}{r['load_peak_mib']:>10}{r['load_steady_mib']:>8}{r['train_peak_mib']:>11}"
              f"{r['train_steady_mib']:>8}{ratio:>12}{r['step_s']:>8}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python bench/quantized_memory.py " + " ".join(passthrough), "batch": args.batch, "seq": args.seq,
            "steps": args.steps, "units": "MiB of process RSS over the pre-load baseline"}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
