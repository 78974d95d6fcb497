"""save_prompts / load_prompts: round trips, validation before touching the model, atomic writes."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import model_inputs, output_tensor, tiny_model

import fastprompt
from fastprompt import PromptLoadError


def _logits(model, arch):
    with torch.no_grad():
        return output_tensor(model(**model_inputs(arch)))


def _trained(arch, **kw):
    model = tiny_model(arch, kind="seqcls") if arch in ("bert", "llama") else tiny_model(arch)
    fastprompt.patch(model, **kw)
    with torch.no_grad():
        for p in fastprompt.prompt_parameters(model):
            p.add_(torch.randn_like(p) * 0.1)  # stands in for training
    return model


@pytest.mark.parametrize(
    "arch,kw",
    [
        ("bert", dict(method="ptv2", num_tokens=4)),
        ("bert", dict(method="prompt", num_tokens=3)),
        ("llama", dict(method="ptv2", num_tokens=4, start_layer=1, reparam=True, reparam_hidden=16)),
        ("llama", dict(method="prompt", num_tokens=3, init_token_ids=[5, 6])),
        ("t5", dict(method="ptv2", num_tokens=2)),
        ("bert", dict(method="lpt", num_tokens=3, start_layer=1, generator="avgpool", generator_hidden=8)),
        ("llama", dict(method="lpt", num_tokens=2, start_layer=2, checkpointing=True)),
    ],
)
def test_round_trip_into_fresh_model(tmp_path, arch, kw):
    model = _trained(arch, **kw)
    expected = _logits(model, arch)
    fastprompt.save_prompts(model, tmp_path / "p")
    assert sorted(f.name for f in (tmp_path / "p").iterdir()) == ["fastprompt.json", "prompts.safetensors"]
    meta = json.loads((tmp_path / "p" / "fastprompt.json").read_text())
    assert meta["method"] == kw["method"] and meta["num_tokens"] == kw["num_tokens"] and meta["dtype"] == "float32"
    assert set(meta["fingerprint"]) == {"architecture", "layers", "heads", "kv_heads", "head_dim", "hidden_size"}
    fresh = tiny_model(arch, kind="seqcls") if arch in ("bert", "llama") else tiny_model(arch)
    fastprompt.load_prompts(fresh, tmp_path / "p")
    # a reparam prompt is saved folded: it loads as the plain prefix inference needs
    assert fastprompt.prompt_config(fresh) == dataclasses.replace(fastprompt.prompt_config(model), reparam=False)
    torch.testing.assert_close(_logits(fresh, arch), expected, atol=0, rtol=0)


def test_load_into_patched_model_with_same_config(tmp_path):
    model = _trained("bert", method="ptv2", num_tokens=4)
    fastprompt.save_prompts(model, tmp_path)
    other = tiny_model("bert", kind="seqcls")
    fastprompt.patch(other, method="ptv2", num_tokens=4)
    fastprompt.load_prompts(other, tmp_path)
    torch.testing.assert_close(_logits(other, "bert"), _logits(model, "bert"), atol=0, rtol=0)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.config._attn_implementation


def _assert_untouched(model, before):
    state, impl = before
    assert model.config._attn_implementation == impl
    assert "fastprompt" not in dict(model.named_children())
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def test_other_model_rejected_naming_the_difference(tmp_path):
    model = _trained("bert", method="ptv2", num_tokens=4)
    fastprompt.save_prompts(model, tmp_path)
    other = tiny_model("bert", kind="seqcls", num_hidden_layers=2)
    before = _state(other)
    with pytest.raises(PromptLoadError, match=r"layers: saved \[3\], model \[2\]"):
        fastprompt.load_prompts(other, tmp_path)
    _assert_untouched(other, before)
    with pytest.raises(PromptLoadError, match="architecture: saved 'bert', model 'llama'"):
        fastprompt.load_prompts(tiny_model("llama"), tmp_path)


def test_training_only_fields_do_not_block_a_load(tmp_path):
    model = _trained("bert", method="ptv2", num_tokens=4, checkpointing=True)
    fastprompt.save_prompts(model, tmp_path)
    other = tiny_model("bert", kind="seqcls")
    fastprompt.patch(other, method="ptv2", num_tokens=4)  # same prompt, trained without checkpointing
    fastprompt.load_prompts(other, tmp_path)
    torch.testing.assert_close(_logits(other, "bert"), _logits(model, "bert"), atol=0, rtol=0)


def test_patched_with_other_config_rejected(tmp_path):
    model = _trained("bert", method="ptv2", num_tokens=4)
    fastprompt.save_prompts(model, tmp_path)
    other = tiny_model("bert", kind="seqcls")
    fastprompt.patch(other, method="ptv2", num_tokens=5)
    with pytest.raises(PromptLoadError, match="num_tokens: saved 4, model 5"):
        fastprompt.load_prompts(other, tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "flip", "missing_tensors", "bad_json", "missing_field", "unknown_field", "unknown_config_field", "wrong_shape"])
def test_damaged_saves_rejected_before_touching_model(tmp_path, damage):
    model = _trained("bert", method="ptv2", num_tokens=4)
    fastprompt.save_prompts(model, tmp_path)
    tfile, jfile = tmp_path / "prompts.safetensors", tmp_path / "fastprompt.json"
    meta = json.loads(jfile.read_text())
    if damage == "truncate":
        tfile.write_bytes(tfile.read_bytes()[:-10])
    elif damage == "flip":
        b = bytearray(tfile.read_bytes())
        b[-1] ^= 0xFF
        tfile.write_bytes(bytes(b))
    elif damage == "missing_tensors":
        tfile.unlink()
    elif damage == "bad_json":
        jfile.write_text("{not json")
    elif damage == "missing_field":
        del meta["fingerprint"]
        jfile.write_text(json.dumps(meta))
    elif damage == "unknown_field":
        meta["surprise"] = 1
        jfile.write_text(json.dumps(meta))
    elif damage == "unknown_config_field":
        meta["config"]["surprise"] = 1
        jfile.write_text(json.dumps(meta))
    elif damage == "wrong_shape":
        import hashlib

        import safetensors.torch

        blob = safetensors.torch.save({"prompt.prefix": torch.zeros(3, 2, 4, 5, 8)})
        tfile.write_bytes(blob)
        meta["tensors_sha256"] = hashlib.sha256(blob).hexdigest()
        jfile.write_text(json.dumps(meta))
    fresh = tiny_model("bert", kind="seqcls")
    before = _state(fresh)
    with pytest.raises(PromptLoadError):
        fastprompt.load_prompts(fresh, tmp_path)
    _assert_untouched(fresh, before)


def test_failed_save_leaves_previous_save_intact(tmp_path, monkeypatch):
    model = _trained("bert", method="ptv2", num_tokens=4)
    fastprompt.save_prompts(model, tmp_path)
    expected = _logits(model, "bert")
    with torch.no_grad():
        model.fastprompt.prefix.add_(1.0)

    import os

    real_fsync = os.fsync
    calls = []

    def failing_fsync(fd):
        calls.append(fd)
        if len(calls) == 1:
            raise OSError("disk full")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        fastprompt.save_prompts(model, tmp_path)
    monkeypatch.undo()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["fastprompt.json", "prompts.safetensors"]  # no temp files left
    fresh = tiny_model("bert", kind="seqcls")
    fastprompt.load_prompts(fresh, tmp_path)
    torch.testing.assert_close(_logits(fresh, "bert"), expected, atol=0, rtol=0)


def test_only_safetensors_and_json_are_read(tmp_path, monkeypatch):
    model = _trained("bert", method="ptv2", num_tokens=4)
    fastprompt.save_prompts(model, tmp_path)

    def no_pickle(*a, **k):
        raise AssertionError("torch.load (pickle) must not be used")

    monkeypatch.setattr(torch, "load", no_pickle)
    import pickle

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    fastprompt.load_prompts(tiny_model("bert", kind="seqcls"), tmp_path)


def test_load_through_a_module_wrapper_as_save_does(tmp_path):
    """load_prompts, like save_prompts and prompt_parameters, reaches the model inside a `.module`
    wrapper (DataParallel here; DistributedDataParallel keeps it the same way): into an unpatched
    model and into one already patched, with the outputs of the model that was saved."""
    model = _trained("bert", num_tokens=4)
    expected = _logits(model, "bert")
    fastprompt.save_prompts(torch.nn.DataParallel(model), tmp_path / "p")
    for fresh in (tiny_model("bert", kind="seqcls"), fastprompt.patch(tiny_model("bert", kind="seqcls"), num_tokens=4)):
        wrapper = torch.nn.DataParallel(fresh)
        assert fastprompt.load_prompts(wrapper, tmp_path / "p") is wrapper
        torch.testing.assert_close(_logits(fresh, "bert"), expected)
