"""The fused SwiGLU against Megatron-Core's own MLP: same output, same gradients for the input and both
linear layers; used only in training mode, and only where the MLP's activation is SwiGLU without Megatron's
own fusion."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from jacpt import compiled, swiglu  # noqa: E402

HIDDEN, FFN = 64, 96


def _mlp(**cfg):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = {"gated_linear_unit": True, "activation_func": F.silu, "add_bias_linear": False,
              "bias_activation_fusion": False, **cfg}
    config = TransformerConfig(num_layers=1, hidden_size=HIDDEN, ffn_hidden_size=FFN, num_attention_heads=4,
                               use_cpu_initialization=True, **fields)
    torch.manual_seed(0)
    return MLP(config, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))


def _run(mlp, tokens=(7, 3)):
    p = next(mlp.parameters())
    x = torch.randn(*tokens, HIDDEN, generator=torch.Generator().manual_seed(1)).to(p.device, p.dtype)
    x.requires_grad_(True)
    out, bias = mlp(x)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(p.device, p.dtype)
    (out * w).sum().backward()
    grads = (x.grad, mlp.linear_fc1.weight.grad, mlp.linear_fc2.weight.grad)
    mlp.zero_grad(set_to_none=True)
    return out.detach(), bias, grads


@pytest.fixture
def fuse(monkeypatch):
    """Call to install the fused forward; Megatron's comes back after the test, for the tests that follow.
    The returned list counts the fused SwiGLU's calls."""
    from megatron.core.transformer.mlp import MLP

    monkeypatch.setattr(MLP, "forward", MLP.forward)
    calls = []
    apply = swiglu.SwiGLU.apply

    def counting(y):
        calls.append(tuple(y.shape))
        return apply(y)

    monkeypatch.setattr(swiglu.SwiGLU, "apply", counting)
    swiglu.install()
    return calls


def test_backward_is_the_derivative_of_the_forward():
    y = torch.randn(5, 2 * 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu.SwiGLU.apply, (y,))
    a, b = y.detach().chunk(2, dim=-1)
    assert torch.equal(swiglu.SwiGLU.apply(y.detach()), F.silu(a) * b)


def test_fused_mlp_matches_megatrons(megatron_tp1, fuse):
    mlp = _mlp()
    assert swiglu.eligible(mlp)
    from megatron.core.transformer.mlp import MLP

    want = _run_with(MLP.forward.__wrapped__, mlp)
    got = _run(mlp)
    assert fuse == [(7, 3, 2 * FFN)], "one fused SwiGLU call, over linear_fc1's whole output"
    assert got[0].shape == want[0].shape == (7, 3, HIDDEN) and got[1] is None and want[1] is None
    assert torch.allclose(got[0], want[0], atol=1e-6, rtol=1e-5), (got[0] - want[0]).abs().max()
    for name, a, b in zip(("input", "linear_fc1", "linear_fc2"), got[2], want[2]):
        assert a is not None and torch.allclose(a, b, atol=1e-5, rtol=1e-5), f"{name}: {(a - b).abs().max():.3g}"


def _run_with(forward, mlp, tokens=(7, 3)):
    """_run with `forward` as the MLP's forward for this one call."""
    mlp.forward = forward.__get__(mlp)
    try:
        return _run(mlp, tokens)
    finally:
        del mlp.forward


