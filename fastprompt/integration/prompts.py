"""The modules a patch adds: deep key/value prefixes (DeepPrefix, P-Tuning v2, optionally
reparameterised), input soft prompts (SoftPrompt), late prompt generators and their per-task bank
(LatePromptGenerator, LatePromptBank), the per-task head bank (TaskHeads), and FoldCache, which
keeps values derived from parameters while no gradient is recorded."""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F


class FoldCache:
    """Holds values derived from parameters while no gradient is recorded (inference).

    The key is every parameter's in-place version counter plus dtype and device, so an optimizer
    step or a load_prompts invalidates it without any hook.
    """

    def __init__(self):
        self.key = None
        self.value = None

    def get(self, params, extra, compute):
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            self.key = self.value = None
            return compute()
        key = (tuple(p._version for p in params), tuple(p.data_ptr() for p in params), extra)
        if key != self.key:
            self.value, self.key = compute(), key
        return self.value


class DeepPrefix(nn.Module):
    """Per-layer key/value prefixes for `num_slots` self-attention layers, one set per task.

    Without reparameterisation: one parameter `prefix: (T, num_slots, 2, Hkv, P, D)` (K then V).
    With it (P-Tuning v2): `embedding: (T, P, hidden)` -> Linear(hidden, r) -> Tanh ->
    Linear(r, num_slots * 2 * Hkv * D) shared by the tasks, laid out as [P, slot, K|V, Hkv, D]
    like PEFT's. At inference (no grad) the prefixes are folded once and reused until a
    parameter changes.
    """

    task_dim_keys = ("prefix", "embedding")  # state_dict entries with a leading task dimension

    def __init__(self, num_slots, kv_heads, num_tokens, head_dim, hidden_size, reparam=False, reparam_hidden=512, dropout=0.0, num_tasks=1):
        super().__init__()
        self.num_slots, self.kv_heads, self.num_tokens, self.head_dim = num_slots, kv_heads, num_tokens, head_dim
        self.reparam = reparam
        self.dropout = dropout
        if reparam:
            self.embedding = nn.Parameter(torch.randn(num_tasks, num_tokens, hidden_size))
            self.mlp = nn.Sequential(
                nn.Linear(hidden_size, reparam_hidden), nn.Tanh(), nn.Linear(reparam_hidden, num_slots * 2 * kv_heads * head_dim)
            )
        else:
            # N(0, 1) as P-Tuning v2 and PEFT initialise their prefix embedding
            self.prefix = nn.Parameter(torch.randn(num_tasks, num_slots, 2, kv_heads, num_tokens, head_dim))
        self._folded = FoldCache()

    @property
    def num_tasks(self) -> int:
        return (self.embedding if self.reparam else self.prefix).shape[0]

    def _slot_raw(self, slot: int) -> torch.Tensor:
        """(T, 2, Hkv, P, D) for one slot, differentiable."""
        if not self.reparam:
            return self.prefix[:, slot]
        lin1, _, lin2 = self.mlp
        hidden = torch.tanh(lin1(self.embedding))  # (T, P, r): recomputed per layer, T*P*H*r flops
        rows = 2 * self.kv_heads * self.head_dim
        w = lin2.weight[slot * rows:(slot + 1) * rows]
        b = lin2.bias[slot * rows:(slot + 1) * rows]
        out = F.linear(hidden, w, b)  # (T, P, 2*Hkv*D)
        return out.view(-1, self.num_tokens, 2, self.kv_heads, self.head_dim).permute(0, 2, 3, 1, 4)

    def folded(self) -> torch.Tensor:
        """(T, num_slots, 2, Hkv, P, D): every slot's prefix at once, for saving and export."""
        if not self.reparam:
            return self.prefix
        return torch.stack([self._slot_raw(i) for i in range(self.num_slots)], dim=1)

    def slot(self, slot: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The (K, V) prefix bank of one layer, each (T, Hkv, P, D) in the attention's dtype."""
        params = list(self.parameters())

        def compute_all():
            return self.folded().detach().to(device=device, dtype=dtype)

        if not (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            kv = self._folded.get(params, (dtype, device), compute_all)[:, slot]
            return kv[:, 0], kv[:, 1]
        kv = self._slot_raw(slot).to(device=device, dtype=dtype)
        if self.training and self.dropout > 0:
            kv = F.dropout(kv, self.dropout, training=True)
        return kv[:, 0], kv[:, 1]


class SoftPrompt(nn.Module):
    """Input soft prompts (Lester et al.): `embedding: (T, P, hidden)` in the input-embedding space."""

    task_dim_keys = ("embedding",)

    def __init__(self, init: torch.Tensor):
        """init: (T, P, hidden)."""
        super().__init__()
        self.embedding = nn.Parameter(init.detach().clone().float())

    @property
    def num_tokens(self) -> int:
        return self.embedding.shape[1]

    @property
    def num_tasks(self) -> int:
        return self.embedding.shape[0]


class LatePromptGenerator(nn.Module):
    """Late Prompt Tuning's prompt generator: per example, n tokens from the layer-L input.

    kind "npg": the [CLS] state (decoders: the last real token) -> Linear(H, r) -> ReLU ->
    Linear(r, n * H). kind "avgpool"/"maxpool": Linear(H, r) on every token -> adaptive
    average/max pool over the real tokens to n -> ReLU -> Linear(r, H).
    """

    def __init__(self, hidden_size: int, num_tokens: int, kind: str = "npg", hidden: int = 128):
        super().__init__()
        self.kind, self.num_tokens, self.hidden_size = kind, num_tokens, hidden_size
        self.down = nn.Linear(hidden_size, hidden)
        self.up = nn.Linear(hidden, num_tokens * hidden_size if kind == "npg" else hidden_size)

    def forward(self, hidden_states: torch.Tensor, real: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """hidden_states: (B, T, H); real: (B, T) bool, True for real tokens; source: (B,) index of
        the token npg reads. Returns (B, n, H) in hidden_states' dtype."""
        x = hidden_states.to(self.down.weight.dtype)
        b, t, _ = x.shape
        if self.kind == "npg":
            h = torch.relu(self.down(x[torch.arange(b, device=x.device), source]))
            return self.up(h).view(b, self.num_tokens, self.hidden_size).to(hidden_states.dtype)
        h = self.down(x)  # (B, T, r)
        bins = _pool_bins(real, self.num_tokens)  # (B, n, T): which real tokens feed each output
        if self.kind == "avgpool":
            pooled = torch.bmm(bins / bins.sum(-1, keepdim=True).clamp(min=1), h)
        else:
            pooled = h[:, None].masked_fill(~bins.bool()[..., None], float("-inf")).amax(dim=2)
        return self.up(torch.relu(pooled)).to(hidden_states.dtype)


class LatePromptBank(nn.Module):
    """One LatePromptGenerator per task (`generators.<t>.*`); each example uses its task's."""

    task_dim_keys = ()

    def __init__(self, hidden_size: int, num_tokens: int, kind: str = "npg", hidden: int = 128, num_tasks: int = 1):
        super().__init__()
        self.args = (hidden_size, num_tokens, kind, hidden)
        self.generators = nn.ModuleList(LatePromptGenerator(*self.args) for _ in range(num_tasks))

    @property
    def num_tasks(self) -> int:
        return len(self.generators)

    def forward(self, hidden_states, real, source, prompt_ids=None):
        """As LatePromptGenerator.forward, with prompt_ids: (B,) task per example (None: task 0)."""
        if prompt_ids is None or self.num_tasks == 1:
            return self.generators[0](hidden_states, real, source)
        # one call per task present in the batch: gathering per-example weights would copy them B times
        parts, order = [], []
        for t in torch.unique(prompt_ids).tolist():
            idx = (prompt_ids == t).nonzero(as_tuple=True)[0]
            parts.append(self.generators[t](hidden_states[idx], real[idx], source[idx]))
            order.append(idx)
        out = torch.cat(parts)
        return out[torch.argsort(torch.cat(order))]


class TaskHeads(nn.Module):
    """A bank of linear heads, one per task, replacing a model's linear head while patched.

    weight: (T, L, H), bias: (T, L) or None, L the largest label count; labels: (T,) each
    task's own count. forward(x: (B, H) or (B, S, H)) -> (B, L) or (B, S, L) using each
    example's task (from the runtime's prompt_ids); logits past a task's count are the dtype's
    minimum, so softmax, cross-entropy and argmax only ever see that task's labels.
    """

    task_dim_keys = ("weight", "bias")

    def __init__(self, base: nn.Linear, labels: list[int], runtime):
        super().__init__()
        t = len(labels)
        self.weight = nn.Parameter(base.weight.detach().clone()[None].repeat(t, 1, 1))
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone()[None].repeat(t, 1))
        self.register_buffer("labels", torch.tensor(labels, dtype=torch.long, device=base.weight.device), persistent=False)
        self.__dict__["_runtime"] = weakref.ref(runtime)  # not a submodule; weak: see back_references.py
        self.__dict__["_base"] = base  # the replaced head (not a submodule): a new task starts from it

    def grow(self, num_labels: int) -> None:
        """Adds a task with `num_labels` labels, starting from the replaced head's weights."""
        for key in self.task_dim_keys:
            old = getattr(self, key)
            if old is None:
                continue
            row = getattr(self._base, key).detach()[None].to(old)
            setattr(self, key, nn.Parameter(torch.cat([old.detach(), row]), requires_grad=True))
        self.labels = torch.cat([self.labels, self.labels.new_tensor([num_labels])])

    @property
    def num_tasks(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        runtime = self._runtime()
        ids = None if runtime is None else runtime.forward.prompt_ids
        if ids is None:
            ids = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        ids = ids.to(x.device)
        w = self.weight[ids].to(x.dtype)  # (B, L, H): B small matrices, the head is tiny
        out = torch.einsum("bh,blh->bl" if x.dim() == 2 else "bsh,blh->bsl", x, w)
        if self.bias is not None:
            b = self.bias[ids].to(x.dtype)
            out = out + (b if x.dim() == 2 else b[:, None])
        valid = torch.arange(w.shape[1], device=x.device) < self.labels[ids][:, None]  # (B, L)
        if x.dim() == 3:
            valid = valid[:, None]
        return out.masked_fill(~valid, torch.finfo(out.dtype).min)


def _pool_bins(real: torch.Tensor, n: int) -> torch.Tensor:
    """(B, T) bool -> (B, n, T) float: adaptive pooling bins over each example's real tokens.

    Bin i covers real positions [floor(i*L/n), ceil((i+1)*L/n)) of an example with L real
    tokens, as torch's adaptive pooling does on the unpadded sequence.
    """
    length = real.sum(-1, keepdim=True)  # (B, 1)
    rank = real.cumsum(-1) - 1  # position among real tokens
    i = torch.arange(n, device=real.device)[None, :, None]
    start = (i * length[:, None]) // n
    end = -((-(i + 1) * length[:, None]) // n)
    r = rank[:, None, :]
    return ((r >= start) & (r < end) & real[:, None, :]).float()
