"""The memory planner against peak memory measured in real training steps, and its table and CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import transformers as tf

import fastprompt
from fastprompt.planner import parse_bytes, predict, shape_of

HERE = Path(__file__).resolve().parent
CPU_WORKSPACE = 48 * 2**20  # oneDNN/MKL and autograd-engine memory of a first training step on CPU (measured)
LLAMA = dict(model_type="llama", vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=2, num_labels=2, pad_token_id=0)
BERT = dict(model_type="bert", vocab_size=30522, hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
            num_attention_heads=12, num_labels=2)

CASES = [
    # config, class, batch, seq, patch
    (LLAMA, "LlamaForSequenceClassification", 8, 256, dict(method="ptv2", num_tokens=32, start_layer=0)),
    (LLAMA, "LlamaForSequenceClassification", 8, 256, dict(method="ptv2", num_tokens=32, start_layer=4)),
    (LLAMA, "LlamaForSequenceClassification", 8, 256, dict(method="lpt", num_tokens=32, start_layer=4)),
    (LLAMA, "LlamaForSequenceClassification", 8, 256, dict(method="ptv2", num_tokens=32, start_layer=2, checkpointing=True)),
    (LLAMA, "LlamaForCausalLM", 4, 256, dict(method="ptv2", num_tokens=16, start_layer=0)),
    (BERT, "BertForSequenceClassification", 16, 128, dict(method="ptv2", num_tokens=16, start_layer=0)),
]


def _measure(config, cls, batch, seq, patch) -> int:
    spec = json.dumps({"config": config, "cls": cls, "batch": batch, "seq": seq, "patch": patch})
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, str(HERE / "plan_measure.py"), spec], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


@pytest.mark.parametrize("config, cls, batch, seq, patch", CASES,
                         ids=[f"{c[1]}-{c[4]['method']}-L{c[4]['start_layer']}{'-ckpt' if c[4].get('checkpointing') else ''}" for c in CASES])
def test_prediction_within_15_percent_of_measured_peak(config, cls, batch, seq, patch):
    measured = _measure(config, cls, batch, seq, patch)
    c = tf.AutoConfig.for_model(**config)
    c.architectures = [cls]
    predicted, parts = predict(shape_of(c), "float", patch["method"], patch["start_layer"], patch.get("checkpointing", False),
                               batch, seq, patch["num_tokens"], float_bytes=4, act_bytes=4, overhead=CPU_WORKSPACE)
    print(f"{cls} {patch}: predicted {predicted / 2**20:.0f} MiB {parts}, measured {measured / 2**20:.0f} MiB")
    assert abs(predicted - measured) <= 0.15 * measured, (predicted, measured, parts)


def test_config_counts_equal_the_models_own():
    for config, cls in ((LLAMA, "LlamaForCausalLM"), (BERT, "BertForSequenceClassification")):
        c = tf.AutoConfig.for_model(**config)
        c.architectures = [cls]
        model = getattr(tf, cls)(c)
        a, b = shape_of(c), shape_of(model)
        assert a.quantisable == b.quantisable and a.linear_rows == b.linear_rows
        assert a.quantisable + a.other == b.quantisable + b.other == sum(p.numel() for p in model.parameters())


def test_plan_table_and_cli(tmp_path, capsys):
    rows = fastprompt.plan(dict(LLAMA), device_memory="1GiB", batch_size=8, seq_len=256, num_tokens=32)
    table = capsys.readouterr().out
    assert "peak GiB" in table and len(table.splitlines()) == 2 + len(rows)
    assert {r.weights for r in rows} == {"bf16", "int8", "nf4"} and {r.method for r in rows} == {"ptv2", "prompt", "lpt"}
    by = {(r.weights, r.method, r.start_layer, r.checkpointing): r for r in rows}
    assert by[("int8", "ptv2", 0, False)].parts["weights"] < by[("bf16", "ptv2", 0, False)].parts["weights"]
    assert by[("bf16", "ptv2", 4, False)].peak_bytes < by[("bf16", "ptv2", 0, False)].peak_bytes
    assert by[("bf16", "ptv2", 4, True)].peak_bytes < by[("bf16", "ptv2", 4, False)].peak_bytes
    assert by[("bf16", "ptv2", 4, False)].relative_cost < 1.0 < by[("bf16", "ptv2", 0, True)].relative_cost
    assert all(r.fits == (r.peak_bytes <= 2**30) for r in rows)
    tf.AutoConfig.for_model(**LLAMA).save_pretrained(tmp_path)
    out = subprocess.run([sys.executable, "-m", "fastprompt.cli", "plan", str(tmp_path), "--memory", "16GB", "--seq-len", "128"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "fits" in out.stdout and "llama" in out.stdout, out.stderr
    bad = subprocess.run([sys.executable, "-m", "fastprompt.cli", "plan", str(tmp_path), "--memory", "lots"], capture_output=True, text=True)
    assert bad.returncode == 2 and "device_memory must be" in bad.stderr


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * 2**30 and parse_bytes("80GB") == 80 * 10**9 and parse_bytes(512) == 512
    with pytest.raises(ValueError, match="device_memory"):
        parse_bytes("-3GB")
