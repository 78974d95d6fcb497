"""Prompt ensembles (Lester et al.): K prompts of one task as a bank with K heads, run in one batched
pass (`EnsembleModel`), combined by majority vote (`vote_logits`) or mean span logits, and each
member's metrics from the same pass (`Replay`, `evaluate_ensemble`)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .task_heads import _OUTPUTS, MODEL_INPUTS, _backbone_outputs


class EnsembleModel(nn.Module):
    """K prompts of one task (a bank) and K heads, applied in one batched pass: each example is
    repeated once per member with prompt ids 0..K-1. Outputs combine the members as transformers'
    task model's outputs: classification and tags by majority vote over the members' argmax (ties
    to the highest mean probability; softmax of the returned logits is the vote share), QA spans by
    the mean of the start and end logits. With `record` a list, each call appends the members'
    own outputs (so member metrics come from the same pass)."""

    def __init__(self, backbone: nn.Module, heads: list[nn.Module]):
        super().__init__()
        self.backbone, self.heads = backbone, nn.ModuleList(heads)
        self.record: list | None = None

    def members(self, inputs: dict) -> list[dict]:
        k, b = len(self.heads), inputs["input_ids"].shape[0]
        rep = {n: v.repeat(k, *[1] * (v.dim() - 1)) for n, v in inputs.items() if n in MODEL_INPUTS}
        prompt_ids = torch.arange(k, device=inputs["input_ids"].device).repeat_interleave(b)
        hidden, pooled = _backbone_outputs(self.backbone, rep, prompt_ids)
        return [h(hidden[i * b : (i + 1) * b], pooled[i * b : (i + 1) * b]) for i, h in enumerate(self.heads)]

    def forward(self, **inputs):
        outs = self.members(inputs)
        if self.record is not None:
            self.record.append([{n: v.detach().cpu() for n, v in o.items()} for o in outs])
        kind = self.heads[0].kind
        if kind == "qa":
            combined = {n: torch.stack([o[n] for o in outs]).float().mean(0) for n in ("start_logits", "end_logits")}
        else:
            combined = {"logits": vote_logits(torch.stack([o["logits"] for o in outs]))}
        return _OUTPUTS[kind](**combined)


def vote_logits(logits: torch.Tensor) -> torch.Tensor:
    """(K, ..., C) members' logits -> (..., C) logits whose argmax is the majority vote of the
    members' argmax (ties: the highest mean probability) and whose softmax is the vote share."""
    k, c = logits.shape[0], logits.shape[-1]
    votes = F.one_hot(logits.argmax(-1), c).float().sum(0) / k
    mean_prob = logits.float().softmax(-1).mean(0)
    return torch.log(votes + 1e-4 * mean_prob)  # 1e-4 * p < 1/K: a tie-break only


class Replay(nn.Module):
    """Plays back one member's recorded outputs, batch by batch, as a model's outputs: its metrics
    with the task's own evaluation code, without another pass."""

    def __init__(self, outputs: list[dict], kind: str):
        super().__init__()
        self.outputs, self.kind = list(outputs), kind
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)  # where inputs are moved

    def forward(self, **inputs):
        return _OUTPUTS[self.kind](**self.outputs.pop(0))


def evaluate_ensemble(task, model: EnsembleModel, tokenizer) -> tuple[dict, object, list[dict]]:
    """(the ensemble's metrics, its predictions, each member's metrics) from one batched pass."""
    model.record = []
    try:
        metrics, predictions = task.evaluate(model, tokenizer)
        recorded = model.record
    finally:
        model.record = None
    members = [task.evaluate(Replay([r[i] for r in recorded], model.heads[0].kind), tokenizer)[0] for i in range(len(model.heads))]
    return metrics, predictions, members
