"""The no-TE core attention (torch SDPA) against Megatron-Core's stock DotProductAttention.

Both modules get the same query/key/value in Megatron's [seq, batch, heads, head_dim] layout, with
Qwen2.5-0.5B's head shape (14 query heads sharing 2 key/value groups, head_dim 64). Outputs and the
gradients of all three inputs must agree to fp32 rounding.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from jacpt import nemo_compat  # noqa: E402

HEADS, GROUPS, HEAD_DIM = 14, 2, 64


def _config(layer_scaling: bool = False):
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(num_layers=2, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                            num_query_groups=GROUPS, kv_channels=HEAD_DIM, masked_softmax_fusion=False,
                            attention_softmax_in_fp32=True, attention_dropout=0.0)
    # Set after validation, which allows layer scaling only with fp16; the arithmetic is the same in fp32.
    cfg.apply_query_key_layer_scaling = layer_scaling
    return cfg


def _pair(config, layer_number: int = 1):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    kw = dict(config=config, layer_number=layer_number, attn_mask_type=AttnMaskType.causal, attention_type="self")
    return DotProductAttention(**kw), nemo_compat.sdpa_attention_class()(**kw)


def _qkv(sq: int, sk: int, b: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sq, b, HEADS, HEAD_DIM, generator=g, requires_grad=True)
    k = torch.randn(sk, b, GROUPS, HEAD_DIM, generator=g, requires_grad=True)
    v = torch.randn(sk, b, GROUPS, HEAD_DIM, generator=g, requires_grad=True)
    return q, k, v


def _run(module, q, k, v, mask):
    qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = module(qq, kk, vv, mask)
    # A fixed random projection of the output: every element's gradient matters.
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(99)).to(out.device, out.dtype)
    (out * w).sum().backward()
    return out.detach(), qq.grad, kk.grad, vv.grad


@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "causal-mask"])
def test_causal_self_attention_matches_the_stock_module(megatron_tp1, no_cuda_rng, with_mask):
    stock, sdpa = _pair(_config())
    q, k, v = _qkv(48, 48, 3, seed=1)
    # Megatron's GPT datasets pass the causal mask as booleans, True = masked out.
    mask = torch.triu(torch.ones(1, 1, 48, 48, dtype=torch.bool), diagonal=1) if with_mask else None
    want, got = _run(stock, q, k, v, mask), _run(sdpa, q, k, v, mask)
    assert got[0].shape == want[0].shape == (48, 3, HEADS * HEAD_DIM)
    for name, a, b in zip(("output", "dq", "dk", "dv"), got, want):
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-4), f"{name}: max |diff| {(a - b).abs().max():.3g}"


def test_a_decode_step_attends_to_every_cached_key(megatron_tp1, no_cuda_rng):
    # One new query against 20 cached keys (sq != sk): no causal kernel, the mask as given.
    stock, sdpa = _pair(_config())
    q, k, v = _qkv(1, 20, 2, seed=2)
    mask = torch.zeros(1, 1, 1, 20, dtype=torch.bool)
    want, got = _run(stock, q, k, v, mask), _run(sdpa, q, k, v, mask)
    assert torch.allclose(got[0], want[0], atol=2e-5, rtol=1e-4)


def test_a_padding_mask_is_applied_when_not_causal(megatron_tp1, no_cuda_rng):
    from megatron.core.transformer.enums import AttnMaskType

    stock, sdpa = _pair(_config())
    stock.attn_mask_type = sdpa.attn_mask_type = AttnMaskType.padding
    stock.scale_mask_softmax.attn_mask_type = AttnMaskType.padding
    q, k, v = _qkv(16, 16, 2, seed=3)
    mask = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    mask[1, :, :, 10:] = True  # the second sample's last six keys are padding
    want, got = _run(stock, q, k, v, mask), _run(sdpa, q, k, v, mask)
    assert torch.allclose(got[0], want[0], atol=2e-5, rtol=1e-4)
    # ... and the mask mattered: without it the second sample's output differs.
    free = _run(sdpa, q, k, v, torch.zeros_like(mask))[0]
    assert not torch.allclose(free[:, 1], got[0][:, 1], atol=1e-3)


def test_query_key_layer_scaling_gives_the_same_scores(megatron_tp1, no_cuda_rng):
    # With layer scaling the stock module divides the scores by the layer number and multiplies them
    # back in the softmax; the product is the plain 1/sqrt(head_dim) that SDPA applies.
    cfg = _config(layer_scaling=True)
    stock, sdpa = _pair(cfg, layer_number=5)
    q, k, v = _qkv(32, 32, 2, seed=4)
    want, got = _run(stock, q, k, v, None), _run(sdpa, q, k, v, None)
    assert torch.allclose(got[0], want[0], atol=5e-5, rtol=1e-4)


def test_the_patch_swaps_the_local_spec_and_can_be_turned_off(monkeypatch):
    import megatron.core.models.gpt.gpt_layer_specs as specs
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    monkeypatch.setattr(specs, "DotProductAttention", DotProductAttention)
    monkeypatch.setattr(nemo_compat, "APPLIED", [])
    monkeypatch.setenv(nemo_compat.ATTENTION_ENV, "local")
    nemo_compat._patch_local_core_attention()
    spec = specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    assert spec.submodules.self_attention.submodules.core_attention is DotProductAttention

    monkeypatch.delenv(nemo_compat.ATTENTION_ENV)
    nemo_compat._patch_local_core_attention()
    spec = specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    assert spec.submodules.self_attention.submodules.core_attention is nemo_compat.sdpa_attention_class()
    assert any("scaled_dot_product_attention" in n for n in nemo_compat.APPLIED)

    monkeypatch.setenv(nemo_compat.ATTENTION_ENV, "flash")
    with pytest.raises(ValueError, match="JACPT_NO_TE_ATTENTION='flash'"):
        nemo_compat._patch_local_core_attention()


def _cuda_bf16_pair():
    """The stock module and the SDPA one, bf16, on the GPU (with Megatron's CUDA RNG seeded)."""
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    cfg = _config()
    cfg.bf16 = True
    return tuple(m.cuda() for m in _pair(cfg))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 flash attention)")
