"""The one row-fold helper pair every backend shares: (batch, heads) rows folded into one matrix
per head, so that a head's rows of the whole batch meet the prefix in one product or kernel call,
and unfolded back."""

from __future__ import annotations

import math

import torch


def fold_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, H, *R, X) -> (H, B * prod(R), X): every row of a head across the batch in one matrix,
    rows in (b, *r) order. A view when x is laid out (B, *R, H, X), as transformers' projections
    produce q, k, v (and H is the last of the folded dims), a copy otherwise."""
    h, x_ = x.shape[1], x.shape[-1]
    return x.transpose(0, 1).reshape(h, x.shape[0] * math.prod(x.shape[2:-1]), x_)


def unfold_rows(x: torch.Tensor, b: int, *r: int) -> torch.Tensor:
    """(H, B * prod(R), X) -> (B, H, *R, X), a view: `fold_rows` undone. R defaults to the one
    dimension the rows leave after B."""
    h, n, x_ = x.shape
    return x.view(h, b, *(r or (n // b,)), x_).transpose(0, 1)
