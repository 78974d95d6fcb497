"""What patched attention layers hand the op: a padded batch reaches causal layers as (B, Sk) key
padding plus causal=True (not a dense (B, 1, S, S) mask), so fused backends run variable-length
kernels; the result equals the unpatched model's on every real token."""

from __future__ import annotations

import pytest
import torch
from conftest import output_tensor, tiny_model

import fastprompt
from fastprompt.integration import attention as integration

CALLS: list[dict] = []


@pytest.fixture
def spy(monkeypatch):
    real = integration.prefix_attention

    def recording(q, k, v, pk, pv, **kw):
        m = kw.get("mask")
        CALLS.append({"mask_dim": None if m is None else m.dim(), "causal": kw.get("causal"), "sk": k.shape[2]})
        return real(q, k, v, pk, pv, **kw)

    CALLS.clear()
    monkeypatch.setattr(integration, "prefix_attention", recording)
    return CALLS


@pytest.mark.parametrize("arch,causal", [("llama", True), ("qwen2", True), ("gpt2", True), ("opt", True), ("bert", False)])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_reaches_the_op_as_key_padding(spy, arch, causal, side):
    if side == "left" and arch in ("gpt2", "bert"):
        pytest.skip("absolute positions count from the left: the unpatched model is not left-padding invariant either")
    model = tiny_model(arch)
    ids = torch.randint(3, 99, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if side == "left":
        mask[1, :3] = 0
        mask[2, :5] = 0
    else:
        mask[1, 4:] = 0
        mask[2, 2:] = 0
    fastprompt.patch(model, method="ptv2", num_tokens=4)
    spy.clear()  # patch's own probe call
    with torch.no_grad():
        padded = output_tensor(model(input_ids=ids, attention_mask=mask))
    assert spy and all(c["mask_dim"] == 2 and c["causal"] is causal for c in spy), spy
    # each example alone, without padding, through the same patched model
    for i in range(3):
        real = mask[i].bool()
        with torch.no_grad():
            alone = output_tensor(model(input_ids=ids[i : i + 1, real], attention_mask=mask[i : i + 1, real]))
        torch.testing.assert_close(padded[i : i + 1, real], alone, atol=2e-5, rtol=2e-5)


def test_cached_decoding_passes_key_padding_and_keeps_generate_exact(spy):
    model = tiny_model("llama")
    fastprompt.patch(model, method="ptv2", num_tokens=4)
    ids = torch.randint(3, 99, (2, 5), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    spy.clear()
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **kw)
        decode_calls = [c for c in spy if c["mask_dim"] == 2]
        uncached = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    assert len({c["sk"] for c in decode_calls}) > 1  # the cached steps took the key-padding path too