def test_a_bias_from_linear_fc1_is_added_before_the_swiglu(megatron_tp1, fuse):
    """A wrapped linear_fc1 (an adapter, say) may hand back a bias even without add_bias_linear."""
    from megatron.core.transformer.mlp import MLP

    mlp = _mlp()
    bias = torch.randn(2 * FFN, generator=torch.Generator().manual_seed(3))
    fc1 = mlp.linear_fc1.forward
    mlp.linear_fc1.forward = lambda x: (fc1(x)[0], bias)
    want = _run_with(MLP.forward.__wrapped__, mlp)
    got = _run(mlp)
    assert len(fuse) == 1
    assert torch.allclose(got[0], want[0], atol=1e-6, rtol=1e-5), (got[0] - want[0]).abs().max()
    for a, b in zip(got[2], want[2]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_in_eval_mode_megatrons_code_runs(megatron_tp1, fuse):
    from megatron.core.transformer.mlp import MLP

    mlp = _mlp().eval()
    x = torch.randn(4, 2, HIDDEN)
    with torch.no_grad():
        out, _ = mlp(x)
    with torch.inference_mode():
        out2, _ = mlp(x)
    out3, _ = mlp(x.requires_grad_(True))
    assert fuse == [], "validation and generation (eval mode) must not take the training path"
    with torch.no_grad():
        want, _ = MLP.forward.__wrapped__(mlp, x)
    assert torch.equal(out, want) and torch.equal(out2, want) and torch.equal(out3.detach(), want)


def test_recompute_forward_without_grad_takes_the_same_path(megatron_tp1, fuse):
    """Activation recompute runs a layer's first pass under no_grad in training mode, then again with grad:
    both passes must compute the same function."""
    mlp = _mlp()
    x = torch.randn(4, 2, HIDDEN)
    with torch.no_grad():
        first, _ = mlp(x)
    again, _ = mlp(x.requires_grad_(True))
    assert fuse == [(4, 2, 2 * FFN)] * 2 and torch.equal(first, again.detach())


@pytest.mark.parametrize("cfg", [{"bias_activation_fusion": True},  # Megatron's own fused SwiGLU
                                 {"gated_linear_unit": False},  # plain silu
                                 {"activation_func": F.gelu, "gated_linear_unit": True},  # GeGLU
                                 {"add_bias_linear": True}],
                         ids=["megatron-fusion", "not-gated", "geglu", "bias"])
def test_other_mlps_run_megatrons_code(megatron_tp1, fuse, cfg, monkeypatch):
    import megatron.core.fusions.fused_bias_swiglu as fused

    for name in ("swiglu", "swiglu_back"):  # torch.compile'd on every device; its arithmetic is what counts here
        monkeypatch.setattr(fused, name, getattr(fused, name).__wrapped__)
    mlp = _mlp(**cfg)
    assert not swiglu.eligible(mlp)
    out, _, grads = _run(mlp)
    assert fuse == [] and all(g is not None for g in grads)


def test_install_is_idempotent_and_keeps_megatrons_forward(fuse):
    from megatron.core.transformer.mlp import MLP

    fused = MLP.forward
    assert fused._jacpt_fused and fused.__wrapped__.__qualname__ == "MLP.forward"
    swiglu.install()
    assert MLP.forward is fused


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the compiled kernels)")
def test_fused_mlp_in_bf16_on_cuda_is_compiled_and_smaller(megatron_tp1, fuse):
    from megatron.core.transformer.mlp import MLP

    mlp = _mlp().cuda().bfloat16()
    megatron_forward = MLP.forward.__wrapped__
    fwd, bwd = compiled.on("cuda", swiglu._forward), compiled.on("cuda", swiglu._backward)
    assert fwd is not swiglu._forward and bwd is not swiglu._backward, "compiled on CUDA"

    def peak(run):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = run()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - base

    tokens = (512, 8)
    want, want_mem = peak(lambda: _run_with(megatron_forward, mlp, tokens))
    _run(mlp, tokens)  # compiles
    got, got_mem = peak(lambda: _run(mlp, tokens))
    assert got[0].dtype == torch.bfloat16 and len(fuse) == 2
    # One rounding instead of two (silu, then the product): equal within bf16's step.
    assert torch.allclose(got[0].float(), want[0].float(), atol=5e-2, rtol=2e-2), (got[0] - want[0]).abs().max()
    for name, a, b in zip(("input", "linear_fc1", "linear_fc2"), got[2], want[2]):
        assert torch.allclose(a.float(), b.float(), atol=0.25, rtol=2e-2), f"{name}: {(a - b).abs().max():.3g}"
    assert got_mem < want_mem, f"fused {got_mem} bytes at peak, Megatron's {want_mem}"
