"""bench/gpu_check.py keeps working without a GPU: --smoke runs every section's code on CPU at tiny
sizes, and its correctness check fails a wrong backend."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_help_explains_the_sections():
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for word in ("--smoke", "correctness", "overflow", "timing", "e2e", "headline", "planner"):
        assert word in r.stdout


def test_smoke_runs_every_section_and_writes_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["meta"]["smoke"] is True
    sections = data["sections"]
    assert set(sections) == {"correctness", "overflow", "timing", "e2e", "headline"}
    for name, sec in sections.items():
        assert "error" not in sec, (name, sec)
        assert sec["rows"], name
        assert not [row for row in sec["rows"] if "error" in row], (name, [row for row in sec["rows"] if "error" in row])
    checked = [row for row in sections["correctness"]["rows"] if "ok" in row]
    assert {row["backend"] for row in checked} == {"cpu", "aten-reference", "torch"}
    assert all(row["ok"] for row in checked)
    assert {row["run"] for row in sections["e2e"]["rows"]} >= {"peft prefix tuning", "fastprompt ptv2 L=0"}
    headline = sections["headline"]["rows"]
    assert all(row["step_s"] > 0 for row in headline)
    assert all(row["planned_peak_bytes"] > 0 for row in headline if row["start_layer"] is not None)  # the prompt rows
    assert any(row["weights"].endswith("lora r=8") for row in headline)  # LoRA beside them


def test_correctness_section_fails_a_wrong_backend(monkeypatch):
    mod = _module()
    real = mod._op

    def skewed(name):
        op = real(name)
        if name != "cpu":
            return op
        return lambda q, k, v, pk, pv, **kw: op(q, k, v, pk * 1.05, pv, **kw)  # a subtly wrong prefix

    monkeypatch.setattr(mod, "_op", skewed)
    torch.set_num_threads(2)
    rows = [r for r in mod.correctness(mod.Sizes(smoke=True)) if "ok" in r]
    assert not any(r["ok"] for r in rows if r["backend"] == "cpu")
    assert all(r["ok"] for r in rows if r["backend"] != "cpu")
