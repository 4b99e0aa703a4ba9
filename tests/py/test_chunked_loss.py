"""The output layer + cross entropy in chunks of tokens, against the whole-logits computation.

The function is checked against torch's cross entropy on full logits (values and the gradients of
hidden states and weight), and the installed GPTModel path against Megatron-Core's own: the same
model, the same batch, loss and every parameter's gradient with the chunks on and off.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from jacpt import chunked_loss  # noqa: E402


def _reference(hidden, weight, target):
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()
    loss = torch.nn.functional.cross_entropy(logits.float(), target.reshape(-1), reduction="none")
    return loss.view(target.shape)


def _inputs(s: int, b: int, h: int, v: int, seed: int, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(s, b, h, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.5).to(device, dtype).requires_grad_()
    target = torch.randint(0, v, (s, b), generator=g).to(device)
    return hidden, weight, target


@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])  # 16 divides the 2x8 tokens, 7 leaves a remainder
def test_values_and_gradients_match_full_logits(chunk):
    hidden, weight, target = _inputs(8, 2, 32, 97, seed=0)
    grad_out = torch.rand(8, 2)  # NeMo's reduction weights tokens (loss mask / count): not all ones
    ref = _reference(hidden, weight, target)
    ref_h, ref_w = torch.autograd.grad((ref * grad_out).sum(), (hidden, weight))
    got = chunked_loss.linear_cross_entropy(hidden, weight, target, chunk)
    got_h, got_w = torch.autograd.grad((got * grad_out).sum(), (hidden, weight))
    assert got.shape == target.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_h, ref_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_w, ref_w, rtol=1e-5, atol=1e-6)


def _counting_backward(monkeypatch):
    """Record how many tokens each backward-pass recomputation of logits covers."""
    rows = []
    real = chunked_loss._backward_chunk

    def counted(logits, lse, target, grad):
        rows.append(logits.shape[0])
        return real(logits, lse, target, grad)

    monkeypatch.setattr(chunked_loss, "_backward_chunk", counted)
    return rows


@pytest.mark.parametrize("masked", [[], [0, 5, 11], list(range(16))])
def test_nemos_masked_weights_recompute_only_the_masked_tokens(monkeypatch, masked):
    # NeMo's reduction: the same weight for every counted token, 0 for the masked ones.
    hidden, weight, target = _inputs(8, 2, 32, 97, seed=5)
    grad_out = torch.full((16,), 1 / 13)
    grad_out[masked] = 0.0
    grad_out = grad_out.view(8, 2)
    ref_h, ref_w = torch.autograd.grad((_reference(hidden, weight, target) * grad_out).sum(), (hidden, weight))
    rows = _counting_backward(monkeypatch)
    got = chunked_loss.linear_cross_entropy(hidden, weight, target, 4)
    got_h, got_w = torch.autograd.grad((got * grad_out).sum(), (hidden, weight))
    torch.testing.assert_close(got_h, ref_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_w, ref_w, rtol=1e-5, atol=1e-6)
    if len(masked) == 16:  # all zero: c = 0, nothing to correct, no gradient
        assert rows == [] and got_w.abs().max() == 0
    else:
        assert sum(rows) == len(masked)  # only the masked tokens' logits again, in chunks of at most 4
        assert all(n <= 4 for n in rows)


def test_weights_of_all_different_values_recompute_every_other_token(monkeypatch):
    hidden, weight, target = _inputs(4, 3, 16, 50, seed=6)
    grad_out = torch.linspace(-1.0, 2.0, 12).view(4, 3)
    rows = _counting_backward(monkeypatch)
    got = chunked_loss.linear_cross_entropy(hidden, weight, target, 5)
    got_h, got_w = torch.autograd.grad((got * grad_out).sum(), (hidden, weight))
    ref_h, ref_w = torch.autograd.grad((_reference(hidden, weight, target) * grad_out).sum(), (hidden, weight))
    torch.testing.assert_close(got_h, ref_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_w, ref_w, rtol=1e-5, atol=1e-6)
    assert rows == [5, 5, 1]  # 11 tokens differ from the largest weight


def test_without_autograd_the_forward_computes_no_gradients(monkeypatch):
    hidden, weight, target = _inputs(4, 2, 16, 40, seed=7)
    calls = []
    real = chunked_loss._gradient_chunk
    monkeypatch.setattr(chunked_loss, "_gradient_chunk", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():  # validation
        loss = chunked_loss.linear_cross_entropy(hidden, weight, target, 3)
    assert calls == []
    torch.testing.assert_close(loss, _reference(hidden, weight, target).detach(), rtol=1e-5, atol=1e-5)
    chunked_loss.linear_cross_entropy(hidden, weight, target, 3)
    assert len(calls) == 3  # 8 tokens in chunks of 3


def test_a_second_backward_pass_is_refused():
    hidden, weight, target = _inputs(4, 2, 16, 40, seed=8)
    loss = chunked_loss.linear_cross_entropy(hidden, weight, target, 3).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="ran twice .*loss_chunk_tokens=0"):
        loss.backward()


def test_a_frozen_weight_gets_no_gradient_and_hidden_still_does():
    hidden, weight, target = _inputs(4, 3, 16, 50, seed=1)
    weight.requires_grad_(False)  # LoRA: the output layer is frozen
    loss = chunked_loss.linear_cross_entropy(hidden, weight, target, 5)
    loss.sum().backward()
    assert weight.grad is None
    ref_h, = torch.autograd.grad(_reference(hidden, weight, target).sum(), (hidden,))
    torch.testing.assert_close(hidden.grad, ref_h, rtol=1e-5, atol=1e-6)


def test_bad_chunk_and_mismatched_targets_are_refused():
    hidden, weight, target = _inputs(4, 2, 8, 20, seed=2)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        chunked_loss.linear_cross_entropy(hidden, weight, target, 0)
    with pytest.raises(ValueError, match="8 hidden states but 4 targets"):
        chunked_loss.linear_cross_entropy(hidden, weight, target[:2], 3)
    with pytest.raises(ValueError, match="loss_chunk_tokens must be >= 0"):
        chunked_loss.install(-1)


# ----------------------------------------------------------------------------- inside Megatron's GPTModel

VOCAB, SEQ, BATCH = 301, 12, 2


@pytest.fixture
def tiny_gpt(megatron_tp1, no_cuda_rng):
    """A 2-layer tied GPTModel (local spec, fp32, CPU) and a batch; the chunks off afterwards.

    Learned position embeddings: Megatron's RoPE moves its frequencies to CUDA at the first forward."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.manual_seed(0)
    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=64, use_cpu_initialization=True, masked_softmax_fusion=False,
                            bias_activation_fusion=False, gated_linear_unit=True, normalization="RMSNorm",
                            add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0)
    model = GPTModel(cfg, get_gpt_layer_local_spec(qk_layernorm=False, normalization="RMSNorm"), VOCAB, SEQ,
                     share_embeddings_and_output_weights=True, position_embedding_type="learned_absolute")
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:],
             "position_ids": torch.arange(SEQ).expand(BATCH, SEQ),
             "attention_mask": torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)}
    yield model, batch
    chunked_loss.install(0)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch)
    (loss * torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape)).sum().backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gptmodel_loss_and_gradients_are_megatrons(tiny_gpt, monkeypatch):
    model, batch = tiny_gpt
    calls = []
    real = chunked_loss.linear_cross_entropy
    monkeypatch.setattr(chunked_loss, "linear_cross_entropy", lambda *a: calls.append(a[3]) or real(*a))
    chunked_loss.install(0)
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    assert calls == []  # off: Megatron's own output layer and cross entropy
    assert chunked_loss.install(5)  # 24 tokens in chunks of 5: five chunks, the last one short
    loss, grads = _loss_and_grads(model, batch)
    assert calls == [5]
    assert loss.shape == (BATCH, SEQ)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-6, msg=name)
    assert "forward" not in vars(model.output_layer)  # the output layer is itself again after the call


