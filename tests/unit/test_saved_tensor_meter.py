"""SavedTensorMeter (megazero/activation/saved_tensors.py) on plain modules, one process: exact bytes of
known saved tensors, storages counted once, parameters never, release by backward, peak, host bytes,
the (microbatch, layer) / ("recompute", layer) labels of label_layers, and autograd's in-place
modification check kept while the meter records."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from megazero.activation.saved_tensors import SavedTensorMeter, mark_host

B, H, F4 = 4, 8, 32  # batch rows, hidden, hidden * 4
FP32 = 4


def mlp_chain(x, fc1, fc2):
    """linear -> gelu -> linear: saves x [B, H] (for fc1's weight grad), fc1's output [B, F4] (gelu's
    input) and gelu's output [B, F4] (fc2's input); the weights are parameters and not counted."""
    return fc2(F.gelu(fc1(x)))


def test_linear_gelu_chain_exact_bytes_and_release():
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(H, F4), nn.Linear(F4, H)
    x = torch.randn(B, H, requires_grad=True)
    meter = SavedTensorMeter()
    with meter.recording():
        y = mlp_chain(x, fc1, fc2)
    expected = FP32 * (B * H + 2 * B * F4)
    assert meter.live_bytes == meter.peak_bytes == expected
    y.sum().backward()
    assert meter.live_bytes == 0 and meter.peak_bytes == expected  # every saved variable freed by backward
    assert fc1.weight.grad is not None


def test_views_of_one_storage_count_once_whole():
    """q, k, v chunks of one fused [B, 3H] output: q * k saves q and k, (q * k) * v saves the product
    and v: the fused storage once (all 3H columns), plus the [B, H] product and the layer's input."""
    qkv = nn.Linear(H, 3 * H)
    meter = SavedTensorMeter()
    with meter.recording():
        q, k, v = qkv(torch.randn(B, H)).chunk(3, dim=-1)
        out = (q * k) * v
    assert meter.live_bytes == FP32 * (B * H + B * 3 * H + B * H)  # x (for qkv.weight's grad), qkv, q * k
    out.sum().backward()
    assert meter.live_bytes == 0


def test_parameters_are_not_counted():
    w = nn.Parameter(torch.randn(H, H))
    meter = SavedTensorMeter()
    with meter.recording():
        y = (w * w.t()).sum()  # saves w and a view of w: parameters, model state
    assert meter.live_bytes == meter.peak_bytes == 0
    y.backward()


@pytest.mark.parametrize("recording", [False, True], ids=["autograd", "meter"])
def test_a_saved_tensor_modified_in_place_is_refused_as_autograd_does(recording):
    """sin saves its input y; y.add_(1) before backward would make the gradient cos(y + 1): autograd refuses
    (its version check), and so must the meter, whose hooks take that check away from autograd."""
    meter = SavedTensorMeter()
    x = torch.randn(3, 2, requires_grad=True)
    with meter.recording() if recording else contextlib.nullcontext():
        y = x * 2
        z = y.sin()
    y.add_(1)
    with pytest.raises(RuntimeError, match=r"modified by an inplace operation: \[torch\.FloatTensor \[3, 2\]\]"
                                           r".* is at version 1; expected version 0 instead\.") as e:
        z.sum().backward()
    assert "\n" not in str(e.value)
    # unmodified, the same computation runs through the meter unchanged
    with meter.recording():
        y = x * 2
        z = y.sin()
    z.sum().backward()
    assert torch.equal(x.grad, 2 * torch.cos(x.detach() * 2))


def test_peak_over_in_flight_microbatches_and_reset():
    fc1, fc2 = nn.Linear(H, F4), nn.Linear(F4, H)
    per_mb = FP32 * (B * H + 2 * B * F4)
    meter = SavedTensorMeter()
    with meter.recording():
        outs = [mlp_chain(torch.randn(B, H), fc1, fc2) for _ in range(3)]  # 3 in flight, as a first stage
        assert meter.live_bytes == 3 * per_mb
        outs.pop(0).sum().backward()
        assert meter.live_bytes == 2 * per_mb and meter.peak_bytes == 3 * per_mb
        meter.reset_peak()  # a new step starts from what is live
        assert meter.peak_bytes == 2 * per_mb
        for o in outs:
            o.sum().backward()
    assert meter.live_bytes == 0 and meter.peak_bytes == 2 * per_mb


