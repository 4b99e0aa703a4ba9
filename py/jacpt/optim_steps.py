"""Less host work in each optimizer step: Megatron-Core 0.12 counts gradient zeros nobody asked for.

Megatron-Core 0.12's ChainedOptimizer.step counts the zeros of every gradient at every step
(megatron/core/optimizer/optimizer.py:1144, core_v0.12.0 to 0.12.3), whatever `log_num_zeros_in_grad` says;
its single optimizers (:493, :855) and Megatron-Core 0.13's chained one (:1230) count only when it is set.
NeMo's optimizer module always builds a ChainedOptimizer. The count is a count_nonzero, a subtraction and an
add per gradient tensor (~170 for Qwen2.5-0.5B) and a host sync: in a profile of a CPT step on an H100,
~20 ms of host time after the backward pass while the GPU had nothing queued (BENCHMARKS.md).
`fix_zero_count()` makes the chained optimizer count only when one of its optimizers' configs asks, as 0.13
does; NeMo then logs no `num_zeros_in_grad` (it logs it only when it is not None:
nemo/lightning/pytorch/strategies/megatron_strategy.py:764-768). The step itself is unchanged.

It applies inside and outside the container: it is a kit feature, not a compatibility patch.
"""

from __future__ import annotations

import functools

ZERO_COUNT_NOTE = "gradient zeros counted only when log_num_zeros_in_grad is set (Megatron-Core 0.12)"


def zero_count_is_unconditional() -> bool:
    """Whether this Megatron-Core's ChainedOptimizer.step counts zeros whatever the config says (0.12.x)."""
    from megatron.core import package_info
    from packaging.version import Version

    return Version(package_info.__version__).release[:2] == (0, 12)


def fix_zero_count() -> bool:
    """Count gradient zeros in a chained optimizer only when asked, in this process (idempotent).
    Returns whether the fix is in place (False: this Megatron-Core has no such bug)."""
    from megatron.core.optimizer.optimizer import ChainedOptimizer

    orig = ChainedOptimizer.count_zeros
    if getattr(orig, "_jacpt", False):
        return True
    if not zero_count_is_unconditional():
        return False

    @functools.wraps(orig)
    def count_zeros(self):
        if not any(opt.config.log_num_zeros_in_grad for opt in self.chained_optimizers):
            return None
        return orig(self)

    count_zeros._jacpt = True
    ChainedOptimizer.count_zeros = count_zeros
    return True
