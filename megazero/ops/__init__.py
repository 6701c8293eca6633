"""Fusable ops: one dispatch API over the fused CUDA kernels (megatron_kernels/) and their pure-PyTorch
reference (reference.py, the numeric spec). See dispatch.py and docs/kernels.md."""

from megazero.ops import reference
from megazero.ops.dispatch import (
    dispatch_paths,
    layer_norm,
    reset_dispatch_log,
    rms_norm,
    scaled_causal_softmax,
    scaled_masked_softmax,
    set_dispatch_callback,
)

__all__ = [
    "dispatch_paths",
    "layer_norm",
    "reference",
    "reset_dispatch_log",
    "rms_norm",
    "scaled_causal_softmax",
    "scaled_masked_softmax",
    "set_dispatch_callback",
]
