"""Named RNG streams.

Dropout must be *identical* across TP ranks where activations are replicated (hidden dropout after a
row-parallel layer: every TP rank holds the same tensor) and *distinct* where activations are sharded
(attention-probability dropout: each TP rank holds different heads). torch's dropout draws from the
device's global generator, so each stream is a saved generator state that `fork(name)` swaps in and
out around the region, like Megatron's CUDA RNG tracker but explicit (no module-level tracker).

Streams:
- "default": seeded identically on every TP rank (and DP rank) of a pipeline stage; offset per
  pipeline stage so different layers do not reuse one mask sequence.
- "tensor-parallel": seeded distinctly per TP rank, for dropout on sharded activations.

The whole object is checkpointable (state_dict / load_state_dict).

Recomputation (activation/recompute.py) replays a region's random draws: `snapshot()` before the
region records the live generator (the ambient stream, or the forked stream when taken inside a fork)
and every named stream; `replay(snap)` runs the recomputation from those states and afterwards puts
the generator, every stream and the active fork back as they were, so the draws of code running
between the forward and the recomputation (later layers, other microbatches) are untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch

# Offsets as in Megatron (seed + 2718 + tp_rank for the model-parallel stream) so seeds are familiar.
_TP_STREAM_OFFSET = 2718
_PP_STAGE_OFFSET = 100


@dataclasses.dataclass(frozen=True)
class RNGSnapshot:
    generator: torch.Tensor  # the device generator's state (whichever stream was live)
    streams: dict[str, torch.Tensor]  # name -> saved state of each stream not live
    active: str | None  # the fork in force, if any


class RNGStreams:
    def __init__(self, seed: int, tp_rank: int, pp_rank: int, device: torch.device):
        self.device = device
        self._states: dict[str, torch.Tensor] = {}
        base = seed + _PP_STAGE_OFFSET * pp_rank
        self._states["default"] = self._fresh_state(base)
        self._states["tensor-parallel"] = self._fresh_state(base + _TP_STREAM_OFFSET + tp_rank)
        # The ambient generator follows the default stream, so code outside any fork() is reproducible.
        self._set_state(self._states["default"])
        self._active: str | None = None

    def _get_state(self) -> torch.Tensor:
        if self.device.type == "cuda":
            return torch.cuda.get_rng_state(self.device)
        return torch.get_rng_state()

    def _set_state(self, state: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    def _fresh_state(self, seed: int) -> torch.Tensor:
        saved = self._get_state()
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        fresh = self._get_state()
        self._set_state(saved)
        return fresh

    @contextlib.contextmanager
    def fork(self, name: str) -> Iterator[None]:
        """Draw random numbers from stream `name` inside the block; the ambient stream is restored after."""
        assert name in self._states, f"unknown RNG stream {name!r}"
        assert self._active is None, "RNG stream forks do not nest"
        ambient = self._get_state()
        self._set_state(self._states[name])
        self._active = name
        try:
            yield
        finally:
            self._states[name] = self._get_state()
            self._set_state(ambient)
            self._active = None

    def snapshot(self) -> "RNGSnapshot":
        """The live generator state (the active fork's stream inside a fork) and every named stream."""
        return RNGSnapshot(self._get_state(), dict(self._states), self._active)  # states are never mutated

    @contextlib.contextmanager
    def replay(self, snap: "RNGSnapshot") -> Iterator[None]:
        """Run the block with the generator, the streams and the active fork as at `snap`; restore after."""
        now = RNGSnapshot(self._get_state(), self._states, self._active)
        self._set_state(snap.generator)
        self._states, self._active = dict(snap.streams), snap.active  # forks inside write to the copy
        try:
            yield
        finally:
            self._set_state(now.generator)
            self._states, self._active = now.streams, now.active

    def state_dict(self) -> dict:
        return {"streams": {k: v.clone() for k, v in self._states.items()}, "ambient": self._get_state().clone()}

    def load_state_dict(self, state: dict) -> None:
        self._states = {k: v.clone() for k, v in state["streams"].items()}
        self._set_state(state["ambient"])
