"""patch/unpatch errors: bad arguments and unsupported architectures fail early and clearly."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from conftest import tiny_model

import fastprompt
from fastprompt.integration import architectures


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(method="lora"), "method must be one of"),
        (dict(num_tokens=0), "num_tokens must be a positive int"),
        (dict(num_tokens=2.5), "num_tokens must be a positive int"),
        (dict(start_layer=3), r"start_layer must be in \[0, 3\)"),
        (dict(start_layer=-1), "start_layer must be a non-negative int"),
        (dict(method="prompt", start_layer=1), "start_layer must be 0 for method='prompt'"),
        (dict(method="prompt", reparam=True), "reparam=True is for method='ptv2' only"),
        (dict(method="prompt", init_token_ids=[1, 500]), r"init_token_ids must be non-empty token ids in \[0, 99\)"),
        (dict(init_token_ids=[1]), "init_token_ids is for method='prompt' only"),
        (dict(prefix_dropout=1.0), "prefix_dropout must be in"),
        (dict(head="nonexistent"), "head='nonexistent'"),
    ],
)
def test_bad_arguments_named_and_model_untouched(kwargs, match):
    model = tiny_model("bert")
    with pytest.raises(ValueError, match=match):
        fastprompt.patch(model, **kwargs)
    assert model.config._attn_implementation != "fastprompt"
    assert all(p.requires_grad for p in model.parameters())
    assert "fastprompt" not in dict(model.named_children())


def test_patch_twice_and_unpatch_unpatched():
    model = tiny_model("llama")
    with pytest.raises(RuntimeError, match="not patched"):
        fastprompt.unpatch(model)
    with pytest.raises(RuntimeError, match="not patched"):
        fastprompt.prompt_parameters(model)
    fastprompt.patch(model, num_tokens=2)
    with pytest.raises(RuntimeError, match="already patched"):
        fastprompt.patch(model, num_tokens=2)
    fastprompt.unpatch(model)
    fastprompt.patch(model, num_tokens=2)  # patchable again after unpatch


def test_config_object_and_keywords():
    model = tiny_model("llama")
    cfg = fastprompt.PromptConfig(method="ptv2", num_tokens=3, start_layer=1)
    assert fastprompt.patch(model, cfg) is model
    assert fastprompt.prompt_config(model) == cfg
    with pytest.raises(ValueError, match="either config or keyword"):
        fastprompt.patch(tiny_model("llama"), cfg, num_tokens=2)
    with pytest.raises(TypeError, match="transformers PreTrainedModel"):
        fastprompt.patch(torch.nn.Linear(2, 2))


UNSUPPORTED = {
    "deberta-v2": lambda: tf.DebertaV2Model(
        tf.DebertaV2Config(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    ),
    "falcon": lambda: tf.FalconForCausalLM(tf.FalconConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)),
    "bloom": lambda: tf.BloomForCausalLM(tf.BloomConfig(vocab_size=99, hidden_size=32, n_layer=2, n_head=4)),
    "gptj": lambda: tf.GPTJForCausalLM(tf.GPTJConfig(vocab_size=99, n_embd=32, n_layer=2, n_head=4, rotary_dim=4)),
}


@pytest.mark.parametrize("arch", list(UNSUPPORTED))
def test_unsupported_architecture_named_with_supported_list(arch):
    model = UNSUPPORTED[arch]()
    with pytest.raises(fastprompt.UnsupportedModelError, match=rf"model_type='{arch}'.*supported model types: bert, roberta"):
        fastprompt.patch(model)


def test_model_that_ignores_the_attention_function_is_detected(monkeypatch):
    """DeBERTa-v2 accepts a custom attn_implementation and never calls it: the patch-time probe notices."""
    spec = architectures.ArchSpec(
        "deberta-v2",
        lambda m: [architectures._stack("encoder", m.base_model.encoder.layer, lambda l: l.attention.self, False, m.base_model)],
        True,
    )
    monkeypatch.setitem(architectures.SPECS, "deberta-v2", spec)
    model = UNSUPPORTED["deberta-v2"]().eval()
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        before = model(input_ids=ids).last_hidden_state
    impl = model.config._attn_implementation
    with pytest.raises(fastprompt.UnsupportedModelError, match="did not call the registered attention function"):
        fastprompt.patch(model)
    assert model.config._attn_implementation == impl
    assert "fastprompt" not in dict(model.named_children())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).last_hidden_state, before)


def test_hf_trainer_trains_a_patched_model(tmp_path):
    from conftest import tiny_model
    from transformers import Trainer, TrainingArguments

    model = tiny_model("bert", kind="seqcls")
    fastprompt.patch(model, method="ptv2", num_tokens=4)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 99, (8,), generator=g), "labels": torch.tensor(i % 3)} for i in range(32)]
    before = model.fastprompt.prefix.detach().clone()
    frozen = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=8, max_steps=4, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, logging_strategy="no")
    Trainer(model=model, args=args, train_dataset=rows).train()
    assert not torch.equal(model.fastprompt.prefix.detach(), before)
    assert torch.equal(model.bert.encoder.layer[0].attention.self.query.weight, frozen)
    fastprompt.save_prompts(model, tmp_path / "p")
    fresh = tiny_model("bert", kind="seqcls")
    fastprompt.load_prompts(fresh, tmp_path / "p")
    torch.testing.assert_close(fresh.fastprompt.prefix, model.fastprompt.prefix)


def test_hf_trainer_trains_a_mixed_task_bank_with_per_task_heads(tmp_path):
    from conftest import tiny_model
    from transformers import Trainer, TrainingArguments

    model = tiny_model("bert", kind="seqcls")  # 3 labels: the larger task
    fastprompt.patch(model, method="ptv2", num_tokens=4, heads={"binary": 2, "ternary": 3})
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 99, (8,), generator=g), "prompt_ids": torch.tensor(i % 2),
             "labels": torch.tensor(i % (2 + i % 2))} for i in range(32)]
    before = model.fastprompt.prefix.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=8, max_steps=4, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, logging_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    changed = (model.fastprompt.prefix.detach() - before).flatten(1).abs().sum(-1)
    assert (changed > 0).all()  # both tasks' prompts trained from the mixed batches
    fastprompt.save_prompts(model, tmp_path / "p")
    fresh = fastprompt.load_prompts(tiny_model("bert", kind="seqcls"), tmp_path / "p")
    batch = {"input_ids": torch.stack([r["input_ids"] for r in rows[:4]]), "prompt_ids": torch.tensor([0, 1, 0, 1])}
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits)
