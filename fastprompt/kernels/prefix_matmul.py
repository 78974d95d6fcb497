"""The prefix part of the LSE merge as plain matrix products (`PrefixByMatmul`: any device; the
aten backend's), and `prompt_groups`, a bank's examples grouped by prompt (every backend's).

Every query row of a kv head attends to the P prefix keys in one batched product per kv head:
(Hkv, B*S*G, D) @ (Hkv, D, P), G = H // Hkv query heads per kv head, so grouped-query attention
never repeats K/V and the prefix is never copied per example. With a bank, one product per prompt
over the rows of the examples that use it. Scores, softmax and the backward's row terms are
float32; the probabilities meet V in the input dtype, as in flash kernels. The backward reduces
the prefix gradients over the batch inside its products: deterministic, no atomics, no
(B, P, D) buffer.
"""

from __future__ import annotations

import torch

from .rows import fold_rows, unfold_rows
from .tensor_memo import LastForTensor

# rows per product chunk are bounded so the (Hkv, rows, P) float32 score blocks stay under this
_MAX_SCORE_ELEMENTS = 1 << 27


def _bmm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b batched, accumulated and returned in float32."""
    if a.dtype in (torch.float16, torch.bfloat16) and a.device.type == "cuda":
        return torch.bmm(a, b, out_dtype=torch.float32)  # no upcast copies (CUDA only in torch)
    return torch.bmm(a.float(), b.float())


def _rows(x: torch.Tensor, hkv: int, idx: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, S, X) -> (Hkv, n*S*G, X) for the examples idx (all when None), rows (b, s, g); a
    view for MHA in transformers' (B, S, H, X) layout, a copy otherwise."""
    x5 = x.unflatten(1, (hkv, x.shape[1] // hkv))  # (B, Hkv, G, S, X)
    if idx is not None:
        x5 = x5.index_select(0, idx)
    return fold_rows(x5.transpose(2, 3))


def _unrows(r: torch.Tensor, b: int, h: int, s: int) -> torch.Tensor:
    """(Hkv, b*S*G, X) -> (b, H, S, X)."""
    hkv = r.shape[0]
    return unfold_rows(r, b, s, h // hkv).transpose(2, 3).reshape(b, h, s, r.shape[-1])


# per-forward state, so held per context (thread / task): concurrent forwards never share it
_groups = LastForTensor("fastprompt_prompt_groups")


def prompt_groups(prompt_ids: torch.Tensor | None) -> list[tuple[torch.Tensor, int]] | None:
    """[(example indices, prompt index)] per distinct prompt of a bank, or None without one.
    Finding which prompts occur costs a host sync; a patched model hands every layer the same
    prompt_ids tensor in one forward (and its checkpointed recompute), so it is paid once per
    forward. The memo is the last prompt_ids seen in this thread (`LastForTensor`): a forward in
    another thread neither reuses nor evicts it."""
    if prompt_ids is None:
        return None
    return _groups.get(prompt_ids, lambda: [((prompt_ids == t).nonzero(as_tuple=True)[0], int(t))
                                            for t in torch.unique(prompt_ids).tolist()])


def _chunks(n: int, hkv: int, p: int):
    step = max(1, _MAX_SCORE_ELEMENTS // max(1, hkv * p))
    return [(i, min(step, n - i)) for i in range(0, n, step)]


def _cat(parts, dim):
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _attend(qr, pk, pv, scale):
    """qr: (Hkv, N, D), pk, pv: (Hkv, P, D) -> out (Hkv, N, D) float32, LSE (Hkv, N) float32."""
    hkv, n, d = qr.shape
    outs, lses = [], []
    for i, m in _chunks(n, hkv, pk.shape[1]):
        s = _bmm32(qr.narrow(1, i, m), pk.transpose(1, 2)).mul_(scale)
        l = torch.logsumexp(s, -1)
        p = torch.exp(s.sub_(l.unsqueeze(-1)))
        outs.append(_bmm32(p.to(pv.dtype), pv))
        lses.append(l)
    return _cat(outs, 1), _cat(lses, 1)


def _attend_backward(dor, qr, our, lser, pk, pv, scale):
    """Rows as in `_attend`, with the merged output our and LSE lser -> dq (Hkv, N, D) float32,
    dpk, dpv (Hkv, P, D) float32 summed over the rows."""
    hkv, n, d = qr.shape
    dqs, dpk, dpv = [], 0, 0
    for i, m in _chunks(n, hkv, pk.shape[1]):
        q_, do_ = qr.narrow(1, i, m), dor.narrow(1, i, m)
        p = torch.exp(_bmm32(q_, pk.transpose(1, 2)).mul_(scale).sub_(lser.narrow(1, i, m).unsqueeze(-1)))
        delta = (do_.float() * our.narrow(1, i, m).float()).sum(-1, keepdim=True)  # the full softmax's row term
        dpv = dpv + _bmm32(p.to(do_.dtype).transpose(1, 2), do_)
        ds = p.mul_(_bmm32(do_, pv.transpose(1, 2)).sub_(delta)).to(q_.dtype)
        dqs.append(_bmm32(ds, pk).mul_(scale))
        dpk = dpk + _bmm32(ds.transpose(1, 2), q_).mul_(scale)
    return _cat(dqs, 1), dpk, dpv


class PrefixByMatmul:
    """The `PrefixPart` of `lse_merge` on any device. groups: `prompt_groups(prompt_ids)` for a
    bank (T, Hkv, P, D), None for a shared (Hkv, P, D) prefix."""

    def __init__(self, scale: float, groups: list[tuple[torch.Tensor, int]] | None = None):
        self.scale, self.groups = scale, groups

    def forward(self, q, pk, pv):
        b, h, s, d = q.shape
        hkv = pk.shape[-3]
        if self.groups is None:
            o, l = _attend(_rows(q, hkv), pk, pv, self.scale)
            return _unrows(o, b, h, s), _unrows(l.unsqueeze(-1), b, h, s).squeeze(-1)
        out = torch.empty(b, h, s, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(b, h, s, dtype=torch.float32, device=q.device)
        for idx, t in self.groups:
            o, l = _attend(_rows(q, hkv, idx), pk.select(0, t), pv.select(0, t), self.scale)
            n = idx.numel()
            out.index_copy_(0, idx, _unrows(o, n, h, s))
            lse.index_copy_(0, idx, _unrows(l.unsqueeze(-1), n, h, s).squeeze(-1))
        return out, lse

    def backward(self, dout, q, pk, pv, out, lse):
        b, h, s, d = q.shape
        hkv = pk.shape[-3]
        lse4 = lse.unsqueeze(-1)
        if self.groups is None:
            dq, dpk, dpv = _attend_backward(
                _rows(dout, hkv), _rows(q, hkv), _rows(out, hkv), _rows(lse4, hkv).squeeze(-1), pk, pv, self.scale
            )
            return _unrows(dq, b, h, s), dpk.to(pk.dtype), dpv.to(pv.dtype)
        dq = torch.zeros(b, h, s, d, dtype=torch.float32, device=q.device)
        gk, gv = {}, {}
        for idx, t in self.groups:
            gq, gk[t], gv[t] = _attend_backward(
                _rows(dout, hkv, idx), _rows(q, hkv, idx), _rows(out, hkv, idx), _rows(lse4, hkv, idx).squeeze(-1),
                pk.select(0, t), pv.select(0, t), self.scale,
            )
            dq.index_copy_(0, idx, _unrows(gq, idx.numel(), h, s))
        # prompts no example used get zeros; each prompt's gradient is written once (deterministic)
        zero = torch.zeros_like(pk.select(0, 0))
        dpk = torch.stack([gk[t].to(pk.dtype) if t in gk else zero for t in range(pk.shape[0])])
        dpv = torch.stack([gv[t].to(pv.dtype) if t in gv else zero for t in range(pv.shape[0])])
        return dq, dpk, dpv
