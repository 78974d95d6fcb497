"""Truncated backward below the first prompt layer, and activation checkpointing."""

from __future__ import annotations

import pytest
import torch
from conftest import model_inputs, output_tensor, tiny_model
from reference import PREFIX, REF_IMPL, self_attention_modules

import fastprompt


def _grad_modes(model, arch):
    seen = []
    for module in self_attention_modules(model, arch)[0]:
        module.register_forward_pre_hook(lambda m, a, k: seen.append(torch.is_grad_enabled()), with_kwargs=True)
    return seen


@pytest.mark.parametrize("method", ["ptv2", "lpt"])
@pytest.mark.parametrize("arch", ["llama", "bert", "t5"])
def test_layers_below_start_run_without_autograd(arch, method):
    model = tiny_model(arch)
    fastprompt.patch(model, method=method, num_tokens=2, start_layer=2)
    seen = _grad_modes(model, arch)
    output_tensor(model(**model_inputs(arch))).sum().backward()
    assert seen[:3] == [False, False, True]
    fastprompt.unpatch(model)
    seen.clear()
    model(**model_inputs(arch))
    assert seen[:3] == [True, True, True]  # unpatch removes the wrappers


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_truncated_gradients_equal_full_graph(arch):
    """The prefix gradients with truncation equal those of a run whose graph spans every layer."""
    model = tiny_model(arch)
    inputs = model_inputs(arch)
    fastprompt.patch(model, method="ptv2", num_tokens=3, start_layer=2)
    out = output_tensor(model(**inputs))
    w = torch.randn_like(out)
    (out * w).sum().backward()
    grad = model.fastprompt.prefix.grad[0].clone()
    ref_prefix = model.fastprompt.prefix[0].detach().clone().requires_grad_(True)
    fastprompt.unpatch(model)
    emb = model.get_input_embeddings().weight
    emb.requires_grad_(True)  # forces a graph through the lower layers too
    PREFIX.clear()
    for i, module in enumerate(self_attention_modules(model, arch)[0][2:]):
        PREFIX[id(module)] = (ref_prefix[i, 0], ref_prefix[i, 1])
    model.set_attn_implementation(REF_IMPL)
    ref = output_tensor(model(**inputs))
    (ref * w).sum().backward()
    PREFIX.clear()
    assert emb.grad is not None and emb.grad.abs().sum() > 0  # the reference's graph did reach the bottom
    torch.testing.assert_close(grad, ref_prefix.grad, atol=2e-5, rtol=1e-4)


CONFIGS = [
    ("llama", dict(method="ptv2", start_layer=0)),
    ("llama", dict(method="ptv2", start_layer=1, reparam=True, reparam_hidden=8)),
    ("llama", dict(method="prompt")),
    ("llama", dict(method="lpt", start_layer=1)),
    ("bert", dict(method="ptv2", start_layer=1)),
    ("bert", dict(method="prompt")),
    ("bert", dict(method="lpt", start_layer=1, generator="avgpool")),
    ("t5", dict(method="ptv2", start_layer=1)),
    ("gpt2", dict(method="lpt", start_layer=1)),
]


def _train_step(arch, kw, checkpointing):
    model = tiny_model(arch)
    model.train()  # dropout on: checkpointing must replay the same masks
    fastprompt.patch(model, num_tokens=3, checkpointing=checkpointing, **kw)
    inputs = model_inputs(arch)
    inputs["attention_mask"][1, -2:] = 0
    torch.manual_seed(7)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.untyped_storage()) or t, lambda t: t):
        out = output_tensor(model(**inputs))
    (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    nbytes = sum({s.data_ptr(): s.nbytes() for s in saved if s.data_ptr() not in weights}.values())  # activations only
    return out.detach(), grads, nbytes


@pytest.mark.parametrize("arch,kw", CONFIGS, ids=[f"{a}-{k['method']}-L{k.get('start_layer', 0)}" for a, k in CONFIGS])
def test_checkpointed_gradients_equal_plain(arch, kw):
    out, grads, plain_bytes = _train_step(arch, kw, False)
    out_c, grads_c, ckpt_bytes = _train_step(arch, kw, True)
    torch.testing.assert_close(out_c, out)
    assert grads.keys() == grads_c.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    assert ckpt_bytes < plain_bytes / 2, (ckpt_bytes, plain_bytes)
