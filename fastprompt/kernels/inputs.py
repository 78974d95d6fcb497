"""The prefix-attention op's normalised inputs: what every backend receives.

The public op (`fastprompt.ops.prefix_attention`) validates and normalises once: a float mask
becomes part of the additive bias, a (B, Sk) key-padding mask stays 2-D (so fused backends can
run variable-length kernels instead of reading a dense mask), causal is bottom-right aligned and
switched off where it cannot mask anything (one query row). Backends must honour every field
together: key padding, a dense mask, causal and the bias compose.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionInputs:
    """q: (B, H, S, D); k, v: (B, Hkv, Sk, D), H a multiple of Hkv (query head h reads kv head
    h // (H // Hkv), as transformers' repeat_kv). prefix_k, prefix_v: (Hkv, P, D) shared by the
    batch, or (T, Hkv, P, D) a bank with prompt_ids: (B,) int64 choosing one prompt per example.

    key_padding: (B, Sk) bool, True = a real token, or None. On a causal call query row i is the
    token at key position Sk - S + i, so a padded query row is padding too: it sees no sequence
    key (only the prefix). On a non-causal call it masks keys only.
    mask: bool broadcastable to (B, H, S, Sk), True = attend, or None.
    bias: float broadcastable to (B, H, S, Sk), added to the sequence scores (position bias and
    any float mask), -inf or the dtype's min where masked, or None.
    causal: query i sees sequence keys j <= i + (Sk - S) (bottom-right, as in cached decoding).
    The prefix is visible to every query; masks and bias apply to the sequence keys only.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    prefix_k: torch.Tensor
    prefix_v: torch.Tensor
    prompt_ids: torch.Tensor | None
    key_padding: torch.Tensor | None
    mask: torch.Tensor | None
    bias: torch.Tensor | None
    causal: bool
    scale: float
    dropout_p: float

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        """(B, H, Hkv, S, Sk, D)."""
        b, h, s, d = self.q.shape
        return b, h, self.k.shape[1], s, self.k.shape[2], d

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in (self.q, self.k, self.v, self.prefix_k, self.prefix_v))

    @property
    def has_masking(self) -> bool:
        """Whether anything besides (optional) causal masks sequence keys."""
        return self.key_padding is not None or self.mask is not None or self.bias is not None

    def causal_visible(self) -> torch.Tensor:
        """(S, Sk) bool: the bottom-right causal pattern."""
        _, _, _, s, sk, _ = self.shape
        dev = self.q.device
        return torch.arange(sk, device=dev).unsqueeze(0) <= torch.arange(s, device=dev).unsqueeze(1) + (sk - s)

    def padding_visible(self) -> torch.Tensor | None:
        """(B, 1, S or 1, Sk) bool from key_padding, with the causal padded-query rule; None without padding."""
        if self.key_padding is None:
            return None
        kp = self.key_padding
        keys = kp.unsqueeze(1).unsqueeze(1)  # (B, 1, 1, Sk)
        if not self.causal:
            return keys
        s = self.q.shape[2]
        rows = kp.narrow(1, kp.shape[1] - s, s).unsqueeze(1).unsqueeze(-1)  # (B, 1, S, 1): the query tokens
        return keys & rows

    def bool_mask(self) -> torch.Tensor | None:
        """Key padding (with the causal padded-query rule) and the mask as one bool tensor
        broadcastable to (B, H, S, Sk), causal left out: for kernels that apply causal themselves."""
        vis = self.padding_visible()
        if self.mask is not None:
            vis = self.mask if vis is None else vis & self.mask
        return vis

    def visible(self) -> torch.Tensor | None:
        """Bool broadcastable to (B, H, S, Sk), True = attend: key padding, mask and causal composed
        (the bias's -inf entries not included); None when every sequence key is visible."""
        vis = self.bool_mask()
        if self.causal:
            c = self.causal_visible().unsqueeze(0).unsqueeze(0)
            vis = c if vis is None else vis & c
        return vis

    def additive_bias(self, dtype: torch.dtype | None = None, align: int = 1, causal: bool = True) -> torch.Tensor | None:
        """Everything above as one additive float tensor broadcastable to (B, H, S, Sk) (-inf where
        masked, plus the bias), or None when nothing masks. align: the last dimension's storage is
        padded to a multiple of it (fused kernels read bias rows at aligned addresses). causal=False:
        the causal pattern left out, for a kernel that applies it itself."""
        vis = self.visible() if causal else self.bool_mask()
        if vis is None and self.bias is None:
            return None
        dtype = dtype or self.q.dtype
        b, h, _, s, sk, _ = self.shape
        parts = [t for t in (vis, self.bias) if t is not None]
        lead = [max(t.shape[0] for t in parts), max(t.shape[1] for t in parts)]
        width = -(-sk // align) * align
        out = torch.zeros((), dtype=dtype, device=self.q.device).expand(*lead, s, sk)
        if self.bias is not None:
            out = out + self.bias.to(dtype)
        if vis is not None:
            out = out.masked_fill(vis.logical_not(), float("-inf"))  # not ~: fake CUDA tensors refuse it
        out = out.expand(*lead, s, sk)
        if width != sk or out.stride(-1) != 1 or out.stride(-2) != sk:
            # padded storage: every row starts at an aligned address (and the tensor is dense)
            out = torch.nn.functional.pad(out, (0, width - sk)).narrow(-1, 0, sk)
        return out

    @staticmethod
    def dead_rows_of(bias: torch.Tensor | None) -> torch.Tensor | None:
        """Bool (B|1, H|1, S): rows of an `additive_bias` that see no sequence key (the prefix only),
        or None without a bias. No device sync: fused kernels report such rows inconsistently
        (0, -inf or +inf LSE, NaN output), so callers overwrite them unconditionally."""
        if bias is None:
            return None
        return (bias > torch.finfo(bias.dtype).min / 2).any(-1).logical_not()

    def dead_rows(self) -> torch.Tensor | None:
        """`dead_rows_of` this call's additive bias."""
        return self.dead_rows_of(self.additive_bias(torch.float32))
