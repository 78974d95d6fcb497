"""Prompts that start from a text (init_text) or from zero (prefix_init="zero").

References: the unpatched model with the text's tokens prepended to the input (on decoders the
untrained prompt must be exactly that text), and on an encoder the key/value projections of the
unpatched model's own hidden states, computed by hand.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import fastprompt


class CharTokenizer:
    """A stand-in tokenizer: one id per character (3..92), no special tokens."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % 90 for c in text]}


TEXT = "the text"
TEXT_IDS = torch.tensor(CharTokenizer()(TEXT)["input_ids"])


def _prepended(model, ids, text_ids):
    with torch.no_grad():
        full = torch.cat([text_ids[None].expand(ids.shape[0], -1), ids], 1)
        return model(input_ids=full, attention_mask=torch.ones_like(full)).logits[:, text_ids.numel():]


@pytest.mark.parametrize("method", ["ptv2", "prompt"])
@pytest.mark.parametrize("arch, peft_positions", [("llama", False), ("llama", True), ("qwen2", False), ("gemma", False), ("qwen3", True),
                                                   ("gpt2", True), ("mistral", False)])
def test_untrained_prompt_is_the_text_prepended(arch, peft_positions, method):
    """On rotary decoders with the default positions (real tokens keep 0..T-1) and with PEFT's shift
    alike; on learned absolute positions (GPT-2) with PEFT's shift, where the text takes 0..P-1."""
    model = tiny_model(arch)
    ids = torch.randint(3, 99, (2, 7))
    expected = _prepended(model, ids, TEXT_IDS)
    fastprompt.patch(model, method=method, init_text=TEXT, tokenizer=CharTokenizer(), peft_positions=peft_positions)
    assert fastprompt.prompt_config(model).num_tokens == TEXT_IDS.numel()  # P = the text's token count
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("num_tokens", [3, 19])
def test_given_length_cuts_or_repeats_the_text(num_tokens):
    model = tiny_model("llama")
    ids = torch.randint(3, 99, (1, 5))
    text = TEXT_IDS.repeat(3)[:num_tokens]
    expected = _prepended(model, ids, text)
    fastprompt.patch(model, num_tokens=num_tokens, init_text=TEXT, tokenizer=CharTokenizer())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=2e-5, rtol=1e-4)


def test_encoder_prefix_is_the_texts_own_keys_and_values():
    """BERT: each layer's prefix is that layer's key/value projection of the unpatched model's hidden
    states for the text (bidirectional, so this is a start, not the text prepended)."""
    model = tiny_model("bert")
    with torch.no_grad():
        hidden = model(input_ids=TEXT_IDS[None], output_hidden_states=True).hidden_states
    fastprompt.patch(model, init_text=TEXT, tokenizer=CharTokenizer(), start_layer=1)
    prefix = model.fastprompt.prefix[0]  # (slots, 2, H, P, D)
    heads = model.config.num_attention_heads
    for slot, layer in enumerate(model.encoder.layer[1:]):
        attn = layer.attention.self
        for kv, proj in enumerate((attn.key, attn.value)):
            with torch.no_grad():
                ref = proj(hidden[slot + 1][0]).view(TEXT_IDS.numel(), heads, -1).transpose(0, 1)
            torch.testing.assert_close(prefix[slot, kv], ref, atol=1e-5, rtol=1e-5)


def test_zero_prefix_and_zero_reparam_output():
    model = fastprompt.patch(tiny_model("llama"), prefix_init="zero")
    assert model.fastprompt.prefix.abs().sum() == 0 and model.fastprompt.prefix.requires_grad
    fastprompt.unpatch(model)
    fastprompt.patch(model, prefix_init="zero", reparam=True, reparam_hidden=8)
    assert model.fastprompt.folded().abs().sum() == 0


def test_saved_text_initialised_prompt_loads_without_a_tokenizer(tmp_path):
    model = fastprompt.patch(tiny_model("llama"), init_text=TEXT, tokenizer=CharTokenizer())
    ids = torch.randint(3, 99, (2, 6))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    fastprompt.save_prompts(model, tmp_path)
    fresh = fastprompt.load_prompts(tiny_model("llama"), tmp_path)  # a random-init model without name_or_path: no tokenizer
    assert fastprompt.prompt_config(fresh).init_text is None and fastprompt.prompt_config(fresh).num_tokens == TEXT_IDS.numel()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, expected)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="lpt", init_text="hi", start_layer=1), "init_text does not apply to method='lpt'"),
        (dict(init_text="hi", reparam=True), "init_text sets the prefix itself"),
        (dict(init_text="  "), "init_text must be a non-empty string"),
        (dict(method="prompt", prefix_init="zero"), "prefix_init='zero' is for method='ptv2'"),
        (dict(prefix_init="ones"), "prefix_init must be one of"),
        (dict(init_text="hi"), "init_text needs the model's tokenizer"),  # no tokenizer given, none saved with the model
    ],
)
def test_bad_init_arguments_are_refused(kwargs, match):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=match):
        fastprompt.patch(model, **kwargs)
    assert fastprompt.integration.runtime.runtime_of(model) is None
