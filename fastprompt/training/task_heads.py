"""The heads a multi-task or ensemble run puts on one frozen encoder, one per dataset or member, as
transformers' BERT task models build them: SequenceHead (pooler output -> dropout -> linear),
TokenHead (dropout -> linear per token), SpanHead (start/end logits with transformers' span loss);
`make_head`, the backbone's outputs under prompt ids, `HeadedModel` (one dataset's view with a task
model's outputs) and right-padding several datasets' encodings to one batch (`pad_inputs`)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.modeling_outputs import QuestionAnsweringModelOutput, SequenceClassifierOutput, TokenClassifierOutput

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

def _init_linear(linear: nn.Linear, config) -> nn.Linear:
    # as transformers initialises a fresh task head: N(0, initializer_range), zero bias
    nn.init.normal_(linear.weight, std=getattr(config, "initializer_range", 0.02))
    nn.init.zeros_(linear.bias)
    return linear


def _dropout(config) -> nn.Dropout:
    p = getattr(config, "classifier_dropout", None)
    return nn.Dropout(p if p is not None else getattr(config, "hidden_dropout_prob", 0.1))


class SequenceHead(nn.Module):
    """Pooled output -> dropout -> Linear(H, labels): transformers' BERT sequence classifier."""

    kind = "seq"

    def __init__(self, config, num_labels: int):
        super().__init__()
        self.dropout = _dropout(config)
        self.classifier = _init_linear(nn.Linear(config.hidden_size, num_labels), config)

    def forward(self, hidden, pooled):
        return {"logits": self.classifier(self.dropout(pooled))}

    def loss(self, out, labels):
        return F.cross_entropy(out["logits"].float(), labels["labels"])


class TokenHead(nn.Module):
    """dropout -> Linear(H, labels) per token: transformers' BERT token classifier (-100 ignored)."""

    kind = "token"

    def __init__(self, config, num_labels: int):
        super().__init__()
        self.dropout = _dropout(config)
        self.classifier = _init_linear(nn.Linear(config.hidden_size, num_labels), config)

    def forward(self, hidden, pooled):
        return {"logits": self.classifier(self.dropout(hidden))}

    def loss(self, out, labels):
        logits = out["logits"]
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels["labels"].reshape(-1), ignore_index=-100)


class SpanHead(nn.Module):
    """Linear(H, 2) per token -> start and end logits: transformers' question-answering head."""

    kind = "qa"

    def __init__(self, config, num_labels: int = 2):
        super().__init__()
        self.qa_outputs = _init_linear(nn.Linear(config.hidden_size, 2), config)

    def forward(self, hidden, pooled):
        start, end = self.qa_outputs(hidden).split(1, dim=-1)
        return {"start_logits": start.squeeze(-1).contiguous(), "end_logits": end.squeeze(-1).contiguous()}

    def loss(self, out, labels):
        # transformers' rule: positions outside the window are clamped to its length and ignored
        n = out["start_logits"].shape[1]
        s, e = labels["start_positions"].clamp(0, n), labels["end_positions"].clamp(0, n)
        return (F.cross_entropy(out["start_logits"].float(), s, ignore_index=n) + F.cross_entropy(out["end_logits"].float(), e, ignore_index=n)) / 2


HEADS = {h.kind: h for h in (SequenceHead, TokenHead, SpanHead)}
_OUTPUTS = {"seq": SequenceClassifierOutput, "token": TokenClassifierOutput, "qa": QuestionAnsweringModelOutput}
LABEL_KEYS = ("labels", "start_positions", "end_positions")


def make_head(kind: str, config, task) -> nn.Module:
    return HEADS[kind](config, len(task.labels) if task.labels is not None else 2)


def _backbone_outputs(backbone, inputs: dict, prompt_ids):
    extra = {"prompt_ids": prompt_ids} if prompt_ids is not None else {}
    out = backbone(**{k: v for k, v in inputs.items() if k in MODEL_INPUTS}, **extra)
    hidden = out.last_hidden_state
    pooled = getattr(out, "pooler_output", None)
    return hidden, pooled if pooled is not None else hidden[:, 0]


class HeadedModel(nn.Module):
    """One dataset's model: the shared backbone, this dataset's head and prompt id (None: the one
    prompt). Called as transformers' task model is: inputs (and labels) -> its output class."""

    def __init__(self, backbone: nn.Module, head: nn.Module, prompt_id: int | None = None):
        super().__init__()
        self.backbone, self.head, self.prompt_id = backbone, head, prompt_id

    def forward(self, **inputs):
        ids = inputs["input_ids"]
        prompt_ids = None if self.prompt_id is None else torch.full((ids.shape[0],), self.prompt_id, dtype=torch.long, device=ids.device)
        out = self.head(*_backbone_outputs(self.backbone, inputs, prompt_ids))
        labels = {k: inputs[k] for k in LABEL_KEYS if k in inputs}
        loss = self.head.loss(out, labels) if labels else None
        return _OUTPUTS[self.head.kind](loss=loss, **out)


def pad_inputs(parts: list[dict], pad_id: int) -> dict:
    """Model inputs of several encoded batches, right-padded to the longest, stacked in order."""
    length = max(p["input_ids"].shape[1] for p in parts)
    out = {}
    for key in MODEL_INPUTS:
        if not any(key in p for p in parts):
            continue
        fill = pad_id if key == "input_ids" else 0
        rows = []
        for p in parts:
            t = p[key] if key in p else torch.zeros_like(p["input_ids"])
            rows.append(F.pad(t, (0, length - t.shape[1]), value=fill))
        out[key] = torch.cat(rows)
    return out
