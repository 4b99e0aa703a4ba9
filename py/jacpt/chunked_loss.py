"""The output layer and the cross entropy together, a chunk of tokens at a time.

Qwen2.5's vocabulary is 151,936 wide. Megatron-Core's GPTModel computes the logits of every token
of the micro-batch at once (megatron/core/models/gpt/gpt_model.py:389, `self.output_layer(...)`,
in megatron-core 0.12.3). Its cross entropy then upcasts them to fp32 and keeps the fp32 softmax for
the backward pass (language_module.py:83-97, then fusions/fused_cross_entropy.py or
tensor_parallel/cross_entropy.py). With the bf16 gradient and the fp32 temporaries that is ~1.5 MB a
token, the largest activation of a Qwen2.5-0.5B step: at 8 x 2048 tokens on an H100, 50.9 GiB peak
against 31.6 GiB in chunks of 4,096 tokens (BENCHMARKS.md).

Here the forward pass computes the logits of `chunk` tokens at a time and, while a chunk's logits are at
hand, also the gradients of its per-token losses: softmax - one_hot(target), turned at once into the hidden
states' gradient (a [tokens, hidden] tensor) and summed into the weight's (fp32). It keeps those two and each
token's log-sum-exp. The backward pass then only weights them by the loss's incoming gradient g: each
token's hidden-state gradient is scaled by its own g[t], and the weight's sum, taken with every g[t] = 1, is
scaled by c = max(g) and corrected by (g[t] - c) times the gradient of each token whose g[t] differs from c
(their logits computed again). NeMo's reduction gives every counted token the same g and the masked ones 0,
so the correction covers only masked tokens (a CPT sequence's end-of-document labels, an SFT prompt); a g of
all different values computes every token's logits again, as a plain backward pass would. The logits are
never whole, a chunk's logits are computed once a step rather than twice (the output-layer matmul is ~8%
of a step's FLOPs), and on CUDA the softmax arithmetic of a chunk is a compiled kernel, not a chain of fp32
copies.

The loss is the same per-token loss Megatron returns ([b, s], fp32; NeMo's loss reduction masks and
averages it as before); tests/py/test_chunked_loss.py checks values and gradients against
torch's own cross entropy on full logits.

`install(chunk)` wraps GPTModel.forward: a call with labels, on the last pipeline stage, without
tensor or sequence parallelism (the vocabulary is not split) and without multi-token prediction
goes through the chunks; every other call (generation, `labels=None`) runs Megatron's code as is.
"""

from __future__ import annotations

import functools
import inspect

import torch

from jacpt import compiled

_CHUNK = 0  # tokens per chunk; set by install()


def _forward_chunk(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-sum-exp and loss of one chunk of [tokens, vocab] logits (fp32 arithmetic)."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    return lse, lse - x.gather(1, target.unsqueeze(1)).squeeze(1)


def _gradient_chunk(logits: torch.Tensor, lse: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """d loss / d logits of one chunk for an incoming gradient of 1, softmax - one_hot(target), in the
    logits' dtype."""
    p = torch.exp(logits.float() - lse.unsqueeze(1))
    hit = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0) == target.unsqueeze(1)
    return (p - hit.float()).to(logits.dtype)


def _backward_chunk(logits: torch.Tensor, lse: torch.Tensor, target: torch.Tensor,
                    grad: torch.Tensor) -> torch.Tensor:
    """d loss / d logits of one chunk, (softmax - one_hot(target)) * grad, in the logits' dtype."""
    p = torch.exp(logits.float() - lse.unsqueeze(1))
    hit = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0) == target.unsqueeze(1)
    return ((p - hit.float()) * grad.unsqueeze(1)).to(logits.dtype)


