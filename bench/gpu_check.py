"""One command that checks fastprompt on one GPU and always brings something back.

    python bench/gpu_check.py                    # on a CUDA machine; writes bench/results/gpu_check_cuda.json
    python bench/gpu_check.py --budget 300       # the whole run in 5 minutes, imports and compilation included
    python bench/gpu_check.py --build-cuda-ext   # also JIT-build csrc/ (nvcc) first, then time the extension
    python bench/gpu_check.py --smoke            # every section's code on CPU at tiny sizes (CI runs this)
    python bench/gpu_check.py --only correctness,e2e --out /tmp/x.json

What comes back: the JSON is rewritten atomically (a temporary file, then os.replace) when the run
starts, after every row and after every section, so a run killed at any moment leaves a valid file
with everything finished so far (the section it was in says "status": "running"). Budget: --budget
seconds for the whole run (default 480, from the start of the process: imports, compilation and
autotuning count). Each section gets a share of what is left, in proportion to the shares below
(seconds of the default budget), so time a section leaves unused goes to the later ones. A section
past its share stops at its next row ("status": "stopped", with why); once the run's budget is spent
the sections left are recorded "skipped" with the reason. Statuses: done, stopped, skipped, error.

Sections, in order of value (share of the default budget):
  correctness (75 s)  the aten backend (smoke: cpu, aten-reference, torch) against attention over the
               explicitly concatenated [prefix ; sequence] keys, output and gradients of q, k, v and the
               prefix. The cases users hit first: fp32 (the memory-efficient kernel), a dense float
               mask (transformers' 4-D additive mask: causal, left padding, holes), T5's additive
               position bias (scale 1), causal with S != Sk (chunked prefill, bottom-right aligned),
               decode at S=1 against a long left-padded cache with a prompt bank, head dim 256, and
               attention dropout through the dispatcher (no exact reference: p=0 must equal the
               reference, single draws must differ from it, their mean over 64 draws must approach it
               within 6 standard errors). Then a grid: bf16 and fp16, head dim 64 and 128, P 16 and
               128, S 128/1000/2048/4096, GQA 32/8 and MHA, causal and not, transformers' left padding,
               a bank with repeated ids, q as the non-contiguous view of the (B, S, H, D) layout.
               Reference float32 (float64 for fp32 inputs). The flash-attention rule: error within 2x
               the low-precision reference's own error against it (3x for gradients) plus a small
               floor; a NaN/Inf scan; the run-to-run difference of the prefix gradients. Every row
               names the backend the dispatcher picks for its inputs (fastprompt.explain_backend)
               and, for aten, the PyTorch kernel behind the sequence part.
  overflow (25 s)     a mask past 2^31 elements (tiny H and D): the batch's last example against the
               same example alone; forward only.
  e2e (75 s)          one bf16 training step of a Llama-like ~1B config (random init) on a left-padded
               batch (a real padding mask) with a completion-only causal-LM loss: PEFT prefix tuning,
               PEFT LoRA r=8, fastprompt ptv2 from layer 0 and N/2 (with and without checkpointing);
               step time, peak memory over a baseline measured right before each model is built, the
               planner's prediction for the fastprompt rows; each model freed before the next.
  headline (120 s)    a 10B Llama-like config (hidden 4096, 48 layers): int8 and nf4 (bitsandbytes,
               quantised before the first step: each linear's dtype and bytes checked), bf16, ptv2 from
               N/2 with checkpointing, B=4, S=1024, P=64: peak memory beside the planner's prediction,
               step time; and PEFT LoRA r=8 on the bf16 model with transformers' checkpointing.
  timing (50 s)       forward and forward+backward of the default CUDA backend against SDPA on the
               concatenated keys with K/V repeated to the query heads (what PEFT's path runs; the JSON
               names the SDPA kernel PyTorch picked) and against the sequence alone (the floor; and
               flash-attn's package if installed); decode at S=1 against Sk=4096.
  triton (90 s)       the Triton backend: a reduced correctness set with its default launch config,
               the overflow case, then its timings with autotuning on (the only place it runs; the
               first call's time, compilation and tuning included, is recorded apart) and the
               dispatcher rows (TRITON_MEASURED_FASTER) this run supports. Smoke: the correctness set
               under Triton's interpreter (fp32/fp16), no timings.
  cuda_ext (45 s)     the forward-only csrc/ extension, only if already built (setup.py, or an earlier
               --build-cuda-ext); with --build-cuda-ext it is built at the start of this section, never
               inside a timed row. Forward correctness, then forward timings.
Training steps use a completion-only causal-LM loss; the first step is left out of step times.

Targets on a GPU: prefix_attention fwd+bwd within 1.1x of attention on the sequence alone and >= 1.2x
faster than SDPA on the concatenated keys at S >= 512; at S=1024, P=64 a ptv2 step no slower than
PEFT's from layer 0 and <= 0.75x of it from N/2; the 10B int8 step's peak within 15% of the planner
and under 24 GiB. The script records these ratios; it does not fail on them (they are measurements).
Exit status 1 when a correctness row fails or a section errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

if __name__ == "__main__" and "--smoke" in sys.argv[1:]:
    # Triton's interpreter must be on before Triton is imported (torch imports it): its own
    # @triton.jit helpers are compiled or interpreted from the moment they are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

STARTED = time.perf_counter()  # the run's budget counts from here (imports included)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from measure import median_seconds  # noqa: E402

import fastprompt  # noqa: E402
from fastprompt.ops import prefix_attention, prefix_attention_inputs  # noqa: E402

SECTIONS = ("correctness", "overflow", "e2e", "headline", "timing", "triton", "cuda_ext")
SHARES = {"correctness": 75, "overflow": 25, "e2e": 75, "headline": 120, "timing": 50, "triton": 90, "cuda_ext": 45}
DEFAULT_BUDGET = 480


@dataclasses.dataclass(frozen=True)
class Case:
    """One correctness case: q (B, H, S, D), k/v (B, Hkv, Sk, D), P prefix positions."""

    tag: str
    b: int
    h: int
    hkv: int
    s: int
    sk: int
    p: int
    d: int
    dtype: torch.dtype
    causal: bool = False
    padded: bool = False  # transformers' left padding, as a (B, Sk) mask
    bank: int = 0  # > 0: a bank of that many prompts, repeated ids
    float_mask: bool = False  # a dense (B, 1, S, Sk) additive mask instead (causal, padding and holes inside)
    t5_bias: bool = False  # T5: an additive (1, H, S, Sk) position bias, scale 1, q pre-scaled

    def describe(self) -> dict:
        return dict(case=self.tag, dtype=str(self.dtype)[6:], B=self.b, H=self.h, Hkv=self.hkv, S=self.s, Sk=self.sk, P=self.p, D=self.d,
                    causal=self.causal, left_padded=self.padded, bank=bool(self.bank), float_mask=self.float_mask, t5_bias=self.t5_bias)


class Sizes:
    """Everything that differs between the GPU run and the CPU smoke run."""

    def __init__(self, smoke: bool, build_cuda_ext: bool = False):
        self.smoke = smoke
        self.build_cuda_ext = build_cuda_ext
        self.dtypes = [torch.bfloat16, torch.float16]
        bf16, f32 = torch.bfloat16, torch.float32
        if smoke:
            self.device = "cpu"
            self.backends = ["cpu", "aten-reference", "torch"]
            self.seqs = [16, 33]
            self.heads = [(4, 2), (4, 4)]
            self.head_dims = [16, 32]
            self.prefix_lens = [4, 8]
            self.batch = lambda s: 2
            self.user_cases = [
                Case("fp32", 2, 4, 2, 33, 33, 8, 32, f32, causal=True, padded=True),
                Case("float mask", 2, 4, 4, 16, 16, 4, 16, bf16, float_mask=True),
                Case("t5 bias", 2, 4, 4, 16, 16, 4, 16, bf16, padded=True, t5_bias=True),
                Case("chunked prefill", 2, 4, 2, 8, 24, 4, 16, bf16, causal=True, padded=True),
                Case("decode", 4, 4, 2, 1, 64, 8, 32, bf16, causal=True, padded=True, bank=3),
                Case("head dim 256", 2, 2, 1, 16, 16, 4, 256, bf16, causal=True, padded=True),
            ]
            self.dropout = dict(n=64, h=2, hkv=1, s=16, p=4, d=16, p_drop=0.1)
            self.overflow = dict(b=2, s=40)
            self.timing_shapes = [(2, 4, 2, 64, 8, 32)]
            self.decode = dict(b=2, h=4, hkv=2, sk=64, p=8, d=32)
            self.e2e = dict(hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, vocab=128, b=3, s=32, p=8)
            self.headline = dict(hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, vocab=128, b=2, s=32, p=8)
            self.steps = 2
            # the Triton interpreter is ~1000x slower than a GPU and wrong in bf16: fp32/fp16 only
            self.triton_grid, self.triton_user = (16, [3, 7]), ["fp32"]
            self.cuda_ext_grid, self.cuda_ext_user = (16, []), []
        else:
            self.device = "cuda"
            self.backends = ["aten"]
            self.seqs = [128, 1000, 2048, 4096]
            self.heads = [(32, 8), (16, 16)]
            self.head_dims = [64, 128]
            self.prefix_lens = [16, 128]
            self.batch = lambda s: 4 if s <= 1024 else 2
            self.user_cases = [
                Case("fp32", 2, 32, 8, 1000, 1000, 64, 128, f32, causal=True, padded=True),
                Case("float mask", 2, 16, 16, 1024, 1024, 32, 64, bf16, float_mask=True),
                Case("t5 bias", 2, 16, 16, 512, 512, 32, 64, bf16, padded=True, t5_bias=True),
                Case("chunked prefill", 2, 32, 8, 512, 2048, 64, 128, bf16, causal=True, padded=True),
                Case("decode", 4, 32, 8, 1, 4096, 64, 128, bf16, causal=True, padded=True, bank=3),
                Case("head dim 256", 2, 8, 4, 1024, 1024, 32, 256, bf16, causal=True, padded=True),
            ]
            self.dropout = dict(n=64, h=4, hkv=2, s=64, p=16, d=64, p_drop=0.1)
            self.overflow = dict(b=2, s=33000)  # 2 * 33000 * 33000 mask elements > 2^31
            self.timing_shapes = [(8, 32, 8, 512, 64, 128), (4, 32, 8, 1024, 64, 128), (2, 32, 8, 2048, 64, 128), (1, 32, 8, 4096, 64, 128)]
            self.decode = dict(b=8, h=32, hkv=8, sk=4096, p=64, d=128)
            self.e2e = dict(hidden=2048, intermediate=5632, layers=16, heads=32, kv_heads=8, vocab=32000, b=4, s=1024, p=64)
            self.headline = dict(hidden=4096, intermediate=14336, layers=48, heads=32, kv_heads=8, vocab=32000, b=4, s=1024, p=64)
            self.steps = 3
            # each distinct Triton specialisation compiles (seconds): a reduced set; decode goes to aten
            self.triton_grid, self.triton_user = (1000, [0, 3, 5, 6]), ["fp32", "float mask", "t5 bias", "chunked prefill", "head dim 256"]
            self.cuda_ext_grid, self.cuda_ext_user = (1000, [0, 1, 2, 3]), ["float mask", "chunked prefill", "decode"]

    def grid(self, s: int, which=range(8)) -> list[Case]:
        """8 cases per S, cycling the other factors so that every pair of values meets."""
        out = []
        for i in which:
            h, hkv = self.heads[(i + i // 2) % 2]
            out.append(Case(f"grid{i}", self.batch(s), h, hkv, s, s, self.prefix_lens[(i // 4) % 2], self.head_dims[(i // 2) % 2],
                            self.dtypes[i % 2], causal=(i + i // 4) % 2 == 0, padded=(i // 2 + i // 4) % 2 == 0, bank=3 if i % 3 == 0 else 0))
        return out

    def subset(self, grid, user) -> list[Case]:
        return [c for c in self.user_cases if c.tag in user] + self.grid(grid[0], grid[1])


# ---------------------------------------------------------------------------------------- the JSON and budgets


class Report:
    """The JSON on disk: {"meta": ..., "sections": {name: {"status", "rows", ...}}}, rewritten atomically."""

    def __init__(self, path: Path | None, meta: dict):
        self.path = path
        self.data = {"meta": meta, "sections": {}}
        self.shared: dict = {}  # what later sections read from earlier ones (timing baselines)

    def save(self) -> None:
        if self.path is None:
            return
        self.data["meta"]["elapsed_s"] = round(time.perf_counter() - STARTED, 2)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)  # atomic: a killed run never leaves half a file


class Section:
    """One section's rows and clock. `go()` is False once the section's own budget or the run's is
    spent (recording why, once); `add(row)` appends a row and rewrites the JSON."""

    def __init__(self, report: Report | None, name: str, budget_s: float = float("inf"), deadline: float = float("inf")):
        self.report = report or Report(None, {})
        self.name = name
        self.budget_s = budget_s
        self.t0 = time.perf_counter()
        self.own_end, self.deadline = self.t0 + budget_s, deadline
        self.entry = {"status": "running", "budget_s": None if budget_s == float("inf") else round(budget_s, 1), "rows": []}
        self.report.data["sections"][name] = self.entry
        self.report.save()

    @property
    def rows(self) -> list[dict]:
        return self.entry["rows"]

    @property
    def shared(self) -> dict:
        return self.report.shared

    def go(self) -> bool:
        now = time.perf_counter()
        if now < min(self.own_end, self.deadline):
            return True
        if self.entry["status"] == "running":
            self.entry["status"] = "stopped"
            why = "the run's budget" if now >= self.deadline else f"the section's budget of {self.budget_s:.0f} s"
            self.entry["stopped"] = f"{why} was spent after {len(self.rows)} rows ({now - self.t0:.0f} s)"
            print(f"  stopped: {self.entry['stopped']}", flush=True)
            self.report.save()
        return False

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        self.report.save()
        return row

    def skip(self, reason: str) -> None:
        self.entry.update(status="skipped", reason=reason)
        print(f"  skipped: {reason}", flush=True)
        self.report.save()

    def close(self) -> None:
        if self.entry["status"] == "running":
            self.entry["status"] = "done"
        self.entry["seconds"] = round(time.perf_counter() - self.t0, 2)
        self.report.save()


def run_sections(sz: Sizes, names, report: Report, budget_s: float, started: float = STARTED) -> bool:
    """Runs the named sections in order under the budget; True when something failed."""
    deadline = started + budget_s
    failed = False
    for i, name in enumerate(names):
        print(f"\n== {name}", flush=True)
        left = deadline - time.perf_counter()
        if left <= 0:
            report.data["sections"][name] = {"status": "skipped", "rows": [],
                                             "reason": f"the run's budget of {budget_s:.0f} s was spent before this section"}
            print(f"  skipped: {report.data['sections'][name]['reason']}", flush=True)
            report.save()
            continue
        share = left * SHARES[name] / sum(SHARES[n] for n in names[i:])
        sec = Section(report, name, share, deadline)
        try:
            RUNNERS[name](sz, sec)
        except Exception as e:
            traceback.print_exc()
            sec.entry.update(status="error", error=f"{type(e).__name__}: {e}")
        sec.close()
        bad = [r for r in sec.rows if r.get("ok") is False]
        failed = failed or bool(bad) or sec.entry["status"] == "error"
        print(f"   ({sec.entry['status']}, {sec.entry['seconds']:.1f} s of {share:.0f} s{f', {len(bad)} FAILED' if bad else ''})", flush=True)
    return failed


# ---------------------------------------------------------------------------------------- helpers


def _op(name):
    """prefix_attention through one named backend ("auto": the dispatcher's choice); 'aten-reference'
    runs the aten backend's code with plain-PyTorch stand-ins for its CUDA kernels (CPU smoke runs)."""
    if name == "aten-reference":
        from fastprompt.kernels.aten_kernels import REFERENCE_KERNELS
        from fastprompt.kernels.aten_prefix_attention import prefix_attention_aten

        return lambda q, k, v, pk, pv, **kw: prefix_attention_aten(prefix_attention_inputs(q, k, v, pk, pv, **kw), REFERENCE_KERNELS)
    backend = None if name == "auto" else name
    return lambda q, k, v, pk, pv, **kw: prefix_attention(q, k, v, pk, pv, backend=backend, **kw)


def _declaration(name):
    """The backend's own declaration of what it supports; aten's, made CPU-runnable, for 'aten-reference'."""
    from fastprompt.ops.dispatch import BACKENDS

    if name == "aten-reference":
        return dataclasses.replace(BACKENDS["aten"], devices=frozenset({"cpu", "cuda"}), available=lambda: True, min_capability=None)
    return BACKENDS[name]


def _why_not(name, args, kw) -> str | None:
    if name == "auto":
        return None
    return _declaration(name).why_not(prefix_attention_inputs(*args, **kw))


def _dispatcher_choice(args, kw) -> str:
    try:
        return fastprompt.explain_backend(*args, **kw).backend
    except ValueError as e:
        return f"none ({e})"


def _aten_kernel(name, args, kw) -> str | None:
    """The PyTorch kernel behind the aten backend's sequence part for these inputs."""
    if name not in ("aten", "aten-reference"):
        return None
    from fastprompt.kernels.aten_kernels import CUDA_KERNELS, REFERENCE_KERNELS
    from fastprompt.kernels.aten_prefix_attention import sequence_part

    part, _ = sequence_part(prefix_attention_inputs(*args, **kw), REFERENCE_KERNELS if name == "aten-reference" else CUDA_KERNELS)
    return {"FlashDense": "flash", "FlashVarlen": "flash varlen", "EfficientBias": "memory-efficient"}.get(type(part).__name__, type(part).__name__)


def _runnable(sz: Sizes, names) -> dict[str, str | None]:
    """{backend: None if it runs here, else why not}: a plain bf16 call at head dim 64."""
    out = {}
    for name in names:
        q = torch.zeros(1, 1, 2, 64, device=sz.device, dtype=torch.bfloat16, requires_grad=True)
        kv = torch.zeros(1, 1, 2, 64, device=sz.device, dtype=torch.bfloat16)
        p = torch.zeros(1, 2, 64, device=sz.device, dtype=torch.bfloat16)
        out[name] = _why_not(name, (q, kv, kv, p, p), {})
    return out


def _inputs(b, h, hkv, s, sk, p, d, dtype, device, bank=0, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    q = r(b, s, h, d).transpose(1, 2)  # transformers' layout: a non-contiguous (B, H, S, D) view
    k, v = r(b, sk, hkv, d).transpose(1, 2), r(b, sk, hkv, d).transpose(1, 2)
    shape = (bank, hkv, p, d) if bank else (hkv, p, d)
    return [t.requires_grad_(True) for t in (q, k, v, r(*shape), r(*shape))]


def _left_padding(b, sk, device):
    """(B, Sk) bool, True = real: example j starts (Sk * j) // (2B) tokens late (the first one is full)."""
    kp = torch.ones(b, sk, dtype=torch.bool, device=device)
    for j in range(1, b):
        kp[j, : (sk * j) // (2 * b)] = False
    return kp


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


def _concat_attention(q, k, v, pk, pv, ids, vis, dtype, bias=None, scale=None):
    """Attention over the explicitly concatenated [prefix ; sequence] keys, K/V repeated to the query
    heads, computed in `dtype` (float32/float64: the reference; the input dtype: the low-precision
    reference). vis: bool (B|1, 1, S, Sk); bias: additive float on the sequence scores or None."""
    b, h = q.shape[:2]
    g = h // k.shape[1]
    pkb = pk.unsqueeze(0).expand(b, -1, -1, -1) if ids is None else pk.index_select(0, ids)
    pvb = pv.unsqueeze(0).expand(b, -1, -1, -1) if ids is None else pv.index_select(0, ids)
    kk = torch.cat([pkb, k], 2).repeat_interleave(g, 1).to(dtype)
    vv = torch.cat([pvb, v], 2).repeat_interleave(g, 1).to(dtype)
    p = pk.shape[-2]
    full = torch.cat([torch.ones(*vis.shape[:3], p, dtype=torch.bool, device=q.device), vis], -1)
    mask = full
    if bias is not None:  # the prefix columns get no bias
        padded = torch.nn.functional.pad(bias.to(dtype), (p, 0))
        mask = torch.where(full, padded, torch.tensor(float("-inf"), dtype=dtype, device=q.device))
    return torch.nn.functional.scaled_dot_product_attention(q.to(dtype), kk, vv, attn_mask=mask, scale=scale)


def _case_args(case: Case, device):
    """(leaf tensors q, k, v, pk, pv; the op's keyword arguments; the reference's keyword arguments)."""
    c = case
    args = _inputs(c.b, c.h, c.hkv, c.s, c.sk, c.p, c.d, c.dtype, device, bank=c.bank)
    ids = torch.tensor([(2 * j) % c.bank for j in range(c.b)], device=device) if c.bank else None  # repeated ids
    kp = _left_padding(c.b, c.sk, device) if c.padded else None
    kw = dict(prompt_ids=ids, mask=kp, causal=c.causal)
    vis = _visible(kp, c.s, c.sk, c.causal, device)
    ref = dict(ids=ids, vis=vis, bias=None, scale=None)
    g = torch.Generator().manual_seed(3)
    if c.float_mask:  # transformers' 4-D additive mask: causal, left padding and holes, dtype's min where masked
        keep = _visible(_left_padding(c.b, c.sk, device), c.s, c.sk, True, device)
        keep = keep & (torch.rand(c.b, 1, c.s, c.sk, generator=g) > 0.15).to(device)
        fmask = torch.zeros(keep.shape, dtype=c.dtype, device=device).masked_fill(keep.logical_not(), torch.finfo(c.dtype).min)
        kw = dict(prompt_ids=ids, mask=fmask)
        ref.update(vis=torch.ones(1, 1, c.s, c.sk, dtype=torch.bool, device=device), bias=fmask)
    if c.t5_bias:  # T5: unscaled scores (scale 1, its q carries the scaling) plus a position bias
        with torch.no_grad():
            args[0].mul_(c.d**-0.5)
        bias = (torch.randn(1, c.h, c.s, c.sk, generator=g) * 2).to(device=device, dtype=c.dtype)
        kw.update(bias=bias, scale=1.0)
        ref.update(bias=bias, scale=1.0)
    return args, kw, ref


def _max_err(a, ref) -> float:
    return (a.to(ref.dtype) - ref).abs().max().item()


def _check(name, case: Case, device, grads: bool = True) -> dict:
    """One backend on one case against the float reference: the flash-attention error rule."""
    op = _op(name)
    args, kw, ref = _case_args(case, device)
    ref_dtype = torch.float64 if case.dtype == torch.float32 else torch.float32
    floor = 1e-5 if case.dtype == torch.float32 else 1e-3
    # the reference runs on leaves in its own dtype: its gradients must not be rounded to the inputs'
    # dtype, or a one-ulp rounding difference at the largest element reads as the whole error budget
    args_ref = [t.detach().to(ref_dtype).requires_grad_(grads) for t in args]
    with torch.set_grad_enabled(grads):
        out = op(*args, **kw)
        exact = _concat_attention(*args_ref, dtype=ref_dtype, **ref)
        low = _concat_attention(*args, dtype=case.dtype, **ref)
    err, low_err = _max_err(out, exact), _max_err(low, exact)
    ok = err <= 2 * low_err + floor and bool(torch.isfinite(out).all())
    res = dict(err=err, low_ref_err=low_err, ref_dtype=str(ref_dtype)[6:])
    if grads:
        # seeded, so that a failure reproduces
        w = torch.randn(exact.shape, generator=torch.Generator().manual_seed(1), dtype=ref_dtype).to(exact.device)
        got = torch.autograd.grad((out.to(ref_dtype) * w).sum(), args)
        want = torch.autograd.grad((exact * w).sum(), args_ref)
        lo = torch.autograd.grad((low.to(ref_dtype) * w).sum(), args)
        ratio = {}
        for n, a, e, l_ in zip(("q", "k", "v", "prefix_k", "prefix_v"), got, want, lo):
            ea, el = _max_err(a, e), _max_err(l_, e)
            ratio[n] = ea / (el + floor)
            ok = ok and ea <= 3 * el + floor and bool(torch.isfinite(a).all())
        # run-to-run: the same call again, the prefix gradients bit for bit
        again = torch.autograd.grad((op(*args, **kw).to(ref_dtype) * w).sum(), args[3:])
        res.update(grad_err_over_low=ratio, prefix_grad_rerun_diff=max((a - b_).abs().max().item() for a, b_ in zip(got[3:], again)))
    res["ok"] = ok
    return res


def _case_rows(names, cases, sec: Section, device, grads=True) -> None:
    """For each case and backend: a checked row, or the backend's refusal (its own declaration)."""
    for case in cases:
        try:
            args, kw, _ = _case_args(case, device)
            with torch.set_grad_enabled(grads):  # a forward-only backend refuses inputs that need gradients
                choice = _dispatcher_choice(args, kw)
        except Exception as e:  # inputs that cannot even be built (out of memory): the case fails for every backend
            for name in names:
                sec.add(dict(backend=name, **case.describe(), ok=False, error=f"{type(e).__name__}: {e}"))
            continue
        for name in names:
            if not sec.go():
                return
            row = dict(backend=name, **case.describe(), dispatcher_choice=choice)
            try:
                with torch.set_grad_enabled(grads):
                    why = _why_not(name, args, kw)
                if why:
                    row["refused"] = why
                else:
                    row["kernel"] = _aten_kernel(name, args, kw)
                    row.update(_check(name, case, device, grads))
            except Exception as e:  # a crash is a result too
                row.update(ok=False, error=f"{type(e).__name__}: {e}")
            sec.add(row)
            verdict = "refused" if "refused" in row else "ok" if row.get("ok") else "FAIL"
            print(f"  {name:<15} {case.tag:<15} {row['dtype']:<8} S={case.s:<5} Sk={case.sk:<5} D={case.d:<4} P={case.p:<4} "
                  f"H={case.h}/{case.hkv:<3} causal={case.causal!s:<5} pad={case.padded!s:<5} bank={bool(case.bank)!s:<5} "
                  f"[dispatcher: {choice}]{' kernel: ' + row['kernel'] if row.get('kernel') else ''} -> {verdict} "
                  f"{row.get('error') or row.get('refused') or ''}", flush=True)


def _dropout_row(sz: Sizes) -> dict:
    """Attention dropout through the dispatcher (the fused backends refuse it): no exact reference.
    p=0 equals the reference; a single draw differs from it; the mean over n draws (n copies of one
    example in a batch: independent dropout masks) lies within 6 standard errors of it; gradients
    are finite."""
    c = sz.dropout
    n, dev = c["n"], sz.device
    torch.manual_seed(0)  # the dropout masks: a failure reproduces
    one = _inputs(1, c["h"], c["hkv"], c["s"], c["s"], c["p"], c["d"], torch.float32, dev)
    args = [one[0].expand(n, -1, -1, -1), one[1].expand(n, -1, -1, -1), one[2].expand(n, -1, -1, -1), one[3], one[4]]
    kw = dict(causal=True, dropout_p=c["p_drop"])
    row = dict(backend="auto", case="dropout", dtype="float32", draws=n, H=c["h"], Hkv=c["hkv"], S=c["s"], P=c["p"], D=c["d"],
               dropout_p=c["p_drop"], causal=True, dispatcher_choice=_dispatcher_choice(args, kw))
    with torch.no_grad():
        exact = _concat_attention(*[t.detach().double() for t in one], None, _visible(None, c["s"], c["s"], True, dev), torch.float64)
        p0 = _op("auto")(*one, causal=True, dropout_p=0.0)
    out = _op("auto")(*args, **kw)
    grads = torch.autograd.grad(out.sum(), one)
    o = out.detach().double()
    mean, sem = o.mean(0, keepdim=True), o.std(0, keepdim=True) / n**0.5
    z = ((mean - exact).abs() / (sem + 1e-7)).max().item()
    single = (o[:1] - exact).abs().max().item()
    p0_err = _max_err(p0, exact)
    row.update(p0_err=p0_err, single_draw_err=single, mean_err=(mean - exact).abs().max().item(), max_z=z,
               ok=bool(torch.isfinite(out).all()) and tuple(out.shape) == (n, c["h"], c["s"], c["d"]) and p0_err <= 1e-4
               and single > 1e-3 and z <= 6.0 and all(bool(torch.isfinite(g_).all()) for g_ in grads))
    return row


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

    return lambda fn: median_seconds(fn, repeats=3)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _free(device) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _allocated(device):
    return torch.cuda.memory_allocated() if device == "cuda" else None


def _peak_reset(device):
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak(device):
    return torch.cuda.max_memory_allocated() if device == "cuda" else None


def _gib(x) -> str:
    return "-" if x is None else f"{x / 2**30:.2f} GiB"


class QuantisationError(RuntimeError):
    """A "quantised" model whose linears are not: its figures would be a float model's."""


# ---------------------------------------------------------------------------------------- correctness, overflow


def correctness(sz: Sizes, sec: Section | None = None) -> list[dict]:
    sec = sec or Section(None, "correctness")
    avail = _runnable(sz, sz.backends)
    for name, why in avail.items():
        if why:
            sec.add({"backend": name, "skipped": why})
    names = [n for n, why in avail.items() if not why]
    # the cases users hit first, then the grid by S: a budget stop keeps the most useful rows
    _case_rows(names, sz.user_cases, sec, sz.device)
    if sec.go():
        row = dict(backend="auto", case="dropout")
        try:
            row = _dropout_row(sz)
        except Exception as e:
            row.update(ok=False, error=f"{type(e).__name__}: {e}")
        sec.add(row)
        print(f"  auto            dropout p={sz.dropout['p_drop']} [dispatcher: {row.get('dispatcher_choice')}] mean of {sz.dropout['n']} "
              f"draws: max z {row.get('max_z', float('nan')):.2f}, single draw err {row.get('single_draw_err', float('nan')):.3g}, "
              f"p=0 err {row.get('p0_err', float('nan')):.2g} -> {'ok' if row.get('ok') else 'FAIL'} {row.get('error', '')}", flush=True)
    _case_rows(names, [c for s in sz.seqs for c in sz.grid(s)], sec, sz.device)
    return sec.rows


def _overflow_row(name, sz: Sizes) -> dict:
    """A (B, 1, S, S) mask with more than 2^31 elements on the full run; forward only."""
    b, s = sz.overflow["b"], sz.overflow["s"]
    h = hkv = 1
    d, p = 16, 16
    dev = sz.device
    row = dict(backend=name, B=b, S=s, mask_elements=b * s * s, past_2_31=b * s * s > 2**31)
    with torch.no_grad():
        q, k, v, pk, pv = (t.detach() for t in _inputs(b, h, hkv, s, s, p, d, torch.bfloat16, dev))
        g = torch.Generator(device="cpu").manual_seed(5)
        mask = torch.empty(b, 1, s, s, dtype=torch.bool, device=dev)
        mask.copy_((torch.rand(b, 1, 1, s, generator=g) > 0.2).to(dev).expand(b, 1, s, s))
        mask[-1, 0, :, -3:] = False  # the last example differs from the others at the very end
        why = _why_not(name, (q, k, v, pk, pv), dict(mask=mask, causal=True))
        if why:
            return dict(row, refused=why)
        out = _op(name)(q, k, v, pk, pv, mask=mask, causal=True)[-1:]
        last = slice(b - 1, b)
        alone = _op(name)(q[last], k[last], v[last], pk, pv, mask=mask[last], causal=True)
        exact = _op("torch")(q[last].float(), k[last].float(), v[last].float(), pk.float(), pv.float(), mask=mask[last], causal=True)
    err, err_alone = _max_err(out.float(), exact), _max_err(alone.float(), exact)
    return dict(row, ok=bool(torch.isfinite(out).all()) and err <= 2 * err_alone + 1e-3, err=err, err_alone=err_alone)


def overflow(sz: Sizes, sec: Section | None = None) -> list[dict]:
    sec = sec or Section(None, "overflow")
    for name, why in _runnable(sz, sz.backends).items():
        if not sec.go():
            break
        if why:
            sec.add({"backend": name, "skipped": why})
            continue
        try:
            row = _overflow_row(name, sz)
        except Exception as e:
            row = dict(backend=name, ok=False, error=f"{type(e).__name__}: {e}")
        sec.add(row)
        print(f"  {name:<15} mask {row.get('mask_elements', 0):,} elements -> "
              f"{'refused' if 'refused' in row else 'ok' if row.get('ok') else 'FAIL'} {row.get('error') or row.get('refused') or ''}", flush=True)
        _free(sz.device)
    return sec.rows


# ---------------------------------------------------------------------------------------- training steps


def _llama_config(c):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["intermediate"], num_hidden_layers=c["layers"],
                       num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"], tie_word_embeddings=False, pad_token_id=0,
                       max_position_embeddings=max(2048, c["s"] + c["p"]), architectures=["LlamaForCausalLM"])


def _build(config, dtype, device):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _lm_batch(c, device) -> dict:
    """A left-padded batch (row 0 full, later rows up to ~S/2 of leading padding: transformers keeps
    the mask) with completion-only labels: each row's padding and the first half of its real tokens
    (the prompt) are -100."""
    b, s = c["b"], c["s"]
    ids = torch.randint(1, c["vocab"], (b, s), generator=torch.Generator().manual_seed(0))
    mask = _left_padding(b, s, "cpu").long()
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.clone()
    for j in range(b):
        pad = int((mask[j] == 0).sum())
        labels[j, : pad + (s - pad) // 2] = -100
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def _train_steps(model, params, batch, steps, device, baseline) -> dict:
    """Training steps (AdamW); the median step time leaves out the first (allocations, compilation)."""
    opt = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    times = []
    _peak_reset(device)
    try:
        for _ in range(steps):
            _sync(device)
            t = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            times.append(time.perf_counter() - t)
    finally:
        del opt
    peak = _peak(device)
    return {"step_s": statistics.median(times[1:] or times), "first_step_s": times[0], "peak_bytes": peak,
            "peak_over_baseline_bytes": None if peak is None else peak - baseline, "loss": float(loss.detach())}


def _measure(row: dict, sz: Sizes, make, batch, steps) -> dict:
    """Builds a model with make() -> (model, trainable params, patched), trains `steps` steps and
    frees it (unpatch, del, gc, empty_cache). Memory is reported over the allocation measured right
    before the build; leftover_bytes is what stayed allocated after freeing."""
    dev = sz.device
    _free(dev)
    base = _allocated(dev)
    row["baseline_bytes"] = base
    model = params = None
    patched = False
    try:
        _peak_reset(dev)
        t = time.perf_counter()
        model, params, patched = make()
        _sync(dev)
        row["build_s"] = time.perf_counter() - t
        row["params_b"] = sum(getattr(getattr(p, "quant_state", None), "shape", p).numel() for p in model.parameters()) / 1e9
        if dev == "cuda":
            row["build_peak_over_baseline_bytes"] = _peak(dev) - base
            row["model_bytes"] = _allocated(dev) - base
        row.update(_train_steps(model, params, batch, steps, dev, base))
        if row.get("peak_over_baseline_bytes") and row.get("planned_tensor_bytes"):
            row["peak_x_planned_tensors"] = row["peak_over_baseline_bytes"] / row["planned_tensor_bytes"]
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"
        if isinstance(e, QuantisationError):
            row["ok"] = False  # a figure that would not mean what it says
        traceback.print_exc()
    finally:
        if patched and model is not None:
            try:
                fastprompt.unpatch(model)
            except Exception as e:
                row["unpatch_error"] = f"{type(e).__name__}: {e}"
        del model, params
        _free(dev)
        row["leftover_bytes"] = None if base is None else _allocated(dev) - base
    return row


def _plan(config, c, sz, weights, starts, ckpts) -> dict:
    """{(weights, start, checkpointing): PlanRow} from the planner."""
    budget = f"{torch.cuda.get_device_properties(0).total_memory}" if sz.device == "cuda" else "24GiB"
    rows = fastprompt.plan(config, device_memory=budget, batch_size=c["b"], seq_len=c["s"], num_tokens=c["p"], weights=weights,
                           methods=("ptv2",), start_layers=starts, checkpointing=ckpts, print_table=False,
                           overhead="512MiB" if sz.device == "cuda" else "50MiB")
    return {(r.weights, r.start_layer, r.checkpointing): r for r in rows}


def _planned(row, plan_row) -> None:
    """The planner's prediction beside the measurement: all of it, and its tensors alone (the
    allocator does not see the CUDA context the overhead part stands for)."""
    row["planned_peak_bytes"] = plan_row.peak_bytes
    row["planned_tensor_bytes"] = plan_row.peak_bytes - plan_row.parts["overhead"]
    row["planned_parts"] = plan_row.parts


def e2e(sz: Sizes, sec: Section | None = None) -> list[dict]:
    sec = sec or Section(None, "e2e")
    c = sz.e2e
    config = _llama_config(c)
    n = c["layers"]
    batch = _lm_batch(c, sz.device)
    plan = _plan(config, c, sz, ("bf16",), [0, n // 2], (False, True))
    runs = [("peft prefix tuning", "prefix", None), ("fastprompt ptv2 L=0", "ptv2", dict(start_layer=0)), ("peft lora r=8", "lora", None),
            (f"fastprompt ptv2 L={n // 2}", "ptv2", dict(start_layer=n // 2)),
            (f"fastprompt ptv2 L={n // 2} checkpointing", "ptv2", dict(start_layer=n // 2, checkpointing=True))]
    for label, kind, kw in runs:
        if not sec.go():
            break
        row = dict(run=label, B=c["b"], S=c["s"], P=c["p"], layers=n, hidden=c["hidden"], left_padded_rows=int((batch["attention_mask"][:, 0] == 0).sum()),
                   labelled_tokens=int((batch["labels"] != -100).sum()))
        if kind == "prefix":
            row["note"] = "step time and memory only: PEFT's prefix logits on left-padded rows were found wrong on transformers 5.25"
        if kind == "ptv2":
            _planned(row, plan[("bf16", kw["start_layer"], kw.get("checkpointing", False))])

        def make(kind=kind, kw=kw):
            model = _build(config, torch.bfloat16, sz.device)
            if kind == "ptv2":
                fastprompt.patch(model, method="ptv2", num_tokens=c["p"], **kw)
                return model, fastprompt.prompt_parameters(model), True
            from peft import LoraConfig, PrefixTuningConfig, TaskType, get_peft_model

            cfg = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=c["p"]) if kind == "prefix" else LoraConfig(task_type="CAUSAL_LM", r=8)
            model = get_peft_model(model, cfg)
            return model, [p for p in model.parameters() if p.requires_grad], False

        sec.add(_measure(row, sz, make, batch, sz.steps))
        peft = next((r for r in sec.rows if r["run"] == "peft prefix tuning" and "step_s" in r), None)
        for r in sec.rows:
            if peft and "step_s" in r:
                r["step_x_peft_prefix"] = r["step_s"] / peft["step_s"]
        sec.report.save()
        print(f"  {label:<40} step {row.get('step_s', float('nan')):.3f} s  x peft prefix {row.get('step_x_peft_prefix', float('nan')):.2f}  "
              f"peak over baseline {_gib(row.get('peak_over_baseline_bytes'))} (planner {_gib(row.get('planned_peak_bytes'))}) "
              f"{row.get('error', '')}", flush=True)
    return sec.rows


def _quant_source(device):
    """Random weights for build_quantized, made on `device` (a 10B model's worth of CPU randn takes
    minutes) and handed over on the CPU: bitsandbytes' Int8Params.to() quantises only data that
    starts on the CPU, so the linears are quantised while moving to the GPU, not lazily at the first
    forward (which would measure an fp16 model)."""
    import zlib

    def source(name, shape, dtype):
        if name.endswith("bias"):
            return torch.zeros(shape, dtype=dtype)
        if "norm" in name:
            return torch.ones(shape, dtype=dtype)
        g = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
        return (torch.randn(shape, generator=g, device=device) * 0.02).to(dtype).cpu()

    return source


def _check_quantised(model, weights: str, device) -> dict:
    """Every transformer-layer linear is bitsandbytes' and holds int8 (1 B/weight) or nf4 (uint8, 0.5
    B/weight) data on `device`, before the first step. Raises QuantisationError otherwise."""
    import bitsandbytes as bnb
    import torch.nn as nn

    cls, want = (bnb.nn.Linear8bitLt, torch.int8) if weights == "int8" else (bnb.nn.Linear4bit, torch.uint8)
    n = got = expected = 0
    bad = []
    for name, m in model.named_modules():
        if isinstance(m, cls):
            w = m.weight
            nbytes = w.numel() * w.element_size()
            exp = m.in_features * m.out_features if weights == "int8" else (m.in_features * m.out_features + 1) // 2
            if w.dtype != want or nbytes != exp or w.device.type != device:
                bad.append(f"{name}: {w.dtype}, {nbytes} B (want {exp}) on {w.device}")
            n, got, expected = n + 1, got + nbytes, expected + exp
        elif isinstance(m, nn.Linear) and ".layers." in f".{name}.":
            bad.append(f"{name}: a float nn.Linear")
    if not n or bad:
        raise QuantisationError(f"weights not quantised before the first step ({n} {cls.__name__}): {bad[:3]}")
    return {"linears": n, "dtype": str(want)[6:], "bytes": got, "expected_bytes": expected}


def headline(sz: Sizes, sec: Section | None = None) -> list[dict]:
    sec = sec or Section(None, "headline")
    c = sz.headline
    config = _llama_config(c)
    n = c["layers"]
    start = n // 2
    batch = _lm_batch(c, sz.device)
    plan = _plan(config, c, sz, ("bf16", "int8", "nf4"), [start], (True,))
    for weights in ("int8", "bf16", "bf16 peft lora r=8", "nf4"):
        if not sec.go():
            break
        lora = weights.endswith("lora r=8")
        row = dict(weights=weights, layers=n, hidden=c["hidden"], B=c["b"], S=c["s"], P=c["p"], start_layer=None if lora else start,
                   checkpointing=True, left_padded_rows=int((batch["attention_mask"][:, 0] == 0).sum()))
        if not lora:  # the planner knows prompts only
            _planned(row, plan[(weights, start, True)])

        def make(weights=weights, lora=lora, row=row):
            if lora:  # the method users pick by default: LoRA on every layer, transformers' checkpointing
                from peft import LoraConfig, get_peft_model

                model = _build(config, torch.bfloat16, sz.device)
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.enable_input_require_grads()
                model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8))
                return model, [p for p in model.parameters() if p.requires_grad], False
            if weights == "bf16":
                model = _build(config, torch.bfloat16, sz.device)
            else:
                from fastprompt.loading import build_quantized

                model = build_quantized(config, _quant_source(sz.device), bits=8 if weights == "int8" else 4, dtype=torch.bfloat16,
                                        device=sz.device).to(sz.device)
                row["quantised"] = _check_quantised(model, weights, sz.device)
            fastprompt.patch(model, method="ptv2", num_tokens=c["p"], start_layer=start, checkpointing=True)
            return model, fastprompt.prompt_parameters(model), True

        sec.add(_measure(row, sz, make, batch, max(2, sz.steps - 1)))
        print(f"  {weights:<20} {row.get('params_b', float('nan')):.2f} B params: step {row.get('step_s', float('nan')):.2f} s, peak over baseline "
              f"{_gib(row.get('peak_over_baseline_bytes'))} (planner {_gib(row.get('planned_peak_bytes'))}, its tensors "
              f"{_gib(row.get('planned_tensor_bytes'))}) {row.get('error', '')}", flush=True)
    return sec.rows


# ---------------------------------------------------------------------------------------- timings


def _sdpa_backend(q, k, v, mask, causal, gqa, training) -> dict:
    """The SDPA kernel PyTorch's dispatcher picks for these arguments (torch._fused_sdp_choice, the
    function F.scaled_dot_product_attention itself asks), and the kernels that accept them when forced
    one at a time with torch.nn.attention.sdpa_kernel (forward, no grad)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    with torch.set_grad_enabled(training):
        try:
            out["sdpa_backend"] = SDPBackend(int(torch._fused_sdp_choice(q, k, v, mask, 0.0, causal, enable_gqa=gqa))).name
        except Exception as e:  # a private function: if it moves, the first kernel that accepts the call (approximate)
            out["sdpa_choice_error"] = f"{type(e).__name__}: {e}"
    accepted = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
            try:
                with sdpa_kernel([b]):
                    torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
                accepted.append(b.name)
            except RuntimeError:
                pass
    out["sdpa_accepts"] = accepted
    if "sdpa_backend" not in out:
        out["sdpa_backend"] = f"{accepted[0]} (first accepted)" if accepted else "none"
    return out


def _sdpa_concat_args(q, k, v, pk, pv, c):
    """What PEFT's path hands SDPA: the prefix concatenated in front of the keys, K/V repeated to the
    query heads (transformers' repeat_kv: a mask rules out SDPA's own GQA, whose math fallback would be
    the slowest kernel), and an explicit bool mask, bottom-right causal."""
    b, s, sk, p = q.shape[0], q.shape[2], k.shape[2], pk.shape[1]
    g = q.shape[1] // k.shape[1]
    kk = torch.cat([pk.unsqueeze(0).expand(b, -1, -1, -1), k], 2).repeat_interleave(g, 1)
    vv = torch.cat([pv.unsqueeze(0).expand(b, -1, -1, -1), v], 2).repeat_interleave(g, 1)
    mask = torch.ones(s, p + sk, dtype=torch.bool, device=q.device).tril(diagonal=p + sk - s) if c else None
    return q, kk, vv, mask, False, False


def _sequence_only_args(q, k, v, pk, pv, c):
    return q, k, v, None, c and q.shape[2] > 1, True


def _sdpa(args_of):
    def fn(q, k, v, pk, pv, c):
        q_, k_, v_, mask, causal, gqa = args_of(q, k, v, pk, pv, c)
        return torch.nn.functional.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, is_causal=causal, enable_gqa=gqa)

    fn.sdpa_args = args_of
    return fn


def _backend_fn(name):
    op = _op(name)
    return lambda q, k, v, pk, pv, c: op(q, k, v, pk, pv, causal=c)


def _peer_impls(sz: Sizes) -> dict:
    impls = {"sdpa_concat": _sdpa(_sdpa_concat_args), "sequence_only": _sdpa(_sequence_only_args)}
    if sz.device == "cuda":
        try:
            from flash_attn import flash_attn_func

            impls["flash_attn_sequence"] = lambda q, k, v, pk, pv, c: flash_attn_func(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=c
            ).transpose(1, 2)
        except ImportError:
            pass
    return impls


def _time_one(fn, bench, tensors, causal, device, training: bool, dout=None) -> dict:
    """{first_call_s (compilation, autotuning), fwd_s[, fwd_bwd_s]}."""
    q, k, v, pk, pv = tensors
    _sync(device)
    t = time.perf_counter()
    if training:
        torch.autograd.grad(fn(q, k, v, pk, pv, causal), (q, k, v, pk, pv), dout, allow_unused=True)
    else:
        with torch.no_grad():
            fn(q, k, v, pk, pv, causal)
    _sync(device)
    out = {"first_call_s": time.perf_counter() - t}
    with torch.no_grad():
        out["fwd_s"] = bench(lambda: fn(q, k, v, pk, pv, causal))
    if training:
        out["fwd_bwd_s"] = bench(lambda: torch.autograd.grad(fn(q, k, v, pk, pv, causal), (q, k, v, pk, pv), dout, allow_unused=True))
    return out


def _ratios(row, shared, key) -> None:
    for pas in ("fwd_s", "fwd_bwd_s"):
        for ref in ("sdpa_concat", "sequence_only"):
            base = shared.get((key, ref), {})
            if pas in row and pas in base:
                row[f"{pas}_x_{ref}"] = row[pas] / base[pas]


def _time_rows(impls: dict, sz: Sizes, sec: Section, training_names) -> bool:
    """Times every impl at the timing shapes, then decode; rows into sec and the shared baselines.
    training_names: the impls also timed forward+backward. False when the budget stopped it."""
    bench = _timer(sz.device)
    shared = sec.shared.setdefault("timing", {})
    shapes = [(b, h, hkv, s, s, p, d, True) for b, h, hkv, s, p, d in sz.timing_shapes]
    dc = sz.decode
    shapes.append((dc["b"], dc["h"], dc["hkv"], 1, dc["sk"], dc["p"], dc["d"], True))
    for key in shapes:
        b, h, hkv, s, sk, p, d, causal = key
        tensors = _inputs(b, h, hkv, s, sk, p, d, torch.bfloat16, sz.device)
        dout = torch.randn_like(tensors[0])
        for name, fn in impls.items():
            if not sec.go():
                return False
            training = s > 1 and name in training_names
            row = dict(impl=name, B=b, H=h, Hkv=hkv, S=s, Sk=sk, P=p, D=d, causal=causal, decode=s == 1)
            if name == "triton" and s == 1 and sz.device == "cuda":
                row["note"] = "the triton backend hands decode (S=1) to the aten backend: this times aten"
            try:
                if hasattr(fn, "sdpa_args"):
                    row.update(_sdpa_backend(*fn.sdpa_args(*tensors, causal), training=training))
                if name in ("aten", "aten-reference"):
                    row["kernel"] = _aten_kernel(name, tensors, dict(causal=causal))
                row.update(_time_one(fn, bench, tensors, causal, sz.device, training, dout))
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"
            shared[(key, name)] = row
            _ratios(row, shared, key)
            sec.add(row)
            print(f"  {name:<20} B{b} H{h}/{hkv} S{s} Sk{sk} P{p} D{d}: fwd {row.get('fwd_s', float('nan')) * 1e3:8.3f} ms "
                  f"fwd+bwd {row.get('fwd_bwd_s', float('nan')) * 1e3:8.3f} ms  x sdpa_concat "
                  f"{row.get('fwd_bwd_s_x_sdpa_concat', row.get('fwd_s_x_sdpa_concat', float('nan'))):.2f}  "
                  f"{row.get('sdpa_backend') or row.get('kernel') or ''} {row.get('error', '')}", flush=True)
        del tensors, dout
        _free(sz.device)
    return True


def _winners(rows, ours, device) -> dict:
    """For each timed shape and pass, the fastest fastprompt backend, and the rows the dispatcher's
    TRITON_MEASURED_FASTER table would take from this run (paste them there to act on them)."""
    table, triton_rows = [], []
    fields = ("B", "H", "Hkv", "S", "Sk", "P", "D", "causal")
    shapes = sorted({tuple(r[f] for f in fields) for r in rows if "S" in r and not r.get("decode")})
    for shape in shapes:
        here = [r for r in rows if tuple(r.get(f) for f in fields) == shape and r.get("impl") in ours]
        for key in ("fwd_s", "fwd_bwd_s"):
            timed = [r for r in here if key in r]
            if not timed:
                continue
            best = min(timed, key=lambda r: r[key])
            table.append({"shape": dict(zip(fields, shape)), "pass": key, "fastest": best["impl"], "times": {r["impl"]: r[key] for r in timed}})
            if best["impl"] == "triton" and device == "cuda":
                triton_rows.append({"device_capability": list(torch.cuda.get_device_capability()), "dtypes": ["bfloat16"],
                                    "head_dims": [shape[6]], "seq": [shape[3], shape[3]], "causal": shape[7], "training": key == "fwd_bwd_s"})
    for t in table:
        print(f"    fastest {t['pass']:<10} {t['shape']}: {t['fastest']}", flush=True)
    return {"summary": "winners", "table": table, "triton_measured_faster": triton_rows}


def timing(sz: Sizes, sec: Section | None = None) -> list[dict]:
    sec = sec or Section(None, "timing")
    ours = [n for n, why in _runnable(sz, sz.backends).items() if not why]
    impls = {n: _backend_fn(n) for n in ours} | _peer_impls(sz)
    if _time_rows(impls, sz, sec, training_names=set(impls)):
        sec.add(_winners(sec.rows, set(ours), sz.device))
    return sec.rows


# ---------------------------------------------------------------------------------------- triton, CUDA extension


def triton_section(sz: Sizes, sec: Section | None = None) -> list[dict]:
    sec = sec or Section(None, "triton")
    from fastprompt.ops.dispatch import BACKENDS

    if not BACKENDS["triton"].available():
        sec.skip("Triton is not installed")
        return sec.rows
    if sz.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sec.skip("needs CUDA (or TRITON_INTERPRET=1 for the correctness set in Triton's interpreter)")
        return sec.rows
    saved = os.environ.get("FASTPROMPT_TRITON_AUTOTUNE")
    try:
        os.environ["FASTPROMPT_TRITON_AUTOTUNE"] = "0"  # correctness with the default launch config
        _case_rows(["triton"], sz.subset(sz.triton_grid, sz.triton_user), sec, sz.device)
        if sz.device == "cuda" and sec.go():
            try:
                row = _overflow_row("triton", sz)
            except Exception as e:
                row = dict(backend="triton", case="overflow", ok=False, error=f"{type(e).__name__}: {e}")
            sec.add(dict(row, case="overflow"))
            print(f"  triton overflow -> {'ok' if row.get('ok') else 'FAIL'} {row.get('error') or row.get('refused') or ''}", flush=True)
            _free(sz.device)
        if sz.device != "cuda":
            sec.add({"timing": "skipped", "reason": "needs CUDA (the interpreter's times mean nothing)"})
            return sec.rows
        if not sec.go():
            return sec.rows
        os.environ["FASTPROMPT_TRITON_AUTOTUNE"] = "1"  # the one place the launch configs are tuned
        if _time_rows({"triton": _backend_fn("triton")}, sz, sec, training_names={"triton"}):
            timed = [r for r in sec.shared.get("timing", {}).values()]
            sec.add(_winners(timed, {"triton", "aten"}, sz.device))
    finally:
        if saved is None:
            os.environ.pop("FASTPROMPT_TRITON_AUTOTUNE", None)
        else:
            os.environ["FASTPROMPT_TRITON_AUTOTUNE"] = saved
    return sec.rows


_CUDA_EXT: dict = {"module": None, "origin": None}


def _find_cuda_extension():
    """The csrc/ extension if it is already built (setup.py's fastprompt.kernels._cuda_ext, or a JIT build in
    torch's extension folder), loaded without compiling anything; else (None, why)."""
    from fastprompt.kernels import cuda_prefix_attention as cpa

    try:
        from fastprompt.kernels import _cuda_ext

        return _cuda_ext, "fastprompt.kernels._cuda_ext (setup.py)"
    except ImportError:
        pass
    try:
        import importlib.util

        from torch.utils.cpp_extension import _get_build_directory

        so = Path(_get_build_directory(cpa.EXTENSION, verbose=False)) / f"{cpa.EXTENSION}.so"
        if so.exists():
            spec = importlib.util.spec_from_file_location(cpa.EXTENSION, so)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod, str(so)
    except Exception as e:
        return None, f"an earlier build could not be loaded: {type(e).__name__}: {e}"
    return None, "not built"


def _use_cuda_extension(module, origin) -> None:
    """Makes the `cuda` backend see exactly this module (or None): its own lookup would JIT-compile
    csrc/ the first time anything asks whether it is available (explain_backend asks every backend)."""
    from fastprompt.kernels import cuda_prefix_attention as cpa

    _CUDA_EXT.update(module=module, origin=origin)
    cpa._extension = lambda: module


def cuda_ext(sz: Sizes, sec: Section | None = None) -> list[dict]:
    sec = sec or Section(None, "cuda_ext")
    if sz.device != "cuda":
        sec.skip("needs CUDA (the csrc/ extension is a CUDA kernel)")
        return sec.rows
    if sz.build_cuda_ext:
        from fastprompt.kernels import cuda_prefix_attention as cpa

        t = time.perf_counter()
        try:
            module = cpa.build(with_cuda=True)
            _use_cuda_extension(module, "built by --build-cuda-ext")
            sec.add({"build": "ok", "seconds": time.perf_counter() - t})
        except Exception as e:
            sec.add({"build": "failed", "seconds": time.perf_counter() - t, "ok": False, "error": f"{type(e).__name__}: {e}"})
            return sec.rows
        print(f"  built the extension in {sec.rows[-1]['seconds']:.0f} s", flush=True)
    if _CUDA_EXT["module"] is None:
        sec.skip(f"the extension is {_CUDA_EXT['origin']}: pass --build-cuda-ext (nvcc, a minute or two) or install with FASTPROMPT_BUILD_CUDA=1")
        return sec.rows
    sec.entry["extension"] = _CUDA_EXT["origin"]
    _case_rows(["cuda"], sz.subset(sz.cuda_ext_grid, sz.cuda_ext_user), sec, sz.device, grads=False)
    if sec.go():
        _time_rows({"cuda": _backend_fn("cuda")}, sz, sec, training_names=set())
    return sec.rows


RUNNERS = {"correctness": correctness, "overflow": overflow, "e2e": e2e, "headline": headline, "timing": timing,
           "triton": triton_section, "cuda_ext": cuda_ext}


# ---------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="run every section's code on CPU at tiny sizes (no GPU needed)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections among {','.join(SECTIONS)} (run in that order)")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds for the whole run, compilation included (default %(default)s)")
    ap.add_argument("--build-cuda-ext", action="store_true", help="JIT-build the csrc/ extension at the start of the cuda_ext section")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/gpu_check_<device>.json)")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        ap.error(f"--only: unknown sections {bad}; choose among {list(SECTIONS)}")
    only = [s for s in SECTIONS if s in only]
    if not args.smoke and not torch.cuda.is_available():
        ap.error("no CUDA device here: run on a GPU machine, or pass --smoke to exercise the code on CPU")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    os.environ["FASTPROMPT_TRITON_AUTOTUNE"] = "0"  # the triton section turns it on for its timings only
    sz = Sizes(args.smoke, args.build_cuda_ext)
    import logging

    warnings.filterwarnings("ignore", message="MatMul8bitLt")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    if sz.device == "cpu":
        torch.set_num_threads(1)  # tiny sizes: one thread is as fast, and steadier on a shared machine
    if sz.device == "cuda":
        _use_cuda_extension(*_find_cuda_extension())  # before anything asks the dispatcher (which would compile it)
    else:
        _use_cuda_extension(None, "not usable without CUDA")
    meta = {"command": "python bench/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]), "smoke": args.smoke,
            "budget_s": args.budget, "sections": only, "shares_s": {n: SHARES[n] for n in only}, "finished": False,
            "torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "device": torch.cuda.get_device_name(0) if sz.device == "cuda" else platform.processor() or "cpu",
            "cuda_extension": _CUDA_EXT["origin"], "build_cuda_ext": args.build_cuda_ext}
    for mod in ("transformers", "peft", "bitsandbytes", "triton"):
        try:
            meta[mod] = __import__(mod).__version__
        except Exception:
            pass
    out = Path(args.out) if args.out else HERE / "results" / f"gpu_check_{sz.device}{'_smoke' if args.smoke else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = Report(out, meta)
    report.save()
    failed = run_sections(sz, only, report, args.budget)
    meta.update(finished=True, seconds=time.perf_counter() - STARTED, failed=failed)
    report.save()
    print(f"\nwrote {out} ({meta['seconds']:.0f} s of {args.budget:.0f} s){'; FAILURES above' if failed else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
