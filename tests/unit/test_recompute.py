"""Recomputation (megazero/activation/recompute.py) is exact: outputs, input grads, parameter grads and
the RNG streams after backward are bitwise those of the same computation without it (fp32, CPU), with
dropout drawn from the ambient generator, from a forked stream and inside a fork; the kept inputs are
the only saved tensors (device bytes, or host bytes under offload), partitioned across 2 gloo ranks or
offloaded without changing a bit (a chunk's received input kept as it is); ZeRO-3 keeps a recomputed
block gathered for its backward; recompute_spans on a later chunk's layer ids; ActivationConfig's
start-up phrase; a second backward through a retained graph is refused.
"""

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megazero.activation import input_storage, recompute
from megazero.activation.saved_tensors import SavedTensorMeter
from megazero.config import ActivationConfig, ModelConfig
from megazero.model import GPTModel
from megazero.random import RNGStreams
from megazero.tensor_parallel.init import initialize_parameters
from tests.dist_utils import run_distributed

CPU = torch.device("cpu")
LLAMA = dict(normalization="RMSNorm", position_embedding_type="rope", swiglu=True, add_bias_linear=False,
             group_query_attention=True, num_query_groups=2, untie_embeddings_and_output_weights=True)
FULL = ActivationConfig(recompute_granularity="full")


def _tiny_fn(lin: torch.nn.Linear, rng: RNGStreams, draw: str):
    """x [4, 8] -> dropout(tanh(lin(x))) * y, the dropout drawn from the ambient generator or a fork."""
    def fn(x, y):
        h = torch.tanh(lin(x))
        if draw == "forked stream":
            with rng.fork("tensor-parallel"):
                h = F.dropout(h, 0.3)
        else:
            h = F.dropout(h, 0.3)
        return h * y
    return fn


def _tiny_run(draw: str, use_checkpoint: bool):
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8)
    x, y = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    rng = RNGStreams(3, 0, 0, CPU)
    fn = _tiny_fn(lin, rng, draw)
    run = (lambda *a: recompute.checkpoint(fn, *a, rng=rng)) if use_checkpoint else fn
    if draw == "inside a fork":  # as the selective core attention: the live stream is the forked one
        with rng.fork("tensor-parallel"):
            out = run(x, y)
    else:
        out = run(x, y)
    between = torch.rand(3)  # draws between forward and backward must not see the recomputation
    out.pow(2).sum().backward()
    after = (torch.rand(3), rng.state_dict())
    return out.detach(), x.grad, y.grad, lin.weight.grad, lin.bias.grad, between, after


def _assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _assert_same(u, v)
    else:
        assert torch.equal(a, b)


@pytest.mark.parametrize("draw", ["ambient", "forked stream", "inside a fork"])
def test_checkpoint_is_bitwise_the_plain_computation(draw):
    _assert_same(_tiny_run(draw, True), _tiny_run(draw, False))


def test_checkpoint_without_grad_is_the_function():
    calls = []
    x = torch.randn(3, requires_grad=True)
    with torch.no_grad():
        recompute.checkpoint(lambda t: calls.append(1) or t * 2, x, rng=None)
    out = recompute.checkpoint(lambda t: calls.append(1) or t * 2, torch.randn(3), rng=None)
    assert calls == [1, 1] and out.grad_fn is None


def _gpt(tp_group, activation: ActivationConfig, parts: dict, dropout: float, **kw) -> GPTModel:
    cfg = ModelConfig(num_layers=3, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=300,
                      make_vocab_size_divisible_by=64, hidden_dropout=dropout, attention_dropout=dropout, **parts)
    rank = dist.get_rank(tp_group)
    model = GPTModel(cfg, tp_group=tp_group, rng=RNGStreams(1, rank, 0, CPU), activation=activation, **kw)
    initialize_parameters(model, seed=21)
    return model


def _gpt_step(tp_group, activation: ActivationConfig, parts: dict, dropout: float = 0.1):
    """Two forward/backward passes (grads accumulate) of a 3-layer GPT: losses, every grad, RNG after."""
    model = _gpt(tp_group, activation, parts, dropout)
    g = torch.Generator().manual_seed(22)
    losses = []
    for _ in range(2):
        tokens, labels = torch.randint(0, 300, (2, 16), generator=g), torch.randint(0, 300, (2, 16), generator=g)
        loss = model(tokens, labels).mean()
        loss.backward()
        losses.append(loss.detach())
    grads = {n: p.grad for n, p in model.named_parameters()}
    return losses, grads, model.rng.state_dict()


