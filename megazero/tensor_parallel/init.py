"""Layout-invariant parameter initialisation (DESIGN.md principle 4).

Each parameter carries an init function (`set_init`) that draws the *global, unpadded* tensor from a
generator seeded by (seed, parameter name). Every rank draws the full tensor and keeps its slice, so
the weights of the whole model depend only on seed + config + names, never on tp/pp/dp. Names are
global (layer numbers are global layer indices, see model/gpt.py), so a pipeline stage holding layers
5-8 draws exactly what a single process draws for layers 5-8.

Cost: each rank materialises each full parameter once at start-up (like Megatron's
--use-cpu-initialization). For models too large for that, a later issue can draw only the slice.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch

from megazero.tensor_parallel.sharding import get_shard_spec

InitFn = Callable[[tuple[int, ...], torch.Generator], torch.Tensor]
_ATTR = "megazero_init"


def normal_init(std: float) -> InitFn:
    def init(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float32).mul_(std)

    return init


def constant_init(value: float) -> InitFn:
    def init(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        return torch.full(shape, float(value), dtype=torch.float32)

    return init


def set_init(param: torch.Tensor, fn: InitFn) -> None:
    setattr(param, _ATTR, fn)


def derive_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def initialize_parameters(module: torch.nn.Module, seed: int) -> None:
    """Fill every parameter of `module` from its init function, keyed by its (global) name."""
    for name, param in module.named_parameters():
        fn: InitFn | None = getattr(param, _ATTR, None)
        assert fn is not None, f"parameter {name} has no init function (use set_init)"
        spec = get_shard_spec(param)
        logical = list(spec.global_shape)
        if spec.tp_dim is not None and spec.logical_size is not None:
            logical[spec.tp_dim] = spec.logical_size
        full = fn(tuple(logical), torch.Generator().manual_seed(derive_seed(seed, name)))
        if tuple(logical) != spec.global_shape:  # zero padding rows (vocab padding), never trained
            padded = torch.zeros(spec.global_shape, dtype=full.dtype)
            padded.narrow(spec.tp_dim, 0, spec.logical_size).copy_(full)
            full = padded
        param.copy_(spec.local_slice(full).to(param.dtype))
