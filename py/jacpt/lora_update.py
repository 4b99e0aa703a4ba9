"""LoRA's update added to the frozen layer's output inside the adapter's second matmul.

NeMo's LoRALinear (nemo/collections/llm/peft/lora.py:50-54, nemo_toolkit 2.3.3) runs the frozen layer, then
the adapter (ParallelLinearAdapter.forward, peft/utils.py:374-427): x -> A -> B, then `x * (alpha / dim)`
(:421), and adds the result to the layer's output. The last matmul, the scale and the add each write a
tensor as wide as the layer's output (9,728 for linear_fc1 of Qwen2.5-0.5B), and the backward pass scales
that width again: four full-width passes a wrapped layer where one is needed.

Here the update is one `addmm_` into the frozen layer's output itself: base += (alpha / dim) * (A x) B^T, the
scale as its alpha. In place, because an out-of-place `addmm` with beta 1 first copies `base` into a new
tensor (a profile of LoRA at micro-batch 16 on an H100 showed that copy, ~13 ms a step, nearly all of it for
the 9,728-wide linear_fc1); nothing keeps the frozen layer's output for its backward pass. An output that is
not contiguous, or is a view (a row-parallel layer returns its input's view at tensor parallelism 1, which
autograd does not let a function change in place), takes the out-of-place `addmm`.
The backward pass hands the output's gradient to the frozen layer as it is and computes B's and A x's
gradients with the scale folded into their (rank-wide) matmuls. A (`linear_in`) still runs through
Megatron's own layer. The arithmetic is LoRA's; tests/py/test_lora_update.py checks values and every
gradient against NeMo's LoRALinear.

`install()` replaces LoRALinear.forward; a wrapped layer the fusion does not cover (tensor parallelism,
adapter dropout or norm, an activation, MoE experts, dtypes that differ) runs NeMo's forward as is.
It applies inside and outside the container: it is a kit feature, not a compatibility patch.
"""

from __future__ import annotations

import torch


class LoRAUpdate(torch.autograd.Function):
    """out = base + scale * h @ weight.T over the last dimension (base [..., out], h [..., rank]), written into
    `base` when it is contiguous and not a view."""

    @staticmethod
    def forward(ctx, base, h, weight, scale):
        ctx.save_for_backward(h, weight)
        ctx.scale = scale
        h2 = h.reshape(-1, h.shape[-1])
        # In place, unless base is not contiguous or is a view: a row-parallel layer hands back its input's view
        # at tensor parallelism 1, and autograd does not let a function change such a view in place.
        if base.is_contiguous() and base._base is None:
            base.view(-1, base.shape[-1]).addmm_(h2, weight.t(), alpha=scale)
            ctx.mark_dirty(base)
            return base
        return torch.addmm(base.reshape(-1, base.shape[-1]), h2, weight.t(), alpha=scale).view(base.shape)

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        h2 = h.reshape(-1, h.shape[-1])
        grad_h = torch.mm(g, weight).mul_(ctx.scale).view(h.shape) if ctx.needs_input_grad[1] else None
        grad_w = torch.mm(g.t(), h2).mul_(ctx.scale) if ctx.needs_input_grad[2] else None
        return grad if ctx.needs_input_grad[0] else None, grad_h, grad_w, None


def eligible(wrapper) -> bool:
    """Whether a LoRALinear's update can be fused: A -> B with a scale and nothing else, in one dtype."""
    from megatron.core import parallel_state

    ad, lin_out = wrapper.adapter, wrapper.adapter.linear_out
    base_weight = getattr(wrapper.to_wrap, "weight", None)
    return (parallel_state.get_tensor_model_parallel_world_size() == 1
            and ad.dropout is None and ad.layer_norm is None and not ad.is_expert
            and isinstance(ad.activation, torch.nn.Identity) and getattr(lin_out, "bias", None) is None
            and base_weight is not None and base_weight.dtype == lin_out.weight.dtype
            and lin_out.weight.shape[1] == ad.dim)


def install() -> None:
    """Fuse LoRA's scale and add into its matmul, in this process (idempotent)."""
    from nemo.collections.llm.peft.lora import LoRALinear

    if getattr(LoRALinear.forward, "_jacpt_fused", False):
        return
    nemo_forward = LoRALinear.forward

    def forward(self, x):
        if not eligible(self):
            return nemo_forward(self, x)
        linear_output, bias, layernorm_output = self.base_linear_forward(x)
        ad = self.adapter
        h, _ = ad.linear_in(layernorm_output.contiguous())
        return LoRAUpdate.apply(linear_output, h, ad.linear_out.weight, ad.alpha / ad.dim), bias

    forward._jacpt_fused = True
    forward.__wrapped__ = nemo_forward
    LoRALinear.forward = forward
