"""One command that checks fastprompt on one GPU: correctness, overflow, kernel timings, a ~1B
training step against PEFT, and the 10B headline, in under 8 minutes on an H100/H200.

    python bench/gpu_check.py                  # on a CUDA machine; writes bench/results/gpu_check_cuda.json
    python bench/gpu_check.py --smoke          # the same code paths on CPU at tiny sizes (CI runs this)
    python bench/gpu_check.py --only correctness,timing --out /tmp/x.json

Sections (each one's failure is recorded in the JSON and the others still run):
  correctness  every CUDA backend (aten, triton) against a float32 reference: bf16 and fp16, head dim
               64 and 128, P 16 and 128, S 128/1000/2048/4096, GQA 32/8 and MHA, causal and not,
               left-padded batches as transformers builds them (a (B, S) mask), a bank with repeated
               ids, q as the non-contiguous (B, H, S, D) view of transformers' (B, S, H, D) layout.
               The flash-attention rule (error <= 2x the low-precision reference's own, 3x for
               gradients), a NaN/Inf scan, and the run-to-run difference of the prefix gradients.
  overflow     a mask past 2^31 elements (tiny H and D): the batch's last example against the same
               example alone.
  timing       forward and forward+backward against SDPA on the concatenated keys and against
               flash attention on the sequence alone (and flash-attn's package if installed); decode
               at S=1 against Sk=4096. CUDA: triton.testing.do_bench (CUDA events without triton).
  e2e          one bf16 training step of a Llama-like ~1B config (random init): fastprompt ptv2 from
               layer 0 and N/2 (with and without checkpointing) against PEFT prefix tuning, same
               process: step time and peak memory.
  headline     a 10B Llama-like config (hidden 4096, 48 layers) in bf16 and int8 (bitsandbytes),
               ptv2 from N/2 with checkpointing, B=4, S=1024, P=64: peak memory and step time,
               with the planner's prediction beside the measurement; and PEFT LoRA r=8 on the bf16
               model with transformers' checkpointing, the method users pick by default.
Training steps use a completion-only causal-LM loss (each row's first half is the prompt, -100).

Targets on a GPU: prefix_attention fwd+bwd within 1.1x of flash attention on the sequence alone and
>= 1.2x faster than SDPA on the concatenated keys at S >= 512; at S=1024, P=64 a ptv2 step no slower
than PEFT's from layer 0 and <= 0.75x of it from N/2; the 10B int8 step within 15% of the planner
and under 24 GiB. The script prints these ratios; it does not fail on them (they are measurements).
Exit status 1 when a correctness check fails or a section errors.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from measure import median_seconds  # noqa: E402

import fastprompt  # noqa: E402
from fastprompt.ops import prefix_attention, prefix_attention_inputs  # noqa: E402

SECTIONS = ("correctness", "overflow", "timing", "e2e", "headline")


class Sizes:
    """Everything that differs between the GPU run and the CPU smoke run."""

    def __init__(self, smoke: bool):
        self.smoke = smoke
        if smoke:
            self.device = "cpu"
            self.backends = ["cpu", "aten-reference", "torch"]
            self.inference_backends = []
            self.seqs = [16, 33]
            self.heads = [(4, 2), (4, 4)]
            self.head_dims = [16, 32]
            self.prefix_lens = [4, 8]
            self.batch = lambda s: 2
            self.overflow = dict(b=2, s=40)
            self.timing_shapes = [(2, 4, 2, 64, 8, 32)]
            self.decode = dict(b=2, h=4, hkv=2, sk=64, p=8, d=32)
            self.e2e = dict(hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, vocab=128, b=2, s=32, p=8)
            self.headline = dict(hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, vocab=128, b=2, s=32, p=8)
            self.steps = 2
        else:
            self.device = "cuda"
            self.backends = ["aten", "triton"]
            self.inference_backends = ["cuda"]  # forward-only: timed without gradients
            self.seqs = [128, 1000, 2048, 4096]
            self.heads = [(32, 8), (16, 16)]
            self.head_dims = [64, 128]
            self.prefix_lens = [16, 128]
            self.batch = lambda s: 4 if s <= 1024 else 2
            self.overflow = dict(b=2, s=33000)  # 2 * 33000 * 33000 mask elements > 2^31
            self.timing_shapes = [(8, 32, 8, 512, 64, 128), (4, 32, 8, 1024, 64, 128), (2, 32, 8, 2048, 64, 128), (1, 32, 8, 4096, 64, 128)]
            self.decode = dict(b=8, h=32, hkv=8, sk=4096, p=64, d=128)
            self.e2e = dict(hidden=2048, intermediate=5632, layers=16, heads=32, kv_heads=8, vocab=32000, b=4, s=1024, p=64)
            self.headline = dict(hidden=4096, intermediate=14336, layers=48, heads=32, kv_heads=8, vocab=32000, b=4, s=1024, p=64)
            self.steps = 3
        self.dtypes = [torch.bfloat16, torch.float16]


# ---------------------------------------------------------------------------------------- helpers


def _op(name):
    """prefix_attention through one named backend; 'aten-reference' runs the aten backend's code
    with plain-PyTorch stand-ins for its CUDA kernels (CPU smoke runs)."""
    if name == "aten-reference":
        from fastprompt.kernels.aten_kernels import REFERENCE_KERNELS
        from fastprompt.kernels.aten_prefix_attention import prefix_attention_aten

        return lambda q, k, v, pk, pv, **kw: prefix_attention_aten(prefix_attention_inputs(q, k, v, pk, pv, **kw), REFERENCE_KERNELS)
    return lambda q, k, v, pk, pv, **kw: prefix_attention(q, k, v, pk, pv, backend=name, **kw)


def _runnable(sz: Sizes) -> dict[str, str | None]:
    """{backend: None if it runs here, else why not}."""
    from fastprompt.ops.dispatch import BACKENDS

    out = {}
    for name in sz.backends:
        if name == "aten-reference":
            out[name] = None
            continue
        q = torch.zeros(1, 1, 2, 64, device=sz.device, dtype=torch.bfloat16, requires_grad=True)
        kv = torch.zeros(1, 1, 2, 64, device=sz.device, dtype=torch.bfloat16)
        p = torch.zeros(1, 2, 64, device=sz.device, dtype=torch.bfloat16)
        out[name] = BACKENDS[name].why_not(prefix_attention_inputs(q, kv, kv, p, p))
    return out


def _inputs(b, h, hkv, s, sk, p, d, dtype, device, bank=0, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    q = r(b, s, h, d).transpose(1, 2)  # transformers' layout: a non-contiguous (B, H, S, D) view
    k, v = r(b, sk, hkv, d).transpose(1, 2), r(b, sk, hkv, d).transpose(1, 2)
    shape = (bank, hkv, p, d) if bank else (hkv, p, d)
    return [t.requires_grad_(True) for t in (q, k, v, r(*shape), r(*shape))]


def _visible(kp, s, sk, causal, device):
    """bool (B|1, 1, S, Sk): the op's contract (a padded query row sees no sequence key when causal)."""
    vis = torch.ones(1, 1, s, sk, dtype=torch.bool, device=device)
    if causal and s > 1:
        vis = vis & (torch.arange(sk, device=device)[None] <= torch.arange(s, device=device)[:, None] + (sk - s))
    if kp is not None:
        vis = vis & kp[:, None, None, :]
        if causal and s > 1:
            vis = vis & kp[:, sk - s :][:, None, :, None]
    return vis


