"""The no-TE replacements for Megatron-Core's slow fallbacks: the gradient norm and scale, and RoPE.

Each one must compute what Megatron's own fallback computes; the GPU tests run the compiled RoPE.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from jacpt import nemo_compat  # noqa: E402


def _tensors(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g).to(dtype) for n in (1, 7, 896, 4864 * 3)] + [
        torch.randn(24, 64, generator=g).to(dtype)]


def test_grad_norm_matches_megatrons_fallback(monkeypatch):
    from megatron.core.utils import local_multi_tensor_l2_norm

    grads = _tensors(1)
    # Megatron's fallback puts its result on 'cuda'; on a machine without one, keep it where it is.
    monkeypatch.setattr(torch, "tensor", lambda data, **kw: torch.as_tensor(data, dtype=kw.get("dtype")))
    want, _ = local_multi_tensor_l2_norm(2048 * 32, None, [grads], False)
    monkeypatch.undo()
    got, per_param = nemo_compat._foreach_l2_norm(2048 * 32, None, [grads], False)
    assert per_param is None and got.shape == (1,) and got.dtype == torch.float32
    assert torch.allclose(got, want.to(got.device), rtol=1e-6)
    assert torch.allclose(got, torch.cat([g.flatten() for g in grads]).norm().reshape(1), rtol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_scale_matches_megatrons_fallback_into_another_dtype(scale):
    from megatron.core.utils import local_multi_tensor_scale

    src = _tensors(2)
    want = [torch.empty_like(t, dtype=torch.bfloat16) for t in src]
    got = [torch.full_like(t, float("nan"), dtype=torch.bfloat16) for t in src]
    local_multi_tensor_scale(0, None, [src, want], scale)
    nemo_compat._foreach_scale(0, None, [src, got], scale)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_scale_in_place_as_the_gradient_clip_calls_it():
    from megatron.core.utils import local_multi_tensor_scale

    want, got = _tensors(3), _tensors(3)
    local_multi_tensor_scale(0, None, [want, want], 0.25)
    nemo_compat._foreach_scale(0, None, [got, got], 0.25)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_apply_replaces_the_fallbacks_here():
    """No TE and no apex in this venv: after apply() Megatron's optimizer uses the multi-tensor versions."""
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as optimizer

    nemo_compat.apply()
    assert clip_grads.l2_norm_impl is nemo_compat._foreach_l2_norm
    assert clip_grads.multi_tensor_scale_impl is optimizer.multi_tensor_scale_impl is nemo_compat._foreach_scale


def _eager_rope(monkeypatch):
    """Megatron's own RoPE function, put back in its module for this test (on CUDA, apply() may have compiled it
    earlier in the session)."""
    import megatron.core.models.common.embeddings.rope_utils as rope_utils

    fn = rope_utils._apply_rotary_pos_emb_bshd
    orig = getattr(fn, "__wrapped__", fn)
    assert orig.__module__ == rope_utils.__name__
    monkeypatch.setattr(rope_utils, "_apply_rotary_pos_emb_bshd", orig)
    return rope_utils, orig


def test_compiled_rope_replaces_the_module_function_once(monkeypatch):
    rope_utils, orig = _eager_rope(monkeypatch)
    monkeypatch.setattr(nemo_compat, "APPLIED", [])
    nemo_compat._patch_compiled_rope()
    patched = rope_utils._apply_rotary_pos_emb_bshd
    assert patched is not orig and patched._jacpt_compiled and patched.__wrapped__ is orig
    nemo_compat._patch_compiled_rope()  # idempotent: not compiled twice
    assert rope_utils._apply_rotary_pos_emb_bshd is patched
    assert nemo_compat.APPLIED == [nemo_compat.ROPE_NOTE]


