"""Per-rank memory accounting of a training run: what --log-memory prints and summary.json's `memory`.

Three measured quantities per rank:
  activation bytes   tensors autograd saves for backward (SavedTensorMeter), peak over one training
                     step: the pipeline's in-flight microbatches and recomputation transients included;
                     host bytes (offloaded activations) apart
  model-state bytes  ZeroEngine.memory_bytes() on the device: params + grads + optimizer (host / NVMe
                     optimizer state not included)
  peak bytes         torch.cuda.max_memory_allocated on CUDA, else the process's peak RSS (all memory,
                     Python and the data loader included: an upper bound, not an activation measure)

The meter records only the steps these numbers come from (its saved-tensor hooks cost ~10-20% of a
tiny, launch-bound step): the first training step a Trainer runs (a resumed run's first step too) and,
with --log-memory, every step it logs; `record_every_step` forces all. Activations are a function of the
layout (shapes, dtypes, schedule, recomputation), not of the data or the step: every step saves the same
bytes, so the first step's peak is the run's, and summary.json's activation_bytes (the max over the
recorded steps) stands for every step. Evaluation runs without grad and saves nothing. Per-label bytes
(saved_tensors.py: (microbatch, layer), (microbatch, "other"), ("recompute", layer)) are reset every
recorded step; `logged_labels` keeps those of the last step --log-memory printed.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from typing import Iterator

import torch

from megazero import comm
from megazero.activation.saved_tensors import RECOMPUTE, SavedTensorMeter
from megazero.topology import Topology, rank_to_coords

STATE_PARTS = ("params", "grads", "optimizer")  # ZeroEngine.memory_bytes() keys held on the device


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def process_peak_bytes(device: torch.device) -> int:
    """CUDA max allocated on a CUDA device, else peak RSS (ru_maxrss: KiB on Linux, bytes on macOS)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def describe_labels(labels: dict) -> str:
    """One line from a step's bytes_by_label: microbatch 0's bytes per layer (equal across
    microbatches), each microbatch's total, and what recomputation saved per layer (if any)."""
    layers = sorted((k[1], v) for k, v in labels.items() if k[0] == 0 and isinstance(k[1], int))
    other = labels.get((0, "other"), 0)
    totals: dict[int, int] = {}
    recomputed: dict = {}
    for key, v in labels.items():
        if isinstance(key, tuple) and isinstance(key[0], int):
            totals[key[0]] = totals.get(key[0], 0) + v
        elif isinstance(key, tuple) and key[0] == RECOMPUTE:
            recomputed[key[1]] = recomputed.get(key[1], 0) + v
    text = ("microbatch 0 per layer: " + " | ".join([f"{layer}: {format_bytes(v)}" for layer, v in layers]
                                                     + [f"other: {format_bytes(other)}"])
            + "; per microbatch: " + " ".join(format_bytes(totals[mb]) for mb in sorted(totals)))
    if recomputed:
        text += "; saved by recomputation (all microbatches): " + " | ".join(
            f"{k}: {format_bytes(v)}" for k, v in sorted(recomputed.items(), key=lambda kv: str(kv[0])))
    return text


class MemoryAccounting:
    """The trainer's memory bookkeeping. `chunks`: this rank's model chunks (GPTModel: `.layers` keyed
    by global layer number), whose blocks the meter labels."""

    def __init__(self, chunks, zero, topo: Topology, device: torch.device):
        self.zero, self.topo, self.device = zero, topo, device
        self.meter = SavedTensorMeter()
        self.layers = {int(k): blk for c in chunks for k, blk in getattr(c, "layers", {}).items()}
        self.activation_bytes = 0  # max over the recorded steps of the per-step peak
        self.activation_host_bytes = 0
        self.logged_labels: dict = {}
        self.record_every_step = False  # benches / tests measuring every step; the trainer records only some
        self.recorded_iterations: list[int] = []

    def records(self, logged: bool) -> bool:
        """Whether the next training step runs with the meter: the first one, one --log-memory reports
        (`logged`), or every one with record_every_step."""
        return self.record_every_step or logged or not self.recorded_iterations

    @contextlib.contextmanager
    def recording(self, iteration: int, executor) -> Iterator[None]:
        """Record training step `iteration` (the schedule `executor` runs inside the block): peak and
        per-label bytes from zero, the executor's microbatch scopes and the blocks' layer labels on (hooks
        present only while recording), the step's peaks folded into the run's maxima afterwards."""
        self.meter.reset_peak()
        self.meter.reset_labels()
        handles = self.meter.label_layers(self.layers)
        executor.meter = self.meter
        try:
            with self.meter.recording():
                yield
        finally:
            executor.meter = None
            for handle in handles:
                handle.remove()
        self.activation_bytes = max(self.activation_bytes, self.meter.peak_bytes)
        self.activation_host_bytes = max(self.activation_host_bytes, self.meter.host_peak_bytes)
        self.recorded_iterations.append(iteration)

    def model_state_bytes(self) -> int:
        parts = self.zero.memory_bytes()
        return sum(parts[k] for k in STATE_PARTS)

    def step_fields(self) -> tuple[dict[str, float], str]:
        """--log-memory for the step just run: this rank's scalars (memory/...-bytes) and its activation
        line; keeps the step's per-label bytes as `logged_labels`."""
        self.logged_labels = dict(self.meter.bytes_by_label)
        scalars = {f"memory/{k}-bytes": float(v) for k, v in self.zero.memory_bytes().items()}
        scalars["memory/activation-peak-bytes"] = float(self.meter.peak_bytes)
        if self.meter.host_peak_bytes:
            scalars["memory/activation-host-peak-bytes"] = float(self.meter.host_peak_bytes)
        host = f" (+{format_bytes(self.meter.host_peak_bytes)} host)" if self.meter.host_peak_bytes else ""
        line = (f"activations saved for backward: peak {format_bytes(self.meter.peak_bytes)}{host} over the "
                f"step; {describe_labels(self.logged_labels)}")
        return scalars, line

    def summary(self) -> dict:
        """summary.json's `memory`: the max over ranks of each value, and `per_rank`. Collective over the
        world group: every rank calls it."""
        mine = {"activation_bytes": self.activation_bytes, "activation_host_bytes": self.activation_host_bytes,
                "model_state_bytes": self.model_state_bytes(), "peak_bytes": process_peak_bytes(self.device)}
        everyone = comm.all_gather_object(mine, self.topo.world_group)
        per_rank = [{"rank": r, "pp": c.pp, "dp": c.dp, "tp": c.tp, **d}
                    for r, d in enumerate(everyone) for c in [rank_to_coords(r, self.topo.shape)]]
        return {**{k: max(d[k] for d in everyone) for k in mine}, "per_rank": per_rank}