def test_bf16_on_cuda_matches_and_saves_memory(megatron_tp1):
    stock, sdpa = _cuda_bf16_pair()
    q, k, v = (t.detach().cuda().bfloat16() for t in _qkv(2048, 2048, 2, seed=5))
    peaks = []
    for m in (stock, sdpa):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = _run(m, q, k, v, None)
        peaks.append((torch.cuda.max_memory_allocated() - base, out))
    (stock_mem, want), (sdpa_mem, got) = peaks
    assert (got[0].float() - want[0].float()).abs().max() < 2e-2
    assert sdpa_mem < stock_mem / 2, (sdpa_mem, stock_mem)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the generation path of SDPA)")
def test_bf16_decode_steps_on_cuda_match_the_stock_module(megatron_tp1):
    # Generation: no autograd, one query against a growing cache, a new key length every step.
    from megatron.core.transformer.enums import AttnMaskType

    stock, sdpa = (m.eval() for m in _cuda_bf16_pair())
    with torch.no_grad():
        for sk in (7, 8, 300):
            # What Attention passes after the prompt step (attention.py:270-273): no mask, no_mask type.
            q, k, v = (t.detach().cuda().bfloat16() for t in _qkv(1, sk, 3, seed=sk))
            want = stock(q, k, v, None, attn_mask_type=AttnMaskType.no_mask)
            got = sdpa(q, k, v, None, attn_mask_type=AttnMaskType.no_mask)
            assert torch.allclose(got.float(), want.float(), atol=2e-2, rtol=2e-2), (got - want).abs().max()
