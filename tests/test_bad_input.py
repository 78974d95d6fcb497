"""Bad input gets a clear error, early: one table of cases, each naming what was wrong.

(The quantised-head case is in test_quantized.py, bad prompt_ids in test_prompt_banks.py, damaged
PEFT adapters in test_peft_interop.py, damaged checkpoints in test_resume.py.)
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from conftest import model_inputs, tiny_model

import fastprompt
from fastprompt.integration.runtime import runtime_of


def _saved(tmp_path, **kw):
    model = fastprompt.patch(tiny_model("llama"), num_tokens=2, **kw)
    fastprompt.save_prompts(model, tmp_path)
    return tmp_path


def _edit_json(path, **changes):
    f = path / "fastprompt.json"
    meta = json.loads(f.read_text())
    for k, v in changes.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    f.write_text(json.dumps(meta))
    return path


def _patched_twice(_):
    model = fastprompt.patch(tiny_model("llama"))
    fastprompt.patch(model)


def _deberta(_):
    config = tf.DebertaV2Config(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    fastprompt.patch(tf.DebertaV2Model(config))


def _load_into(path, model=None, **kw):
    model = model if model is not None else tiny_model("llama")
    before = runtime_of(model)
    state = None if before is None else {k: v.clone() for k, v in before.prompts.state_dict().items()}
    try:
        fastprompt.load_prompts(model, path, **kw)
    finally:  # refused before the model was touched
        assert runtime_of(model) is before
        if before is not None:
            assert all(torch.equal(v, before.prompts.state_dict()[k]) for k, v in state.items())


def _truncated(tmp_path):
    path = _saved(tmp_path)
    blob = (path / "prompts.safetensors").read_bytes()
    (path / "prompts.safetensors").write_bytes(blob[: len(blob) // 2])
    _load_into(path)


def _garbage_with_matching_checksum(tmp_path):
    import hashlib

    path = _saved(tmp_path)
    junk = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"
    (path / "prompts.safetensors").write_bytes(junk)
    _load_into(_edit_json(path, tensors_sha256=hashlib.sha256(junk).hexdigest()))


def _op(**changes):
    q = torch.randn(1, 2, 3, 4)
    args = dict(q=q, k=torch.randn(1, 2, 3, 4), v=torch.randn(1, 2, 3, 4), prefix_k=torch.randn(2, 2, 4), prefix_v=torch.randn(2, 2, 4))
    args.update(changes)
    return lambda _: fastprompt.prefix_attention(**args)


CASES = [
    ("invalid method", lambda _: fastprompt.patch(tiny_model("llama"), method="lora"), ValueError, "method must be one of"),
    ("num_tokens 0", lambda _: fastprompt.patch(tiny_model("llama"), num_tokens=0), ValueError, "num_tokens must be a positive int, got 0"),
    ("num_tokens negative", lambda _: fastprompt.patch(tiny_model("llama"), num_tokens=-3), ValueError, "num_tokens must be a positive int"),
    ("start_layer too large", lambda _: fastprompt.patch(tiny_model("llama"), start_layer=3), ValueError, r"start_layer must be in \[0, 3\)"),
    ("start_layer negative", lambda _: fastprompt.patch(tiny_model("llama"), start_layer=-1), ValueError, "start_layer must be a non-negative int"),
    ("num_tasks 0", lambda _: fastprompt.patch(tiny_model("llama"), num_tasks=0), ValueError, "num_tasks must be a positive int"),
    ("num_tasks vs heads", lambda _: fastprompt.PromptConfig(num_tasks=3, heads={"a": 2, "b": 2}), ValueError, "num_tasks=3 but heads names 2"),
    ("prompt_ids out of range", lambda _: fastprompt.patch(tiny_model("llama"), num_tasks=2)(**model_inputs("llama"), prompt_ids=torch.tensor([0, 2])),
     ValueError, r"prompt_ids must lie in \[0, 2\)"),
    ("prompt_ids as floats", lambda _: fastprompt.patch(tiny_model("llama"), num_tasks=2)(**model_inputs("llama"), prompt_ids=torch.tensor([0.0, 1.0])),
     ValueError, "1-D integer tensor"),
    ("bank saved with 3 tasks, model patched with 2",
     lambda p: _load_into(_saved(p, num_tasks=3), fastprompt.patch(tiny_model("llama"), num_tokens=2, num_tasks=2), task=None),
     fastprompt.PromptLoadError, "num_tasks: saved 3, model 2"),
    ("prefix dtype differs from q", _op(prefix_k=torch.randn(2, 2, 4, dtype=torch.float64), prefix_v=torch.randn(2, 2, 4, dtype=torch.float64)),
     ValueError, "prefix_k dtype torch.float64 differs from q dtype torch.float32"),
    ("prefix on another device", _op(prefix_k=torch.randn(2, 2, 4, device="meta"), prefix_v=torch.randn(2, 2, 4, device="meta")),
     ValueError, "prefix_k is on meta, q on cpu"),
    ("prompts saved for another model", lambda p: _load_into(_saved(p), tiny_model("llama", num_hidden_layers=2)),
     fastprompt.PromptLoadError, r"saved for another model: layers: saved \[3\], model \[2\]"),
    ("truncated safetensors", _truncated, fastprompt.PromptLoadError, "checksum does not match"),
    ("corrupt safetensors", _garbage_with_matching_checksum, fastprompt.PromptLoadError, "not a valid safetensors file"),
    ("JSON missing a field", lambda p: _load_into(_edit_json(_saved(p), heads=None)), fastprompt.PromptLoadError, r"missing fields \['heads'\]"),
    ("JSON with an unknown field", lambda p: _load_into(_edit_json(_saved(p), exec="rm -rf /")), fastprompt.PromptLoadError, r"unknown fields \['exec'\]"),
    ("JSON config with an unknown field", lambda p: _load_into(_edit_json(_saved(p), config={"method": "ptv2", "num_tokens": 2, "evil": 1})),
     fastprompt.PromptLoadError, r"unknown prompt config fields \['evil'\]"),
    ("unsupported architecture", _deberta, fastprompt.UnsupportedModelError, "model_type='deberta-v2'.*supported model types"),
    ("patch twice", _patched_twice, RuntimeError, "already patched"),
    ("unpatch an unpatched model", lambda _: fastprompt.unpatch(tiny_model("llama")), RuntimeError, "not patched"),
    ("export a bank to PEFT without task", lambda p: fastprompt.to_peft(fastprompt.patch(tiny_model("llama"), num_tasks=2), p), ValueError, "pass task="),
]


@pytest.mark.parametrize("name, call, exc, match", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_a_clear_message(tmp_path, name, call, exc, match):
    with pytest.raises(exc, match=match):
        call(tmp_path)