def _scale_rows(x: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x[t] * g[t] (fp32 arithmetic), in `dtype`."""
    return (x.float() * g.unsqueeze(1)).to(dtype)


def _kernels(device_type: str):
    """The chunk functions (forward, gradient, backward, row scale): compiled into fused kernels on CUDA,
    eager elsewhere.

    CPT's chunks all have one shape, compiled once. LoRA's batches vary in length, so the last chunk
    does too, as does the number of tokens a backward pass corrects: torch.compile's automatic dynamic
    shapes compile a second, shape-generic kernel at the first new length instead of one kernel per
    length."""
    return tuple(compiled.on(device_type, f) for f in (_forward_chunk, _gradient_chunk, _backward_chunk,
                                                       _scale_rows))


_FP32_PRODUCTS: dict[str, bool] = {}  # device type -> whether torch.mm/addmm take out_dtype there


def _fp32_products(device: torch.device) -> bool:
    """Whether bf16 matmuls on this device can write or sum into fp32 tensors (torch >= 2.8's `out_dtype`, on
    CUDA); probed once per device type."""
    kind = device.type
    if kind not in _FP32_PRODUCTS:
        ok = kind == "cuda"
        if ok:
            a, z = torch.ones(2, 2, dtype=torch.bfloat16, device=device), torch.zeros(2, 2, device=device)
            try:  # the two calls the loss makes
                torch.addmm(z, a, a, out_dtype=torch.float32, out=z)
                torch.mm(a, a, out_dtype=torch.float32, out=z)
            except (TypeError, RuntimeError):  # an older torch: no out_dtype
                ok = False
        _FP32_PRODUCTS[kind] = ok
    return _FP32_PRODUCTS[kind]


def _accumulate(grad_w: torch.Tensor, d: torch.Tensor, hc: torch.Tensor) -> None:
    """grad_w += d^T hc, summed in grad_w's fp32 (Megatron's single matmul sums in the tensor cores' fp32
    accumulator). For bf16 chunks on CUDA the matmul adds into grad_w itself, saving a pass over the
    151,936 x 896 fp32 sum a chunk; elsewhere the product is added."""
    if grad_w.dtype == d.dtype:
        grad_w.addmm_(d.t(), hc)
    elif _fp32_products(grad_w.device):
        torch.addmm(grad_w, d.t(), hc, out_dtype=grad_w.dtype, out=grad_w)
    else:
        grad_w.add_(d.t() @ hc)


class LinearCrossEntropy(torch.autograd.Function):
    """loss[t] = logsumexp(h[t] @ W.T) - (h[t] @ W.T)[y[t]], computed `chunk` tokens at a time.

    hidden: [..., H] (Megatron's [s, b, H]); weight: [V, H]; target: hidden's leading shape; recorded: whether
    autograd records the call (the forward pass computes the gradients only then); returns fp32 per-token losses
    of target's shape.
    """

    @staticmethod
    def forward(ctx, hidden, weight, target, chunk, recorded):
        fwd, gradient, _, _ = _kernels(hidden.device.type)
        h = hidden.reshape(-1, hidden.shape[-1])
        y = target.reshape(-1)
        if y.shape[0] != h.shape[0]:
            raise ValueError(f"{h.shape[0]} hidden states but {y.shape[0]} targets")
        # needs_input_grad says which inputs require gradients, even when autograd records nothing (validation).
        need_h, need_w = recorded and ctx.needs_input_grad[0], recorded and ctx.needs_input_grad[1]
        lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        loss = torch.empty_like(lse)
        # The per-token losses' gradients for an incoming gradient of 1; backward() weights them.
        # The hidden states' gradients in fp32 where the matmul can write them so (then scaled by g and rounded
        # once, as a plain backward pass rounds them), else in the hidden states' dtype.
        wide = need_h and h.dtype != torch.float32 and _fp32_products(h.device)
        grad_h = torch.empty(h.shape, dtype=torch.float32 if wide else h.dtype, device=h.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for i in range(0, h.shape[0], chunk):
            hc, yc = h[i:i + chunk], y[i:i + chunk]
            logits = hc @ weight.t()
            lse[i:i + chunk], loss[i:i + chunk] = fwd(logits, yc)
            if need_h or need_w:
                d = gradient(logits, lse[i:i + chunk], yc)
                del logits
                if need_h:
                    if wide:
                        torch.mm(d, weight, out_dtype=torch.float32, out=grad_h[i:i + chunk])
                    else:
                        torch.mm(d, weight, out=grad_h[i:i + chunk])
                if need_w:
                    _accumulate(grad_w, d, hc)
        ctx.save_for_backward(hidden, weight, target, lse, grad_h, grad_w)
        ctx.chunk, ctx.done = chunk, False
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.done:
            raise RuntimeError("the chunked loss's backward pass ran twice (retain_graph): it scales the gradients "
                               "it kept in place, once; set <stage>.loss_chunk_tokens=0 for Megatron's "
                               "whole-logits loss")
        ctx.done = True
        hidden, weight, target, lse, grad_h, grad_w = ctx.saved_tensors
        _, _, bwd, scale_rows = _kernels(hidden.device.type)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = grad_loss.reshape(-1).float()
        if need_h:
            grad_h = scale_rows(grad_h, g, hidden.dtype).view(hidden.shape)
        if need_w:
            # sum_t g[t] dW_t = c * sum_t dW_t + sum over the tokens with g[t] != c of (g[t] - c) dW_t
            c = g.max()
            grad_w.mul_(c)
            rows = torch.nonzero(g != c).squeeze(1)  # waits for the device: the number of tokens to correct
            h = hidden.reshape(-1, hidden.shape[-1])
            y = target.reshape(-1)
            for i in range(0, rows.shape[0], ctx.chunk):
                r = rows[i:i + ctx.chunk]
                hc = h[r]
                _accumulate(grad_w, bwd(hc @ weight.t(), lse[r], y[r], g[r] - c), hc)
            grad_w = grad_w.to(weight.dtype)
        return (grad_h if need_h else None), (grad_w if need_w else None), None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         chunk: int) -> torch.Tensor:
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 token, not {chunk}")
    return LinearCrossEntropy.apply(hidden, weight, target, chunk, torch.is_grad_enabled())


class _Deferred:
    """What the output layer hands on instead of logits inside a chunked call: its input and weight."""

    __slots__ = ("hidden", "weight")

    def __init__(self, hidden, weight):
        self.hidden, self.weight = hidden, weight


def _deferred_output(layer, input_, weight=None, runtime_gather_output=None):
    # ColumnParallelLinear.forward's signature (tensor_parallel/layers.py); the output layer has no bias.
    return _Deferred(input_, layer.weight if weight is None else weight), None


def eligible(model) -> bool:
    """Whether a GPTModel's loss can be computed in chunks: the whole vocabulary on this rank, no
    bias, no multi-token prediction, no deferred embedding wgrad, no config logger."""
    from megatron.core import parallel_state
    from megatron.core.config_logger import has_config_logger_enabled

    cfg = model.config
    return (model.post_process and not getattr(model, "mtp_process", False)
            and parallel_state.get_tensor_model_parallel_world_size() == 1 and not cfg.sequence_parallel
            and getattr(model.output_layer, "bias", None) is None
            and not getattr(cfg, "defer_embedding_wgrad_compute", False)
            and not has_config_logger_enabled(cfg))


def install(chunk: int) -> bool:
    """Route GPTModel's training and validation loss through chunks of `chunk` tokens (0: leave
    Megatron's code alone). Idempotent; a later call changes the chunk. Returns whether active."""
    global _CHUNK
    from megatron.core.models.gpt.gpt_model import GPTModel

    if chunk < 0:
        raise ValueError(f"loss_chunk_tokens must be >= 0, not {chunk}")
    _CHUNK = chunk
    if chunk == 0 or getattr(GPTModel.forward, "_jacpt_chunked", False):
        return chunk > 0
    forward, compute_loss = GPTModel.forward, GPTModel.compute_language_model_loss
    sig = inspect.signature(forward)

    @functools.wraps(forward)
    def chunked_forward(self, *args, **kwargs):
        if _CHUNK == 0 or sig.bind(self, *args, **kwargs).arguments.get("labels") is None or not eligible(self):
            return forward(self, *args, **kwargs)
        layer = self.output_layer
        layer.forward = functools.partial(_deferred_output, layer)  # shadows the class's forward for this call
        try:
            return forward(self, *args, **kwargs)
        finally:
            del layer.forward

    @functools.wraps(compute_loss)
    def chunked_loss(self, labels, logits):
        if not isinstance(logits, _Deferred):
            return compute_loss(self, labels, logits)
        # labels [b, s]; hidden [s, b, H]; Megatron returns the loss as [b, s].
        loss = linear_cross_entropy(logits.hidden, logits.weight, labels.transpose(0, 1), _CHUNK)
        return loss.transpose(0, 1).contiguous()

    chunked_forward._jacpt_chunked = True
    GPTModel.forward = chunked_forward
    GPTModel.compute_language_model_loss = chunked_loss
    return True
