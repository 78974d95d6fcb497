"""Tiny random-init models of every supported architecture, and shared references."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

# Triton's interpreter has to be chosen before triton is first imported: on machines without a
# GPU the Triton kernels then run on CPU tensors (tests/triton_harness.py)
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest
import torch
import transformers as tf

torch.set_num_threads(min(2, os.cpu_count() or 1))

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
VOCAB = 99

# (config factory, causal LM / seq2seq class, sequence classification class or None)
TINY = {
    "bert": (lambda: tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37, max_position_embeddings=64), None, tf.BertForSequenceClassification),
    "roberta": (lambda: tf.RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37, max_position_embeddings=70, pad_token_id=1), None, tf.RobertaForSequenceClassification),
    "distilbert": (lambda: tf.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=3, n_heads=4, hidden_dim=37, max_position_embeddings=64), None, tf.DistilBertForSequenceClassification),
    "gpt2": (lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64), tf.GPT2LMHeadModel, tf.GPT2ForSequenceClassification),
    "llama": (lambda: tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2), tf.LlamaForCausalLM, tf.LlamaForSequenceClassification),
    "mistral": (lambda: tf.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, sliding_window=None), tf.MistralForCausalLM, None),
    "qwen2": (lambda: tf.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1), tf.Qwen2ForCausalLM, None),
    "qwen3": (lambda: tf.Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16), tf.Qwen3ForCausalLM, None),
    "gemma": (lambda: tf.GemmaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=8), tf.GemmaForCausalLM, None),
    "opt": (lambda: tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, ffn_dim=37, num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64), tf.OPTForCausalLM, None),
    "t5": (lambda: tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=37, num_layers=3, num_heads=4, decoder_start_token_id=0, pad_token_id=0), tf.T5ForConditionalGeneration, None),
}
ENCODERS = ("bert", "roberta", "distilbert")
DECODERS = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "opt")
ARCHS = tuple(TINY)


def tiny_model(arch: str, kind: str = "main", seed: int = 0, **config_overrides):
    """A random-init tiny model: kind 'main' (encoder: BertModel-style base, decoder: LM, t5: seq2seq) or 'seqcls'."""
    make_config, lm_cls, cls_cls = TINY[arch]
    config = make_config()
    for k, v in config_overrides.items():
        setattr(config, k, v)
    torch.manual_seed(seed)
    if kind == "seqcls":
        config.num_labels = config_overrides.get("num_labels", 3)
        config.pad_token_id = 0 if config.pad_token_id is None else config.pad_token_id
        model = cls_cls(config)
    elif lm_cls is not None:
        model = lm_cls(config)
    else:
        model = tf.AutoModel.from_config(config)
    return model.eval()


def model_inputs(arch: str, batch: int = 2, length: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if arch == "t5":
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 4), generator=g)
    return inputs


def output_tensor(out):
    for name in ("logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    raise AssertionError(f"no logits in {type(out)}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@contextlib.contextmanager
def peft_runs(what: str):
    """Runs a PEFT call; where PEFT itself refuses the installed transformers (peft 0.21.2's prefix
    tuning on transformers 5.24 looks for a `past_key_values` argument that 5.24 renamed), the test
    is skipped with that reason. Only PEFT's side may skip: fastprompt's own calls never go in here."""
    import peft

    try:
        yield
    except ValueError as e:
        if "does not support past key values" not in str(e):
            raise
        pytest.skip(f"peft {peft.__version__} cannot run {what} on transformers {tf.__version__}: {e}")
