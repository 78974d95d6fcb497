"""Frozen backbones in 8-bit and 4-bit (bitsandbytes, on this CPU): every method trains."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import fastprompt

bnb = pytest.importorskip("bitsandbytes")
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig  # noqa: E402

QUANT = {
    "int8": lambda **kw: BitsAndBytesConfig(load_in_8bit=True, **kw),
    "nf4": lambda **kw: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32, **kw),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    tiny_model("llama", intermediate_size=64, hidden_size=64).save_pretrained(d / "llama")
    tiny_model("bert", kind="seqcls").save_pretrained(d / "bert")
    return d


def _losses(model, batch, steps=10, lr=1e-1):
    opt = torch.optim.AdamW(fastprompt.prompt_parameters(model), lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("quant", list(QUANT))
@pytest.mark.parametrize("kw", [dict(method="ptv2"), dict(method="prompt"), dict(method="lpt", start_layer=1),
                                dict(method="ptv2", start_layer=1, checkpointing=True)], ids=["ptv2", "prompt", "lpt", "ptv2-L1-ckpt"])
def test_quantised_decoder_trains(saved, quant, kw):
    model = AutoModelForCausalLM.from_pretrained(saved / "llama", quantization_config=QUANT[quant]())
    assert any(isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)) for m in model.modules())
    fastprompt.patch(model, num_tokens=4, **kw)
    ids = torch.randint(3, 99, (4, 10))
    losses = _losses(model, {"input_ids": ids, "labels": ids})
    assert losses[-1] < losses[0] - 0.02, losses


def test_4bit_eval_then_train(saved):
    """bitsandbytes repacks 4-bit weights for CPU inference on an eval forward without grad, after
    which no gradient flows (and on these shapes the repack itself fails): patched models never
    repack, so eval then train works."""
    model = AutoModelForCausalLM.from_pretrained(saved / "llama", quantization_config=QUANT["nf4"]())
    q = model.model.layers[0].self_attn.q_proj
    own_flag = q.support_avx512bf16_for_cpu
    fastprompt.patch(model, method="prompt", num_tokens=4)
    ids = torch.randint(3, 99, (4, 10))
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids, labels=ids).loss.item()
    assert not getattr(q.weight.quant_state, "packing_format_for_cpu", False)
    losses = _losses(model, {"input_ids": ids, "labels": ids})
    assert losses[-1] < before - 0.02, (before, losses)
    fastprompt.unpatch(model)
    assert q.support_avx512bf16_for_cpu == own_flag  # the layer's own setting is back


@pytest.mark.parametrize("quant", list(QUANT))
def test_quantised_encoder_with_float_head_trains(saved, quant):
    model = AutoModelForSequenceClassification.from_pretrained(saved / "bert", quantization_config=QUANT[quant](llm_int8_skip_modules=["classifier", "pooler"]))
    fastprompt.patch(model, method="ptv2", num_tokens=4)
    batch = {"input_ids": torch.randint(3, 99, (6, 8)), "labels": torch.tensor([0, 1, 2, 0, 1, 2])}
    losses = _losses(model, batch, steps=10, lr=5e-2)
    assert losses[-1] < losses[0] - 0.02, losses


def test_quantised_head_is_refused_clearly(saved):
    model = AutoModelForSequenceClassification.from_pretrained(saved / "bert", quantization_config=QUANT["int8"]())
    with pytest.raises(ValueError, match="task head has non-float parameters.*llm_int8_skip_modules"):
        fastprompt.patch(model, method="ptv2", num_tokens=4)
    assert "fastprompt" not in dict(model.named_children())


def _live_storages() -> dict[int, int]:
    import gc

    found = {}
    for t in gc.get_objects():
        try:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            ptr = t.untyped_storage().data_ptr()
        except (RuntimeError, ReferenceError):  # fake tensors other tests left behind, dead weak proxies
            continue
        if ptr:
            found[ptr] = t.untyped_storage().nbytes()
    return found


def _saved_bytes_and_grads(model, batch):
    """One training step: bytes of the tensors that come to life in forward and stay for backward
    (what autograd saves, and what Python objects such as autograd ctx attributes hold: bitsandbytes'
    CPU training path keeps inputs there, where saved-tensor hooks never see them), and the prompt grads."""
    model.train()
    existing = set(_live_storages())
    existing |= {p.untyped_storage().data_ptr() for p in model.parameters()}
    for m in model.modules():  # bitsandbytes moves the int8 weight into its state on the first forward
        for name in ("CB", "SCB"):
            w = getattr(getattr(m, "state", None), name, None)
            if isinstance(w, torch.Tensor):
                existing.add(w.untyped_storage().data_ptr())
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    kept.update(_live_storages())
    nbytes = sum(n for ptr, n in kept.items() if ptr not in existing)
    loss.backward()
    return nbytes, [p.grad.clone() for p in fastprompt.prompt_parameters(model)]


def test_int8_training_saves_no_more_than_float_and_matches_its_dequantised_twin(saved):
    """The int8 backbone's prompt gradients equal a float32 model holding the dequantised weights
    (the reference: plain nn.Linear), and a training step keeps no more activations than float32 does."""
    q = AutoModelForCausalLM.from_pretrained(saved / "llama", quantization_config=QUANT["int8"]())
    ref = AutoModelForCausalLM.from_pretrained(saved / "llama")
    with torch.no_grad():
        for (name, m), (_, r) in zip(q.named_modules(), ref.named_modules()):
            if isinstance(m, bnb.nn.Linear8bitLt):
                cb, scb = m.weight.data, m.weight.SCB
                r.weight.copy_(cb.float() * scb.float()[:, None] / 127)
    ids = torch.randint(3, 99, (4, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    results = {}
    for name, model in (("int8", q), ("float", ref)):
        torch.manual_seed(0)
        fastprompt.patch(model, num_tokens=4, start_layer=1)
        results[name] = _saved_bytes_and_grads(model, batch)
    (q_bytes, q_grads), (f_bytes, f_grads) = results["int8"], results["float"]
    for g, r in zip(q_grads, f_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    assert q_bytes <= f_bytes, f"int8 step saved {q_bytes} bytes for backward, float32 {f_bytes}"
