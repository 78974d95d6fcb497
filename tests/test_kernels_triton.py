"""Triton prefix-attention kernels: run under TRITON_INTERPRET=1 against a float32 reference, and
compiled for sm_80 and sm_90 (register, spill and shared-memory report). On a GPU the same
cases run natively."""

from __future__ import annotations

import json

import pytest
import torch

triton = pytest.importorskip("triton")

from reference import concat_attention  # noqa: E402
from triton_harness import compile_report, interpreted_kernels, ptxas_available  # noqa: E402

ON_GPU = torch.cuda.is_available()


def _kernels():
    if ON_GPU:
        from fastprompt.kernels import triton_prefix_attention

        return triton_prefix_attention
    return interpreted_kernels()


def _device():
    return "cuda" if ON_GPU else "cpu"


def _make(b, h, hkv, s, sk, p, d, dtype, bank=0, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, layout=None):
        x = torch.randn(*shape, generator=g)
        if layout == "bshd":  # transformers' memory layout for q, k, v
            x = torch.randn(shape[0], shape[2], shape[1], shape[3], generator=g).transpose(1, 2)
        return x.to(device=_device(), dtype=dtype).requires_grad_(True)

    shape = (bank, hkv, p, d) if bank else (hkv, p, d)
    return r(b, h, s, d, layout="bshd"), r(b, hkv, sk, d, layout="bshd"), r(b, hkv, sk, d, layout="bshd"), r(*shape), r(*shape)


