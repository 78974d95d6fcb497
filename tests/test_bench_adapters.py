"""bench/adapters_compare.py's worker runs on fastprompt's side (the adapters side needs its own
environment, which the benchmark creates; not in the test run), and the two sides of every
configuration measure the same model, batch and prompt length."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _module(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _value(args, flag):
    return args[args.index(flag) + 1] if flag in args else None


def test_both_sides_of_each_configuration_measure_the_same_thing():
    for group, name, fp, ad in _module("adapters_compare").configurations():
        for flag in ("--model", "--batch", "--seq", "--p", "--phase"):
            assert _value(fp, flag) == _value(ad, flag), (name, flag)
        assert ("--ckpt" in fp) == ("--ckpt" in ad), name
        assert _value(fp, "--mode") in (None, "bank") and _value(ad, "--mode") in (None, "multitask", "batchsplit"), name


@pytest.mark.parametrize("mode, phase", [("single", "train"), ("bank", "train"), ("bank", "infer")])
def test_worker_measures_a_fastprompt_step(mode, phase):
    from fastprompt.training.loop import default_model_path

    cmd = [sys.executable, str(BENCH / "adapters_worker.py"), "--lib", "fastprompt", "--model", "minilm", "--minilm", default_model_path(),
           "--mode", mode, "--phase", phase, "--batch", "4", "--seq", "16", "--p", "4", "--steps", "1", "--ckpt"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["lib"].startswith("fastprompt") and out["step_s"] > 0 and out["logits_finite"]
    assert (out["saved_mib"] > 0) == (phase == "train")
    assert out["trainable"] > 0
