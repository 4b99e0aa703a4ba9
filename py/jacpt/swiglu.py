"""SwiGLU in one kernel forward and one backward while training.

Qwen2's MLP is linear_fc1 -> SwiGLU -> linear_fc2, with SwiGLU(y) = silu(y1) * y2 over the two halves of
linear_fc1's output (9,728 wide for Qwen2.5-0.5B). Unless `bias_activation_fusion` is set, Megatron-Core's
MLP computes it op by op (megatron/core/transformer/mlp.py:137-143, `glu`, megatron-core 0.12.3): silu and a
multiply over strided halves forward, and backward two multiplies, silu's backward and a concatenation of the
halves' gradients, each a pass over the whole width; autograd also keeps silu's output. A profile of one
CPT step on an H100 (micro-batch 16) put these kernels at about a sixth of the step.

With `bias_activation_fusion` Megatron-Core has a fused SwiGLU, but the flag is saved in the checkpoint's
model config, and its compiled kernels recompile at every new sequence length during generation (the demo
became about 10x slower; BENCHMARKS.md). So the kit leaves the config alone: `install()` wraps MLP.forward,
and a call in training mode runs linear_fc1, this module's SwiGLU and linear_fc2 (also the no-grad first
pass of activation recompute, so that its recomputation matches it); every other call (validation and
generation, in eval mode; MoE experts with per-token scales, other activations, an MLP with Megatron's own
fusion on) runs Megatron-Core's code as is. On CUDA each direction is one compiled kernel
reading and writing each tensor once; elsewhere the same arithmetic runs eagerly. Only the input is kept for
the backward pass, so a step needs less memory too.

The arithmetic is Megatron's; tests/py/test_swiglu.py checks values and gradients against its MLP.
It applies inside and outside the container: it is a kit feature, not a compatibility patch.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from jacpt import compiled


def _wide(t: torch.Tensor) -> torch.Tensor:
    """t in at least fp32 (the arithmetic of a bf16 step; fp64 stays fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _forward(y: torch.Tensor) -> torch.Tensor:
    a, b = torch.chunk(_wide(y), 2, dim=-1)
    return (F.silu(a) * b).to(y.dtype)


def _backward(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d SwiGLU / d y for the output's gradient g: [g * b * silu'(a), g * silu(a)]."""
    a, b = torch.chunk(_wide(y), 2, dim=-1)
    g = _wide(g)
    s = torch.sigmoid(a)
    return torch.cat((g * b * s * (1 + a * (1 - s)), g * a * s), dim=-1).to(y.dtype)


class SwiGLU(torch.autograd.Function):
    """silu(y1) * y2 over the last dimension's halves; keeps only y for the backward pass."""

    @staticmethod
    def forward(ctx, y):
        ctx.save_for_backward(y)
        return compiled.on(y.device.type, _forward)(y)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return compiled.on(y.device.type, _backward)(grad.contiguous(), y)


def eligible(mlp) -> bool:
    """Whether an MLP's activation is SwiGLU without a bias and without Megatron's own fusion."""
    cfg = mlp.config
    return (cfg.gated_linear_unit and mlp.activation_func is F.silu and not cfg.bias_activation_fusion
            and not cfg.add_bias_linear and not getattr(cfg, "activation_func_fp8_input_store", False))


def install() -> None:
    """Route Megatron-Core's MLP in training mode through the fused SwiGLU, in this process (idempotent)."""
    from megatron.core.transformer.mlp import MLP

    if getattr(MLP.forward, "_jacpt_fused", False):
        return
    megatron_forward = MLP.forward

    @functools.wraps(megatron_forward)
    def forward(self, hidden_states, per_token_scale=None):
        if per_token_scale is not None or not self.training or not eligible(self):
            return megatron_forward(self, hidden_states, per_token_scale)
        y, bias = self.linear_fc1(hidden_states)
        if bias is not None:  # add_bias_linear is off, but a wrapped linear_fc1 could still return one
            y = y + bias
        return self.linear_fc2(SwiGLU.apply(y))

    forward._jacpt_fused = True
    MLP.forward = forward