def test_compiled_rope_runs_only_while_autograd_records(monkeypatch):
    """Training takes the compiled kernel; validation and generation (no autograd) take Megatron's own."""
    rope_utils, orig = _eager_rope(monkeypatch)
    nemo_compat._patch_compiled_rope()
    patched = rope_utils._apply_rotary_pos_emb_bshd
    calls = []
    monkeypatch.setattr(patched, "compiled", lambda *a, **k: calls.append(a) or orig(*a, **k))
    t = torch.randn(5, 2, 3, 8)
    freqs = torch.randn(5, 1, 1, 8)
    with torch.no_grad():
        assert torch.equal(patched(t, freqs), orig(t, freqs))
    with torch.inference_mode():
        patched(t, freqs)
    assert calls == []
    y = patched(t.requires_grad_(True), freqs)
    assert len(calls) == 1 and y.requires_grad


def test_compiled_rope_is_left_out_where_a_fused_kernel_exists(monkeypatch):
    rope_utils, orig = _eager_rope(monkeypatch)
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", lambda *a, **k: None)
    nemo_compat._patch_compiled_rope()
    assert rope_utils._apply_rotary_pos_emb_bshd is orig


def test_each_replacement_can_be_turned_off_and_a_wrong_value_is_named(monkeypatch):
    import megatron.core.optimizer.clip_grads as clip_grads
    from megatron.core.utils import local_multi_tensor_l2_norm

    rope_utils, _ = _eager_rope(monkeypatch)
    monkeypatch.setattr(clip_grads, "l2_norm_impl", local_multi_tensor_l2_norm)
    monkeypatch.setenv(nemo_compat.ROPE_ENV, "eager")
    monkeypatch.setenv(nemo_compat.MULTI_TENSOR_ENV, "megatron")
    nemo_compat._patch_compiled_rope()
    nemo_compat._patch_multi_tensor_fallbacks()
    assert not getattr(rope_utils._apply_rotary_pos_emb_bshd, "_jacpt_compiled", False)
    assert clip_grads.l2_norm_impl is local_multi_tensor_l2_norm

    monkeypatch.setenv(nemo_compat.ROPE_ENV, "fused")
    with pytest.raises(ValueError, match=r"JACPT_NO_TE_ROPE='fused': use 'compiled' .* or 'eager'"):
        nemo_compat._patch_compiled_rope()
    monkeypatch.setenv(nemo_compat.MULTI_TENSOR_ENV, "apex")
    with pytest.raises(ValueError, match=r"JACPT_NO_TE_MULTI_TENSOR='apex': use 'foreach' .* or 'megatron'"):
        nemo_compat._patch_multi_tensor_fallbacks()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the compiled RoPE runs on CUDA only)")
@pytest.mark.parametrize("seq,batch,heads", [(2048, 2, 14), (2048, 2, 2), (1, 3, 14)], ids=["query", "key", "decode"])
def test_compiled_rope_matches_megatrons_on_cuda(monkeypatch, seq, batch, heads):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope_utils, orig = _eager_rope(monkeypatch)
    nemo_compat._patch_compiled_rope()
    compiled = rope_utils._apply_rotary_pos_emb_bshd
    freqs = RotaryEmbedding(kv_channels=64, rotary_percent=1.0, rotary_base=1000000).cuda()(4096)[:seq]
    g = torch.Generator(device="cuda").manual_seed(7)
    t = torch.randn(seq, batch, heads, 64, generator=g, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(t.shape, generator=g, device="cuda", dtype=torch.bfloat16)
    outs = []
    for fn in (orig, compiled):
        x = t.clone().requires_grad_(True)
        y = fn(x, freqs)
        (y.float() * w.float()).sum().backward()
        outs.append((y.detach(), x.grad))
    (y0, g0), (y1, g1) = outs
    assert y1.dtype == y0.dtype and y1.shape == y0.shape
    # The same bf16 arithmetic, fused: equal up to one bf16 rounding.
    assert torch.allclose(y1.float(), y0.float(), atol=2e-2, rtol=1e-2), (y1.float() - y0.float()).abs().max()
    assert torch.allclose(g1.float(), g0.float(), atol=2e-2, rtol=1e-2), (g1.float() - g0.float()).abs().max()
    assert not torch.allclose(y0.float(), t.float(), atol=1e-2) or seq == 1  # RoPE did rotate (position 0 is identity)