def test_gptmodel_without_labels_returns_logits_untouched(tiny_gpt):
    model, batch = tiny_gpt
    chunked_loss.install(4)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs)
        chunked_loss.install(0)
        ref = model(**inputs)
    assert logits.shape == (BATCH, SEQ, VOCAB)
    torch.testing.assert_close(logits, ref)


def test_the_patch_is_installed_once():
    from megatron.core.models.gpt.gpt_model import GPTModel

    chunked_loss.install(8)
    first = GPTModel.forward
    chunked_loss.install(16)
    assert GPTModel.forward is first and chunked_loss._CHUNK == 16
    chunked_loss.install(0)
    assert chunked_loss._CHUNK == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 kernels compiled by inductor)")
@pytest.mark.parametrize("weights", ["masked", "random"])
def test_bf16_on_cuda_matches_and_saves_memory(weights):
    hidden, weight, target = _inputs(2048, 4, 896, 151936, seed=4, dtype=torch.bfloat16, device="cuda")
    if weights == "masked":  # NeMo's reduction: 1 / count for counted tokens, 0 for ~3% masked
        keep = torch.rand(2048, 4, device="cuda") > 0.03
        grad_out = keep.float() / keep.sum()
    else:
        grad_out = torch.rand(2048, 4, device="cuda")

    def run(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = fn()
        gh, gw = torch.autograd.grad((loss * grad_out).sum(), (hidden, weight))
        torch.cuda.synchronize()
        return loss.float(), gh.float(), gw.float(), torch.cuda.max_memory_allocated() - base

    ref = run(lambda: _reference(hidden, weight, target))
    got = run(lambda: chunked_loss.linear_cross_entropy(hidden, weight, target, 2048))
    torch.testing.assert_close(got[0], ref[0], rtol=1e-3, atol=1e-3)
    for a, b in zip(got[1:3], ref[1:3]):
        assert (a - b).norm() / b.norm() < 2e-2
    assert got[3] < 0.5 * ref[3], f"peak {got[3] / 2**30:.2f} GiB vs {ref[3] / 2**30:.2f} GiB"
