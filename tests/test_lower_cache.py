"""Lower-layer cache: later epochs skip the layers below the first prompt and lose nothing."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import fastprompt

N_EX, T = 6, 7


def _data():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 99, (N_EX, T), generator=g)
    lengths = torch.tensor([7, 5, 6, 3, 7, 4])
    return ids, lengths


def _batch(arch, rows, ids, lengths):
    x = ids[rows]
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        n = int(lengths[r])
        if arch == "bert":
            mask[i, :n] = 1  # right padding
        else:
            mask[i, T - n:] = 1  # left padding
    out = {"input_ids": x, "attention_mask": mask, "labels": torch.tensor([r % 3 for r in rows])}
    if arch != "bert":
        out["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return out


def _train(arch, method, cached, calls, dtype=torch.float32, path=None):
    torch.manual_seed(0)
    model = tiny_model(arch, kind="seqcls", **({"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0} if arch == "bert" else {}))
    fastprompt.patch(model, method=method, num_tokens=2, start_layer=2)
    cache = fastprompt.cache_lower_layers(model, dtype=dtype, path=path) if cached else None
    layer0 = model.base_model.encoder.layer[0] if arch == "bert" else model.base_model.layers[0]
    inner = layer0.intermediate if arch == "bert" else layer0.mlp
    inner.register_forward_hook(lambda *a: calls.append(1))
    model.train()
    opt = torch.optim.AdamW(fastprompt.prompt_parameters(model), lr=1e-2)
    ids, lengths = _data()
    losses = []
    for order in ([0, 1, 2], [3, 4, 5], [5, 0, 3], [1, 4, 2]):  # epoch 2 regroups the examples
        batch = _batch(arch, order, ids, lengths)
        extra = {"example_ids": torch.tensor(order)} if cached else {}
        loss = model(**batch, **extra).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, cache


@pytest.mark.parametrize("arch, method", [("llama", "ptv2"), ("llama", "lpt"), ("bert", "ptv2"), ("bert", "lpt")])
def test_cached_epochs_give_identical_losses_and_skip_the_lower_layers(arch, method):
    plain_calls, cached_calls = [], []
    plain, _ = _train(arch, method, False, plain_calls)
    cached, cache = _train(arch, method, True, cached_calls)
    assert cached == plain
    assert len(plain_calls) == 4 and len(cached_calls) == 2  # epoch 2 never ran layer 0
    assert len(cache) == N_EX and cache.hits == 6 and cache.misses == 6
    assert cache.nbytes == int(_data()[1].sum()) * 32 * 4  # real tokens only, fp32


def test_memory_mapped_bf16_cache(tmp_path):
    plain, _ = _train("llama", "ptv2", False, [])
    cached, cache = _train("llama", "ptv2", True, [], dtype=torch.bfloat16, path=tmp_path / "cache.bin")
    assert (tmp_path / "cache.bin").stat().st_size == int(_data()[1].sum()) * 32 * 2
    assert cached[:2] == plain[:2]  # the first epoch computes everything
    torch.testing.assert_close(torch.tensor(cached[2:]), torch.tensor(plain[2:]), atol=2e-2, rtol=2e-2)


def test_cache_errors():
    with pytest.raises(ValueError, match="start_layer > 0"):
        fastprompt.cache_lower_layers(fastprompt.patch(tiny_model("llama"), start_layer=0))
    model = fastprompt.patch(tiny_model("llama"), start_layer=1)
    with pytest.raises(ValueError, match="cache_lower_layers\\(model\\) first"):
        model(input_ids=torch.ones(1, 3, dtype=torch.long), example_ids=torch.tensor([0]))


def test_adopt_carries_stored_states_between_caches(tmp_path):
    """LowerLayerCache.adopt (a sweep hands one configuration's cache to the next): every stored
    example reads back as it was put, from memory into a file and from a file into memory."""
    from fastprompt.integration.lower_cache import LowerLayerCache

    hidden = torch.randn(3, 5, 4)
    real = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.bool)
    ids = torch.tensor([7, 2, 9])
    expected = torch.where(real[..., None], hidden, torch.zeros(()))  # the real rows in place, zeros elsewhere
    first = LowerLayerCache(4, torch.float32)
    first.put(ids, hidden, real)
    on_disk = LowerLayerCache(4, torch.float32, tmp_path / "cache.bin")
    on_disk.adopt(first)
    back = LowerLayerCache(4, torch.float32)
    back.adopt(on_disk)
    for cache in (on_disk, back):
        assert len(cache) == 3 and cache.has_all(ids)
        torch.testing.assert_close(cache.get(ids, real, hidden), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="other must be a LowerLayerCache of hidden 4"):
        back.adopt(LowerLayerCache(8, torch.float32))
    on_disk.close()
    with pytest.raises(ValueError, match="closed"):
        back.adopt(on_disk)