ACTIVATIONS = {
    "full uniform 2": ActivationConfig(recompute_granularity="full", recompute_num_layers=2),
    "full block 2": ActivationConfig(recompute_granularity="full", recompute_method="block",
                                     recompute_num_layers=2),
    "selective": ActivationConfig(recompute_granularity="selective"),
}


@pytest.mark.parametrize("model", ["gpt2", "llama"])
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_gpt_recomputation_is_bitwise_with_dropout(tp_group, act, model, monkeypatch):
    parts = LLAMA if model == "llama" else {}
    calls = []
    checkpoint = recompute.checkpoint
    monkeypatch.setattr(recompute, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    _assert_same(_gpt_step(tp_group, ACTIVATIONS[act], parts), _gpt_step(tp_group, ActivationConfig(), parts))
    assert len(calls) >= 4  # the model did checkpoint (2 passes, 2 spans or more each)


def test_recompute_spans_of_a_later_chunk_and_edge_cases():
    # the methods' table is tests/unit/test_activation_flags.py (layers 0-4); here what it leaves out: a
    # later pipeline chunk's global layer ids, block with more layers asked than the chunk holds, no layers
    block = ActivationConfig(recompute_granularity="full", recompute_method="block", recompute_num_layers=2)
    assert recompute.recompute_spans([4, 5, 6], block) == [([4], True), ([5], True), ([6], False)]
    assert recompute.recompute_spans([4], block) == [([4], True)]
    assert recompute.recompute_spans([], ActivationConfig()) == []


@pytest.mark.parametrize("act,expected", [
    (ActivationConfig(), "no recomputation"),
    (ActivationConfig(sequence_parallel=True, recompute_granularity="selective"),
     "sequence parallel; selective recomputation (core attention where it pays, MLP activation)"),
    # what a ds_config with partition_activations + cpu_checkpointing maps to (megazero/ds_config/mapping.py)
    (ActivationConfig(recompute_granularity="full", distribute_saved_activations=True, cpu_offload_activations=True),
     "full recomputation (uniform, 1 layer per checkpoint, inputs partitioned across tensor-parallel ranks and "
     "offloaded to host)"),
    (ActivationConfig(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
     "full recomputation (block, the first 2 layers of each model chunk checkpointed one by one)"),
])
def test_activation_config_describe(act, expected):
    assert act.describe() == "activations: " + expected  # the trainer's start-up model line carries it


def test_a_second_backward_through_a_recomputed_region_is_refused():
    x = torch.randn(4, requires_grad=True)
    out = recompute.checkpoint(lambda t: t.sin() * 2, x, rng=None)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="^backward through a recomputed region twice is not supported; ") as e:
        out.sum().backward()
    assert "\n" not in str(e.value)
    assert torch.equal(x.grad, 2 * x.detach().cos())  # the first backward's gradient, once


def _blocks_forward(tp_group, activation: ActivationConfig, meter: SavedTensorMeter | None = None):
    """A middle pipeline chunk (3 blocks, no embedding or head) on hidden states x [2, 16, 32]: the
    forward's saved bytes (device, host) while recording, the output and every grad after backward."""
    model = _gpt(tp_group, activation, {}, 0.1, pre_process=False, post_process=False)
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(5)).requires_grad_()
    meter = meter or SavedTensorMeter()
    with meter.recording():
        out = model(x)
        saved = (meter.live_bytes, meter.host_live_bytes)
        out.pow(2).sum().backward()
    return saved, out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


X_BYTES = 2 * 16 * 32 * 4  # one checkpointed input [b, s, h] fp32
# _blocks_forward's chunk is fed by a previous stage: its first span keeps that input as received (the
# executor holds the buffer for its gradient anyway; GPTModel.received_input_storage), never offloaded or
# partitioned; the other spans' inputs are


def test_full_recomputation_saves_only_the_checkpointed_inputs(tp_group):
    (device, host), *got = _blocks_forward(tp_group, FULL)
    assert (device, host) == (3 * X_BYTES, 0)  # the input of each of the 3 one-layer spans
    (device, host), *offloaded = _blocks_forward(tp_group, dataclasses.replace(FULL, cpu_offload_activations=True))
    assert (device, host) == (X_BYTES, 2 * X_BYTES)  # the received input stays; spans 2 and 3 on the host
    (reference, _), *plain = _blocks_forward(tp_group, ActivationConfig())
    assert reference > 10 * X_BYTES
    _assert_same(got, plain)
    _assert_same(offloaded, plain)


