"""The bytes of tensors autograd saves for backward on this rank, measured (not RSS, not a model).

`SavedTensorMeter.recording()` installs torch.autograd.graph.saved_tensors_hooks: every tensor an op
saves for its backward passes through `pack`, which records its *storage* (several ops save views of
one storage, e.g. q, k and v of the fused QKV output: counted once, whole) and returns a small handle
holding the tensor; autograd drops the handle when it frees the saved variable (after that node's
backward, or with the graph), and the storage is released from the count when its last handle goes.
So `live_bytes` is what the autograd graphs alive at that moment pin in memory, `peak_bytes` its
maximum since `reset_peak()`: over a training step, pipeline in-flight microbatches and the transient
activations of a recomputation included. Autograd checks a saved tensor's version only when no hooks
are installed, so unpack does it instead: a tensor modified in place between its save and its backward
raises torch's RuntimeError ("... modified by an inplace operation ..."), as it would without the meter.

Not counted: parameters (model state, whatever autograd saves of them; ZeRO-3's gathered copies are
parameters too). Counted apart as host bytes: tensors marked with `mark_host(t)` (activation offload:
checkpointed inputs kept in host memory), whichever device the run uses.

Attribution: `scope(label)` names what runs inside it; each storage counts toward the label active
when it was first saved, in `bytes_by_label` (reset by `reset_labels()`). The labels the training run
uses (the executor's scopes plus `label_layers` on the transformer blocks):

    (microbatch, layer)      what block `layer` (global number) saved in microbatch's forward; under full
                             recomputation the kept input of a checkpointed span counts toward the span's
                             first layer (it is that block's input storage; a host or partitioned copy
                             of it counts there too when made with `derived_from` / mark_host(source=),
                             else as "other")
    (microbatch, "other")    the rest of a chunk's forward: embedding, final norm, output layer, loss
    ("recompute", layer)     saved during backward by the recomputation of block `layer` (full: the
                             block's forward re-run; selective: its core attention / activation), all
                             microbatches summed; transient, each released by that block's backward
    ("recompute", "other")   anything else saved during a backward
"""

from __future__ import annotations

import contextlib
import weakref
from collections import defaultdict
from typing import Hashable, Iterator, Mapping

import torch
from torch import nn

_HOST_MARK = "_megazero_host_activation"
_SOURCE = "_megazero_activation_source"  # storage key of the tensor a kept copy was made from
RECOMPUTE = "recompute"  # first element of the labels of what backward saves


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device.type, t.device.index, t.untyped_storage().data_ptr())


