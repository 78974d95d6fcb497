"""bench/gpu_check.py keeps working without a GPU and always brings something back: --smoke runs every
section's code on CPU at tiny sizes (CUDA-only parts record why they were skipped), a run killed
mid-way leaves a valid JSON holding the sections it finished, spent budgets skip and stop sections,
and the correctness check fails a wrong backend."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
SECTIONS = ["correctness", "overflow", "e2e", "headline", "timing", "triton", "cuda_ext"]  # in order of value
USER_CASES = {"fp32", "float mask", "t5 bias", "chunked prefill", "decode", "head dim 256", "dropout"}


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve the module's (string) annotations through it
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text())


def test_help_explains_the_sections_and_flags():
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for word in ("--smoke", "--budget", "--build-cuda-ext", "planner", *SECTIONS):
        assert word in r.stdout


def test_smoke_runs_every_section_in_order(smoke):
    assert smoke["meta"]["smoke"] is True and smoke["meta"]["finished"] is True
    sections = smoke["sections"]
    assert list(sections) == SECTIONS
    for name, sec in sections.items():
        if name == "cuda_ext":  # a CUDA kernel: nothing to run on CPU, and it says so
            assert sec["status"] == "skipped" and "CUDA" in sec["reason"], sec
            continue
        assert sec["status"] == "done", (name, sec.get("status"), sec.get("error"), sec.get("stopped"))
        assert sec["rows"], name
        assert not [row for row in sec["rows"] if "error" in row or row.get("ok") is False], name


def test_smoke_correctness_cases_pass_and_name_the_dispatcher(smoke):
    rows = smoke["sections"]["correctness"]["rows"]
    checked = [row for row in rows if "ok" in row]
    assert {row["backend"] for row in checked} == {"cpu", "aten-reference", "torch", "auto"}
    assert all(row["ok"] for row in checked)
    assert {row["case"] for row in checked} >= USER_CASES
    assert all(row["dispatcher_choice"] in ("cpu", "torch") for row in checked)
    dropout = next(row for row in checked if row["case"] == "dropout")
    assert dropout["dispatcher_choice"] == "torch" and dropout["single_draw_err"] > 1e-3  # dropout really applied
    fp32 = [row for row in checked if row["case"] == "fp32"]
    assert fp32 and all(row["ref_dtype"] == "float64" for row in fp32)
    assert {row["kernel"] for row in checked if row["backend"] == "aten-reference"} >= {"flash", "flash varlen", "memory-efficient"}
    # the reduced Triton set ran under the interpreter; its timings are CUDA-only and say so
    triton = smoke["sections"]["triton"]["rows"]
    assert [row for row in triton if row.get("backend") == "triton" and row.get("ok")]
    assert any(row.get("timing") == "skipped" and "CUDA" in row["reason"] for row in triton)


def test_smoke_training_rows(smoke):
    e2e = smoke["sections"]["e2e"]["rows"]
    assert {row["run"] for row in e2e} >= {"peft prefix tuning", "peft lora r=8", "fastprompt ptv2 L=0"}
    for row in e2e:  # a real padding mask and completion-only labels
        assert row["left_padded_rows"] >= 1 and 0 < row["labelled_tokens"] < row["B"] * row["S"] and row["step_s"] > 0
    assert all(row["planned_peak_bytes"] > 0 for row in e2e if row["run"].startswith("fastprompt"))
    headline = {row["weights"]: row for row in smoke["sections"]["headline"]["rows"]}
    assert set(headline) == {"int8", "bf16", "bf16 peft lora r=8", "nf4"}
    assert all(row["step_s"] > 0 for row in headline.values())
    assert all(row["planned_peak_bytes"] > 0 for w, row in headline.items() if "lora" not in w)
    for w, dtype in (("int8", "int8"), ("nf4", "uint8")):  # quantised before the first step
        q = headline[w]["quantised"]
        assert q["dtype"] == dtype and q["linears"] == 7 * 4 and q["bytes"] == q["expected_bytes"]


def test_smoke_timing_names_the_sdpa_kernel(smoke):
    rows = smoke["sections"]["timing"]["rows"]
    peers = [row for row in rows if row.get("impl") in ("sdpa_concat", "sequence_only")]
    assert peers and all(row["sdpa_backend"] and row["sdpa_accepts"] for row in peers)
    assert any(row.get("decode") for row in rows)
    assert rows[-1]["summary"] == "winners"


def test_killed_run_leaves_valid_json(tmp_path):
    out = tmp_path / "killed.json"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = False
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if out.exists():  # replaced atomically: every read parses
                if json.loads(out.read_text())["sections"].get("correctness", {}).get("status") == "done":
                    proc.kill()
                    killed = True
                    break
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert killed, "the run ended (or hung) before its first section was recorded"
    data = json.loads(out.read_text())
    assert data["meta"]["finished"] is False
    sections = data["sections"]
    assert list(sections) == SECTIONS[: len(sections)]
    assert sections["correctness"]["status"] == "done"
    assert [row for row in sections["correctness"]["rows"] if row.get("ok")]
    assert all(sec["status"] in ("done", "running") for sec in sections.values())


def test_spent_budgets_skip_sections_and_stop_a_section(tmp_path):
    mod = _module()
    sz = mod.Sizes(smoke=True)
    report = mod.Report(tmp_path / "budget.json", {"test": True})
    mod.run_sections(sz, ["overflow", "timing"], report, budget_s=0.0, started=time.perf_counter())
    sections = json.loads((tmp_path / "budget.json").read_text())["sections"]
    assert [sections[n]["status"] for n in ("overflow", "timing")] == ["skipped", "skipped"]
    assert "budget" in sections["timing"]["reason"]
    sec = mod.Section(report, "correctness", budget_s=0.0)
    mod.correctness(sz, sec)
    assert sec.entry["status"] == "stopped" and "section's budget" in sec.entry["stopped"]
    assert not [row for row in sec.rows if "ok" in row]


def test_correctness_section_fails_a_wrong_backend(monkeypatch):
    mod = _module()
    real = mod._op

    def skewed(name):
        op = real(name)
        if name != "cpu":
            return op
        return lambda q, k, v, pk, pv, **kw: op(q, k, v, pk * 1.05, pv, **kw)  # a subtly wrong prefix

    monkeypatch.setattr(mod, "_op", skewed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: one thread is as fast, and steady on a busy machine
    try:
        rows = [r for r in mod.correctness(mod.Sizes(smoke=True)) if "ok" in r]
    finally:
        torch.set_num_threads(threads)
    assert [r for r in rows if r["backend"] == "cpu"] and not any(r["ok"] for r in rows if r["backend"] == "cpu")
    assert all(r["ok"] for r in rows if r["backend"] != "cpu")