def _concat_attention(q, k, v, pk, pv, ids, vis, dtype):
    """Attention over the explicitly concatenated [prefix ; sequence] keys, computed in `dtype`
    (float32: the reference; the input dtype: the low-precision reference, SDPA as PEFT runs it)."""
    b, h = q.shape[:2]
    g = h // k.shape[1]
    pkb = pk.unsqueeze(0).expand(b, -1, -1, -1) if ids is None else pk.index_select(0, ids)
    pvb = pv.unsqueeze(0).expand(b, -1, -1, -1) if ids is None else pv.index_select(0, ids)
    kk = torch.cat([pkb, k], 2).repeat_interleave(g, 1).to(dtype)
    vv = torch.cat([pvb, v], 2).repeat_interleave(g, 1).to(dtype)
    p = pk.shape[-2]
    full = torch.cat([torch.ones(*vis.shape[:3], p, dtype=torch.bool, device=q.device), vis], -1)
    return torch.nn.functional.scaled_dot_product_attention(q.to(dtype), kk, vv, attn_mask=full)


def _timer(device):
    if device == "cuda":
        try:
            from triton.testing import do_bench

            return lambda fn: do_bench(fn, warmup=10, rep=40) / 1e3
        except ImportError:
            pass

        def events(fn, n=20):
            for _ in range(3):
                fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(n):
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            return statistics.median(times)

        return events

    return median_seconds


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_reset(device):
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(device):
    return torch.cuda.max_memory_allocated() if device == "cuda" else None