def mark_host(t: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
    """Declare `t` an activation kept in host memory (offload): the meter counts it as host bytes
    (attributed as `source`'s storage would be, when given: see derived_from)."""
    setattr(t, _HOST_MARK, True)
    return t if source is None else derived_from(t, source)


def derived_from(t: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Declare `t` a kept copy (or slice) of `source`: a checkpoint keeping it instead of a block's input
    gets the bytes attributed to that block's label."""
    setattr(t, _SOURCE, _storage_key(source))
    return t


def _is_parameter(t: torch.Tensor) -> bool:
    return isinstance(t, nn.Parameter) or isinstance(getattr(t, "_base", None), nn.Parameter)


def _modified_message(t: torch.Tensor, saved_version: int) -> str:
    """torch's own error for a saved tensor changed in place before its backward (SavedVariable::unpack),
    less the grad_fn it names (an unpack hook does not see it)."""
    hint = ("" if torch.is_anomaly_enabled() else
            " Hint: enable anomaly detection to find the operation that failed to compute its gradient, "
            "with torch.autograd.set_detect_anomaly(True).")
    return ("one of the variables needed for gradient computation has been modified by an inplace operation: "
            f"[{t.type()} {list(t.shape)}] is at version {t._version}; expected version {saved_version} instead."
            + hint)


class _Packed:
    """What autograd holds instead of a saved tensor while the meter records; its deletion releases it.
    `version`: the tensor's version counter when saved (autograd checks it at unpack only without hooks,
    so the meter does, as autograd would)."""

    __slots__ = ("tensor", "version", "key", "meter")

    def __init__(self, tensor: torch.Tensor, key, meter: "SavedTensorMeter"):
        self.tensor, self.version, self.key, self.meter = tensor, tensor._version, key, meter

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
        self._outer_labels: list = []  # label_layers: the labels a block's forward pre-hook replaced
        # storage key -> (weak ref to a block's input, that block's label): a full-recomputation checkpoint
        # saves its span's input after the span's blocks ran, outside their scope (label_layers)
        self._block_inputs: dict[tuple, tuple[weakref.ref, Hashable]] = {}

    # ----- hooks ----------------------------------------------------------------------------------
    def _pack(self, t: torch.Tensor):
        if _is_parameter(t):
            return _Packed(t, None, self)
        storage = t.untyped_storage()
        key = (t.device.type, t.device.index, storage.data_ptr())  # _storage_key, inlined (every save)
        if key in self._refs:
            self._refs[key] += 1
        else:
            nbytes = storage.nbytes()
            self._refs[key], self._size[key] = 1, nbytes
            label = self.label
            if self._block_inputs:
                source = getattr(t, _SOURCE, key)
                entry = self._block_inputs.get(source)
                x = entry[0]() if entry is not None else None
                if x is not None and x.untyped_storage().data_ptr() == source[2]:  # still that tensor's storage
                    label = entry[1]
            if getattr(t, _HOST_MARK, False):
                self._host.add(key)
                self.host_live_bytes += nbytes
                self.host_peak_bytes = max(self.host_peak_bytes, self.host_live_bytes)
            else:
                self.live_bytes += nbytes
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            self.bytes_by_label[label] += nbytes
        return _Packed(t, key, self)

    @staticmethod
    def _unpack(packed: _Packed) -> torch.Tensor:
        t = packed.tensor
        if t._version != packed.version:  # modified in place since saved: its backward would be wrong
            raise RuntimeError(_modified_message(t, packed.version))
        return t

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
        self._outer_labels.clear()
        self._block_inputs.clear()

    def label_layers(self, layers: Mapping[int, nn.Module]) -> list:
        """Attribute what each block saves to (microbatch, layer) inside a (microbatch, ...) scope and to
        ("recompute", layer) inside a ("recompute", ...) one (module forward pre/post hooks; a gradient
        hook on the block's output names the layer whose backward runs, for selective recomputation,
        which re-runs only parts of a block). Outside any scope (evaluation) the hooks do nothing.
        Returns the hook handles."""
        handles = []
        for layer, block in layers.items():
            handles.append(block.register_forward_pre_hook(self._enter_layer_hook(layer)))
            handles.append(block.register_forward_hook(self._leave_layer_hook(layer)))
        return handles

    def _enter_layer_hook(self, layer: int):
        def enter(module, args):
            outer = self.label
            self._outer_labels.append(outer)
            if isinstance(outer, tuple):
                self.label = (RECOMPUTE if outer[0] == RECOMPUTE else outer[0], layer)
                x = args[0] if args else None
                if isinstance(x, torch.Tensor) and outer[0] != RECOMPUTE:
                    self._block_inputs[_storage_key(x)] = (weakref.ref(x), self.label)
        return enter

    def _leave_layer_hook(self, layer: int):
        recompute_label = (RECOMPUTE, layer)

        def name_backward(grad):
            self.label = recompute_label  # block `layer`'s backward starts: its gradient arrived

        def leave(module, args, output):
            self.label = self._outer_labels.pop() if self._outer_labels else None
            if (isinstance(self.label, tuple) and self.label[0] != RECOMPUTE
                    and isinstance(output, torch.Tensor) and output.requires_grad):
                output.register_hook(name_backward)
        return leave
