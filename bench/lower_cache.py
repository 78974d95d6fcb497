"""Lower-layer cache: epoch time with and without it, against the N/(N-L) ceiling.

Llama-like model (8 layers, hidden 512, 8/2 heads, no dropout), deep prompts from layer L,
64 random examples of 128 tokens, batch 8, fp32, two epochs each way in one run. Epoch 1 fills
the cache (it computes everything); epoch 2 runs only layers >= L. The forward pass can gain
at most N/(N-L); the step gains less, since the backward pass (layers >= L) is the same.

    python bench/lower_cache.py                     # L = 4 and 6 of 8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _epoch(model, data, batch, cached, opt):
    t0 = time.perf_counter()
    losses = []
    ids, labels = data
    for i in range(0, len(ids), batch):
        rows = torch.arange(i, min(i + batch, len(ids)))
        extra = {"example_ids": rows} if cached else {}
        loss = model(input_ids=ids[rows], attention_mask=torch.ones_like(ids[rows]), labels=labels[rows], **extra).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return time.perf_counter() - t0, losses


def run(start_layer, args, data):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    import fastprompt

    out = {}
    for cached in (False, True):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                             num_attention_heads=8, num_key_value_heads=2, num_labels=2, pad_token_id=0)
        model = LlamaForSequenceClassification(config)
        fastprompt.patch(model, num_tokens=args.num_tokens, start_layer=start_layer)
        cache = fastprompt.cache_lower_layers(model, dtype=torch.float32) if cached else None
        model.train()
        opt = torch.optim.AdamW(fastprompt.prompt_parameters(model), lr=1e-3)
        t1, l1 = _epoch(model, data, args.batch, cached, opt)
        t2, l2 = _epoch(model, data, args.batch, cached, opt)
        out["cached" if cached else "plain"] = {"epoch1_s": t1, "epoch2_s": t2, "losses": l1 + l2,
                                                "cache_mib": cache.nbytes / 2**20 if cache else 0.0}
    plain, cached = out["plain"], out["cached"]
    out["identical_losses"] = plain["losses"] == cached["losses"]
    out["epoch2_speedup"] = plain["epoch2_s"] / cached["epoch2_s"]
    out["ceiling"] = 8 / (8 - start_layer)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--num-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "lower_cache_cpu.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    data = (torch.randint(1, 32000, (args.examples, args.seq), generator=g), torch.randint(0, 2, (args.examples,), generator=g))
    results = {f"L={L}": run(L, args, data) for L in (4, 6)}
    print(f"Llama-like 8 layers, hidden 512; {args.examples} examples x {args.seq} tokens, batch {args.batch}, fp32 cache, {args.threads} threads")
    print(f"{'start layer':<12}{'epoch 1 s':>10}{'epoch 2 s':>10}{'cached 2 s':>11}{'speed-up':>9}{'N/(N-L)':>9}{'cache MiB':>10}  losses equal")
    for name, r in results.items():
        p, c = r["plain"], r["cached"]
        print(f"{name:<12}{p['epoch1_s']:>10.2f}{p['epoch2_s']:>10.2f}{c['epoch2_s']:>11.2f}{r['epoch2_speedup']:>9.2f}{r['ceiling']:>9.2f}"
              f"{c['cache_mib']:>10.1f}  {r['identical_losses']}")
    meta = {"command": "python bench/lower_cache.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "args": vars(args), "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
