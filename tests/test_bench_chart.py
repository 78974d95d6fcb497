"""bench/chart.py draws an e2e result as a PNG with one bar per configuration and metric."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import chart  # noqa: E402


def test_chart_png_from_results(tmp_path):
    results = {
        "meta": {"model": "llama", "batch": 8, "seq": 256, "num_tokens": 32, "device": "cpu", "threads": 2, "command": "python bench/e2e_vs_peft.py"},
        "results": {
            "peft prefix": {"step_ratio": 1.0, "saved_ratio": 1.0, "peak_ratio": 1.0},
            "ptv2 L=4": {"step_ratio": 0.7, "saved_ratio": 0.43, "peak_ratio": 0.7},
            "int8 ptv2 L=0": {"step_ratio": 0.9, "saved_ratio": 0.8, "peak_ratio": 0.9},
        },
    }
    src = tmp_path / "e2e.json"
    src.write_text(json.dumps(results))
    out = chart.draw(src, tmp_path / "chart.png")
    head = out.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    assert width > height > 100  # three panels side by side
    assert chart.main([str(tmp_path / "missing.json")]) == 2


def test_accuracy_chart_png(tmp_path):
    results = {
        "meta": {"command": "python bench/accuracy_parity.py --task sst2", "date": "2026-11-22"},
        "results": {
            "sst2/peft prefix": {"metric": 0.84, "speed_vs_peft": 1.0, "peak_mib": 1500},
            "sst2/ptv2 L=0": {"metric": 0.85, "speed_vs_peft": 1.05, "peak_mib": 1490},
            "conll/peft prefix": {"metric": 0.80, "speed_vs_peft": 1.0, "peak_mib": 1300},
            "conll/lpt L=3": {"metric": 0.79, "speed_vs_peft": 1.3, "peak_mib": 1200},
        },
    }
    src = tmp_path / "acc.json"
    src.write_text(json.dumps(results))
    head = chart.draw(src, tmp_path / "acc.png").read_bytes()[:24]
    width, height = struct.unpack(">II", head[16:24])
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and width > 1000 and height > 300  # two tasks x three panels


def test_generation_chart_png(tmp_path):
    row = {"bleu": 30.0, "rougeL": 45.0, "step_s": 3.0, "peak_mib": 2500}
    results = {
        "meta": {"command": "python bench/generation_parity.py", "date": "2026-12-06", "model": "SmolLM2", "data": "E2E",
                 "settings": {"steps": 80, "batch_size": 8, "num_tokens": 16}},
        "results": {"ptv2 L=0": row, "peft prefix": {**row, "bleu": 20.0}, "prompt": {"skipped": "crashed"}},
    }
    src = tmp_path / "gen.json"
    src.write_text(json.dumps(results))
    head = chart.draw(src, tmp_path / "gen.png").read_bytes()[:24]
    width, height = struct.unpack(">II", head[16:24])
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and width > 1500 and height > 200  # four panels, the skipped row left out