def _reference(q, k, v, pk, pv, ids, visible, bias, scale, dtype=torch.float64):
    outs = []
    for i in range(q.shape[0]):
        a, c = (pk, pv) if ids is None else (pk[ids[i]], pv[ids[i]])
        vis = None if visible is None else visible[i : i + 1] if visible.shape[0] > 1 else visible
        bi = None if bias is None else bias[i : i + 1] if bias.shape[0] > 1 else bias
        cast = lambda t: t.to(dtype)  # noqa: E731
        if dtype == torch.float64:
            outs.append(concat_attention(cast(q[i : i + 1]), cast(k[i : i + 1]), cast(v[i : i + 1]), cast(a), cast(c), vis, bi, scale))
        else:  # the same math in the low-precision dtype: the reference's own error
            kk = torch.cat([a.unsqueeze(0), k[i : i + 1]], 2).repeat_interleave(q.shape[1] // k.shape[1], 1)
            vv = torch.cat([c.unsqueeze(0), v[i : i + 1]], 2).repeat_interleave(q.shape[1] // k.shape[1], 1)
            p_ = a.shape[-2]
            full = torch.ones(1, 1, q.shape[2], kk.shape[2], dtype=torch.bool, device=q.device)
            if vis is not None:
                full = torch.cat([full[..., :p_].expand(vis.shape[0], vis.shape[1], -1, -1), vis.expand(-1, -1, q.shape[2], -1)], -1)
            mask = torch.zeros(full.shape, dtype=q.dtype, device=q.device).masked_fill(~full, float("-inf"))
            if bi is not None:
                mask = mask + torch.cat([torch.zeros(*bi.shape[:3], p_, dtype=q.dtype, device=q.device), bi.to(q.dtype)], -1)
            outs.append(torch.nn.functional.scaled_dot_product_attention(q[i : i + 1], kk, vv, attn_mask=mask, scale=scale))
    return torch.cat(outs)


CASES = {
    # name: (b, h, hkv, s, sk, p, d, causal, mask kind, bank, bias)
    "odd-S50-P7-D40": (2, 4, 2, 50, 50, 7, 40, False, None, 0, False),
    "causal-gqa": (2, 4, 1, 37, 37, 5, 32, True, None, 0, False),
    "decode-cache": (2, 4, 2, 1, 19, 3, 32, True, None, 0, False),
    "chunked-prefill": (1, 2, 2, 9, 23, 4, 32, True, None, 0, False),
    "key-padding": (3, 2, 2, 21, 21, 6, 64, False, "pad", 0, False),
    "bank-repeated-ids": (4, 2, 2, 17, 17, 5, 32, True, None, 3, False),
    "t5-bias-4d-mask": (2, 2, 2, 13, 13, 4, 32, False, "4d", 0, True),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CONFIGS = [{"BLOCK_M": 16, "BLOCK_N": 16}, None]


def _setup(case, dtype):
    b, h, hkv, s, sk, p, d, causal, mask_kind, bank, with_bias = CASES[case]
    q, k, v, pk, pv = _make(b, h, hkv, s, sk, p, d, dtype, bank)
    dev = _device()
    ids = torch.tensor([2, 0, 2, 2], device=dev)[:b] if bank else None
    mask = visible = bias = None
    if causal:
        visible = (torch.arange(sk, device=dev)[None] <= torch.arange(s, device=dev)[:, None] + (sk - s))[None, None]
    if mask_kind == "pad":
        keys = torch.ones(b, sk, dtype=torch.bool, device=dev)
        keys[1, 15:] = False
        keys[2, 3:] = False
        mask = keys[:, None, None, :]
        visible = mask
    elif mask_kind == "4d":
        mask = torch.rand(b, 1, s, sk, generator=torch.Generator().manual_seed(3)).to(dev) > 0.3
        mask[0, 0, 4] = False  # a row that sees only the prefix
        visible = mask
    if with_bias:
        bias = torch.randn(1, h, s, sk, generator=torch.Generator().manual_seed(4)).to(dev)
    return (q, k, v, pk, pv), ids, mask, visible, bias, causal


@pytest.mark.parametrize("config", CONFIGS, ids=["block16", "default"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("case", list(CASES))
def test_kernels_against_float32_reference(case, dtype, config):
    kern = _kernels()
    (q, k, v, pk, pv), ids, mask, visible, bias, causal = _setup(case, dtype)
    scale = q.shape[-1] ** -0.5
    mask_arg = mask if mask is not None else None
    out, lse = kern.prefix_attention_forward(q, k, v, pk, pv, ids, mask_arg, bias, causal and mask is None, scale, config)
    exact = _reference(q, k, v, pk, pv, ids, visible, bias, scale).to(out.device)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(device=out.device, dtype=dtype)
    grads = kern.prefix_attention_backward(do, q, k, v, pk, pv, out, lse, ids, mask_arg, bias, causal and mask is None, scale, config)
    want = torch.autograd.grad(exact, (q, k, v, pk, pv), do.double())
    names = ["dq", "dk", "dv", "dprefix_k", "dprefix_v"]
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), exact, atol=2e-5, rtol=2e-5)
        for n, g, w in zip(names, grads, want):
            torch.testing.assert_close(g.double(), w.double(), atol=5e-5, rtol=5e-5, msg=lambda m: f"{n}: {m}")
        return
    # flash-attention rule: within 2x the low-precision reference's own error (3x for gradients)
    low = _reference(q, k, v, pk, pv, ids, visible, bias, scale, dtype=dtype)
    low_grads = torch.autograd.grad(low, (q, k, v, pk, pv), do)
    floor = 1e-3 if dtype == torch.float16 else 8e-3
    err, ref_err = (out.double() - exact).abs().max(), (low.double() - exact).abs().max()
    assert err <= 2 * ref_err + floor, (err, ref_err)
    for n, g, lo, w in zip(names, grads, low_grads, want):
        e, re_ = (g.double() - w.double()).abs().max(), (lo.double() - w.double()).abs().max()
        assert e <= 3 * re_ + floor, (n, e, re_)


def test_autograd_function_and_prefix_grad_is_batch_reduced():
    """Through the autograd.Function: the prefix gradient is one (Hkv, P, D) tensor, the batch summed."""
    kern = _kernels()
    (q, k, v, pk, pv), ids, mask, visible, bias, causal = _setup("causal-gqa", torch.float32)
    from fastprompt.ops import prefix_attention_inputs

    out = kern.prefix_attention_triton(prefix_attention_inputs(q, k, v, pk, pv, causal=True))
    out.sum().backward()
    assert pk.grad.shape == pk.shape and pv.grad.shape == pv.shape
    ref_pk = pk.detach().double().requires_grad_(True)
    exact = _reference(q, k, v, ref_pk, pv, None, visible, None, q.shape[-1] ** -0.5)
    exact.sum().backward()
    torch.testing.assert_close(pk.grad.double(), ref_pk.grad, atol=5e-5, rtol=5e-5)


# ---- compiled for real GPUs: registers, spills, shared memory ----

SMEM_LIMIT = {80: 166912, 90: 232448}
KERNEL_NAMES = ["_fwd_kernel", "_bwd_preprocess", "_bwd_dq", "_bwd_dkdv"]
def _candidates(dt, d):
    from fastprompt.kernels.triton_configs import candidates

    return candidates({"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dt], d)


# every kernel at every candidate config the tuner may pick, for sm_80 and sm_90
COMPILE_CASES = [
    {"kernel": k, "dtype": dt, "head_dim": d, "cc": cc, "config": cfg}
    for dt, d in (("fp16", 64), ("bf16", 64), ("fp16", 128), ("bf16", 128), ("fp32", 64))
    for cfg in _candidates(dt, d) for k in KERNEL_NAMES for cc in (80, 90)
]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    if not ptxas_available():
        pytest.skip("ptxas (bundled with triton's NVIDIA backend) not found")
    report = compile_report(COMPILE_CASES, tmp_path_factory.mktemp("cubin"))
    return {(c["kernel"], c["dtype"], c["head_dim"], c["cc"], json.dumps(c["config"], sort_keys=True)): c for c in report}


def _cfg_id(cfg):
    return (f"M{cfg['BLOCK_M']}N{cfg['BLOCK_N']}w{cfg['num_warps']}s{cfg['num_stages']}"
            f"-kv{cfg.get('BLOCK_N_KV')}x{cfg.get('BLOCK_M_KV')}w{cfg.get('num_warps_dkdv')}")


@pytest.mark.parametrize("case", COMPILE_CASES, ids=lambda c: f"{c['kernel']}-{c['dtype']}-D{c['head_dim']}-{_cfg_id(c['config'])}-sm{c['cc']}")
def test_compiles_for_gpu_without_spills(compiled, case, record_property):
    c = compiled[(case["kernel"], case["dtype"], case["head_dim"], case["cc"], json.dumps(case["config"], sort_keys=True))]
    assert "error" not in c, c.get("error")
    report = (f"{c['kernel']} {c['dtype']} D={c['head_dim']} {_cfg_id(c['config'])} sm_{c['cc']}: {c['registers']} registers, "
              f"{c['spill_stores']} B spill stores, {c['spill_loads']} B spill loads, stack {c['stack']} B, shared {c['shared']} B, "
              f"cp.async {c['cp_async']}")
    print(report)
    record_property("resources", report)
    assert c["registers"] > 0, c
    # compiled as a real launch specialises it: 16-divisible pointers and strides
    assert "Out" in c["divisible_args"] or "DQ" in c["divisible_args"] or "Delta" in c["divisible_args"], c["divisible_args"]
    assert c["spill_stores"] == 0 and c["spill_loads"] == 0, f"register spills: {report}"
    assert c["shared"] <= SMEM_LIMIT[c["cc"]], f"shared memory overflow: {report}"


# ------------------------------------------------- through the public op (CPU tensors: the interpreter)

COMPOSED = [
    # b, h, hkv, s, sk, p, d, mask kind, bank
    (3, 4, 2, 50, 50, 7, 40, "right-padding", 0),
    (3, 4, 4, 33, 33, 5, 16, "left-padding", 3),
    (2, 4, 1, 1, 40, 7, 16, "left-padding", 0),  # decode against a padded cache
    (2, 4, 2, 9, 30, 7, 16, "dense", 2),  # chunked prefill, dense mask + causal
]


@pytest.mark.parametrize("case", COMPOSED, ids=[f"{c[7]}-S{c[3]}-Sk{c[4]}-bank{c[8]}" for c in COMPOSED])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_public_op_backend_triton_masks_compose_with_causal(case, dtype):
    """backend="triton" through fastprompt.ops.prefix_attention (on CPU tensors under the
    interpreter): key padding or a dense mask AND causal, banks, GQA, odd sizes."""
    _kernels()  # the interpreter's bf16/cast fixes; the public op then runs the same module
    from fastprompt.ops import prefix_attention

    b, h, hkv, s, sk, p, d, kind, bank = case
    q, k, v, pk, pv = _make(b, h, hkv, s, sk, p, d, dtype, bank=bank)
    ids = torch.tensor([(2 * i + 1) % bank for i in range(b)], device=_device()) if bank else None
    causal = torch.arange(sk)[None] <= torch.arange(s)[:, None] + (sk - s)
    g = torch.Generator().manual_seed(4)
    if kind == "dense":
        mask = torch.rand(b, 1, s, sk, generator=g) > 0.3
        visible = mask & causal
    else:
        mask = torch.ones(b, sk, dtype=torch.bool)
        if kind == "right-padding":
            mask[1, sk - 9 :], mask[-1, 3:] = False, False
        else:
            mask[1, :4], mask[-1, : sk - 2] = False, False
        visible = mask[:, None, None, :] & causal
        if s > 1:
            visible = visible & mask[:, sk - s :][:, None, :, None]
    mask = mask.to(_device())
    out = prefix_attention(q, k, v, pk, pv, prompt_ids=ids, mask=mask, causal=True, backend="triton")
    ref = _reference(q, k, v, pk, pv, ids, visible.to(_device()), None, d**-0.5)
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.double(), ref.double(), atol=tol, rtol=tol)
    w = torch.randn_like(ref)
    got = torch.autograd.grad((out.double() * w).sum(), (q, k, v, pk, pv))
    want = torch.autograd.grad((ref.double() * w).sum(), (q, k, v, pk, pv))
    for name, a, e in zip("q k v prefix_k prefix_v".split(), got, want):
        torch.testing.assert_close(a.double(), e.double(), atol=10 * tol, rtol=10 * tol, msg=lambda m: f"grad {name}: {m}")


def test_public_op_refuses_bf16_under_the_interpreter_and_says_why():
    from fastprompt.ops import explain_backend

    q, k, v, pk, pv = _make(1, 2, 2, 4, 4, 3, 16, torch.bfloat16)
    if ON_GPU:
        pytest.skip("the interpreter's refusal concerns CPU tensors")
    c = explain_backend(q, k, v, pk, pv, backend="cpu")
    assert "issue #11584" in c.refused["triton"]


@pytest.mark.parametrize("bank", [0, 3])
def test_deterministic_prefix_gradients_equal_the_atomic_ones_and_repeat_bit_for_bit(bank):
    """config deterministic=True: per-example fp32 partial gradients reduced after the kernel,
    the same values as the atomics (to fp32 rounding) and identical from run to run; it is the
    default under torch.use_deterministic_algorithms(True)."""
    kern = _kernels()
    q, k, v, pk, pv = (t.detach() for t in _make(4, 4, 2, 20, 20, 7, 16, torch.float32, bank=bank))
    ids = torch.tensor([2, 0, 2, 2], device=_device()) if bank else None
    out, lse = kern.prefix_attention_forward(q, k, v, pk, pv, ids, None, None, True)
    do = torch.randn_like(out)
    run = lambda det: kern.prefix_attention_backward(do, q, k, v, pk, pv, out, lse, ids, None, None, True, config={"deterministic": det})  # noqa: E731
    atomic, det1, det2 = run(False), run(True), run(True)
    for a, b_ in zip(atomic, det1):
        torch.testing.assert_close(a, b_, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(a, b_) for a, b_ in zip(det1, det2))
    if bank:
        assert det1[3][1].abs().sum() == 0  # prompt 1 unused
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        default = kern.prefix_attention_backward(do, q, k, v, pk, pv, out, lse, ids, None, None, True)
    finally:
        torch.use_deterministic_algorithms(prev)
    assert all(torch.equal(a, b_) for a, b_ in zip(default, det1))


@pytest.mark.parametrize("config,match", [
    ({"BLOCK_M": 8}, r"config\['BLOCK_M'\] must be a power of two >= 16"),
    ({"BLOCK_N": 24}, r"config\['BLOCK_N'\] must be a power of two >= 16"),
    ({"num_warps": 3}, r"config\['num_warps'\] must be 1, 2, 4, 8 or 16"),
    ({"BLOCKM": 32}, r"config keys must be among"),
])
def test_a_bad_config_is_refused_before_launch(config, match):
    kern = _kernels()
    q, k, v, pk, pv = (t.detach() for t in _make(1, 2, 2, 4, 4, 3, 16, torch.float32))
    with pytest.raises(ValueError, match=match):
        kern.prefix_attention_forward(q, k, v, pk, pv, config=config)


def test_out_of_range_prompt_ids_are_refused_before_any_kernel_reads_the_bank():
    _kernels()
    from fastprompt.ops import prefix_attention

    q, k, v, pk, pv = _make(2, 2, 2, 4, 4, 3, 16, torch.float32, bank=2)
    with pytest.raises(ValueError, match=r"prompt_ids must lie in \[0, 2\)"):
        prefix_attention(q, k, v, pk, pv, prompt_ids=torch.tensor([0, 2], device=_device()), backend="triton")


def test_tuner_keeps_the_fastest_candidate_per_key_and_skips_failures(monkeypatch):
    """The measuring logic, with a stand-in clock (timing itself needs a GPU)."""
    import triton.testing

    from fastprompt.kernels import triton_configs as tc

    calls = []

    def fake_bench(fn, warmup, rep):
        fn()
        return {32: 1.0, 64: 2.0}[calls[-1]["BLOCK_M"]]

    def run(config):
        calls.append(config)
        if config["BLOCK_M"] == 16:
            raise RuntimeError("out of resources")

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    monkeypatch.setattr(tc, "_TUNED", {})
    key = ("sm90", torch.bfloat16, 128, 1024, 1024, True, True)
    monkeypatch.setattr(tc, "candidates", lambda dtype, d: [{"BLOCK_M": 64}, {"BLOCK_M": 16}, {"BLOCK_M": 32}])
    assert tc.tuned(key, torch.bfloat16, 128, run, on_gpu=True) == {"BLOCK_M": 32}
    n = len(calls)
    assert tc.tuned(key, torch.bfloat16, 128, run, on_gpu=True) == {"BLOCK_M": 32} and len(calls) == n  # cached
    assert tc.tuned(key, torch.bfloat16, 128, run, on_gpu=False) == {"BLOCK_M": 64}  # interpreter: the default
    monkeypatch.setenv("FASTPROMPT_TRITON_AUTOTUNE", "0")
    assert tc.tuned(("other",), torch.bfloat16, 128, run, on_gpu=True) == {"BLOCK_M": 64}
    assert tc.s_bucket(1) == 128 and tc.s_bucket(1000) == 1024 and tc.s_bucket(1 << 20) == 8192


def test_skipping_fully_padded_key_blocks_changes_nothing():
    """With each example's real-key range the kernels skip key blocks that are all padding; the
    result is bit for bit the one that visits them (masked blocks add exp2(-inf) = 0)."""
    kern = _kernels()
    b, s = 3, 70
    q, k, v, pk, pv = (t.detach() for t in _make(b, 4, 2, s, s, 5, 16, torch.float32))
    kp = torch.ones(b, s, dtype=torch.bool)
    kp[0, :40] = False  # left padding: the first blocks are empty
    kp[1, 20:] = False  # right padding
    kp[2, 5:9] = False  # a hole: nothing skippable inside, the range is the whole row
    rng = kern.key_range(kp.to(_device()))
    assert rng.tolist() == [[40, 70], [0, 20], [0, 70]]
    mask = kp[:, None, None, :].to(_device())
    plain = kern.prefix_attention_forward(q, k, v, pk, pv, None, mask, None, False)
    skipped = kern.prefix_attention_forward(q, k, v, pk, pv, None, mask, None, False, krange=rng)
    assert all(torch.equal(a, c) for a, c in zip(plain, skipped))
    do = torch.randn_like(plain[0])
    det = {"deterministic": True}  # no atomics: the comparison is exact on a GPU too
    g_plain = kern.prefix_attention_backward(do, q, k, v, pk, pv, *plain, None, mask, None, False, config=det)
    g_skip = kern.prefix_attention_backward(do, q, k, v, pk, pv, *skipped, None, mask, None, False, config=det, krange=rng)
    for a, c in zip(g_plain, g_skip):
        torch.testing.assert_close(a, c, atol=0, rtol=0)
