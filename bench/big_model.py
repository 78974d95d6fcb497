"""A 10-billion-parameter Llama trains deep prompts on this 24 GiB, 2-core CPU machine.

Builds a Llama-architecture causal LM directly in int8 (or nf4 with --4bit), tensor by tensor
from random weights (`fastprompt.loading.build_quantized`, the path that reads real checkpoints
shard by shard), patches it with late-truncated deep prompts and checkpointing, and runs real
training steps (forward, backward, AdamW) on one fixed batch with a completion-only causal-LM loss
(the first half of each sequence is the prompt, labelled -100; the second half the completion), as
generation training does. Prints the parameter count, peak resident memory, time per step and the
losses, and what `fastprompt.plan` predicts; writes JSON.

`--peer lora` trains the same model, batch and loss with PEFT LoRA (r=8 on the attention
projections PEFT targets by default) and transformers' gradient checkpointing instead: the method
users pick by default, which has to back-propagate through every layer.

    python bench/big_model.py                       # 10.2 B parameters, int8, B1 S128, 3 steps
    python bench/big_model.py --peer lora           # the same with PEFT LoRA r=8
    python bench/big_model.py --4bit --hidden 6144 --intermediate 16384 --layers 48 --heads 48
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


sys.path.insert(0, str(HERE))
from measure import proc_status_bytes  # noqa: E402


def _status(field) -> int:
    return proc_status_bytes(field) or 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=49)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--4bit", dest="four_bit", action="store_true", help="nf4 instead of int8")
    ap.add_argument("--method", choices=["ptv2", "lpt"], default="ptv2")
    ap.add_argument("--start-layer", type=int, default=None, help="default: 3/4 of the layers")
    ap.add_argument("--num-tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-1)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="activations and unquantised weights (default: float32 with int8, whose CPU matmul is fastest "
                         "from fp32 here; bfloat16 with nf4)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-lower-layers", action="store_true", help="steps after the first skip the layers below the prompts")
    ap.add_argument("--peer", choices=["lora"], default=None, help="train PEFT LoRA r=8 (gradient checkpointing) instead of prompts")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import warnings

    from transformers import LlamaConfig
    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", message="MatMul8bitLt")
    import logging

    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)  # a cast notice on every call otherwise

    import fastprompt
    from fastprompt.loading import build_quantized, random_source

    hf_logging.set_verbosity_error()
    bits = 4 if args.four_bit else 8
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads or args.heads, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    start_layer = args.start_layer if args.start_layer is not None else 3 * args.layers // 4
    rss_before = _status("VmRSS")  # the Python/torch runtime, before any weight exists
    t0 = time.perf_counter()

    def progress(i, n):
        if i % 8 == 0 or i == n:
            print(f"  built layer {i}/{n}: RSS {_status('VmRSS') / 2**30:.2f} GiB, {time.perf_counter() - t0:.0f} s", flush=True)

    dtype = getattr(torch, args.dtype or ("bfloat16" if bits == 4 else "float32"))
    model = build_quantized(config, random_source(0), bits=bits, dtype=dtype, progress=progress)
    build_s = time.perf_counter() - t0
    from fastprompt.planner import shape_of

    shape = shape_of(model)
    n_params = shape.quantisable + shape.other
    print(f"model: Llama {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}: "
          f"{n_params / 1e9:.2f} B parameters ({'nf4' if bits == 4 else 'int8'} layers, {str(dtype)[6:]} rest), built in {build_s:.0f} s, "
          f"RSS {_status('VmRSS') / 2**30:.2f} GiB")
    if args.peer == "lora":
        from peft import LoraConfig, get_peft_model

        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8))
        params = [p for p in model.parameters() if p.requires_grad]
        print(f"PEFT LoRA r=8 ({', '.join(sorted(model.peft_config['default'].target_modules))}), gradient checkpointing; "
              f"{sum(p.numel() for p in params):,} trainable parameters")
    else:
        fastprompt.patch(model, method=args.method, num_tokens=args.num_tokens, start_layer=start_layer, checkpointing=True)
        params = fastprompt.prompt_parameters(model)
        print(f"patched: {args.method}, P={args.num_tokens}, start_layer={start_layer}, checkpointing; "
              f"{sum(p.numel() for p in params):,} trainable parameters")
    extra = {}
    if args.cache_lower_layers and args.peer is None:
        fastprompt.cache_lower_layers(model)
        extra = {"example_ids": torch.arange(args.batch)}
    opt = torch.optim.AdamW(params, lr=args.lr)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, args.vocab, (args.batch, args.seq), generator=g)
    labels = ids.clone()
    labels[:, : args.seq // 2] = -100  # the prompt half: only the completion is learned
    model.train()
    losses, times = [], []
    for step in range(args.steps):
        t = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, **extra).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
        print(f"  step {step + 1}: loss {losses[-1]:.4f}, {times[-1]:.1f} s, peak RSS {_status('VmHWM') / 2**30:.2f} GiB", flush=True)
    peak = _status("VmHWM")
    planned = {}
    for gb in (16, 24, 40, 80):
        rows = fastprompt.plan(config, device_memory=f"{gb}GB", batch_size=args.batch, seq_len=args.seq, num_tokens=args.num_tokens,
                               weights=("bf16", "int8", "nf4"), methods=(args.method,), start_layers=(0, start_layer), print_table=False)
        if gb == 24:
            fastprompt.plan(config, device_memory="24GB", batch_size=args.batch, seq_len=args.seq, num_tokens=args.num_tokens,
                            weights=("bf16", "int8", "nf4"), methods=(args.method,), start_layers=(0, start_layer))
        planned[f"{gb}GB"] = [{"weights": r.weights, "start_layer": r.start_layer, "checkpointing": r.checkpointing,
                               "peak_gib": r.peak_bytes / 2**30, "fits": r.fits} for r in rows]
    mine = next(r for r in planned["24GB"] if r["weights"] == ("nf4" if bits == 4 else "int8") and r["start_layer"] == start_layer and r["checkpointing"])
    from fastprompt.planner import predict

    size = torch.empty(0, dtype=dtype).element_size()
    this_run, _ = predict(shape, "nf4" if bits == 4 else "int8", args.method, start_layer, True, args.batch, args.seq, args.num_tokens,
                          float_bytes=size, act_bytes=size, overhead=48 * 2**20)
    print(f"planner for this run ({str(dtype)[6:]} activations and unquantised weights, CPU): {this_run / 2**30:.2f} GiB; "
          f"measured peak RSS - RSS before building: {(peak - rss_before) / 2**30:.2f} GiB")
    print(f"parameters {n_params / 1e9:.2f} B; peak RSS {peak / 2**30:.2f} GiB (planner, 24 GB device, bf16: {mine['peak_gib']:.2f} GiB); "
          f"step {sorted(times)[len(times) // 2]:.1f} s (median); losses {' -> '.join(f'{l:.4f}' for l in losses)}")
    out = Path(args.out or HERE / "results" / f"big_model_{'nf4' if bits == 4 else 'int8'}{'_' + args.peer if args.peer else ''}_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python bench/big_model.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__, "machine": platform.machine()}
    out.write_text(json.dumps({"meta": meta, "args": vars(args), "parameters": n_params, "build_s": build_s, "peak_rss_bytes": peak,
                               "rss_before_build_bytes": rss_before, "planner_this_run_bytes": this_run,
                               "step_s": times, "losses": losses, "planner": planned}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
