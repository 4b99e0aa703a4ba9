"""Every workaround for running NeMo 2.3 / Megatron-Core 0.12 without CUDA or without Transformer Engine.

The kit's one place for them. Each patch names the library line it covers and
applies only when its condition holds:

* ``cpu``    - no CUDA device (the CPU test tier, `make quickstart` on a laptop);
* ``no_te``  - Transformer Engine not importable (CPU, or a GPU outside the NeMo container);
* ``torch``  - torch newer than Megatron-Core 0.12 was written for (>= 2.8);
* ``numpy2`` - numpy 2.x, which dropped an alias Megatron-Core 0.12 still calls.

In the NeMo container (CUDA, TE, torch 2.7) none holds and `apply()` changes
nothing; tests/py/test_nemo_compat.py holds it to that. Library line numbers
are those of nemo_toolkit 2.3.3 and megatron-core 0.12.3.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import os
import types

APPLIED: list[str] = []
_done = False


def need_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def need_no_te() -> bool:
    return importlib.util.find_spec("transformer_engine") is None


def conditions() -> dict[str, bool]:
    return {"cpu": need_cpu(), "no_te": need_no_te(), "torch": _torch_needs_write_item_binding(),
            "numpy2": _numpy_lacks_product()}


def apply() -> list[str]:
    """Apply the patches whose conditions hold (idempotent); returns their names."""
    global _done
    if _done:
        return APPLIED
    _done = True
    cond = conditions()
    if not any(cond.values()):
        return APPLIED
    # NeMo first: its import-time torch.jit.script calls break if torch factories are already wrapped.
    import nemo.collections.llm  # noqa: F401

    if cond["torch"]:
        _patch_write_item()
    if cond["numpy2"]:
        _patch_numpy_product()
    if cond["no_te"]:
        _patch_lora_te_guard()
        _patch_local_core_attention()
        _patch_multi_tensor_fallbacks()
        _patch_decode_positions()
        if not cond["cpu"]:
            _patch_fused_adamw()
            _patch_compiled_rope()
    if cond["cpu"]:
        _patch_cpu()
    return APPLIED


def _note(name: str) -> None:
    APPLIED.append(name)


def _env_choice(name: str, default: str, choices: dict[str, str]) -> str:
    """The value of a switch variable, `default` when unset; a value not in `choices` (name: what it does) stops."""
    choice = os.environ.get(name, default)
    if choice not in choices:
        raise ValueError(f"{name}={choice!r}: use " + " or ".join(f"'{k}' ({v})" for k, v in choices.items()))
    return choice


# ----------------------------------------------------------------------------- torch >= 2.8

def _torch_needs_write_item_binding() -> bool:
    import torch.distributed.checkpoint.filesystem as tfs

    return "serialization_format" in inspect.signature(tfs._write_item).parameters


def _patch_write_item() -> None:
    # megatron/core/dist_checkpointing/strategies/filesystem_async.py:320 and :326 call
    # torch.distributed.checkpoint.filesystem._write_item with five arguments; torch >= 2.8 added a
    # required `serialization_format`. Bind it to TORCH_SAVE, the format torch used before.
    import megatron.core.dist_checkpointing.strategies.filesystem_async as fa
    import torch.distributed.checkpoint.filesystem as tfs

    orig, nparams = tfs._write_item, len(inspect.signature(tfs._write_item).parameters)

    @functools.wraps(orig)
    def _write_item(*args, **kw):
        if "serialization_format" not in kw and len(args) < nparams:
            kw["serialization_format"] = tfs.SerializationFormat.TORCH_SAVE
        return orig(*args, **kw)

    fa._write_item = _write_item
    _note("filesystem_async._write_item: serialization_format=TORCH_SAVE")


# ----------------------------------------------------------------------------- numpy >= 2

def _numpy_lacks_product() -> bool:
    import numpy as np

    return not hasattr(np, "product")


def _patch_numpy_product() -> None:
    # megatron/core/dist_checkpointing/exchange_utils.py:65 (the fully parallel checkpoint load of a
    # data-parallel run), mapping.py:207 and validation.py:497 call np.product, which numpy 2.0 removed
    # (the NeMo 25.04 image has numpy 1.x). It was an alias of np.prod.
    import numpy as np

    np.product = np.prod
    _note("numpy.product: alias of numpy.prod")


# ----------------------------------------------------------------------------- no Transformer Engine

def _patch_lora_te_guard() -> None:
    # nemo/collections/llm/peft/lora.py:432 compares `m.__class__ == te.Linear` without checking HAVE_TE;
    # without TE `te` is a placeholder whose attributes raise UnavailableError.
    import nemo.collections.llm.peft.lora as lora

    if not lora.HAVE_TE:
        lora.te = types.SimpleNamespace(Linear=type("_NoTELinear", (), {}))
        _note("peft.lora.te.Linear: placeholder class")


# Megatron-Core's local spec (megatron/core/models/gpt/gpt_layer_specs.py:232 and :254) uses
# DotProductAttention (transformer/dot_product_attention.py:150-199): it materialises the
# [batch x heads x seq x seq] score matrix, softmaxes it in fp32 and keeps the probabilities for the
# backward pass: at seq 2048 that is ~0.9 GB per layer per sample of Qwen2.5-0.5B, and most of the
# step time. With TE, TEDotProductAttention runs fused flash attention instead. This is the no-TE
# counterpart: torch's scaled_dot_product_attention (flash / memory-efficient kernels), same inputs,
# same outputs (tests/py/test_sdpa_attention.py checks it against the stock module).
ATTENTION_ENV = "JACPT_NO_TE_ATTENTION"  # "sdpa" (default) or "local" (Megatron's stock module)
SDPA_NOTE = "local spec core attention: torch scaled_dot_product_attention"


def _sdpa_class():
    import math

    import torch
    import torch.nn.functional as F
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.utils import divide

    from torch.nn.attention import SDPBackend, sdpa_kernel

    gqa_kw = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)
    NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

    class SDPAttention(MegatronModule):
        """Core attention through torch.nn.functional.scaled_dot_product_attention.

        The constructor and forward take DotProductAttention's arguments. As TE's core attention does,
        a causal self-attention (sq == sk) is computed with the causal kernel and the given mask, which
        for GPT data is that same causal mask, is not read. Otherwise the boolean mask (True = masked
        out, Megatron's convention) is applied; without one, every key is attended (a decode step).
        """

        def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                     softmax_scale=None, cp_comm_type=None):
            super().__init__(config=config)
            assert config.context_parallel_size == 1, "context parallelism needs Transformer Engine"
            assert config.window_size is None, "sliding-window attention needs Transformer Engine"
            self.attn_mask_type = attn_mask_type
            world = parallel_state.get_tensor_model_parallel_world_size()
            projection = config.kv_channels * config.num_attention_heads
            self.hidden_size_per_partition = divide(projection, world)
            self.heads = divide(config.num_attention_heads, world)
            self.groups = divide(config.num_query_groups, world)
            head_dim = divide(projection, config.num_attention_heads)
            # apply_query_key_layer_scaling divides the scores by the layer number and multiplies them back
            # inside the softmax: the product is 1/sqrt(head_dim) either way.
            self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
            self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            assert packed_seq_params is None, "packed sequences need Transformer Engine"
            assert attention_bias is None, "attention bias is not supported without Transformer Engine"
            mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
            sq, b = query.shape[0], query.shape[1]
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [s, b, n, d] -> [b, n, s, d]
            kw = {}
            if self.heads != self.groups:
                if gqa_kw:
                    kw["enable_gqa"] = True
                else:
                    k = k.repeat_interleave(self.heads // self.groups, dim=1)
                    v = v.repeat_interleave(self.heads // self.groups, dim=1)
            causal = mask_type == AttnMaskType.causal and sq == key.shape[0] and sq > 1
            mask = None if causal or attention_mask is None else ~attention_mask
            p = self.dropout if self.training else 0.0
            if p > 0 and not self.config.sequence_parallel:
                with tensor_parallel.get_cuda_rng_tracker().fork():
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal,
                                                         scale=self.scale, **kw)
            elif q.is_cuda and not torch.is_grad_enabled():
                # Generation: a decode step (one query, no mask: attention.py:270-273 switches to no_mask
                # after the prompt) has a new key length each time, and SDPA's first choice on Hopper,
                # cuDNN's attention, builds an execution plan for every new shape (tens of ms each on an
                # H100); flash and memory-efficient attention do not.
                with sdpa_kernel(NO_CUDNN):
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                         scale=self.scale, **kw)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal,
                                                     scale=self.scale, **kw)
            return out.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    return SDPAttention


_SDPA = None


def sdpa_attention_class():
    """The SDPA core-attention module (built once, on first use: it needs megatron-core)."""
    global _SDPA
    if _SDPA is None:
        _SDPA = _sdpa_class()
    return _SDPA


def _patch_local_core_attention() -> None:
    choice = _env_choice(ATTENTION_ENV, "sdpa", {"sdpa": "torch flash attention, the default",
                                                  "local": "Megatron-Core's unfused DotProductAttention"})
    if choice == "local":
        _note("core attention: Megatron-Core DotProductAttention (JACPT_NO_TE_ATTENTION=local)")
        return
    import megatron.core.models.gpt.gpt_layer_specs as specs

    specs.DotProductAttention = sdpa_attention_class()
    _note(SDPA_NOTE)


ADAMW_ENV = "JACPT_NO_TE_ADAMW"  # "fused" (default) or "foreach" (torch's default implementation)


def _patch_fused_adamw() -> None:
    # megatron/core/optimizer/__init__.py:11-25 takes TE's FusedAdam, else apex's, else torch.optim.AdamW
    # with its defaults (the multi-tensor "foreach" path), and builds it at :352 without `fused`. torch's
    # fused AdamW is the same update in one kernel per parameter group: the no-TE counterpart of FusedAdam.
    import importlib.util

    choice = _env_choice(ADAMW_ENV, "fused", {"fused": "one kernel per parameter group, the default",
                                              "foreach": "torch's default implementation"})
    if choice == "foreach" or importlib.util.find_spec("apex") is not None:
        return
    import megatron.core.optimizer as mopt
    import torch

    if mopt.Adam is torch.optim.AdamW:
        mopt.Adam = functools.partial(torch.optim.AdamW, fused=True)
        _note("megatron optimizer: torch AdamW(fused=True)")


def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """megatron.core.utils.local_multi_tensor_l2_norm without its host syncs: same arguments and result."""
    import torch

    norms = torch._foreach_norm(tensor_lists[0], 2.0)
    return torch.linalg.vector_norm(torch.stack(norms).float()).reshape(1), None


def _foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """megatron.core.utils.local_multi_tensor_scale in one multi-tensor call: dst = src * scale."""
    import torch

    src, dst = tensor_lists
    if scale == 1.0:
        torch._foreach_copy_(dst, src)
    elif all(a is b for a, b in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


MULTI_TENSOR_ENV = "JACPT_NO_TE_MULTI_TENSOR"  # "foreach" (default) or "megatron" (its per-tensor fallbacks)


def _patch_multi_tensor_fallbacks() -> None:
    # Without TE or apex, megatron/core/optimizer/clip_grads.py:35-43 and optimizer.py:31-37 fall back to
    # megatron/core/utils.py:909 (local_multi_tensor_l2_norm) and :921 (local_multi_tensor_scale). The norm
    # turns every parameter's gradient norm into a Python float (`torch.tensor(l2)` of CUDA scalars, :915):
    # one host-device sync per parameter, ~200 a step for Qwen2.5-0.5B, each one draining the GPU's queue.
    # The scale copies main params to model params one tensor at a time through a temporary (`src * 1.0`).
    # torch's multi-tensor (_foreach) ops do the same arithmetic without syncs.
    if _env_choice(MULTI_TENSOR_ENV, "foreach", {"foreach": "torch's multi-tensor ops, the default",
                                                 "megatron": "Megatron-Core's per-tensor fallbacks"}) == "megatron":
        return
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as optimizer
    from megatron.core.utils import local_multi_tensor_l2_norm, local_multi_tensor_scale

    if clip_grads.l2_norm_impl is local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = _foreach_l2_norm
        _note("megatron grad norm: torch._foreach_norm (no per-parameter sync)")
    for mod in (clip_grads, optimizer):
        if mod.multi_tensor_scale_impl is local_multi_tensor_scale:
            mod.multi_tensor_scale_impl = _foreach_scale
            _note(f"megatron {mod.__name__.rsplit('.', 1)[1]} multi-tensor scale: torch._foreach ops")


ROPE_ENV = "JACPT_NO_TE_ROPE"  # "compiled" (default) or "eager" (Megatron-Core's unfused RoPE as is)
ROPE_NOTE = "rotary embedding: torch.compile'd for training (no fused RoPE without TE)"


def _patch_compiled_rope() -> None:
    # RoPE without a fused kernel: megatron/core/models/common/embeddings/rope_utils.py:192 takes the fused
    # kernel only with apply_rope_fusion, which needs TE or apex (:21-29, transformer_config.py:911-926).
    # The unfused path (:89-117, _apply_rotary_pos_emb_bshd) is ~10 elementwise kernels per call, twice a
    # layer (query and key), with cos/sin recomputed each time; compiled, it is one kernel forward and one
    # backward (+4.6% CPT tokens/s at micro-batch 16 and +24% LoRA at 4 on an H100, BENCHMARKS.md).
    # apply_rotary_pos_emb looks the function up in the module at each call, so replacing the module
    # attribute is enough. Compiled only while autograd records (training): generation's shapes change
    # with every prompt and KV-cache length, and each new shape meant a compile before the first answer (a
    # demo worker's first 8 answers: 5-8 s with a cold compile cache, 1.0 s without compiling, H100). The
    # price comes after the first answer: decode steps replayed from CUDA graphs run ~20% slower with the
    # unfused RoPE (3 x 256 tokens one at a time; BENCHMARKS.md). (Activation recompute's first pass runs
    # under no_grad and so takes the eager RoPE, its recomputation the compiled one: the same arithmetic, to
    # bf16 rounding.)
    if _env_choice(ROPE_ENV, "compiled", {"compiled": "one compiled kernel, the default",
                                          "eager": "Megatron-Core's unfused RoPE"}) == "eager":
        return
    import megatron.core.models.common.embeddings.rope_utils as rope_utils
    import torch

    fn = rope_utils._apply_rotary_pos_emb_bshd
    if rope_utils.fused_apply_rotary_pos_emb is not None or getattr(fn, "_jacpt_compiled", False):
        return
    @functools.wraps(fn)
    def rope(*args, **kwargs):
        return (rope.compiled if torch.is_grad_enabled() else fn)(*args, **kwargs)

    rope.compiled = torch.compile(fn)
    rope._jacpt_compiled = True
    rope_utils._apply_rotary_pos_emb_bshd = rope
    _note(ROPE_NOTE)


DECODE_ENV = "JACPT_NO_TE_DECODE"  # "graph" (default) or "eager" (Megatron-Core's decode step, op by op)
DECODE_STEP = "_jacpt_decode_step"  # set on a static inference context: a DecodeStep for the fixed-shape step
DECODE_NOTE = "decode step: key/value positions on the device (for CUDA graphs)"


class DecodeStep:
    """What one fixed-shape decode step hands the attention layers (through the inference context).

    `pos`: the new token's position, a device scalar. `offset`: the same as an int, for the one-off work of a
    generation's first fixed step (never captured). `rotated`: the layers whose cached keys already carry
    their rotary embedding, kept for the whole generation. `rope`: this step's (cos, sin) row, computed by
    the first layer and shared by the others."""

    def __init__(self, pos, offset: int, rotated: set):
        self.pos, self.offset, self.rotated, self.rope = pos, offset, rotated, None


def _rope_new_token(attention, query, key, q_emb, k_emb, step: DecodeStep):
    """The rotary embedding of one new token's query and key, as Megatron-Core's unfused RoPE computes it
    (rope_utils.py:89-117, `_apply_rotary_pos_emb_bshd`, mscale 1 as Attention.forward calls it): the
    same operations in the same order and dtype, so the same numbers. Query and key go through it as one
    tensor and the (cos, sin) row is computed once a step, not once a layer. Interleaved, partial or
    multi-latent variants, or distinct query and key tables, take Megatron-Core's function, row by row."""
    import torch
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    cfg = attention.config
    if (q_emb is not k_emb or cfg.rotary_interleaved or cfg.multi_latent_attention
            or q_emb.size(-1) != query.size(-1)):
        return (apply_rotary_pos_emb(query, q_emb.index_select(0, step.pos), config=cfg),
                apply_rotary_pos_emb(key, k_emb.index_select(0, step.pos), config=cfg))
    qk = torch.cat((query, key), dim=2)
    if step.rope is None:
        row = q_emb.index_select(0, step.pos)
        step.rope = torch.cos(row).to(qk.dtype), torch.sin(row).to(qk.dtype)
    cos, sin = step.rope
    x1, x2 = torch.chunk(qk, 2, dim=-1)
    qk = (qk * cos) + (torch.cat((-x2, x1), dim=-1) * sin)
    return torch.split(qk, [query.size(2), key.size(2)], dim=2)


def _patch_decode_positions() -> None:
    # Megatron-Core's static-batch decode step (megatron/core/transformer/attention.py:275-330,
    # _adjust_key_value_for_inference) writes the new key/value at `sequence_len_offset`, attends over the
    # cache up to it (Python integers: a new key length every step) and then gives every cached key its
    # rotary embedding again (Attention.forward, :580-618), each step. A context carrying a DecodeStep
    # instead gets the write at that device position and the whole cache as keys and values, the caller
    # masking the positions past it; the new token's query and key are rotated here and the key is cached
    # rotated. The keys the prefill cached (unrotated) are rotated once, at the generation's first such step,
    # which is never captured. Every shape is then the same at every step, which is what lets DecodeGraphs
    # capture the step once, and the step rotates one position instead of the whole cache. Without the
    # attribute (training, prefill, TE's path) Megatron-Core's code runs as is.
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.transformer.attention import Attention
    from megatron.core.transformer.enums import AttnMaskType

    orig = Attention._adjust_key_value_for_inference
    if getattr(orig, "_jacpt", False):
        return

    @functools.wraps(orig)
    def adjust(self, inference_context, query, key, value, rotary_pos_emb, rotary_pos_cos=None,
               rotary_pos_sin=None, sequence_len_offset=None, *, inference_params=None):
        ctx = inference_context if inference_context is not None else inference_params
        step = getattr(ctx, DECODE_STEP, None)
        if step is None or self.config.flash_decode:
            return orig(self, inference_context, query, key, value, rotary_pos_emb, rotary_pos_cos,
                        rotary_pos_sin, sequence_len_offset, inference_params=inference_params)
        assert ctx.is_static_batching() and ctx.batch_size_offset == 0 and key.size(0) == 1, \
            "one new token per sequence, whole batch"
        k_mem, v_mem = (m[:, : key.size(1)] for m in ctx.key_value_memory_dict[self.layer_number])
        if rotary_pos_emb is not None:
            q_emb, k_emb = rotary_pos_emb
            if self.layer_number not in step.rotated:
                prefix = k_mem[: step.offset]
                prefix.copy_(apply_rotary_pos_emb(prefix, k_emb[: step.offset], config=self.config))
                step.rotated.add(self.layer_number)
            query, key = _rope_new_token(self, query, key, q_emb, k_emb, step)
        k_mem.index_copy_(0, step.pos, key)
        v_mem.index_copy_(0, step.pos, value)
        return query, k_mem, v_mem, None, AttnMaskType.no_mask

    adjust._jacpt = True
    Attention._adjust_key_value_for_inference = adjust
    _note(DECODE_NOTE)


class DecodeGraphs:
    """An inference wrapper's decode step as one CUDA graph, captured at the first step after the prefill.

    Megatron-Core 0.12 captures decode steps only with flash decoding (transformer_layer.py:258-263, which
    needs the flash-attn package). Without it, generation is bound by the host: ~1,100 kernel launches and
    the Python that issues them, each token. Installed over `wrapper.run_one_forward_step`, this runs every
    step after the prefill (one token per sequence) with fixed buffers: the tokens and positions are copied
    in, the step's position is a device scalar (see _patch_decode_positions) and keys past it are masked, so
    the step is the same work each time and is replayed from the graph. Keys are cached with their rotary
    embedding, so a step rotates one position, not the whole cache. That includes the steps that still
    read the longer prompts of a batch token by token: Megatron-Core's controller keeps those out of "decode
    mode" (text_generation_controller.py:632-634), but without flash decoding a one-token step at a nonzero
    offset is the same computation in both modes (attention.py:270-327). The prefill of each new generation
    (offset 0, a new KV cache) goes through the wrapper's own step, and the graph is captured again at the
    next step. `capture=False` runs the same fixed-buffer step eagerly (the CPU tests).
    """

    def __init__(self, wrapper, capture: bool = True):
        self.wrapper, self.step, self.capture = wrapper, wrapper.run_one_forward_step, capture
        self.graph = self.logits = None
        self.captures, self.rotated = 0, set()

    def __call__(self, inference_input, *args, **kwargs):
        ctx, tokens = self.wrapper.inference_context, inference_input["tokens"]
        if ctx.sequence_len_offset == 0:
            self.graph = self.logits = None  # a new generation: new cache, perhaps new sizes
        if ctx.sequence_len_offset == 0 or args or kwargs or tokens.size(1) != 1:  # the prefill, or not one token
            if self.logits is not None:  # Megatron-Core's step would rotate the already rotated keys again
                raise RuntimeError("DecodeGraphs: a step of more than one token per sequence after the fixed "
                                   "steps began; set JACPT_NO_TE_DECODE=eager for this generation loop")
            return self.step(inference_input, *args, **kwargs)
        if self.logits is None:
            self._buffers(tokens, ctx.max_sequence_length)
            self._clear_unwritten(ctx)
            self.rotated = set()
        self.tokens.copy_(tokens)
        self.position_ids.copy_(inference_input["position_ids"])
        self.pos.fill_(ctx.sequence_len_offset)
        if self.graph is None:
            self._build(ctx)
        else:
            self.graph.replay()
        ctx.sequence_len_offset += 1  # as forward_pass_without_pipeline_parallel does
        return self.logits

    def _buffers(self, tokens, max_len: int) -> None:
        import torch

        self.tokens = torch.empty_like(tokens)
        self.position_ids = torch.empty_like(tokens)
        self.pos = torch.zeros(1, dtype=torch.long, device=tokens.device)
        self.positions = torch.arange(max_len, device=tokens.device)

    @staticmethod
    def _clear_unwritten(ctx) -> None:
        # Megatron-Core allocates the KV cache with torch.empty (attention.py:_allocate_memory) and reads only
        # what it wrote; this step attends over the whole cache with the rest masked. A NaN or inf left in
        # unwritten memory would still reach the output (a masked weight is 0, and 0 x NaN is NaN), so the
        # positions not yet written are zeroed once per generation.
        for key, value in ctx.key_value_memory_dict.values():
            key[ctx.sequence_len_offset:].zero_()
            value[ctx.sequence_len_offset:].zero_()

    def _forward(self, ctx):
        masked = (self.positions > self.pos).view(1, 1, 1, -1)  # True = masked, Megatron's convention
        setattr(ctx, DECODE_STEP, DecodeStep(self.pos, ctx.sequence_len_offset, self.rotated))
        try:
            return self.wrapper._forward({"tokens": self.tokens, "position_ids": self.position_ids,
                                          "attention_mask": masked})
        finally:
            delattr(ctx, DECODE_STEP)

    def _build(self, ctx) -> None:
        import torch

        if not self.capture:
            self.logits = self._forward(ctx)
            return
        # Warm up on a side stream (cuBLAS workspaces, lazily built kernels), then capture; the warm-up writes
        # the same key/value at the same position as the step itself, so running it is harmless.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward(ctx)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._forward(ctx)
        graph.replay()
        self.graph, self.captures = graph, self.captures + 1


def decode_graphs(wrapper) -> bool:
    """Install DecodeGraphs on a GPT inference wrapper where it applies: the decode patch and this module's SDPA
    attention (which takes the mask) applied, i.e. no TE; CUDA; one GPU; JACPT_NO_TE_DECODE=graph (the default).
    Returns whether it did."""
    import torch
    from megatron.core import parallel_state

    if _env_choice(DECODE_ENV, "graph", {"graph": "one CUDA graph per decode step, the default",
                                         "eager": "Megatron-Core's decode step, op by op"}) == "eager":
        return False
    if DECODE_NOTE not in APPLIED or SDPA_NOTE not in APPLIED or not torch.cuda.is_available():
        return False
    if (parallel_state.get_pipeline_model_parallel_world_size() != 1
            or parallel_state.get_tensor_model_parallel_world_size() != 1):
        return False
    wrapper.run_one_forward_step = DecodeGraphs(wrapper)
    return True


# The local (non-TE) layer spec keeps the RMSNorms as separate modules; NeMo's Qwen2 connectors
# (nemo/collections/llm/gpt/model/qwen2.py:224-225 and :319-320) name the TE-fused weights instead,
# so without TE the import silently leaves every norm at 1.0 and the export fails with IndexError.
TE_TO_LOCAL_NORMS = {
    "decoder.layers.*.self_attention.linear_qkv.layer_norm_weight": "decoder.layers.*.input_layernorm.weight",
    "decoder.layers.*.mlp.linear_fc1.layer_norm_weight": "decoder.layers.*.pre_mlp_layernorm.weight",
}


def local_norm_mapping(mapping: dict[str, str], nemo_state_keys) -> dict[str, str]:
    """Rename TE-fused norm keys to the local spec's when the NeMo model has local-spec norms.

    Called by the kit's Qwen2 connectors (jacpt.qwen); returns `mapping` unchanged for a TE model.
    """
    keys = list(nemo_state_keys)
    local = any(k.endswith("input_layernorm.weight") for k in keys) and not any(
        k.endswith("linear_qkv.layer_norm_weight") for k in keys)
    if not local:
        return mapping
    return {TE_TO_LOCAL_NORMS.get(s, s): TE_TO_LOCAL_NORMS.get(t, t) for s, t in mapping.items()}


def match_local_norm_dtype(module) -> None:
    """Cast local-spec RMSNorm weights to the model's dtype (no-op for a TE model).

    Without TE, megatron/core/models/gpt/gpt_layer_specs.py:202 builds the norms as WrappedTorchNorm
    (torch RMSNorm, fp32) while every other weight is in params_dtype (bf16); nemo/lightning/io/state.py:225
    then refuses the conversion because a target dtype changed. TE's fused norm weights are in
    params_dtype, so this makes the local spec look like it.
    """
    import collections

    params = dict(module.named_parameters())
    if not any(k.endswith("input_layernorm.weight") for k in params):
        return  # TE spec: fused norms, already in params_dtype
    norms = {k: p for k, p in params.items() if k.endswith("layernorm.weight")}
    dtypes = collections.Counter(p.dtype for k, p in params.items() if k not in norms and p.is_floating_point())
    if not dtypes:
        return
    dtype = dtypes.most_common(1)[0][0]
    for p in norms.values():
        if p.dtype != dtype:
            p.data = p.data.to(dtype)


def no_te_model_overrides() -> dict:
    """Model-config fields a run without TE needs (empty with TE)."""
    if not need_no_te():
        return {}
    # megatron/core/fusions/fused_softmax.py:161 (FusedScaleMaskSoftmax.is_kernel_available, via
    # get_batch_per_block at :218) imports apex's scaled_masked_softmax_cuda unguarded for bf16 and
    # seq <= 4096; with the fusion off torch's softmax is used instead.
    # (bias_activation_fusion, the SwiGLU fusion, was measured and left off: +1.4% tokens/s in training, but the
    # flag is saved with the checkpoint's config and its torch.compile'd kernel recompiles for every new shape
    # in generation, which it made ~10x slower; BENCHMARKS.md.)
    return {"masked_softmax_fusion": False}


def no_te_optimizer_overrides() -> dict:
    """Optimizer-config fields a run without TE needs (empty with TE)."""
    if not need_no_te():
        return {}
    # megatron/core/optimizer/distrib_optimizer.py:2019 (_copy_main_params_to_model_params) calls
    # fp8_utils.quantize_param_shard, which raises "Invalid Transformer Engine version for FP8
    # distributed optimizer" without TE even with no FP8 parameters.
    return {"use_distributed_optimizer": False}


# ----------------------------------------------------------------------------- no CUDA

def cpu_trainer_overrides() -> dict:
    """Trainer/optimizer/data settings for a CPU run (empty with CUDA)."""
    if not need_cpu():
        return {}
    return {
        "trainer": {"accelerator": "cpu", "devices": 1, "plugins": None},
        # bf16-mixed fails in megatron/core/optimizer/optimizer.py:572 on CPU; fp32 throughout.
        "optim": {"bf16": False, "fp16": False, "use_distributed_optimizer": False,
                  # megatron/core/optimizer/clip_grads.py:167 asserts CUDA gradients.
                  "clip_grad": 0.0},
        "data": {"num_workers": 0, "pin_memory": False, "persistent_workers": False},
    }


def _patch_cpu() -> None:
    import torch

    # megatron/core/dist_checkpointing/strategies/filesystem_async.py:198 and async_utils.py:195 call
    # torch.cuda.synchronize() on every save.
    torch.cuda.synchronize = lambda *a, **k: None
    # async_utils.py:148 and :546, distributed/param_and_grad_buffer.py:625/631 place tensors on
    # torch.cuda.current_device().
    torch.cuda.current_device = lambda: "cpu"
    _note("torch.cuda.synchronize/current_device: CPU no-ops")

    # megatron/core/tensor_parallel/random.py:207 (via layers.py:118) forks the model-parallel CUDA RNG
    # tracker, which NeMo seeds only when torch.cuda.device_count() > 0.
    from megatron.core.tensor_parallel import random as mrandom

    def _add(self, name, seed):
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = seed

    mrandom.CudaRNGStatesTracker.add = _add
    mrandom.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()
    _note("CudaRNGStatesTracker.add/fork: CPU no-ops")

    # Hard-coded `.cuda()`: nemo/collections/llm/gpt/model/base.py:98 (gpt_data_step); and
    # nemo/lightning/megatron_parallel.py:112 moves batches to torch.cuda.current_device() (patched above).
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    _note("Tensor.cuda/Module.cuda: identity")

    # Hard-coded device='cuda' / torch.cuda.current_device(): megatron/core/optimizer/optimizer.py:357/365/369/776,
    # optimizer/clip_grads.py:90-206, optimizer/grad_scaler.py, pipeline_parallel/schedules.py:477.
    def _cpu(dev):
        if isinstance(dev, int) or (isinstance(dev, str) and dev.startswith("cuda")):
            return "cpu"
        if isinstance(dev, torch.device) and dev.type == "cuda":
            return torch.device("cpu")
        return dev

    def _wrap(fn):
        @functools.wraps(fn)
        def w(*a, **k):
            if "device" in k:
                k["device"] = _cpu(k["device"])
            return fn(*a, **k)
        return w

    for name in ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like", "empty_like",
                 "full_like", "rand", "randn", "randint", "as_tensor"):
        setattr(torch, name, _wrap(getattr(torch, name)))
    _to = torch.Tensor.to

    def to(self, *a, **k):
        a = tuple(_cpu(x) if isinstance(x, (str, torch.device)) or (i == 0 and isinstance(x, int)) else x
                  for i, x in enumerate(a))
        if "device" in k:
            k["device"] = _cpu(k["device"])
        return _to(self, *a, **k)

    torch.Tensor.to = to
    # nemo/collections/llm/gpt/data/utils.py:702 `torch.cuda.LongTensor([1])` (SFT sample mapping).
    for n in ("LongTensor", "FloatTensor", "IntTensor", "BoolTensor", "ByteTensor", "HalfTensor", "DoubleTensor"):
        setattr(torch.cuda, n, getattr(torch, n))
    _note("torch factories/Tensor.to/torch.cuda.*Tensor: 'cuda' -> 'cpu'")

    # nemo/lightning/io/pl.py:433 _fix_tensors_device asserts torch.cuda.is_initialized() after each load.
    import nemo.lightning.io.pl as nio_pl

    nio_pl._fix_tensors_device = lambda ckpt: ckpt
    _note("io.pl._fix_tensors_device: identity")

    # nemo/collections/llm/gpt/data/utils.py:547 build_index_files forks a multiprocessing Pool inside the
    # running trainer even for one file; on CPU that fork deadlocked (no error, SIGTERM ignored). Serial.
    import nemo.collections.llm.gpt.data.utils as du

    def build_index_files(dataset_paths, newline_int, workers=None, build_index_fn=du.build_index_from_memdata,
                          index_mapping_dir=None):
        if len(dataset_paths) < 1:
            raise ValueError("files_list must contain at leat one file name")
        return [du._build_memmap_index_files(newline_int, build_index_fn, p, index_mapping_dir=index_mapping_dir)
                for p in dataset_paths]

    du.build_index_files = build_index_files
    _note("gpt.data.utils.build_index_files: serial")
