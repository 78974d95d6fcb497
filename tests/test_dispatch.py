"""The dispatcher: per-device priority over the backends' own declarations, and the public
"which backend and why" answer."""

from __future__ import annotations

import pytest
import torch

from fastprompt.ops import backends, explain_backend, prefix_attention, priority


def _t(*shape, device="cpu", dtype=torch.float32, grad=False):
    return torch.zeros(*shape, dtype=dtype, device=device, requires_grad=grad)


def test_every_backend_declares_itself_and_each_priority_name_exists():
    names = {b.name for b in backends()}
    assert names == {"aten", "triton", "cuda", "cpu", "torch"}
    for order in priority().values():
        assert set(order) <= names
    assert priority()["cuda"][0] == "aten"  # the CUDA default until Triton is measured faster
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
    before = dict(priority())
    with __import__("fastprompt").ops.prefer("torch"):
        assert explain_backend(q, kv, kv, p, p).backend == "torch"
        assert priority()["cuda"][0] == "torch"
    assert dict(priority()) == before and explain_backend(q, kv, kv, p, p).backend == "cpu"
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


def test_the_priority_is_read_only():
    with pytest.raises(TypeError):
        priority()["cpu"] = ("torch",)
    with pytest.raises(AttributeError):
        priority()["cpu"].append("torch")


def test_prefer_nests_and_each_exit_restores_the_order_it_found():
    from fastprompt.ops import prefer

    q, kv, p = _t(1, 2, 3, 8, grad=True), _t(1, 2, 3, 8), _t(2, 2, 8)
    default = dict(priority())
    with prefer("torch"):
        assert priority()["cpu"] == ("torch", "cpu")
        with prefer("cpu"):
            assert priority()["cpu"] == ("cpu", "torch") and explain_backend(q, kv, kv, p, p).backend == "cpu"
        assert priority()["cpu"] == ("torch", "cpu") and explain_backend(q, kv, kv, p, p).backend == "torch"
    assert dict(priority()) == default
    plain = prefer("torch")  # the plain-call form lasts until restore()
    assert explain_backend(q, kv, kv, p, p).backend == "torch"
    plain.restore()
    assert dict(priority()) == default and explain_backend(q, kv, kv, p, p).backend == "cpu"


def test_prefer_in_one_thread_leaves_another_threads_dispatch_alone():
    """Two threads at once: one inside prefer("torch"), the other dispatching meanwhile."""
    import threading

    from fastprompt.ops import prefer

    q, kv, p = _t(1, 2, 3, 8, grad=True), _t(1, 2, 3, 8), _t(2, 2, 8)
    inside, checked = threading.Event(), threading.Event()
    seen = {}

    def preferring():
        with prefer("torch"):
            seen["preferring"] = explain_backend(q, kv, kv, p, p).backend
            inside.set()
            checked.wait(10)
            seen["preferring_after"] = explain_backend(q, kv, kv, p, p).backend

    def other():
        inside.wait(10)
        seen["other"] = explain_backend(q, kv, kv, p, p).backend
        seen["other_order"] = priority()["cpu"]
        checked.set()

    threads = [threading.Thread(target=preferring), threading.Thread(target=other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen == {"preferring": "torch", "other": "cpu", "other_order": ("cpu", "torch"), "preferring_after": "torch"}
    assert explain_backend(q, kv, kv, p, p).backend == "cpu"  # nor this one


def test_triton_hands_gpu_decode_to_aten_and_says_why(fake_gpu, monkeypatch):
    """Decode (S=1) on a GPU: named or preferred, triton declares the handoff, aten runs, and
    explain_backend gives triton's reason; S > 1 stays with triton."""
    from fastprompt.ops import dispatch

    if not dispatch.BACKENDS["triton"].available():
        pytest.skip("Triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # real GPU kernels, not the interpreter

    def choice(s, **kw):
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode():
            q = torch.empty(2, 8, s, 64, dtype=torch.bfloat16, device="cuda")
            kv = torch.empty(2, 2, 16, 64, dtype=torch.bfloat16, device="cuda")
            p = torch.empty(2, 4, 64, dtype=torch.bfloat16, device="cuda")
            return explain_backend(q, kv, kv, p, p, **kw)

    c = choice(1, backend="triton")
    assert c.backend == "aten" and c.refused["triton"].startswith("hands these inputs to aten: decode (S=1)")
    with dispatch.prefer("triton"):
        c = choice(1)
        assert c.backend == "aten" and c.order[0] == "triton" and "hands these inputs to aten" in c.refused["triton"]
        assert choice(4).backend == "triton"
    assert choice(4, backend="triton").backend == "triton"
    fake_gpu["value"] = (7, 5)  # aten cannot run it: triton keeps the decode call
    assert choice(1, backend="triton").backend == "triton"