# ---------------------------------------------------------------------------------------- sections


def correctness(sz: Sizes) -> list[dict]:
    rows = []
    avail = _runnable(sz)
    for name, why in avail.items():
        if why:
            rows.append({"backend": name, "skipped": why})
    for s in sz.seqs:
        for i in range(8):  # 8 cases per S, cycling the other factors so that every pair of values meets
            dtype = sz.dtypes[i % 2]
            d = sz.head_dims[(i // 2) % 2]
            p = sz.prefix_lens[(i // 4) % 2]
            h, hkv = sz.heads[(i + i // 2) % 2]
            causal = (i + i // 4) % 2 == 0
            padded = (i // 2 + i // 4) % 2 == 0
            bank = 3 if i % 3 == 0 else 0
            b = sz.batch(s)
            for name, why in avail.items():
                if why:
                    continue
                case = dict(backend=name, dtype=str(dtype)[6:], S=s, D=d, P=p, H=h, Hkv=hkv, causal=causal, left_padded=padded, bank=bool(bank), B=b)
                try:
                    case.update(_check_case(name, b, h, hkv, s, p, d, dtype, causal, padded, bank, sz.device))
                except Exception as e:  # a refusal or a crash is a result too
                    case.update(ok=False, error=f"{type(e).__name__}: {e}")
                rows.append(case)
                print(f"  {name:<15} {case['dtype']:<9} S={s:<5} D={d:<4} P={p:<4} H={h}/{hkv:<3} causal={causal!s:<6} "
                      f"pad={padded!s:<6} bank={bool(bank)!s:<6} -> {'ok' if case['ok'] else 'FAIL'} "
                      f"{case.get('error') or ''}", flush=True)
    return rows


def _check_case(name, b, h, hkv, s, p, d, dtype, causal, padded, bank, device):
    op = _op(name)
    q, k, v, pk, pv = _inputs(b, h, hkv, s, s, p, d, dtype, device, bank=bank)
    ids = None
    if bank:
        ids = torch.tensor([(2 * j) % bank for j in range(b)], device=device)  # repeated ids
    kp = None
    if padded:  # transformers' left padding: the shorter examples start later
        kp = torch.ones(b, s, dtype=torch.bool, device=device)
        for j in range(1, b):
            kp[j, : (s * j) // (2 * b)] = False
    kw = dict(prompt_ids=ids, mask=kp, causal=causal)
    out = op(q, k, v, pk, pv, **kw)
    vis = _visible(kp, s, s, causal, device)
    # the reference runs on float32 leaves: its gradients must not be rounded to the inputs' dtype,
    # or a one-ulp rounding difference at the largest element reads as the whole error budget
    ts = (q, k, v, pk, pv)
    ts32 = [t.detach().float().requires_grad_() for t in ts]
    exact = _concat_attention(*ts32, ids, vis, torch.float32)
    low = _concat_attention(q, k, v, pk, pv, ids, vis, dtype)
    floor = 1e-3
    err = (out.float() - exact).abs().max().item()
    low_err = (low.float() - exact).abs().max().item()
    # seeded, so that a failure reproduces
    w = torch.randn(exact.shape, generator=torch.Generator().manual_seed(1), dtype=exact.dtype).to(exact.device)
    got = torch.autograd.grad((out.float() * w).sum(), ts)
    want = torch.autograd.grad((exact * w).sum(), ts32)
    lo = torch.autograd.grad((low.float() * w).sum(), ts)
    grad_ratio = {}
    ok = err <= 2 * low_err + floor and bool(torch.isfinite(out).all())
    for n, a, e, l_ in zip(("q", "k", "v", "prefix_k", "prefix_v"), got, want, lo):
        ea, el = (a.float() - e).abs().max().item(), (l_.float() - e).abs().max().item()
        grad_ratio[n] = ea / (el + floor)
        ok = ok and ea <= 3 * el + floor and bool(torch.isfinite(a).all())
    # run-to-run: the same call again, the prefix gradients bit for bit
    again = torch.autograd.grad((op(q, k, v, pk, pv, **kw).float() * w).sum(), (pk, pv))
    rerun = max((a - b_).abs().max().item() for a, b_ in zip(got[3:], again))
    return dict(ok=ok, err=err, low_ref_err=low_err, grad_err_over_low=grad_ratio, prefix_grad_rerun_diff=rerun)


def overflow(sz: Sizes) -> list[dict]:
    """A (B, 1, S, S) mask with more than 2^31 elements on the full run; forward only."""
    b, s = sz.overflow["b"], sz.overflow["s"]
    h = hkv = 1
    d, p = 16, 16
    dev = sz.device
    rows = []
    for name, why in _runnable(sz).items():
        if why:
            rows.append({"backend": name, "skipped": why})
            continue
        row = dict(backend=name, B=b, S=s, mask_elements=b * s * s, past_2_31=b * s * s > 2**31)
        try:
            with torch.no_grad():
                q, k, v, pk, pv = (t.detach() for t in _inputs(b, h, hkv, s, s, p, d, torch.bfloat16, dev))
                g = torch.Generator(device="cpu").manual_seed(5)
                mask = torch.empty(b, 1, s, s, dtype=torch.bool, device=dev)
                mask.copy_((torch.rand(b, 1, 1, s, generator=g) > 0.2).to(dev).expand(b, 1, s, s))
                mask[-1, 0, :, -3:] = False  # the last example differs from the others at the very end
                out = _op(name)(q, k, v, pk, pv, mask=mask, causal=True)[-1:]
                last = slice(b - 1, b)
                alone = _op(name)(q[last], k[last], v[last], pk, pv, mask=mask[last], causal=True)
                exact = _op("torch")(q[last].float(), k[last].float(), v[last].float(), pk.float(), pv.float(), mask=mask[last], causal=True)
            err = (out.float() - exact).abs().max().item()
            err_alone = (alone.float() - exact).abs().max().item()
            row.update(ok=bool(torch.isfinite(out).all()) and err <= 2 * err_alone + 1e-3, err=err, err_alone=err_alone)
        except Exception as e:
            row.update(ok=False, error=f"{type(e).__name__}: {e}")
        print(f"  {name:<15} mask {b}x{s}x{s} = {b * s * s:,} elements -> {'ok' if row['ok'] else 'FAIL'} {row.get('error', '')}", flush=True)
        rows.append(row)
        if dev == "cuda":
            torch.cuda.empty_cache()
    return rows


def _timing_impls(sz: Sizes):
    """name -> fn(q, k, v, pk, pv, causal) for every implementation timed."""
    impls = {n: (lambda op: lambda q, k, v, pk, pv, c: op(q, k, v, pk, pv, causal=c))(_op(n)) for n, why in _runnable(sz).items() if not why}

    def sdpa_concat(q, k, v, pk, pv, c):  # what PEFT's concatenated cache runs
        b, s, sk, p = q.shape[0], q.shape[2], k.shape[2], pk.shape[1]
        kk = torch.cat([pk.unsqueeze(0).expand(b, -1, -1, -1), k], 2)
        vv = torch.cat([pv.unsqueeze(0).expand(b, -1, -1, -1), v], 2)
        mask = torch.ones(s, p + sk, dtype=torch.bool, device=q.device).tril(diagonal=p + sk - s) if c else None
        return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, enable_gqa=True)

    def sequence_only(q, k, v, pk, pv, c):  # flash attention on the sequence alone: the floor
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=c and q.shape[2] > 1, enable_gqa=True)

    impls["sdpa_concat"] = sdpa_concat
    impls["sequence_only"] = sequence_only
    for name in sz.inference_backends:  # forward-only backends: their fwd rows only
        impls[name] = (lambda op: lambda q, k, v, pk, pv, c: op(q, k, v, pk, pv, causal=c))(_op(name))
    if sz.device == "cuda":
        try:
            from flash_attn import flash_attn_func

            impls["flash_attn_sequence"] = lambda q, k, v, pk, pv, c: flash_attn_func(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=c
            ).transpose(1, 2)
        except ImportError:
            pass
    return impls


def timing(sz: Sizes) -> list[dict]:
    bench = _timer(sz.device)
    impls = _timing_impls(sz)
    rows = []
    cases = [(shape, True) for shape in sz.timing_shapes]
    for (b, h, hkv, s, p, d), causal in cases:
        q, k, v, pk, pv = _inputs(b, h, hkv, s, s, p, d, torch.bfloat16, sz.device)
        dout = torch.randn_like(q)
        base = {}
        for name, fn in impls.items():
            row = dict(impl=name, B=b, H=h, Hkv=hkv, S=s, P=p, D=d, causal=causal)
            try:
                with torch.no_grad():
                    row["fwd_s"] = bench(lambda: fn(q, k, v, pk, pv, causal))
                if name in sz.inference_backends:
                    base[name] = row
                    rows.append(row)
                    continue
                row["fwd_bwd_s"] = bench(lambda: torch.autograd.grad(fn(q, k, v, pk, pv, causal), (q, k, v, pk, pv), dout, allow_unused=True))
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"
            base[name] = row
            rows.append(row)
        for row in base.values():
            for key in ("fwd_s", "fwd_bwd_s"):
                for ref in ("sdpa_concat", "sequence_only"):
                    if key in row and key in base.get(ref, {}):
                        row[f"{key}_x_{ref}"] = row[key] / base[ref][key]
        for row in base.values():
            print(f"  {row['impl']:<20} B{b} H{h}/{hkv} S{s} P{p} D{d}: fwd {row.get('fwd_s', float('nan')) * 1e3:8.3f} ms "
                  f"fwd+bwd {row.get('fwd_bwd_s', float('nan')) * 1e3:8.3f} ms  x sdpa_concat {row.get('fwd_bwd_s_x_sdpa_concat', float('nan')):.2f} "
                  f" x sequence_only {row.get('fwd_bwd_s_x_sequence_only', float('nan')):.2f} {row.get('error', '')}", flush=True)
    rows.append(_winners(rows, sz))
    # decode: one new token per example against a long cache
    dc = sz.decode
    q, k, v, pk, pv = (t.detach() for t in _inputs(dc["b"], dc["h"], dc["hkv"], 1, dc["sk"], dc["p"], dc["d"], torch.bfloat16, sz.device))
    dec = {}
    for name, fn in impls.items():
        row = dict(impl=name, decode=True, B=dc["b"], H=dc["h"], Hkv=dc["hkv"], S=1, Sk=dc["sk"], P=dc["p"], D=dc["d"])
        try:
            with torch.no_grad():
                row["fwd_s"] = bench(lambda: fn(q, k, v, pk, pv, True))
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
        dec[name] = row
        rows.append(row)
    for row in dec.values():
        if "fwd_s" in row and "fwd_s" in dec["sdpa_concat"]:
            row["fwd_s_x_sdpa_concat"] = row["fwd_s"] / dec["sdpa_concat"]["fwd_s"]
        print(f"  decode {row['impl']:<13} S=1 Sk={dc['sk']}: {row.get('fwd_s', float('nan')) * 1e6:9.1f} us "
              f"x sdpa_concat {row.get('fwd_s_x_sdpa_concat', float('nan')):.2f} {row.get('error', '')}", flush=True)
    return rows


def _winners(rows, sz):
    """For each timed shape and pass, the fastest fastprompt backend, and the rows the dispatcher's
    TRITON_MEASURED_FASTER table would take from this run (paste them there to act on them)."""
    ours = set(sz.backends) | set(sz.inference_backends)
    table, triton_rows = [], []
    shapes = sorted({(r["B"], r["H"], r["Hkv"], r["S"], r["P"], r["D"], r["causal"]) for r in rows if "S" in r and not r.get("decode")})
    for shape in shapes:
        here = [r for r in rows
                if (r.get("B"), r.get("H"), r.get("Hkv"), r.get("S"), r.get("P"), r.get("D"), r.get("causal")) == shape
                and r.get("impl") in ours]
        for key in ("fwd_s", "fwd_bwd_s"):
            timed = [r for r in here if key in r]
            if not timed:
                continue
            best = min(timed, key=lambda r: r[key])
            table.append({"shape": shape, "pass": key, "fastest": best["impl"], "times": {r["impl"]: r[key] for r in timed}})
            if best["impl"] == "triton" and sz.device == "cuda":
                triton_rows.append({"device_capability": list(torch.cuda.get_device_capability()), "dtypes": ["bfloat16"],
                                    "head_dims": [shape[5]], "seq": [shape[3], shape[3]], "causal": shape[6],
                                    "training": key == "fwd_bwd_s"})
    print("  fastest fastprompt backend per shape:")
    for t in table:
        print(f"    {t['shape']} {t['pass']:<10} {t['fastest']}")
    return {"summary": "winners", "table": table, "triton_measured_faster": triton_rows}


def _llama_config(c):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["intermediate"], num_hidden_layers=c["layers"],
                       num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"], tie_word_embeddings=False,
                       max_position_embeddings=max(2048, c["s"] + c["p"]), architectures=["LlamaForCausalLM"])


def _build(config, dtype, device):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _train_steps(model, params, ids, steps, device) -> dict:
    """Training steps with a completion-only causal-LM loss: the first half of each row is the prompt (-100)."""
    opt = torch.optim.AdamW(params, lr=1e-3)
    labels = ids.clone()
    labels[:, : ids.shape[1] // 2] = -100
    model.train()
    times = []
    _peak_reset(device)
    for _ in range(steps):
        _sync(device)
        t = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t)
    return {"step_s": statistics.median(times[1:] or times), "peak_bytes": _peak(device), "loss": float(loss.detach())}


def e2e(sz: Sizes) -> list[dict]:
    c = sz.e2e
    config = _llama_config(c)
    dtype = torch.bfloat16
    n = c["layers"]
    ids = torch.randint(1, c["vocab"], (c["b"], c["s"]), generator=torch.Generator().manual_seed(0)).to(sz.device)
    rows = []
    runs = [("fastprompt ptv2 L=0", dict(start_layer=0)), (f"fastprompt ptv2 L={n // 2}", dict(start_layer=n // 2)),
            (f"fastprompt ptv2 L={n // 2} checkpointing", dict(start_layer=n // 2, checkpointing=True)), ("peft prefix tuning", None)]
    for label, kw in runs:
        row = dict(run=label, params_b=None, B=c["b"], S=c["s"], P=c["p"])
        try:
            model = _build(config, dtype, sz.device)
            row["params_b"] = sum(p.numel() for p in model.parameters()) / 1e9
            if kw is None:
                from peft import PrefixTuningConfig, TaskType, get_peft_model

                model = get_peft_model(model, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=c["p"]))
                params = [p for p in model.parameters() if p.requires_grad]
            else:
                fastprompt.patch(model, method="ptv2", num_tokens=c["p"], **kw)
                params = fastprompt.prompt_parameters(model)
            row.update(_train_steps(model, params, ids, sz.steps, sz.device))
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
        model = None
        if sz.device == "cuda":
            torch.cuda.empty_cache()
    peft = next((r for r in rows if r["run"].startswith("peft") and "step_s" in r), None)
    for r in rows:
        if peft and "step_s" in r:
            r["step_x_peft"] = r["step_s"] / peft["step_s"]
        peak = r.get("peak_bytes")
        print(f"  {r['run']:<40} step {r.get('step_s', float('nan')):.3f} s  x peft {r.get('step_x_peft', float('nan')):.2f}  "
              f"peak {'-' if peak is None else f'{peak / 2**30:.2f} GiB'} {r.get('error', '')}", flush=True)
    return rows


def headline(sz: Sizes) -> list[dict]:
    c = sz.headline
    config = _llama_config(c)
    n = c["layers"]
    start = n // 2
    ids = torch.randint(1, c["vocab"], (c["b"], c["s"]), generator=torch.Generator().manual_seed(0)).to(sz.device)
    budget = f"{torch.cuda.get_device_properties(0).total_memory}" if sz.device == "cuda" else "24GiB"
    plan = {r.weights: r for r in fastprompt.plan(config, device_memory=budget, batch_size=c["b"], seq_len=c["s"], num_tokens=c["p"],
                                                  weights=("bf16", "int8"), methods=("ptv2",), start_layers=[start],
                                                  checkpointing=(True,), print_table=False)}
    rows = []
    for weights in ("bf16", "int8", "bf16 peft lora r=8"):
        lora = weights.endswith("lora r=8")
        row = dict(weights=weights, layers=n, hidden=c["hidden"], B=c["b"], S=c["s"], P=c["p"], start_layer=None if lora else start,
                   checkpointing=True, planned_peak_bytes=None if lora else plan[weights].peak_bytes)  # the planner knows prompts only
        model = None
        try:
            if lora:  # the method users pick by default: LoRA on every layer, transformers' checkpointing
                from peft import LoraConfig, get_peft_model

                model = _build(config, torch.bfloat16, sz.device)
                row["params_b"] = sum(p.numel() for p in model.parameters()) / 1e9
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.enable_input_require_grads()
                model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8))
                row.update(_train_steps(model, [p for p in model.parameters() if p.requires_grad], ids, max(2, sz.steps - 1), sz.device))
            elif weights == "bf16":
                model = _build(config, torch.bfloat16, sz.device)
            else:
                from fastprompt.loading import build_quantized

                model = build_quantized(config, _random_source(sz.device), bits=8, dtype=torch.bfloat16, device=sz.device).to(sz.device)
            if not lora:
                row["params_b"] = sum(p.numel() for p in model.parameters()) / 1e9
                fastprompt.patch(model, method="ptv2", num_tokens=c["p"], start_layer=start, checkpointing=True)
                row.update(_train_steps(model, fastprompt.prompt_parameters(model), ids, max(2, sz.steps - 1), sz.device))
            if row.get("peak_bytes") and row["planned_peak_bytes"]:
                row["peak_x_planned"] = row["peak_bytes"] / row["planned_peak_bytes"]
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        rows.append(row)
        peak = row.get("peak_bytes")
        planned = "-" if row["planned_peak_bytes"] is None else f"{row['planned_peak_bytes'] / 2**30:.2f} GiB"
        print(f"  {weights:<5} {row.get('params_b', float('nan')):.2f} B params: step {row.get('step_s', float('nan')):.2f} s, peak "
              f"{'-' if peak is None else f'{peak / 2**30:.2f} GiB'} (planner {planned}) {row.get('error', '')}", flush=True)
        model = None
        if sz.device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _random_source(device):
    """Random weights made on `device` (a 10B model's worth of CPU randn would take minutes)."""
    import zlib

    def source(name, shape, dtype):
        if name.endswith("bias"):
            return torch.zeros(shape, dtype=dtype, device=device)
        if "norm" in name:
            return torch.ones(shape, dtype=dtype, device=device)
        g = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
        return (torch.randn(shape, generator=g, device=device) * 0.02).to(dtype)

    return source


# ---------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="run every section's code on CPU at tiny sizes (no GPU needed)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections among {','.join(SECTIONS)}")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/gpu_check_<device>.json)")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        ap.error(f"--only: unknown sections {bad}; choose among {list(SECTIONS)}")
    if not args.smoke and not torch.cuda.is_available():
        ap.error("no CUDA device here: run on a GPU machine, or pass --smoke to exercise the code on CPU")
    sz = Sizes(args.smoke)
    import logging
    import warnings

    warnings.filterwarnings("ignore", message="MatMul8bitLt")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    if sz.device == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    meta = {"command": "python bench/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]), "smoke": args.smoke,
            "torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "device": torch.cuda.get_device_name(0) if sz.device == "cuda" else platform.processor() or "cpu"}
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:
        pass
    result = {"meta": meta, "sections": {}}
    failed = False
    t_all = time.perf_counter()
    for name in only:
        print(f"\n== {name}", flush=True)
        t = time.perf_counter()
        try:
            rows = globals()[name](sz)
            sec = {"rows": rows, "seconds": time.perf_counter() - t}
            if any(r.get("ok") is False for r in rows):
                failed = True
        except Exception as e:
            traceback.print_exc()
            sec = {"error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - t}
            failed = True
        result["sections"][name] = sec
        print(f"   ({sec['seconds']:.1f} s)", flush=True)
    meta["seconds"] = time.perf_counter() - t_all
    out = Path(args.out) if args.out else HERE / "results" / f"gpu_check_{sz.device}{'_smoke' if args.smoke else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, out)  # atomic: a killed run never leaves half a file
    print(f"\nwrote {out} ({meta['seconds']:.0f} s){'; FAILURES above' if failed else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
