"""from_peft / to_peft against PEFT itself (peft 0.21, the baseline): equal logits both ways."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import model_inputs, peft_runs, tiny_model
from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model

import fastprompt

P = 3


def _peft_adapter(tmp_path, arch, kind, peft_config):
    model = tiny_model(arch, kind=kind)
    with peft_runs(f"{type(peft_config).__name__} on {type(model).__name__}"):
        peft_model = get_peft_model(model, peft_config)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:  # the prompt (and head): away from their init
                p.add_(torch.randn_like(p) * 0.5)
    peft_model.save_pretrained(tmp_path)
    return peft_model.eval()


def _inputs(arch):
    inputs = model_inputs(arch, batch=2, length=6)
    inputs["attention_mask"][1, 4:] = 0 if arch == "bert" else 1
    return inputs


@pytest.mark.parametrize(
    "arch, kind, task, peft_cls",
    [
        ("bert", "seqcls", "SEQ_CLS", PrefixTuningConfig),
        ("llama", "main", "CAUSAL_LM", PrefixTuningConfig),
        ("llama", "seqcls", "SEQ_CLS", PrefixTuningConfig),
        ("llama", "main", "CAUSAL_LM", PromptTuningConfig),
    ],
)
def test_imported_adapter_reproduces_peft_logits(tmp_path, arch, kind, task, peft_cls):
    peft_model = _peft_adapter(tmp_path, arch, kind, peft_cls(task_type=task, num_virtual_tokens=P))
    inputs = _inputs(arch)
    with torch.no_grad(), peft_runs(f"{peft_cls.__name__} on {arch} {kind}"):
        expected = peft_model(**inputs).logits
    if expected.dim() == 3 and expected.shape[1] == 6 + P:  # PROMPT_TUNING returns the virtual tokens' logits too
        expected = expected[:, P:]
    model = fastprompt.from_peft(tiny_model(arch, kind=kind), tmp_path)
    assert fastprompt.prompt_config(model).peft_positions
    with torch.no_grad():
        got = model(**inputs).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    if peft_cls is PrefixTuningConfig and arch == "llama":
        # fastprompt's default keeps real tokens at positions 0..T-1: a different function
        plain = fastprompt.from_peft(tiny_model(arch, kind=kind), tmp_path, peft_positions=False)
        with torch.no_grad():
            assert not torch.allclose(plain(**inputs).logits, expected, atol=1e-3)


@pytest.mark.parametrize(
    "arch, kind, method",
    [("bert", "seqcls", "ptv2"), ("llama", "main", "ptv2"), ("llama", "main", "prompt")],
)
def test_exported_adapter_loads_in_peft_with_equal_logits(tmp_path, arch, kind, method):
    model = fastprompt.patch(tiny_model(arch, kind=kind), method=method, num_tokens=P, peft_positions=True)
    with torch.no_grad():
        for p in fastprompt.prompt_parameters(model):
            p.add_(torch.randn_like(p) * 0.5)
    inputs = _inputs(arch)
    with torch.no_grad():
        ours = model(**inputs).logits
    fastprompt.to_peft(model, tmp_path)
    with torch.no_grad(), peft_runs(f"an adapter of {method} on {arch} {kind}"):
        peft_model = PeftModel.from_pretrained(tiny_model(arch, kind=kind), tmp_path).eval()
        theirs = peft_model(**inputs).logits
    if theirs.dim() == 3 and theirs.shape[1] == 6 + P:
        theirs = theirs[:, P:]
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


def test_bank_task_exports_as_its_own_adapter(tmp_path):
    model = fastprompt.patch(tiny_model("llama"), num_tokens=P, num_tasks=2, peft_positions=True)
    with pytest.raises(ValueError, match="pass task="):
        fastprompt.to_peft(model, tmp_path)
    fastprompt.to_peft(model, tmp_path, task=1)
    inputs = _inputs("llama")
    with torch.no_grad():
        ours = model(**inputs, prompt_ids=torch.tensor([1, 1])).logits
        theirs = PeftModel.from_pretrained(tiny_model("llama"), tmp_path).eval()(**inputs).logits
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


def test_bad_adapters_are_refused_before_touching_the_model(tmp_path):
    _peft_adapter(tmp_path, "llama", "main", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    other = tiny_model("llama", num_hidden_layers=2)
    with pytest.raises(fastprompt.PromptLoadError, match="prompt_embeddings has shape"):
        fastprompt.from_peft(other, tmp_path)
    assert fastprompt.integration.runtime.runtime_of(other) is None
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "LORA"}))
    with pytest.raises(fastprompt.PromptLoadError, match="PREFIX_TUNING or PROMPT_TUNING"):
        fastprompt.from_peft(tiny_model("llama"), tmp_path)
    with pytest.raises(fastprompt.PromptLoadError, match="no such file"):
        fastprompt.from_peft(tiny_model("llama"), tmp_path / "missing")
