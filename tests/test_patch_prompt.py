"""Input soft prompts (method="prompt") against hand-written references."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from conftest import DECODERS, model_inputs, output_tensor, tiny_model
from reference import REF_IMPL
from transformers import DynamicCache

import fastprompt


def _decoder_reference(model, arch, prompt, inputs):
    """Prompt run alone through the frozen model into a KV cache, then the real tokens at 0..T-1."""
    p = prompt.shape[0]
    b, t = inputs["input_ids"].shape
    start = 0 if arch in ("gpt2", "opt") else -p
    cache = DynamicCache(config=model.config)
    model(inputs_embeds=prompt[None], position_ids=torch.arange(start, start + p)[None], past_key_values=cache, use_cache=True)
    cache.batch_repeat_interleave(b)
    mask = torch.cat([torch.ones(b, p, dtype=torch.long), inputs["attention_mask"]], dim=1)
    return model(input_ids=inputs["input_ids"], attention_mask=mask, past_key_values=cache, position_ids=torch.arange(t)[None].expand(b, -1)).logits


@pytest.mark.parametrize("arch", DECODERS)
def test_decoder_prompt_matches_prompt_in_kv_cache_reference(arch):
    model = tiny_model(arch)
    inputs = model_inputs(arch)
    fastprompt.patch(model, method="prompt", num_tokens=4)
    out = model(**inputs).logits
    w = torch.randn_like(out)
    (out * w).sum().backward()
    grad = model.fastprompt.embedding.grad[0].clone()
    prompt = model.fastprompt.embedding[0].detach().clone().requires_grad_(True)
    fastprompt.unpatch(model)
    ref = _decoder_reference(model, arch, prompt, inputs)
    (ref * w).sum().backward()
    assert out.shape == ref.shape == (*inputs["input_ids"].shape, 99)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(grad, prompt.grad, atol=2e-5, rtol=1e-4)


def _bert_reference(model, prompt, input_ids, attention_mask):
    """Prompt inserted after the embeddings, mask widened by hand, removed after the last layer."""
    base = model.base_model
    b, t = input_ids.shape
    p = prompt.shape[0]
    h = torch.cat([prompt[None].expand(b, -1, -1), base.embeddings(input_ids=input_ids)], dim=1)
    keys = torch.cat([torch.ones(b, p, dtype=torch.bool), attention_mask.bool()], dim=1)
    mask = keys[:, None, None, :].expand(b, 1, p + t, p + t)
    original = model.config._attn_implementation
    model.set_attn_implementation(REF_IMPL)
    try:
        for layer in base.encoder.layer:
            h = layer(h, mask)
    finally:
        model.set_attn_implementation(original)
    return h[:, p:]


def test_bert_prompt_matches_handwritten_insertion_with_padding():
    model = tiny_model("bert", kind="seqcls")
    ids = torch.randint(3, 99, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    fastprompt.patch(model, method="prompt", num_tokens=3)
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    hidden = out.hidden_states[-1]
    (out.logits.square().sum()).backward()
    grad = model.fastprompt.embedding.grad[0].clone()
    prompt = model.fastprompt.embedding[0].detach().clone().requires_grad_(True)
    fastprompt.unpatch(model)
    ref_hidden = _bert_reference(model, prompt, ids, mask)
    # the classifier reads [CLS] of the real tokens, not a virtual token
    ref_logits = model.classifier(model.bert.pooler(ref_hidden))
    ref_logits.square().sum().backward()
    assert hidden.shape == (2, 6, 32)
    torch.testing.assert_close(hidden, ref_hidden, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out.logits, ref_logits, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(grad, prompt.grad, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert", "t5"])
def test_bidirectional_prompt_keeps_shapes_and_padding_invariance(arch):
    model = tiny_model(arch)
    fastprompt.patch(model, method="prompt", num_tokens=3)
    ids = torch.randint(3, 99, (1, 5))
    padded = torch.cat([ids, torch.full((1, 3), 1 if arch == "roberta" else 0)], dim=1)
    extra = {"decoder_input_ids": torch.tensor([[0, 5, 7]])} if arch == "t5" else {}
    with torch.no_grad():
        alone = output_tensor(model(input_ids=ids, **extra))
        both = output_tensor(model(input_ids=torch.cat([padded, padded]), attention_mask=torch.tensor([[1] * 5 + [0] * 3] * 2),
                                   **{k: v.expand(2, -1) for k, v in extra.items()}))
    if arch == "t5":
        torch.testing.assert_close(both[0], alone[0], atol=2e-5, rtol=1e-4)
    else:
        assert both.shape[1] == 8
        torch.testing.assert_close(both[0, :5], alone[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_prompt_generate_cached_equals_uncached(arch):
    model = tiny_model(arch)
    fastprompt.patch(model, method="prompt", num_tokens=4)
    ids = torch.randint(3, 99, (2, 5))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    assert torch.equal(model.generate(ids, use_cache=True, **kw), model.generate(ids, use_cache=False, **kw))
    assert model.generate(ids, num_beams=2, **kw).shape[0] == 2


def test_decoder_prompt_computed_once_at_inference_and_per_forward_in_training():
    model = tiny_model("llama")
    fastprompt.patch(model, method="prompt", num_tokens=4)
    lengths = []
    model.model.layers[0].register_forward_pre_hook(lambda mod, args: lengths.append(args[0].shape[1]))
    x = model_inputs("llama")  # 6 real tokens
    with torch.no_grad():
        model.fastprompt.embedding.add_(0.1)  # invalidates what the patch-time probe computed
        model(**x)
        model(**x)
    assert lengths == [4, 6, 6]  # the prompt's own pass once, then only real tokens
    lengths.clear()
    model.train()
    model(**x).logits.sum().backward()
    assert lengths == [4, 6]  # with grad: the prompt pass runs in every forward
    assert model.fastprompt.embedding.grad is not None


def test_prompt_init_from_token_ids():
    model = tiny_model("llama")
    fastprompt.patch(model, method="prompt", num_tokens=5, init_token_ids=[7, 8])
    expected = model.model.embed_tokens.weight[[7, 8, 7, 8, 7]]
    torch.testing.assert_close(model.fastprompt.embedding[0], expected)
    enc = tiny_model("bert")
    fastprompt.patch(enc, method="prompt", num_tokens=2, init_token_ids=[11, 12])
    with torch.no_grad():
        expected = enc.embeddings(input_ids=torch.tensor([[11, 12]]))[0]
    torch.testing.assert_close(enc.fastprompt.embedding[0], expected)


def test_token_classification_with_prompt_keeps_labels_and_length():
    config = tf.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, num_labels=4)
    model = tf.BertForTokenClassification(config)
    fastprompt.patch(model, method="prompt", num_tokens=5)
    ids = torch.randint(3, 99, (2, 7))
    out = model(input_ids=ids, labels=torch.randint(0, 4, (2, 7)))
    assert out.logits.shape == (2, 7, 4)
    out.loss.backward()


def test_decoder_sequence_classification_reads_last_real_token():
    model = tiny_model("llama", kind="seqcls")
    fastprompt.patch(model, method="prompt", num_tokens=3)
    ids = torch.randint(3, 99, (2, 6))
    ids[1, 4:] = 0  # right padding with pad_token_id=0
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=(ids != 0).long(), output_hidden_states=True)
        h = out.hidden_states[-1]
        expected = model.score(h)[torch.arange(2), torch.tensor([5, 3])]
    torch.testing.assert_close(out.logits, expected)
