"""Frozen bitsandbytes backbones under prompt training: fix-ups so 8-bit and 4-bit save memory.

- 8-bit on CPU: in training mode bitsandbytes 0.50 routes `Linear8bitLt` through `MatMul8bitFp`,
  which keeps every layer's input alive for a weight gradient a frozen backbone never needs
  (`ctx.A`, outside autograd's saved tensors, so checkpointing cannot drop it either): an int8
  model then held more activations than its float32 twin saves in total. While patched, those
  layers use `FrozenInt8Linear` instead: the same dequantise-then-matmul numerics, nothing saved
  but the int8 weight it already holds; the input gradient dequantises the weight again. Forwards
  without gradients (evaluation, generation, layers below the first prompt) take the same path, so a
  patched model evaluates with the numerics it trains with (bitsandbytes' own CPU inference path
  casts every input to float16, warning on each call).
  CUDA keeps bitsandbytes' own int8 kernels (they save no input for frozen weights).
- 4-bit on CPU: one eval forward without grad repacks the weights for inference, after which no
  gradient flows through them: switched off while patched (and a repack already done undone).
"""

from __future__ import annotations

import sys
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from .back_references import weak_method


def _dequantised(cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """cb: (out, in) int8 rows, scb: (out,) absmax per row -> (out, in) weight in dtype."""
    return cb.to(dtype).mul_(scb.to(dtype).unsqueeze(1) / 127.0)


class FrozenInt8Linear(torch.autograd.Function):
    """y = x @ dequant(CB, SCB).T + bias for a frozen int8 weight; x: (..., in) -> (..., out)."""

    @staticmethod
    def forward(ctx, x, cb, scb, bias):
        ctx.save_for_backward(cb, scb)  # the weight itself (no copy): the input gradient needs only it
        return F.linear(x, _dequantised(cb, scb, x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        cb, scb = ctx.saved_tensors
        grad_x = grad_out @ _dequantised(cb, scb, grad_out.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


def _int8_forward(module, original):
    # the module holds this forward: it holds the module weakly (back_references.py)
    module_ref, original = weakref.ref(module), weak_method(module, original)

    def forward(x):
        module = module_ref()
        state = module.state
        if module.weight.CB is not None:  # bitsandbytes moves CB/SCB into its state on first use
            module.init_8bit_state()
        trainable = module.weight.requires_grad or (module.bias is not None and module.bias.requires_grad)
        if x.device.type != "cpu" or state.CB is None or state.has_fp16_weights or trainable:
            return original(x)
        return FrozenInt8Linear.apply(x, state.CB, state.SCB, module.bias)

    return forward


def install_quantized_fixes(model: nn.Module, runtime) -> None:
    """Applies both fix-ups to every bitsandbytes layer of `model`, each undone by unpatch (runtime.undo)."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:  # a model with bitsandbytes layers has imported it; importing it here costs ~50 MB of RSS
        return
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear8bitLt):
            runtime.undo.set_attribute(m, "forward", _int8_forward(m, m.forward))
        if hasattr(m, "support_avx512bf16_for_cpu"):
            runtime.undo.set_attribute(m, "support_avx512bf16_for_cpu", False)
            state = getattr(m.weight, "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

                m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu_inverse(m.weight.data, state)
