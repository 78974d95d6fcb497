"""build_quantized: a model built tensor by tensor in int8 / nf4 equals transformers' own bitsandbytes load."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")
from conftest import model_inputs, tiny_model  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

import fastprompt  # noqa: E402
from fastprompt.loading import build_quantized, random_source, safetensors_source  # noqa: E402


@pytest.mark.parametrize("bits", [8, 4])
def test_built_from_checkpoint_equals_transformers_quantised_load(tmp_path, bits):
    float_model = tiny_model("llama", hidden_size=64, intermediate_size=128)
    float_model.save_pretrained(tmp_path, max_shard_size="100KB")  # several shards, read tensor by tensor
    assert (tmp_path / "model.safetensors.index.json").is_file()
    q = (BitsAndBytesConfig(load_in_8bit=True) if bits == 8
         else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=q, dtype=torch.float32).eval()
    built = build_quantized(float_model.config, safetensors_source(tmp_path), bits=bits, dtype=torch.float32)
    kind = "Linear8bitLt" if bits == 8 else "Linear4bit"
    assert type(built.model.layers[0].mlp.up_proj).__name__ == kind
    for m in [*reference.modules(), *built.modules()]:
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False  # bitsandbytes' CPU 4-bit repack fails on layers this small
    inputs = model_inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(built(**inputs).logits, reference(**inputs).logits, atol=1e-5, rtol=1e-4)
    fastprompt.patch(built, num_tokens=2, start_layer=1, checkpointing=True)
    built.train()
    loss = built(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    assert built.fastprompt.prefix.grad.abs().sum() > 0


def test_random_build_is_deterministic_and_never_float():
    config = tiny_model("llama", hidden_size=64, intermediate_size=128).config
    a = build_quantized(config, random_source(1), bits=8, dtype=torch.bfloat16)
    b = build_quantized(config, random_source(1), bits=8, dtype=torch.bfloat16)
    assert a.model.layers[1].self_attn.q_proj.weight.dtype == torch.int8
    assert torch.equal(a.model.layers[1].self_attn.q_proj.weight, b.model.layers[1].self_attn.q_proj.weight)
    assert not any(p.device.type == "meta" for p in a.parameters())
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        build_quantized(config, random_source(), bits=2)
