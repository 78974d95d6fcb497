"""The dispatcher: per-device priority over the backends' own declarations, and the public
"which backend and why" answer."""

from __future__ import annotations

import pytest
import torch

from fastprompt.ops import PRIORITY, backends, explain_backend, prefix_attention


def _t(*shape, device="cpu", dtype=torch.float32, grad=False):
    return torch.zeros(*shape, dtype=dtype, device=device, requires_grad=grad)


def test_every_backend_declares_itself_and_each_priority_name_exists():
    names = {b.name for b in backends()}
    assert names == {"aten", "triton", "cuda", "cpu", "torch"}
    for order in PRIORITY.values():
        assert set(order) <= names
    assert PRIORITY["cuda"][0] == "aten"  # the CUDA default until Triton is measured faster
    assert all(b.notes for b in backends())


def test_explain_on_cpu_names_the_choice_and_every_refusal():
    q, kv, p = _t(2, 4, 5, 8, grad=True), _t(2, 2, 5, 8), _t(2, 3, 8)
    c = explain_backend(q, kv, kv, p, p, causal=True)
    assert c.backend == "cpu" and c.order == ["cpu", "torch"]
    assert c.refused["aten"] == "runs on cuda, not cpu"
    assert "later in the priority" in c.refused["torch"]
    assert str(c).startswith("cpu runs")
    d = explain_backend(q, kv, kv, p, p, dropout_p=0.1)
    assert d.backend == "torch" and d.refused["cpu"] == "does not support attention dropout"
    assert explain_backend(q.double(), kv.double(), kv.double(), p.double(), p.double()).backend == "torch"


def test_named_backend_that_cannot_run_says_why():
    q, kv, p = _t(1, 2, 3, 8), _t(1, 2, 3, 8), _t(2, 2, 8)
    with pytest.raises(ValueError, match=r"backend='aten' runs on cuda, not cpu"):
        prefix_attention(q, kv, kv, p, p, backend="aten")
    with pytest.raises(ValueError, match="backend must be one of"):
        prefix_attention(q, kv, kv, p, p, backend="flash")


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch believes a GPU of the given capability is present (fake CUDA tensors carry no device)."""
    cap = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap["value"])
    return cap


def _fake_choice(**kw):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        dtype = kw.pop("dtype", torch.bfloat16)
        d = kw.pop("d", 64)
        q = torch.empty(2, 8, 16, d, dtype=dtype, device="cuda")
        kv = torch.empty(2, 2, 16, d, dtype=dtype, device="cuda")
        p = torch.empty(2, 4, d, dtype=dtype, device="cuda")
        return explain_backend(q, kv, kv, p, p, **kw)


def test_cuda_default_is_aten_and_refusals_fall_back_with_reasons(fake_gpu):
    assert _fake_choice(causal=True).backend == "aten"
    assert _fake_choice(dtype=torch.float32).backend == "aten"  # memory-efficient kernel
    c = _fake_choice(dropout_p=0.1)
    assert c.backend == "torch" and c.refused["aten"] == "does not support attention dropout"
    c = _fake_choice(d=36)
    assert c.backend == "torch" and "multiples of 8" in c.refused["aten"]
    fake_gpu["value"] = (7, 5)
    c = _fake_choice()
    assert c.backend == "torch" and "compute capability (8, 0)" in c.refused["aten"]
    assert "runs only when named" in c.refused["triton"] or "not available" in c.refused["triton"]


def test_prefer_puts_a_backend_first_and_restores_the_order():
    q, kv, p = _t(1, 2, 3, 8, grad=True), _t(1, 2, 3, 8), _t(2, 2, 8)
    before = {d: list(o) for d, o in PRIORITY.items()}
    with __import__("fastprompt").ops.prefer("torch"):
        assert explain_backend(q, kv, kv, p, p).backend == "torch"
        assert PRIORITY["cuda"][0] == "torch"
    assert PRIORITY == before and explain_backend(q, kv, kv, p, p).backend == "cpu"
    with pytest.raises(ValueError, match="name must be one of"):
        __import__("fastprompt").ops.prefer("flash")


def test_a_patched_model_runs_the_preferred_backend(monkeypatch):
    """A user routes a patched model's attention through another backend without touching it."""
    from conftest import model_inputs, output_tensor, tiny_model

    import fastprompt
    from fastprompt.ops import dispatch

    model = fastprompt.patch(tiny_model("llama"), method="ptv2", num_tokens=4)
    used = []
    real = dispatch.select

    def spy(x, name=None):
        b = real(x, name)
        used.append(b.name)
        return b

    import sys

    monkeypatch.setattr(sys.modules["fastprompt.ops.prefix_attention"], "select", spy)
    inputs = model_inputs("llama")
    with torch.no_grad():
        fused = output_tensor(model(**inputs))
        with fastprompt.ops.prefer("torch"):
            plain = output_tensor(model(**inputs))
    assert set(used[: len(used) // 2]) == {"cpu"} and set(used[len(used) // 2 :]) == {"torch"}
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)


def test_triton_goes_first_only_where_a_measurement_says_it_is_faster(fake_gpu, monkeypatch):
    from fastprompt.ops import dispatch

    assert _fake_choice(causal=True).backend == "aten"  # the table is empty: aten
    monkeypatch.setattr(dispatch, "TRITON_MEASURED_FASTER", [{"device_capability": (9, 0), "dtypes": {torch.bfloat16}, "seq": (8, 64), "causal": True}])
    c = _fake_choice(causal=True)
    assert c.order[0] == "triton"
    assert c.backend == "triton" or "not available" in c.refused["triton"]
    assert _fake_choice(causal=False).order[0] == "aten"  # the row is for causal calls only
    fake_gpu["value"] = (8, 0)
    assert _fake_choice(causal=True).order[0] == "aten"  # measured on another GPU
