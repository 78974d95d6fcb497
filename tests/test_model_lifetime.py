"""A dropped patched model is freed at once, as an unpatched one is: nothing fastprompt installs
points back at the model (or its runtime) strongly, so no reference cycle waits for the cyclic GC."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from conftest import model_inputs, output_tensor, tiny_model

import fastprompt
from fastprompt.integration.architectures import spec_for

# (arch, kind, patch keywords): the three methods on a decoder, plus the pieces that only some
# configurations install (checkpointing wrappers, PEFT's position shift, encoder insertion, a base
# model that owns its own layer stack, per-task heads)
PATCHED = {
    "ptv2": ("llama", "main", dict(method="ptv2", num_tokens=2)),
    "prompt": ("llama", "main", dict(method="prompt", num_tokens=2)),
    "lpt": ("llama", "main", dict(method="lpt", num_tokens=2, start_layer=1)),
    "ptv2-checkpointing": ("llama", "main", dict(method="ptv2", num_tokens=2, start_layer=1, checkpointing=True)),
    "prompt-checkpointing-bank": ("llama", "main", dict(method="prompt", num_tokens=2, num_tasks=2, checkpointing=True)),
    "ptv2-peft-positions": ("llama", "main", dict(method="ptv2", num_tokens=2, peft_positions=True)),
    "prompt-gpt2-peft-positions": ("gpt2", "main", dict(method="prompt", num_tokens=2, peft_positions=True)),
    "ptv2-bert-base": ("bert", "main", dict(method="ptv2", num_tokens=2)),
    "prompt-bert-base": ("bert", "main", dict(method="prompt", num_tokens=2)),
    "lpt-bert-heads": ("bert", "seqcls", dict(method="lpt", num_tokens=2, start_layer=1, num_tasks=2, heads={"a": 2, "b": 3})),
}


def _run(model, arch: str, kind: str) -> None:
    """A training forward + backward, an eval forward and (decoders) a short generate; keeps nothing."""
    inputs = model_inputs(arch)
    runtime = fastprompt.integration.runtime.runtime_of(model)
    if runtime is not None and runtime.config.num_tasks > 1:
        inputs["prompt_ids"] = torch.tensor([0, 1])
    model.train()
    if kind == "seqcls":
        loss = model(**inputs, labels=torch.tensor([0, 1])).loss
    elif arch == "bert":  # a base model: no loss of its own
        loss = output_tensor(model(**inputs)).sum()
    else:
        loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    del loss
    model.eval()
    with torch.no_grad():
        out = model(**inputs)
    del out
    if kind == "main" and arch != "bert":
        model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)


def _built_run_and_dropped(arch: str, kind: str, patch_kwargs: dict | None, unpatch: bool, lower_cache: bool = False) -> list[weakref.ref]:
    """Weak references to a model, its first self-attention module and a weight of it,
    taken after the model ran; every strong reference dies with this frame."""
    model = tiny_model(arch, kind)
    if patch_kwargs is not None:
        fastprompt.patch(model, **patch_kwargs)
        if lower_cache:
            fastprompt.cache_lower_layers(model, dtype=torch.float32)
    _run(model, arch, kind)
    if lower_cache:
        model(**model_inputs(arch), example_ids=torch.tensor([0, 1]))  # a miss, then a hit
        model(**model_inputs(arch), example_ids=torch.tensor([0, 1]))
    if unpatch:
        fastprompt.unpatch(model)
        _run(model, arch, kind)
    attn = spec_for(model).stacks(model)[0].self_attention[0]
    return [weakref.ref(model), weakref.ref(attn), weakref.ref(next(attn.parameters()))]


def _alive_without_cyclic_gc(*args, **kwargs) -> list[bool]:
    gc.collect()
    gc.disable()
    try:
        refs = _built_run_and_dropped(*args, **kwargs)
        return [r() is not None for r in refs]
    finally:
        gc.enable()


def test_unpatched_model_is_freed_without_cyclic_gc():
    """The control: transformers itself leaves no cycle, so the checks below test fastprompt alone."""
    assert _alive_without_cyclic_gc("llama", "main", None, unpatch=False) == [False, False, False]


@pytest.mark.parametrize("case", list(PATCHED))
def test_patched_model_is_freed_without_cyclic_gc(case):
    arch, kind, kwargs = PATCHED[case]
    assert _alive_without_cyclic_gc(arch, kind, kwargs, unpatch=False) == [False, False, False]


@pytest.mark.parametrize("method", ["ptv2", "prompt", "lpt"])
def test_unpatched_after_patch_is_freed_without_cyclic_gc(method):
    _, _, kwargs = PATCHED[method]
    assert _alive_without_cyclic_gc("llama", "main", kwargs, unpatch=True) == [False, False, False]


def test_model_with_lower_layer_cache_is_freed_without_cyclic_gc():
    kwargs = dict(method="lpt", num_tokens=2, start_layer=1)
    assert _alive_without_cyclic_gc("llama", "main", kwargs, unpatch=False, lower_cache=True) == [False, False, False]


def test_int8_model_is_freed_without_cyclic_gc(tmp_path):
    """The CPU int8 layers' forward replacement (quantized.py) holds its layer weakly too."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_model("llama").save_pretrained(tmp_path)

    def dropped():
        model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
        fastprompt.patch(model, method="ptv2", num_tokens=2, start_layer=1, checkpointing=True)
        q = model.model.layers[0].self_attn.q_proj
        assert "forward" in q.__dict__  # the replacement is installed
        _run(model, "llama", "main")
        return [weakref.ref(model), weakref.ref(q)]

    gc.collect()
    gc.disable()
    try:
        assert [r() is not None for r in dropped()] == [False, False]
    finally:
        gc.enable()


def test_checkpointed_backward_after_the_model_is_dropped():
    """The graph of a checkpointed forward keeps what its recompute needs, as before: a loss whose
    model was dropped still backpropagates into the prompt."""
    model = fastprompt.patch(tiny_model("llama"), method="ptv2", num_tokens=2, start_layer=1, checkpointing=True)
    prefix = model.fastprompt.prefix
    inputs = model_inputs("llama")
    model.train()
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    del model
    gc.collect()
    loss.backward()
    assert prefix.grad is not None and prefix.grad.abs().sum() > 0
