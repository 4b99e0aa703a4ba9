"""The fused LoRA update against NeMo's own LoRALinear: same output, same gradient for the input and for
both adapter matrices, for a column-parallel layer (linear_qkv, linear_fc1) and a row-parallel one
(linear_proj, linear_fc2), with Megatron-Core's own layers computed whole (FrozenLinearWithLoRA, each of its
matmul layouts) and other layers through the update alone (LoRAUpdate)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from jacpt import lora_update  # noqa: E402

IN, OUT, RANK = 64, 96, 8


def _wrapped(kind: str, alpha: int = 32, dropout: float = 0.0, n_in: int = IN, n_out: int = OUT, subclass=False):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.transformer_config import TransformerConfig
    from nemo.collections.llm.peft.lora import LoRALinear
    from nemo.collections.llm.peft.utils import ParallelLinearAdapter

    cfg = TransformerConfig(num_layers=1, hidden_size=IN, num_attention_heads=4, use_cpu_initialization=True)
    torch.manual_seed(0)
    if kind == "column":
        cls = type("Column", (ColumnParallelLinear,), {}) if subclass else ColumnParallelLinear
        base = cls(n_in, n_out, config=cfg, init_method=torch.nn.init.normal_, bias=True, gather_output=False)
    else:
        cls = type("Row", (RowParallelLinear,), {}) if subclass else RowParallelLinear
        base = cls(n_in, n_out, config=cfg, init_method=torch.nn.init.normal_, bias=False, input_is_parallel=True,
                   skip_bias_add=True)
    for p in base.parameters():
        p.requires_grad_(False)
    adapter = ParallelLinearAdapter(n_in, n_out, RANK, base_linear_name="x", activation="identity", norm_position=None,
                                    norm_type=None, column_init_method="xavier", row_init_method="zero",
                                    input_is_parallel=kind == "row", dropout=dropout, model_parallel_config=cfg,
                                    alpha=alpha, dropout_position="pre")
    with torch.no_grad():  # B starts at zero in LoRA; give it values so that every gradient is exercised
        adapter.linear_out.weight.normal_()
    return LoRALinear(base, adapter)


def _rel(a, b) -> float:
    """|a - b| / |b| over the whole tensor (fp32 sums in another order differ most where b is near 0)."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _run(module, tokens=(5, 3)):
    p = next(module.adapter.parameters())
    x = torch.randn(*tokens, module.adapter.linear_in.weight.shape[1], generator=torch.Generator().manual_seed(1)).to(p.device, p.dtype).requires_grad_(True)
    out, bias = module(x)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(p.device, p.dtype)
    (out * w).sum().backward()
    grads = (x.grad, module.adapter.linear_in.weight.grad, module.adapter.linear_out.weight.grad)
    module.zero_grad(set_to_none=True)
    return out.detach(), bias, grads


@pytest.fixture
def fuse(monkeypatch):
    """Call to install the fused forward; NeMo's comes back after the test, for the tests that follow."""
    from nemo.collections.llm.peft.lora import LoRALinear

    monkeypatch.setattr(LoRALinear, "forward", LoRALinear.forward)
    return lora_update.install


# (in, out, tokens): separate matmuls both ways; one matmul both ways (wide output); a narrow output with the
# forward's addmm_ and the backward's one matmul.
SHAPES = [(IN, OUT, (5, 3), False, False), (16, 96, (40, 4), True, True), (96, 16, (80, 4), False, True)]


@pytest.mark.parametrize("n_in,n_out,tokens,fwd_one,bwd_one", SHAPES)
def test_each_matmul_layout_is_chosen_where_it_saves_a_pass(n_in, n_out, tokens, fwd_one, bwd_one):
    t = tokens[0] * tokens[1]
    assert lora_update.merged_forward(t, n_out, n_in, RANK) is fwd_one
    assert lora_update.merged_backward(t, n_in, RANK) is bwd_one


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("alpha", [32, 64])
@pytest.mark.parametrize("n_in,n_out,tokens", [s[:3] for s in SHAPES])
def test_fused_update_matches_nemos_lora(megatron_tp1, kind, alpha, n_in, n_out, tokens, fuse, monkeypatch):
    module = _wrapped(kind, alpha, n_in=n_in, n_out=n_out)
    assert lora_update.eligible(module) and lora_update._whole(module)
    want = _run(module, tokens)
    fuse()
    calls = []
    real = lora_update.FrozenLinearWithLoRA.apply
    monkeypatch.setattr(lora_update.FrozenLinearWithLoRA, "apply", lambda *a: calls.append(1) or real(*a))
    got = _run(module, tokens)
    assert calls == [1]  # Megatron's own layer: computed whole
    assert got[0].shape == want[0].shape == (*tokens, n_out)
    assert (got[1] is None) == (want[1] is None)
    for name, a, b in zip(("output", "input", "A", "B"), (got[0], *got[2]), (want[0], *want[2])):
        assert a is not None and _rel(a, b) < 1e-6, f"{name}: relative difference {_rel(a, b):.3g}"
    # The scale mattered: alpha 64 over rank 8 is not alpha 32 over rank 8.
    if alpha == 64:
        assert not torch.allclose(got[0], _run(_wrapped(kind, 32, n_in=n_in, n_out=n_out), tokens)[0], atol=1e-3)


