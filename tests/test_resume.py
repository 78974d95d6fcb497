"""Resumable training: checkpoints restore prompts, optimizer, scheduler and RNG exactly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import model_inputs, tiny_model

import fastprompt
from fastprompt.training.train_state import load_checkpoint, save_checkpoint


def _setup():
    model = fastprompt.patch(tiny_model("llama", kind="seqcls"), num_tokens=2, reparam=True, reparam_hidden=8, prefix_dropout=0.3)
    model.train()
    opt = torch.optim.AdamW(fastprompt.prompt_parameters(model), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 10)
    return model, opt, sched


def _steps(model, opt, sched, n, seed0):
    losses = []
    for i in range(n):
        inputs = model_inputs("llama", batch=4, seed=seed0 + i)
        loss = model(**inputs, labels=torch.tensor([0, 1, 2, 1])).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_checkpoint_resume_gives_the_uninterrupted_losses(tmp_path):
    torch.manual_seed(0)
    model, opt, sched = _setup()
    _steps(model, opt, sched, 3, 0)
    save_checkpoint(tmp_path, model, opt, sched, step=3, state={"epoch": 1})
    expected = _steps(model, opt, sched, 3, 3)  # dropout draws from the RNG: restored too

    torch.manual_seed(99)
    fresh, opt2, sched2 = _setup()
    info = load_checkpoint(tmp_path, fresh, opt2, sched2)
    assert info == {"step": 3, "state": {"epoch": 1}}
    assert fastprompt.prompt_config(fresh).reparam and all(p.requires_grad for p in fastprompt.prompt_parameters(fresh))
    assert _steps(fresh, opt2, sched2, 3, 3) == expected


def test_damaged_checkpoint_is_refused(tmp_path):
    model, opt, sched = _setup()
    save_checkpoint(tmp_path, model, opt, sched, step=1)
    (tmp_path / "step-00000001" / "optimizer.safetensors").write_bytes(b"xx")
    with pytest.raises(fastprompt.PromptLoadError, match="checksum"):
        load_checkpoint(tmp_path, tiny_model("llama", kind="seqcls"), opt, sched)
    with pytest.raises(fastprompt.PromptLoadError, match="no such file"):
        load_checkpoint(tmp_path / "nothing", model)


def _losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


COMMON = ["--steps", "40", "--batch-size", "8", "--max-length", "24", "--num-tokens", "4", "--save-every", "3"]
CLI = [sys.executable, "-m", "fastprompt.cli", "train"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("full")
    full = subprocess.run([*CLI, *COMMON, "--out", str(d / "a"), "--log", str(d / "a.jsonl")], capture_output=True, text=True)
    assert full.returncode == 0, full.stderr[-2000:]
    return _losses(d / "a.jsonl")


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_cli_stopped_by_a_signal_resumes_with_identical_losses(tmp_path, uninterrupted, sig, code):
    ckpt = tmp_path / "b.ckpt"
    proc = subprocess.Popen([*CLI, *COMMON, "--out", str(tmp_path / "b"), "--log", str(tmp_path / "b.jsonl")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (ckpt / "latest.json").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err[-2000:]
    assert "--resume" in err
    stopped = json.loads((ckpt / "latest.json").read_text())["step"]
    assert 3 <= stopped < 40
    assert max(_losses(tmp_path / "b.jsonl")) == stopped  # the checkpoint is at the last finished step

    resumed = subprocess.run([*CLI, "--resume", str(ckpt), "--log", str(tmp_path / "c.jsonl")], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = _losses(tmp_path / "c.jsonl")
    assert sorted(got) == list(range(stopped + 1, 41))
    assert [got[s] for s in sorted(got)] == [uninterrupted[s] for s in sorted(got)]
