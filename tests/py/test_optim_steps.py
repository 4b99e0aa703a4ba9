"""Megatron-Core 0.12's chained optimizer counts gradient zeros only when asked (jacpt/optim_steps.py)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from jacpt import optim_steps  # noqa: E402


def _chained(log_num_zeros_in_grad: bool):
    """A real Megatron-Core ChainedOptimizer over one FP32Optimizer (SGD), one parameter with 2 zero gradients."""
    from megatron.core.optimizer.optimizer import ChainedOptimizer, FP32Optimizer
    from megatron.core.optimizer.optimizer_config import OptimizerConfig

    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.tensor([0.0, 1.0, 0.0, 2.0])
    cfg = OptimizerConfig(optimizer="sgd", lr=0.1, clip_grad=0.0, log_num_zeros_in_grad=log_num_zeros_in_grad)
    return ChainedOptimizer([FP32Optimizer(torch.optim.SGD([p], lr=0.1), cfg, lambda opt, config=None: None)]), p


def test_chained_optimizer_counts_zeros_only_when_asked(megatron_tp1, monkeypatch):
    from megatron.core.optimizer.optimizer import ChainedOptimizer

    from jacpt import nemo_compat

    nemo_compat.apply()  # on the CPU: Megatron-Core's count allocates on "cuda"
    megatron = getattr(ChainedOptimizer.count_zeros, "__wrapped__", ChainedOptimizer.count_zeros)
    monkeypatch.setattr(ChainedOptimizer, "count_zeros", megatron)  # as Megatron-Core 0.12 ships it
    assert optim_steps.zero_count_is_unconditional()
    opt, p = _chained(log_num_zeros_in_grad=False)
    assert opt.step() == (True, pytest.approx(5 ** 0.5), 2.0)  # counted although nobody asked: the bug
    assert optim_steps.fix_zero_count() and optim_steps.fix_zero_count()  # idempotent
    assert ChainedOptimizer.count_zeros.__wrapped__ is megatron
    opt, p = _chained(log_num_zeros_in_grad=False)
    ok, norm, zeros = opt.step()
    assert ok and norm == pytest.approx(5 ** 0.5) and zeros is None  # NeMo then logs no num_zeros_in_grad
    assert torch.allclose(p.data, torch.tensor([1.0, 0.9, 1.0, 0.8]))  # the step itself is unchanged
    opt, _ = _chained(log_num_zeros_in_grad=True)
    assert opt.step()[2] == 2.0  # asked for: counted


def test_zero_count_fix_stays_off_where_megatron_core_has_no_such_bug(monkeypatch):
    from megatron.core import package_info
    from megatron.core.optimizer.optimizer import ChainedOptimizer

    megatron = getattr(ChainedOptimizer.count_zeros, "__wrapped__", ChainedOptimizer.count_zeros)
    monkeypatch.setattr(ChainedOptimizer, "count_zeros", megatron)
    monkeypatch.setattr(package_info, "__version__", "0.13.0")
    assert not optim_steps.zero_count_is_unconditional()
    assert optim_steps.fix_zero_count() is False and ChainedOptimizer.count_zeros is megatron
