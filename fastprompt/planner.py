"""Memory planner: predicted peak memory and relative cost of a prompt-training step (`plan`,
`predict`, `format_table`, `parse_bytes`), from a model's ModelShape and each method class's own
prompt sizes.

`plan(model_or_config, device_memory="24GiB", batch_size=8, seq_len=512, num_tokens=32)` returns
(and prints) one row per configuration: weights bf16 / int8 / nf4 x method x start layer x
checkpointing, with the predicted peak bytes of a training step (forward, backward, AdamW step),
its parts, the step's cost relative to P-Tuning v2 from layer 0 without checkpointing, and
whether it fits. The formulas (README, "Memory planner"), for a batch of n = B*S tokens:

    peak = weights + trainable + saved + transient + overhead
    weights     quantised linears (the transformer layers' nn.Linear weights): 2 B/param bf16,
                1 B + one fp32 scale per output row int8, 0.5 B + one fp32 absmax per 64 nf4;
                everything else (embeddings, norms, lm_head, task head) in the float dtype
    trainable   prompt + head parameters x 16 B (fp32 weight, grad, two AdamW moments)
    saved       activations autograd keeps, per layer >= L (frozen linears save nothing):
                llama-like: n * (2*(4H + 4) + (2*Hq + 2*Hkv_d)*a + 4*heads + 3*I*a)
                  (two RMSNorms' fp32 inputs and rsqrt, the attention's q, k, v, out and lse,
                  SiLU input, its output and the up projection)
                bert-like: n * (4*H*a + 16 + I*a + 2*H*a + 4*heads) (LayerNorm inputs and stats, GELU
                  input, the fused attention's q, k, v, out and lse); with attention dropout (plain
                  torch backend) the attention part is 4*H*a + heads*(8*(S+P) + 4*S + 4*P) per token
                lpt: layers >= L see S+P tokens; decoder input prompts add a P-token pass per task
                checkpointing: n*H*a per checkpointed layer, plus one layer's saved set (recompute)
    transient   the largest working set at the peak: for LM heads the loss over n x vocab logits
                (n * vocab * (a + 10): logits, fp32 copy, log-softmax, two gradients), else one
                layer's MLP (2 * n * I * a)
    overhead    the framework's own memory: `overhead=` (default 512 MiB for a CUDA context and
                workspaces; about 50 MiB of library workspace on CPU, measured here)

with H the hidden size, Hq = heads * head_dim, Hkv_d = kv_heads * head_dim, I the intermediate
size and a the activation dtype's bytes. Relative cost counts matmul FLOPs: forward of every
layer, backward (input gradients only, weights are frozen) of layers >= L, recompute of layers
>= L with checkpointing; int8/nf4 dequantisation overhead is not modelled (it depends on kernels).
"""

from __future__ import annotations

import dataclasses
import re

from .config import PromptConfig
from .integration.facade import BERT_LIKE, GATED, ModelShape, method_class, method_names, shape_of

__all__ = ["PlanRow", "ModelShape", "parse_bytes", "plan", "predict", "shape_of", "format_table"]

WEIGHTS = ("bf16", "int8", "nf4")


