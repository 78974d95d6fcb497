"""Hypothesis property tests: random shapes, masks, paddings, causal flags, GQA ratios and prompt ids.

prefix_attention (every backend that runs here) and patched models against explicit
concatenation in float64; patch-then-unpatch against the untouched model.
"""

from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from conftest import tiny_model  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_ops_prefix_attention import BACKENDS, _grads, _inputs, _reference  # noqa: E402
from test_patch_ptv2 import _reference_run  # noqa: E402

import fastprompt  # noqa: E402
from fastprompt.ops import prefix_attention  # noqa: E402

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def attention_case(draw):
    hkv = draw(st.integers(1, 3))
    h = hkv * draw(st.sampled_from([1, 2, 4]))
    b = draw(st.integers(1, 3))
    s = draw(st.integers(1, 8))
    sk = s + draw(st.sampled_from([0, 0, 3]))  # cached decoding / chunked prefill when > s
    p = draw(st.integers(1, 6))
    d = draw(st.sampled_from([8, 16, 24]))
    bank = draw(st.sampled_from([0, 0, 2, 3]))
    mask_kind = draw(st.sampled_from(["none", "causal", "pad", "random"]))
    seed = draw(st.integers(0, 2**16))
    return dict(b=b, h=h, hkv=hkv, s=s, sk=sk, p=p, d=d, bank=bank, mask=mask_kind, seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, **SETTINGS)
@given(case=attention_case())
def test_prefix_attention_property(backend, case):
    b, h, hkv, s, sk, p, d, bank = (case[k] for k in ("b", "h", "hkv", "s", "sk", "p", "d", "bank"))
    q, k, v, pk, pv = _inputs(b, h, hkv, s, sk, p, d, torch.float32, bank=bank, seed=case["seed"])
    g = torch.Generator().manual_seed(case["seed"] + 1)
    ids = torch.randint(0, bank, (b,), generator=g) if bank else None
    mask, causal, visible = None, False, None
    if case["mask"] == "causal":
        causal = True
        visible = (torch.arange(sk)[None, :] <= torch.arange(s)[:, None] + (sk - s))[None, None]
    elif case["mask"] == "pad":
        lengths = torch.randint(0, sk + 1, (b,), generator=g)  # 0: only the prefix is visible
        mask = torch.arange(sk)[None, :] < lengths[:, None]
        visible = mask[:, None, None, :]
    elif case["mask"] == "random":
        mask = torch.rand(b, 1, s, sk, generator=g) < 0.6
        visible = mask
    out = prefix_attention(q, k, v, pk, pv, prompt_ids=ids, mask=mask, causal=causal, backend=backend)
    ref = _reference(q, k, v, pk, pv, ids=ids, visible=visible)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = _grads(out, (q, k, v, pk, pv), w)
    want = _grads(ref, (q, k, v, pk, pv), w)
    for a, r in zip(got, want):
        torch.testing.assert_close(a.double(), r.double(), atol=5e-5, rtol=1e-4)


@st.composite
def model_case(draw):
    arch = draw(st.sampled_from(["bert", "llama", "gpt2"]))
    b = draw(st.integers(1, 3))
    t = draw(st.integers(2, 7))
    return dict(
        arch=arch, b=b, t=t, p=draw(st.integers(1, 5)), start=draw(st.integers(0, 2)), tasks=draw(st.integers(1, 3)),
        pads=[draw(st.integers(0, t - 1)) for _ in range(b)], seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=12, **SETTINGS)
@given(case=model_case())
def test_patched_model_property(case):
    arch, b, t = case["arch"], case["b"], case["t"]
    g = torch.Generator().manual_seed(case["seed"])
    model = tiny_model(arch)
    ids = torch.randint(3, 99, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    for i, n in enumerate(case["pads"]):  # decoders pad on the left, encoders on the right
        if n:
            mask[i, :n] = 0 if arch != "bert" else 1
            mask[i, t - n:] = 0 if arch == "bert" else mask[i, t - n:]
    inputs = {"input_ids": ids, "attention_mask": mask}
    if arch != "bert":
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    prompt_ids = torch.randint(0, case["tasks"], (b,), generator=g)
    with torch.no_grad():
        original = model(**inputs)
    original = original.logits if arch != "bert" else original.last_hidden_state
    fastprompt.patch(model, num_tokens=case["p"], start_layer=case["start"], num_tasks=case["tasks"])
    with torch.no_grad():
        out = model(**inputs, prompt_ids=prompt_ids)
    out = out.logits if arch != "bert" else out.last_hidden_state
    bank = model.fastprompt.prefix.detach().clone()
    fastprompt.unpatch(model)
    real = mask.bool()
    with torch.no_grad():
        for i in range(b):
            row = {k: v[i : i + 1] for k, v in inputs.items()}
            ref = _reference_run(model, arch, bank[prompt_ids[i]], case["start"], row)
            torch.testing.assert_close(out[i][real[i]], ref[0][real[i]], atol=5e-5, rtol=1e-4)
        after = model(**inputs)
    after = after.logits if arch != "bert" else after.last_hidden_state
    assert torch.equal(after, original)  # unpatched: bitwise the model it was


@settings(max_examples=8, **SETTINGS)
@given(case=attention_case())
def test_triton_kernels_property(case):
    """The Triton kernels (interpreted on CPU, native on a GPU) over the same random cases, fp32."""
    pytest.importorskip("triton")
    from test_kernels_triton import _device, _kernels

    kern = _kernels()
    b, h, hkv, s, sk, p, bank = (case[k] for k in ("b", "h", "hkv", "s", "sk", "p", "bank"))
    d = {8: 16, 16: 32, 24: 40}[case["d"]]  # the kernels take head dims from 16
    q, k, v, pk, pv = (t.detach().to(_device()).requires_grad_(True) for t in _inputs(b, h, hkv, s, sk, p, d, torch.float32, bank=bank, seed=case["seed"]))
    g = torch.Generator().manual_seed(case["seed"] + 1)
    ids = torch.randint(0, bank, (b,), generator=g).to(_device()) if bank else None
    mask, causal, visible = None, False, None
    if case["mask"] == "causal":
        causal = True
        visible = (torch.arange(sk)[None, :] <= torch.arange(s)[:, None] + (sk - s))[None, None].to(_device())
    elif case["mask"] in ("pad", "random"):
        mask = (torch.rand(b, 1, s, sk, generator=g) < 0.6).to(_device())
        visible = mask
    scale = d**-0.5
    out, lse = kern.prefix_attention_forward(q, k, v, pk, pv, ids, mask, None, causal, scale, None)
    ref = _reference(q, k, v, pk, pv, ids=ids, visible=visible)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    do = torch.randn(out.shape, generator=g).to(_device())
    grads = kern.prefix_attention_backward(do, q, k, v, pk, pv, out, lse, ids, mask, None, causal, scale, None)
    want = torch.autograd.grad(ref, (q, k, v, pk, pv), do.double())
    for a, r in zip(grads, want):
        torch.testing.assert_close(a.double(), r.double(), atol=5e-5, rtol=1e-4)