def test_offload_copies_the_previous_input_back_when_a_backward_starts(tp_group, monkeypatch):
    events = []
    prefetch, restore = input_storage.KeptInputs.prefetch, input_storage.KeptInputs.restore
    monkeypatch.setattr(input_storage.KeptInputs, "prefetch",
                        lambda self, saved: events.append(("prefetch", id(self), self._fetched is None))
                        or prefetch(self, saved))
    monkeypatch.setattr(input_storage.KeptInputs, "restore",
                        lambda self, saved: events.append(("restore", id(self))) or restore(self, saved))
    _blocks_forward(tp_group, ActivationConfig(recompute_granularity="full", cpu_offload_activations=True))
    restored = [k for kind, k, *_ in events if kind == "restore"]  # checkpoints 2, 1, 0
    assert len(restored) == 3
    # checkpoint 1's copy starts in checkpoint 2's backward, before 2's own input is restored, and is
    # what 1's restore uses (no second copy)
    later, k = restored[0], restored[1]
    assert events.index(("prefetch", k, True)) < events.index(("restore", later))
    assert ("prefetch", k, False) in events
    assert ("prefetch", restored[2], False) not in events  # checkpoint 0 keeps the received input: no copy


def _partitioned(rank, world_size):
    group = dist.new_group(list(range(world_size)))
    out = {}
    for name, act in (("plain", ActivationConfig()), ("full", FULL),
                      ("partition", ActivationConfig(recompute_granularity="full", distribute_saved_activations=True)),
                      ("partition+offload", ActivationConfig(recompute_granularity="full",
                                                             distribute_saved_activations=True,
                                                             cpu_offload_activations=True))):
        out[name] = _blocks_forward(group, act)
    # numel not a multiple of the group: the last rank's chunk is padded, the gather trims it
    x = torch.arange(7.0, requires_grad=True)
    kept = input_storage.KeptInputs(input_storage.InputStorage(partition_group=group))
    saved = tuple(kept.keep((x,)))
    out["chunk"] = saved[0]
    out["restored"] = kept.restore(saved)[0]
    return out


def test_partitioned_inputs_on_two_ranks():
    for r in run_distributed(_partitioned, 2):
        assert r["full"][0] == (3 * X_BYTES, 0)
        assert r["partition"][0] == (X_BYTES + 2 * X_BYTES // 2, 0)  # the received input whole, 2 halves
        assert r["partition+offload"][0] == (X_BYTES, 2 * X_BYTES // 2)
        for name in ("full", "partition", "partition+offload"):
            _assert_same(r[name][1:], r["plain"][1:])
        assert r["chunk"].shape == (4,)
        assert torch.equal(r["restored"], torch.arange(7.0)) and r["restored"].requires_grad


def _zero3_step(model: GPTModel):
    """One microbatch forward/backward of `model` under ZeRO-3 (dp 1): the loss and, per
    block bucket the gathers that started an all-gather (forward, recomputation, backward re-gather)."""
    from megazero.config import OptimizerConfig, ZeroConfig
    from megazero.topology import GridShape, Topology
    from megazero.zero.engine import ZeroEngine

    zero = ZeroEngine([model], Topology.build(GridShape(1), 0), ZeroConfig(stage=3), OptimizerConfig(lr=1e-3), CPU)
    storage, started = zero.storage, []
    gather, release = storage.gather, storage.release

    def counted_gather(bucket, wait=True):
        if bucket not in storage.gathered and bucket not in storage._inflight:
            started.append(bucket)
        return gather(bucket, wait)

    def checked_release(bucket):
        assert not recompute.recomputing(), "a block released inside its recomputation"
        return release(bucket)

    storage.gather, storage.release = counted_gather, checked_release
    zero.start_step(1)
    g = torch.Generator().manual_seed(22)
    tokens, labels = torch.randint(0, 300, (2, 16), generator=g), torch.randint(0, 300, (2, 16), generator=g)
    loss = model(tokens, labels).mean()
    loss.backward()
    zero.finish_grad_sync()
    blocks = zero.stage3.block_buckets[0]
    return loss.detach(), {b: started.count(b) for b in blocks}


def test_zero3_keeps_recomputed_blocks_gathered_until_their_grads(tp_group):
    loss, gathers = _zero3_step(_gpt(tp_group, FULL, {}, 0.1))
    plain_loss, plain_gathers = _zero3_step(_gpt(tp_group, ActivationConfig(), {}, 0.1))
    assert torch.equal(loss, plain_loss)
    assert set(plain_gathers.values()) == {2}  # forward, then again for backward
    # forward, then the recomputation, kept for backward (no re-gather; no forward prefetch of block
    # i+1 while recomputing block i: its backward is done, that would be a third)
    assert set(gathers.values()) == {2}