def test_host_marked_tensors_count_apart():
    class KeepOnHost(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(mark_host(x.detach().clone()))
            return x * 2

        @staticmethod
        def backward(ctx, g):
            (kept,) = ctx.saved_tensors
            return g * 2 + 0 * kept

    meter = SavedTensorMeter()
    with meter.recording():
        y = KeepOnHost.apply(torch.randn(B, H, requires_grad=True))
    assert (meter.live_bytes, meter.host_live_bytes, meter.host_peak_bytes) == (0, FP32 * B * H, FP32 * B * H)
    y.sum().backward()
    assert meter.host_live_bytes == 0


class Block(nn.Module):
    """x + fc2(gelu(fc1(x))): fc1 saves x [B, H], gelu its input h [B, F4], fc2 gelu's output [B, F4]
    (the add saves nothing); `selective` checkpoints fc2(gelu(.)) (keeps only h; the recomputation in
    backward saves gelu's output again)."""

    def __init__(self, selective=False):
        super().__init__()
        self.fc1, self.fc2, self.selective = nn.Linear(H, F4), nn.Linear(F4, H), selective

    def forward(self, x):
        h = self.fc1(x)
        tail = lambda h: self.fc2(F.gelu(h))  # noqa: E731
        return x + (torch_checkpoint(tail, h, use_reentrant=True) if self.selective else tail(h))


class Chunk(nn.Module):
    """A pipeline chunk as GPTModel lays it out: `.layers` keyed by global layer number (3 and 4), an
    "other" part after the blocks (a final gelu, saving its [B, H] input); `full` runs both blocks as
    one checkpointed span (keeps only the span's input)."""

    def __init__(self, selective=False, full=False):
        super().__init__()
        self.layers = nn.ModuleDict({str(i): Block(selective) for i in (3, 4)})
        self.full = full

    def forward(self, x):
        def run(h):
            for block in self.layers.values():
                h = block(h)
            return h
        x = torch_checkpoint(run, x, use_reentrant=True) if self.full else run(x)
        return F.gelu(x)


def run_two_microbatches(chunk):
    """What the executor does for 2 microbatches: forward scopes (mb, "other"), backward scopes
    ("recompute", "other"), the meter recording around all of it."""
    meter = SavedTensorMeter()
    meter.label_layers({int(k): b for k, b in chunk.layers.items()})
    outs = []
    with meter.recording():
        for mb in range(2):
            with meter.scope((mb, "other")):
                outs.append(chunk(torch.randn(B, H, requires_grad=True)))
        for out in outs:
            with meter.scope(("recompute", "other")):
                out.sum().backward()
    assert meter.live_bytes == 0 and meter.label is None
    return meter


def test_labels_per_microbatch_and_layer():
    meter = run_two_microbatches(Chunk())
    block = FP32 * (B * H + 2 * B * F4)
    assert dict(meter.bytes_by_label) == {(mb, k): v for mb in range(2)
                                          for k, v in ((3, block), (4, block), ("other", FP32 * B * H))}
    assert meter.peak_bytes == 2 * (2 * block + FP32 * B * H)  # both microbatches in flight


def test_labels_under_selective_recomputation():
    """Per layer and microbatch the forward keeps x and h; in backward the recomputation of fc2(gelu(h))
    (no module hook fires: only part of the block re-runs) saves gelu's output, named by the gradient
    hook on the block's output: ("recompute", layer), both microbatches summed, one alive at a time."""
    meter = run_two_microbatches(Chunk(selective=True))
    kept = FP32 * (B * H + B * F4)  # x, h
    assert dict(meter.bytes_by_label) == {
        **{(mb, k): v for mb in range(2) for k, v in ((3, kept), (4, kept), ("other", FP32 * B * H))},
        ("recompute", 3): 2 * FP32 * B * F4, ("recompute", 4): 2 * FP32 * B * F4}
    # both microbatches' forward, then the first backward's recomputation (its final gelu input freed)
    assert meter.peak_bytes == 2 * (2 * kept + FP32 * B * H) - FP32 * B * H + FP32 * B * F4


def test_labels_under_full_recomputation():
    """One checkpointed span of layers 3 and 4: the forward keeps only the span's input, counted toward
    layer 3 (the span's first block); the recomputation saves each block's tensors again in backward,
    under ("recompute", layer), summed over the microbatches, one microbatch alive at a time."""
    meter = run_two_microbatches(Chunk(full=True))
    block = FP32 * (B * H + 2 * B * F4)
    assert dict(meter.bytes_by_label) == {
        (0, 3): FP32 * B * H, (1, 3): FP32 * B * H, (0, "other"): FP32 * B * H, (1, "other"): FP32 * B * H,
        ("recompute", 3): 2 * (block - FP32 * B * H), ("recompute", 4): 2 * block}  # 3's input is the kept one
    # 2 x (span input + final gelu input) in flight; the first backward frees its gelu input, recomputes
    assert meter.peak_bytes == 4 * FP32 * B * H - FP32 * B * H + (block - FP32 * B * H) + block


class _KeepOnHostCheckpoint(torch.autograd.Function):
    """A full-recomputation checkpoint keeping a host copy of its input made with mark_host(source=)."""

    @staticmethod
    def forward(ctx, fn, x):
        with torch.no_grad():
            out = fn(x)
        ctx.save_for_backward(mark_host(x.detach().clone(), source=x))
        ctx.fn = fn
        return out

    @staticmethod
    def backward(ctx, g):
        (kept,) = ctx.saved_tensors
        x = kept.detach().requires_grad_()
        with torch.enable_grad():
            out = ctx.fn(x)
        torch.autograd.backward(out, g)
        return None, x.grad


def test_a_kept_host_copy_counts_toward_its_source_block():
    chunk = Chunk()
    meter = SavedTensorMeter()
    meter.label_layers({int(k): b for k, b in chunk.layers.items()})
    with meter.recording(), meter.scope((0, "other")):
        out = _KeepOnHostCheckpoint.apply(lambda h: chunk.layers["4"](chunk.layers["3"](h)),
                                          torch.randn(B, H, requires_grad=True))
    assert dict(meter.bytes_by_label) == {(0, 3): FP32 * B * H}
    assert (meter.live_bytes, meter.host_live_bytes) == (0, FP32 * B * H)
    out.sum().backward()
    assert meter.host_live_bytes == 0