@pytest.mark.parametrize("kind", ["column", "row"])
def test_another_layer_class_gets_the_update_alone(megatron_tp1, kind, fuse, monkeypatch):
    module = _wrapped(kind, subclass=True)  # e.g. TE's layers in the container: NeMo runs them, the kit adds
    assert lora_update.eligible(module) and not lora_update._whole(module)
    want = _run(module)
    fuse()
    calls = []
    real = lora_update.LoRAUpdate.apply
    monkeypatch.setattr(lora_update.LoRAUpdate, "apply", lambda *a: calls.append(1) or real(*a))
    got = _run(module)
    assert calls == [1]
    for a, b in zip((got[0], *got[2]), (want[0], *want[2])):
        assert _rel(a, b) < 1e-6


@pytest.mark.parametrize("base_needs_grad", [True, False])  # False: the first layer, its input from frozen embeddings
def test_update_is_written_into_the_frozen_layers_output_unless_it_is_a_view(base_needs_grad):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, generator=g).requires_grad_(base_needs_grad)
    frozen = torch.randn(10, 4, generator=g)
    h = torch.randn(6, 3, generator=g).requires_grad_(True)
    b = torch.randn(10, 3, generator=g).requires_grad_(True)
    for as_view in (False, True):
        base = x @ frozen.t()
        if as_view:
            base = base.view(2, 3, 10)  # what a row-parallel layer's reduce hands back at TP 1
        want = (x.detach() @ frozen.t() + 0.5 * h.detach() @ b.detach().t()).view(base.shape)
        storage = base.data_ptr()
        out = lora_update.LoRAUpdate.apply(base, h.view(*base.shape[:-1], 3), b, 0.5)
        assert torch.allclose(out, want)
        assert (out.data_ptr() == storage) is (not as_view)  # in place, or a copy for the view
        w = torch.randn(out.shape, generator=g)
        (out * w).sum().backward()
        w2 = w.view(6, 10)
        assert torch.allclose(h.grad, 0.5 * w2 @ b.detach()) and torch.allclose(b.grad, 0.5 * w2.t() @ h.detach())
        assert (x.grad is not None) is base_needs_grad
        if base_needs_grad:
            assert torch.allclose(x.grad, w2 @ frozen)
        h.grad = b.grad = x.grad = None


def test_adapter_dropout_falls_back_to_nemos_forward(megatron_tp1, fuse, monkeypatch):
    module = _wrapped("column", dropout=0.1)
    assert not lora_update.eligible(module)
    fuse()
    calls = []
    monkeypatch.setattr(lora_update.LoRAUpdate, "apply", lambda *a: calls.append(a))
    module.eval()  # dropout off: the result is deterministic, and NeMo's path computes it
    out, _ = module(torch.randn(2, 1, IN))
    assert calls == [] and out.shape == (2, 1, OUT)


def test_install_is_idempotent_and_keeps_nemos_forward_underneath(fuse):
    from nemo.collections.llm.peft.lora import LoRALinear

    nemo_forward = LoRALinear.forward
    fuse()
    fused = LoRALinear.forward
    assert fused is not nemo_forward and fused.__wrapped__ is nemo_forward
    fuse()
    assert LoRALinear.forward is fused


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 matmuls)")
@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("n_in,n_out,tokens", [(IN, OUT, (5, 3)), (896, 9728, (512, 4)), (4864, 896, (512, 4))])
def test_fused_update_in_bf16_on_cuda(megatron_tp1, kind, n_in, n_out, tokens, fuse):
    module = _wrapped(kind, n_in=n_in, n_out=n_out).cuda().bfloat16()
    want = _run(module, tokens)
    fuse()
    got = _run(module, tokens)
    assert got[0].dtype == torch.bfloat16
    # Fewer roundings than NeMo's matmul, scale and add: equal within bf16's step, relative to each tensor's size.
    for name, a, b in zip(("output", "input", "A", "B"), (got[0], *got[2]), (want[0], *want[2])):
        assert _rel(a, b) < 1e-2, f"{name}: relative difference {_rel(a, b):.3g}"
