"""LoRA's update fused into the matmuls: the frozen layer and its adapter computed together where the layer is
Megatron-Core's own, the update added inside the adapter's second matmul elsewhere.

NeMo's LoRALinear (nemo/collections/llm/peft/lora.py:50-54, nemo_toolkit 2.3.3) runs the frozen layer, then
the adapter (ParallelLinearAdapter.forward, peft/utils.py:374-427): x -> A -> B, then `x * (alpha / dim)`
(:421), and adds the result to the layer's output. The last matmul, the scale and the add each write a
tensor as wide as the layer's output (9,728 for linear_fc1 of Qwen2.5-0.5B), and the backward pass scales
that width again and adds the adapter path's input gradient to the frozen path's (4,864 wide for
linear_fc2): passes over wide tensors that LoRA's few FLOPs do not need.

Megatron-Core's own linear layers (the local spec, without Transformer Engine) at tensor parallelism 1 are
computed whole by FrozenLinearWithLoRA: for a layer whose output is wider than its input, one matmul of
[x | s * x A^T] by [W | B]^T (32 columns deeper than the frozen one, no pass over the output); otherwise an
`addmm_` of the update into the fresh output. Backward, one matmul of the output's gradient by [W | B] gives
the frozen path's input gradient and the adapter's rank-wide gradient together, and the adapter path's
input gradient is summed inside its own matmul. A microbenchmark of linear_fc1 at 32,768 tokens on an H100
took 2.13 ms forward and backward this way, 2.86 ms with the update added to the frozen layer's output as
below, and 2.69 ms for the same layer trained in full, weight gradient included.

Other layers (Transformer Engine's, in the container) run as NeMo runs them, and the update is one `addmm_`
into the frozen layer's output: base += (alpha / dim) * (A x) B^T, the scale as its alpha (LoRAUpdate). In
place, because an out-of-place `addmm` with beta 1 first copies `base` into a new tensor; nothing keeps the
frozen layer's output for its backward pass. An output that is not contiguous, or is a view (a row-parallel
layer can return its input's view, which autograd does not let a function change in place), takes the
out-of-place `addmm`. The backward pass hands the output's gradient to the frozen layer as it is and
computes B's and A x's gradients with the scale folded into their (rank-wide) matmuls; A (`linear_in`) runs
through its own layer.

The arithmetic is LoRA's, with fewer bf16 roundings than NeMo's (one for the summed output instead of three;
s * x A^T is rounded once before its matmul when s is not a power of two); tests/py/test_lora_update.py
checks values and every gradient against NeMo's LoRALinear, for each layout.

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


def merged_forward(tokens: int, n: int, k: int, rank: int) -> bool:
    """Whether FrozenLinearWithLoRA's forward takes one matmul over [x | x A^T] and [W | B]: when the pass over
    the [tokens, n] output it saves outweighs copying x and W one column block wider."""
    return tokens * (n - k) > n * (k + rank)


def merged_backward(tokens: int, k: int, rank: int) -> bool:
    """Whether its backward takes one matmul of g by [W | B]: when the pass over g it saves outweighs copying W."""
    return tokens > 2 * (k + rank)


class FrozenLinearWithLoRA(torch.autograd.Function):
    """out = x W^T (+ bias) + scale * (x A^T) B^T for a frozen W, the frozen matmul and the adapter's in one
    function (Megatron-Core's own linear layers at tensor parallelism 1).

    Forward, for a layer whose output is wider than its input (linear_qkv, linear_fc1 in training): one matmul
    of [x | scale * x A^T] by [W | B]^T, so the update costs a matmul `rank` columns deeper instead of a pass
    over the wide output; otherwise the update is an addmm_ into the fresh output. Backward: one matmul of the
    output's gradient g by [W | B] gives the frozen path's input gradient and g B together; the adapter path's
    input gradient is added inside its own matmul (addmm), not as a separate pass; B's gradient is
    scale * g^T (x A^T) and A's is (scale * g B)^T x. Only x and the rank-wide x A^T are kept for the
    backward pass. Small batches (generation) take the separate matmuls, where copying W would cost more.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale):
        x2 = x.reshape(-1, x.shape[-1])
        h = x2 @ a.t()
        if merged_forward(x2.shape[0], weight.shape[0], weight.shape[1], a.shape[0]):
            xs, ws = torch.cat((x2, h * scale), dim=1), torch.cat((weight, b), dim=1)
            out = torch.addmm(bias, xs, ws.t()) if bias is not None else xs @ ws.t()
        else:
            out = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
            out.addmm_(h, b.t(), alpha=scale)
        ctx.save_for_backward(x, weight, a, b, h)
        ctx.scale = scale
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, weight, a, b, h = ctx.saved_tensors
        need_x, _, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        k = weight.shape[1]
        if merged_backward(g.shape[0], k, a.shape[0]):
            both = g @ torch.cat((weight, b), dim=1)  # [tokens, in + rank]: g W and g B
            g_w, g_b = both[:, :k], both[:, k:]
        else:
            g_w, g_b = g @ weight, g @ b
        grad_h = g_b * ctx.scale
        grad_x = torch.addmm(g_w, grad_h, a).view(x.shape) if need_x else None
        grad_a = grad_h.t() @ x2 if need_a else None
        grad_b = torch.mm(g.t(), h).mul_(ctx.scale) if need_b else None
        grad_bias = g.sum(0) if need_bias else None
        return grad_x, None, grad_bias, grad_a, grad_b, None


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


def _whole(wrapper) -> bool:
    """Whether a fused LoRALinear's frozen layer is Megatron-Core's own linear layer (the local spec, without TE),
    which FrozenLinearWithLoRA computes whole: frozen, no sequence parallelism, no expert communication, its
    bias added inside."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    layer = wrapper.to_wrap
    if type(layer) not in (ColumnParallelLinear, RowParallelLinear) or layer.weight.requires_grad:
        return False
    bias = layer.bias if not layer.skip_bias_add else None
    return (not layer.sequence_parallel and not getattr(layer, "explicit_expert_comm", False)
            and not getattr(layer, "gather_output", False)
            and (bias is None or not bias.requires_grad) and not getattr(layer, "is_expert", False))


def install() -> None:
    """Fuse LoRA's scale and add into its matmul, in this process (idempotent)."""
    from nemo.collections.llm.peft.lora import LoRALinear

    if getattr(LoRALinear.forward, "_jacpt_fused", False):
        return
    nemo_forward = LoRALinear.forward

    def forward(self, x):
        if not eligible(self):
            return nemo_forward(self, x)
        ad = self.adapter
        scale = ad.alpha / ad.dim
        if _whole(self):
            layer = self.to_wrap
            bias = layer.bias if not layer.skip_bias_add else None
            out = FrozenLinearWithLoRA.apply(x, layer.weight, bias, ad.linear_in.weight, ad.linear_out.weight, scale)
            return out, layer.bias if layer.skip_bias_add else None
        linear_output, bias, layernorm_output = self.base_linear_forward(x)
        h, _ = ad.linear_in(layernorm_output.contiguous())
        return LoRAUpdate.apply(linear_output, h, ad.linear_out.weight, scale), bias

    forward._jacpt_fused = True
    forward.__wrapped__ = nemo_forward
    LoRALinear.forward = forward