def parse_bytes(value) -> int:
    """'24GiB', '80GB', '512MiB', 2**30 -> bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return int(value)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B?|B)?\s*", str(value), flags=re.I)
    if not m:
        raise ValueError(f"device_memory must be bytes or a size such as '24GiB' or '80GB', got {value!r}")
    unit = (m.group(2) or "B").upper().rstrip("B") or "B"
    scale = {"B": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(m.group(1)) * scale)


@dataclasses.dataclass(frozen=True)
class PlanRow:
    weights: str
    method: str
    start_layer: int
    checkpointing: bool
    peak_bytes: int
    parts: dict
    relative_cost: float
    fits: bool


def _prompt_params(s: ModelShape, method, start, p) -> int:
    """The method's own count of its prompt's parameters (its default generator / reparam settings)."""
    shapes = method_class(method).shapes(PromptConfig(method=method, num_tokens=p, start_layer=start), s)
    return sum(_product(shape) for shape in shapes.values())


def _product(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _saved_per_layer(s: ModelShape, b, t, p, a, train_dropout: bool) -> float:
    """Bytes autograd saves in one layer with grad, for b sequences of t tokens (+ p prefix keys)."""
    n = b * t
    qd, kvd = s.heads * s.head_dim, s.kv_heads * s.head_dim
    if s.model_type in BERT_LIKE:
        if train_dropout and s.attention_dropout > 0:
            # the plain torch backend (attention dropout): q/k/v and their per-part copies, the
            # probabilities over [prefix; sequence] before and after dropout, the sequence part again
            attn = 4 * s.hidden * a + s.heads * (8 * (t + p) + 4 * t + 4 * p)
        else:  # the fused backend: q, k, v, out and the log-sum-exp
            attn = 2 * s.hidden * a + 4 * s.heads
        return n * (4 * s.hidden * a + 16 + s.intermediate * a + attn)  # + LayerNorm inputs, stats, GELU input
    mlp = (3 if s.model_type in GATED else 2) * s.intermediate * a
    return n * (2 * (4 * s.hidden + 4) + (2 * qd + 2 * kvd) * a + 4 * s.heads + mlp)


def predict(s: ModelShape, weights, method, start, ckpt, b, t, p, float_bytes=2, act_bytes=2, tasks_in_batch=1, overhead=0):
    """(peak bytes, parts) of one training step; see the module docstring for the formulas."""
    if weights in ("bf16", "float"):  # "float": unquantised in float_bytes (4 for fp32)
        w = s.quantisable * (2 if weights == "bf16" else float_bytes)
    elif weights == "int8":
        w = s.quantisable + 4 * s.linear_rows
    else:
        w = s.quantisable // 2 + 4 * (s.quantisable // 64)
    w += s.other * float_bytes
    trainable = 16 * (_prompt_params(s, method, start, p) + s.head_params)
    upper = s.layers - start
    grows = method_class(method).grows_sequence  # inserted tokens: S + P tokens, no prefix keys
    t_up = t + p if grows else t
    per_layer = _saved_per_layer(s, b, t_up, 0 if grows else p, act_bytes, True)
    if ckpt:
        saved = upper * b * t_up * s.hidden * act_bytes + per_layer
    else:
        saved = upper * per_layer
    if method_class(method).decoder_prompt_pass and s.model_type not in BERT_LIKE:  # the prompt's own pass, with grad
        saved += s.layers * _saved_per_layer(s, tasks_in_batch, p, 0, act_bytes, True)
    n = b * t
    # the loss: logits, their fp32 copy, log-softmax and two gradients of n x vocab (measured 3.5x fp32 logits)
    transient = max(n * s.vocab * (act_bytes + 10) if s.lm_head else 0, 2 * n * s.intermediate * act_bytes)
    parts = {"weights": int(w), "trainable": int(trainable), "saved": int(saved), "transient": int(transient), "overhead": int(overhead)}
    return int(sum(parts.values())), parts


def _cost(s: ModelShape, method, start, ckpt, t, p) -> float:
    """Matmul FLOPs of a step relative units: forward per layer-token 1, backward 1, recompute 1."""
    t_up = t + p if method_class(method).grows_sequence else t
    fwd = start * t + (s.layers - start) * t_up
    bwd = (s.layers - start) * t_up
    rec = (s.layers - start) * t_up if ckpt else 0
    extra = s.layers * p * 2 if method_class(method).decoder_prompt_pass and s.model_type not in BERT_LIKE else 0
    return fwd + bwd + rec + extra


def plan(model_or_config, device_memory="24GiB", batch_size: int = 8, seq_len: int = 512, num_tokens: int = 32,
         weights=WEIGHTS, methods=None, start_layers=None, checkpointing=(False, True), print_table: bool = True,
         act_bytes: int = 2, float_bytes: int = 2, overhead="512MiB") -> list[PlanRow]:
    """Predicted peak memory of a training step for each configuration; prints a table.

    model_or_config: a transformers model, its config, a config dict, or a folder / hub id of a
    config.json. start_layers: default 0, N/2 and 3N/4. act_bytes / float_bytes: bytes of the
    activations and of unquantised weights (2: bf16/fp16; 4: fp32). overhead: memory the
    framework takes besides tensors (a CUDA context and library workspaces; about 50 MiB of
    library workspace on CPU).
    """
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len), ("num_tokens", num_tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    budget = parse_bytes(device_memory)
    overhead = parse_bytes(overhead) if overhead else 0
    s = shape_of(model_or_config)
    for w in weights:
        if w not in WEIGHTS:
            raise ValueError(f"weights must be among {WEIGHTS}, got {w!r}")
    methods = method_names() if methods is None else methods
    for m in methods:
        if m not in method_names():
            raise ValueError(f"methods must be among {method_names()}, got {m!r}")
    starts = sorted(set(start_layers if start_layers is not None else (0, s.layers // 2, 3 * s.layers // 4)))
    if any(not 0 <= L < s.layers for L in starts):
        raise ValueError(f"start_layers must lie in [0, {s.layers}), got {starts}")
    base = _cost(s, "ptv2", 0, False, seq_len, num_tokens)
    rows = []
    for w in weights:
        for m in methods:
            for L in starts if not method_class(m).input_layer_only else [0]:
                for ck in checkpointing:
                    peak, parts = predict(s, w, m, L, ck, batch_size, seq_len, num_tokens, float_bytes, act_bytes, overhead=overhead)
                    rows.append(PlanRow(w, m, L, ck, peak, parts, _cost(s, m, L, ck, seq_len, num_tokens) / base, peak <= budget))
    if print_table:
        print(format_table(rows, s, budget, batch_size, seq_len, num_tokens))
    return rows


def _gib(x) -> str:
    return f"{x / 2**30:.2f}"


def format_table(rows, s: ModelShape, budget, b, t, p) -> str:
    params = s.quantisable + s.other
    lines = [
        f"{s.model_type}: {params / 1e9:.2f} B parameters, {s.layers} layers, hidden {s.hidden}; batch {b} x {t} tokens, "
        f"P={p}; device {_gib(budget)} GiB",
        f"{'weights':<8}{'method':<8}{'L':>4} {'ckpt':<5}{'peak GiB':>9}{'weights':>9}{'saved':>8}{'other':>8}{'cost':>7}  fits",
    ]
    for r in rows:
        other = r.parts["trainable"] + r.parts["transient"] + r.parts["overhead"]
        lines.append(
            f"{r.weights:<8}{r.method:<8}{r.start_layer:>4} {('yes' if r.checkpointing else 'no'):<5}{_gib(r.peak_bytes):>9}"
            f"{_gib(r.parts['weights']):>9}{_gib(r.parts['saved']):>8}{_gib(other):>8}{r.relative_cost:>7.2f}  {'yes' if r.fits else 'no'}"
        )
    return "\n".join(lines)
