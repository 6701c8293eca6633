"""The bytes of tensors autograd saves for backward on this rank, measured (not RSS, not a model).

`SavedTensorMeter.recording()` installs torch.autograd.graph.saved_tensors_hooks: every tensor an op
saves for its backward passes through `pack`, which records its *storage* (several ops save views of
one storage, e.g. q, k and v of the fused QKV output: counted once, whole) and returns a small handle
holding the tensor; autograd drops the handle when it frees the saved variable (after that node's
backward, or with the graph), and the storage is released from the count when its last handle goes.
So `live_bytes` is what the autograd graphs alive at that moment pin in memory, `peak_bytes` its
maximum since `reset_peak()`: over a training step, pipeline in-flight microbatches and the transient
activations of a recomputation included.

Not counted: parameters (model state, whatever autograd saves of them; ZeRO-3's gathered copies are
parameters too). Counted apart as host bytes: tensors marked with `mark_host(t)` (activation offload:
checkpointed inputs kept in host memory), whichever device the run uses.

Attribution: `scope(label)` names what runs inside it (the trainer: microbatch, layer); each storage
counts toward the label active when it was first saved, in `bytes_by_label` (reset by `reset_labels()`).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Hashable, Iterator

import torch
from torch import nn

_HOST_MARK = "_megazero_host_activation"


def mark_host(t: torch.Tensor) -> torch.Tensor:
    """Declare `t` an activation kept in host memory (offload): the meter counts it as host bytes."""
    setattr(t, _HOST_MARK, True)
    return t


def _is_parameter(t: torch.Tensor) -> bool:
    return isinstance(t, nn.Parameter) or isinstance(getattr(t, "_base", None), nn.Parameter)


class _Packed:
    """What autograd holds instead of a saved tensor while the meter records; its deletion releases it."""

    __slots__ = ("tensor", "key", "meter")

    def __init__(self, tensor: torch.Tensor, key, meter: "SavedTensorMeter"):
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self):
        if self.key is not None:
            self.meter._release(self.key)


class SavedTensorMeter:
    def __init__(self):
        self._refs: dict[tuple, int] = {}  # storage key -> handles alive
        self._size: dict[tuple, int] = {}  # storage key -> bytes
        self._host: set[tuple] = set()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.host_live_bytes = 0
        self.host_peak_bytes = 0
        self.label: Hashable | None = None
        self.bytes_by_label: dict[Hashable, int] = defaultdict(int)

    # ----- hooks ----------------------------------------------------------------------------------
    def _pack(self, t: torch.Tensor):
        if _is_parameter(t):
            return _Packed(t, None, self)
        storage = t.untyped_storage()
        key = (t.device.type, t.device.index, storage.data_ptr())
        if key in self._refs:
            self._refs[key] += 1
        else:
            nbytes = storage.nbytes()
            self._refs[key], self._size[key] = 1, nbytes
            if getattr(t, _HOST_MARK, False):
                self._host.add(key)
                self.host_live_bytes += nbytes
                self.host_peak_bytes = max(self.host_peak_bytes, self.host_live_bytes)
            else:
                self.live_bytes += nbytes
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            self.bytes_by_label[self.label] += nbytes
        return _Packed(t, key, self)

    @staticmethod
    def _unpack(packed: _Packed) -> torch.Tensor:
        return packed.tensor

    def _release(self, key) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            nbytes = self._size.pop(key)
            if key in self._host:
                self._host.discard(key)
                self.host_live_bytes -= nbytes
            else:
                self.live_bytes -= nbytes

    # ----- use ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def recording(self) -> Iterator["SavedTensorMeter"]:
        """Count every tensor saved for backward inside the block (and their release, whenever it happens)."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self

    @contextlib.contextmanager
    def scope(self, label: Hashable) -> Iterator[None]:
        """Attribute the storages first saved inside the block to `label` (bytes_by_label)."""
        previous, self.label = self.label, label
        try:
            yield
        finally:
            self.label = previous

    def reset_peak(self) -> None:
        self.peak_bytes, self.host_peak_bytes = self.live_bytes, self.host_live_bytes

    def reset_labels(self) -> None:
        self.bytes_by_label = defaultdict(int)
