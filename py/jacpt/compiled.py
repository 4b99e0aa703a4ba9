"""The kit's fused elementwise kernels (jacpt/chunked_loss.py, jacpt/swiglu.py): torch.compile on CUDA, eager
elsewhere, where no compiler is needed and the same arithmetic runs op by op."""

from __future__ import annotations

import functools


@functools.cache
def on(device_type: str, fn):
    """`fn` compiled for a CUDA device, once per function for the process; `fn` itself elsewhere."""
    if device_type != "cuda":
        return fn
    import torch

    return torch.compile(fn)
