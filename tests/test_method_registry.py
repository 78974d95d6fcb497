"""The method registry: a method class defined anywhere (here, in a test) is one registration away from
every place that lists method names (PromptConfig's validation, patch, the planner, the CLI's
--method choices), and patch/unpatch around it behave as for the built-in methods."""

from __future__ import annotations

import pytest
import torch
from conftest import model_inputs, output_tensor, tiny_model

import fastprompt
from fastprompt.cli import _parser
from fastprompt.integration.methods import REGISTRY, method_names
from fastprompt.integration.methods.deep_prefix import DeepPrefixMethod


@pytest.fixture
def registered():
    """A fourth method: P-Tuning v2's prefix under another name (so its outputs have a known reference)."""

    class RenamedPrefix(DeepPrefixMethod):
        name = "renamed-prefix"

    try:
        yield RenamedPrefix
    finally:
        REGISTRY.pop("renamed-prefix", None)


def _logits(model):
    with torch.no_grad():
        return output_tensor(model(**model_inputs("llama")))


def test_a_new_method_is_listed_everywhere_and_runs(registered):
    assert "renamed-prefix" in method_names()
    fastprompt.PromptConfig(method="renamed-prefix")  # validated by its class, accepted
    methods_action = next(a for a in _parser()._subparsers._group_actions[0].choices["train"]._actions if a.dest == "method")
    assert "renamed-prefix" in methods_action.choices
    rows = fastprompt.plan({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
                            "intermediate_size": 128, "vocab_size": 100}, methods=["renamed-prefix"], print_table=False)
    assert rows and {r.method for r in rows} == {"renamed-prefix"}

    plain = tiny_model("llama")
    before = _logits(plain)
    ptv2 = fastprompt.patch(tiny_model("llama"), num_tokens=3)
    renamed = fastprompt.patch(plain, method="renamed-prefix", num_tokens=3)
    with torch.no_grad():
        for a, b in zip(fastprompt.prompt_parameters(renamed), fastprompt.prompt_parameters(ptv2)):
            a.copy_(b)
    torch.testing.assert_close(_logits(renamed), _logits(ptv2), rtol=0, atol=0)
    assert not torch.allclose(_logits(renamed), before)  # the prefix reached the attention
    fastprompt.unpatch(plain)
    torch.testing.assert_close(_logits(plain), before, rtol=0, atol=0)


def test_an_unregistered_name_is_refused_with_the_registered_list():
    with pytest.raises(ValueError, match=r"method must be one of \('ptv2', 'prompt', 'lpt'\)"):
        fastprompt.PromptConfig(method="renamed-prefix")
