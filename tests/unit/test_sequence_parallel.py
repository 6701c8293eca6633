"""Sequence parallelism (tensor_parallel/collectives.py, layers.py; model/gpt.py) on real gloo processes,
at tp 2 and 4: each SP collective and SP layer vs its unsharded counterpart, forward and backward
(outputs, input grads, every weight grad; fp32 rtol 1e-5), and the whole GPT with SP vs the same GPT
without it at the same tp (every test_tensor_parallel variant: GPT-2, Llama GQA / MQA, q/k norms, QKV
bias, no positions), which test_tensor_parallel checks against tp 1.

The SP column-parallel matmul (linear_with_sequence_parallel: ColumnParallelLinear, SwiGLU's regrouped
weight, the QKV replicas, the output layer) keeps only its [b, s/tp, in] input shard for backward
(SavedTensorMeter), not the gathered [b, s, in], and its gradients equal F.linear's on the gathered input.

Activations are [b, s, h]; under SP rank r holds positions [r*s/tp, (r+1)*s/tp) ("chunk r along s").
One 4-process launch runs every check for both sizes; the assertions run in pytest.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megazero.activation.saved_tensors import SavedTensorMeter
from megazero.config import ActivationConfig, ModelConfig
from megazero.model import GPTModel
from megazero.model.norms import LayerNorm, RMSNorm
from megazero.random import RNGStreams
from megazero.tensor_parallel.collectives import (
    gather_from_sequence_parallel_region,
    linear_with_sequence_parallel,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    sum_grad_over_tp,
)
from megazero.tensor_parallel.init import initialize_parameters, normal_init
from megazero.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelOutput,
)
from megazero.topology import GridShape, Topology
from tests.dist_utils import run_distributed
from tests.unit.test_tensor_parallel import GPT_VARIANTS, RTOL, _gather_full, _local, _rel, _same_on_all_ranks

SP = ActivationConfig(sequence_parallel=True)
S = 8  # sequence length of the component checks (divisible by tp 2 and 4)


def _ranks(group) -> tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


def _seq_chunk(t: torch.Tensor, group) -> torch.Tensor:
    """This rank's positions of a [b, s, ...] tensor."""
    tp, r = _ranks(group)
    return t.chunk(tp, 1)[r]


def _check_collectives(g):
    tp, r = _ranks(g)
    full = _same_on_all_ranks(2, S, 3, seed=30)
    proj = _same_on_all_ranks(2, S, 3, seed=31)
    errs = {}
    # scatter: the loss sums every rank's positions of proj * full, so d/dfull = proj on every rank
    x = full.clone().requires_grad_()
    y = scatter_to_sequence_parallel_region(x, g)
    (y * _seq_chunk(proj, g)).sum().backward()
    errs["scatter out"], errs["scatter dx"] = _rel(y, _seq_chunk(full, g)), _rel(x.grad, proj)
    # gather feeding a TP-parallel consumer: rank q's upstream gradient is a partial sum proj_q, the
    # full one is sum_q proj_q, and each rank keeps its positions of it
    partial = [_same_on_all_ranks(2, S, 3, seed=40 + q) for q in range(tp)]
    x = _seq_chunk(full, g).clone().requires_grad_()
    y = gather_from_sequence_parallel_region(x, g)
    (y * partial[r]).sum().backward()
    errs["gather out"], errs["gather dx"] = _rel(y, full), _rel(x.grad, _seq_chunk(sum(partial), g))
    # gather feeding a replicated consumer: the upstream gradient is already the full one everywhere
    x = _seq_chunk(full, g).clone().requires_grad_()
    (gather_from_sequence_parallel_region(x, g, tensor_parallel_output_grad=False) * proj).sum().backward()
    errs["gather (replicated grad) dx"] = _rel(x.grad, _seq_chunk(proj, g))
    # reduce-scatter: out = this rank's positions of sum_q x_q; d/dx_q = proj (all positions) on every q
    x = partial[r].clone().requires_grad_()
    y = reduce_scatter_to_sequence_parallel_region(x, g)
    (y * _seq_chunk(proj, g)).sum().backward()
    errs["reduce-scatter out"] = _rel(y, _seq_chunk(sum(partial), g))
    errs["reduce-scatter dx"] = _rel(x.grad, proj)
    # sum_grad_over_tp: every rank's gradient summed (one slice), or only its slice's replicas' (tp/2
    # ranks hold each of 2 slices at tp 4; one slice at tp 2)
    w = [_same_on_all_ranks(5, seed=50 + q) for q in range(tp)]
    for slices in (1, max(tp // 2, 1)):
        per = tp // slices
        p = _same_on_all_ranks(5, seed=55).requires_grad_()
        (sum_grad_over_tp(p, g, slices, r // per) * w[r]).sum().backward()
        errs[f"sum grad {slices} slices"] = _rel(p.grad, sum(w[(r // per) * per:(r // per + 1) * per]))
    return errs


def _with_reference(layer, g, seed: int) -> torch.nn.Linear:
    """Initialise the TP linear `layer` (a non-zero bias) and return the nn.Linear of its global weights."""
    initialize_parameters(layer, seed=seed)
    ref = torch.nn.Linear(layer.in_features, layer.out_features)
    with torch.no_grad():
        layer.bias.add_(0.1)
        ref.weight.copy_(_gather_full(layer.weight, g))
        ref.bias.copy_(_gather_full(layer.bias, g))
    return ref


def _check_column(g):
    layer = ColumnParallelLinear(16, 24, tp_group=g, init_method=normal_init(0.5), sequence_parallel=True)
    ref = _with_reference(layer, g, seed=3)
    x_full = _same_on_all_ranks(3, S, 16, seed=1)
    x, x_ref = _seq_chunk(x_full, g).clone().requires_grad_(), x_full.clone().requires_grad_()
    proj = _same_on_all_ranks(3, S, 24, seed=2)
    tp, r = _ranks(g)
    y, y_ref = layer(x), ref(x_ref)  # [3, S, 24/tp] (all positions, this rank's features), [3, S, 24]
    (y * proj.chunk(tp, -1)[r]).sum().backward()
    (y_ref * proj).sum().backward()
    return {"out": _rel(y, y_ref.chunk(tp, -1)[r]), "dx": _rel(x.grad, _seq_chunk(x_ref.grad, g)),
            "dW": _rel(layer.weight.grad, _local(ref.weight.grad, layer.weight)),
            "db": _rel(layer.bias.grad, _local(ref.bias.grad, layer.bias))}


def _check_row(g):
    tp, r = _ranks(g)
    layer = RowParallelLinear(24, 16, tp_group=g, init_method=normal_init(0.5), sequence_parallel=True)
    ref = _with_reference(layer, g, seed=4)
    x_full = _same_on_all_ranks(3, S, 24, seed=5)
    x, x_ref = x_full.chunk(tp, -1)[r].clone().requires_grad_(), x_full.clone().requires_grad_()
    proj = _same_on_all_ranks(3, S, 16, seed=6)
    y, y_ref = layer(x), ref(x_ref)  # [3, S/tp, 16] (this rank's positions), [3, S, 16]
    (y * _seq_chunk(proj, g)).sum().backward()
    (y_ref * proj).sum().backward()
    return {"out": _rel(y, _seq_chunk(y_ref, g)), "dx": _rel(x.grad, x_ref.grad.chunk(tp, -1)[r]),
            "dW": _rel(layer.weight.grad, _local(ref.weight.grad, layer.weight)),
            "db": _rel(layer.bias.grad, ref.bias.grad)}  # every rank the full bias gradient


def _saved_bytes(fn) -> tuple[int, torch.Tensor]:
    """Bytes of the storages autograd keeps for backward after fn() (parameters not counted), and its output."""
    meter = SavedTensorMeter()
    with meter.recording():
        out = fn()
    return meter.live_bytes, out


def _check_saved_shard(g):
    """What the SP column-parallel matmuls keep for backward: the input shard [b, s/tp, in], not the
    gathered [b, s, in] (tp times as many bytes; what gather + F.linear keeps, measured as a control),
    plus a derived weight when given one; its gradients vs F.linear on the gathered input."""
    tp, r = _ranks(g)
    x_full = _same_on_all_ranks(3, S, 16, seed=60)
    shard_bytes = x_full.nbytes // tp
    got = {"shard bytes": shard_bytes, "gathered bytes": x_full.nbytes}
    layer = ColumnParallelLinear(16, 24, tp_group=g, init_method=normal_init(0.5), sequence_parallel=True)
    initialize_parameters(layer, seed=61)
    x = _seq_chunk(x_full, g).clone().requires_grad_()
    got["column"], y = _saved_bytes(lambda: layer(x))
    got["gather + F.linear"], _ = _saved_bytes(
        lambda: F.linear(gather_from_sequence_parallel_region(x, g), layer.weight, layer.bias))
    vocab, padded = _vocab(g)
    out_layer = VocabParallelOutput(padded, 16, tp_group=g, init_method=normal_init(1.0), logical_vocab_size=vocab,
                                    sequence_parallel=True)
    got["output layer"], _ = _saved_bytes(lambda: out_layer(x))
    # a weight derived from a leaf (as SwiGLU's regrouped rows, the QKV replicas' summed view): kept too,
    # and its gradient flows back to the leaf; the reference is F.linear on the full input and weight
    w_full = _same_on_all_ranks(24, 16, seed=62)
    w_leaf = w_full.chunk(tp, 0)[r].clone().requires_grad_()
    w_ref = w_full.clone().requires_grad_()
    x_ref = x_full.clone().requires_grad_()
    x = _seq_chunk(x_full, g).clone().requires_grad_()
    got["derived weight"], y = _saved_bytes(lambda: linear_with_sequence_parallel(x, w_leaf * 2, None, g))
    got["derived weight bytes"] = w_leaf.nbytes
    y_ref = F.linear(x_ref, w_ref * 2)
    proj = _same_on_all_ranks(3, S, 24, seed=63)
    (y * proj.chunk(tp, -1)[r]).sum().backward()
    (y_ref * proj).sum().backward()
    errs = {"out": _rel(y, y_ref.chunk(tp, -1)[r]), "dx": _rel(x.grad, _seq_chunk(x_ref.grad, g)),
            "dW": _rel(w_leaf.grad, w_ref.grad.chunk(tp, 0)[r])}
    # an input that needs no gradient: the weight's alone (no reduce-scatter)
    w_leaf.grad = None
    linear_with_sequence_parallel(_seq_chunk(x_full, g), w_leaf * 2, None, g).mul(proj.chunk(tp, -1)[r]).sum().backward()
    errs["dW (input without grad)"] = _rel(w_leaf.grad, w_ref.grad.chunk(tp, 0)[r])
    return got, errs


def _vocab(g) -> tuple[int, int]:
    tp, _ = _ranks(g)
    return 1000, -(-1000 // (128 * tp)) * (128 * tp)  # logical, padded (padding on the last rank(s))


def _check_embedding(g):
    vocab, padded = _vocab(g)
    layer = VocabParallelEmbedding(padded, 8, tp_group=g, init_method=normal_init(1.0), logical_vocab_size=vocab,
                                   sequence_parallel=True)
    initialize_parameters(layer, seed=7)
    ref = torch.nn.Embedding(vocab, 8)
    with torch.no_grad():
        ref.weight.copy_(_gather_full(layer.weight, g)[:vocab])
    ids = torch.randint(0, vocab, (4, S), generator=torch.Generator().manual_seed(8))
    proj = _same_on_all_ranks(4, S, 8, seed=9)
    y, y_ref = layer(ids), ref(ids)  # [4, S/tp, 8], [4, S, 8]
    (y * _seq_chunk(proj, g)).sum().backward()
    (y_ref * proj).sum().backward()
    ref_grad = torch.cat([ref.weight.grad, torch.zeros(padded - vocab, 8)])
    return {"out": _rel(y, _seq_chunk(y_ref, g)), "dW": _rel(layer.weight.grad, _local(ref_grad, layer.weight))}


def _check_output_layer(g):
    """The vocab-parallel output layer gathers the hidden's positions; its gradient goes back
    reduce-scattered (each rank's logits are a slice of the vocabulary: partial sums)."""
    tp, r = _ranks(g)
    vocab, padded = _vocab(g)
    layer = VocabParallelOutput(padded, 8, tp_group=g, init_method=normal_init(1.0), logical_vocab_size=vocab,
                                sequence_parallel=True)
    initialize_parameters(layer, seed=10)
    w_full = _gather_full(layer.weight, g).requires_grad_()
    h_full = _same_on_all_ranks(2, S, 8, seed=11)
    h, h_ref = _seq_chunk(h_full, g).clone().requires_grad_(), h_full.clone().requires_grad_()
    proj = _same_on_all_ranks(2, S, padded, seed=12)
    logits, ref = layer(h), h_ref @ w_full.t()  # [2, S, padded/tp], [2, S, padded]
    (logits * proj.chunk(tp, -1)[r]).sum().backward()
    (ref * proj).sum().backward()
    return {"out": _rel(logits, ref.chunk(tp, -1)[r]), "dx": _rel(h.grad, _seq_chunk(h_ref.grad, g)),
            "dW": _rel(layer.weight.grad, _local(w_full.grad, layer.weight))}


def _check_norms(g):
    errs = {}
    for cls in (LayerNorm, RMSNorm):
        norm, ref = cls(16, grad_sum_group=g), cls(16)
        with torch.no_grad():
            for p, q in zip(norm.parameters(), ref.parameters()):
                p.copy_(_same_on_all_ranks(16, seed=13)), q.copy_(p)
        x_full = _same_on_all_ranks(3, S, 16, seed=14)
        x, x_ref = _seq_chunk(x_full, g).clone().requires_grad_(), x_full.clone().requires_grad_()
        proj = _same_on_all_ranks(3, S, 16, seed=15)
        y, y_ref = norm(x), ref(x_ref)
        (y * _seq_chunk(proj, g)).sum().backward()
        (y_ref * proj).sum().backward()
        errs[f"{cls.__name__} out"] = _rel(y, _seq_chunk(y_ref, g))
        errs[f"{cls.__name__} dx"] = _rel(x.grad, _seq_chunk(x_ref.grad, g))
        for (name, p), q in zip(norm.named_parameters(), ref.parameters()):
            errs[f"{cls.__name__} d{name}"] = _rel(p.grad, q.grad)
    return errs


def _gpt_pair(g, variant: str, post_process: bool = True, **fields):
    heads = 4 if variant == "gpt model" else 8
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=heads, seq_length=16,
                      vocab_size=300, make_vocab_size_divisible_by=64,
                      **{"hidden_dropout": 0.0, "attention_dropout": 0.0, **GPT_VARIANTS[variant], **fields})
    cpu, r = torch.device("cpu"), dist.get_rank(g)
    models = [GPTModel(cfg, tp_group=g, rng=RNGStreams(1, r, 0, cpu), activation=act, post_process=post_process)
              for act in (SP, ActivationConfig())]
    for m in models:
        initialize_parameters(m, seed=21)
    return models


def _loss_and_grads(model, tokens, labels) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = model(tokens, labels)  # [b, s]
    loss.mean().backward()
    return loss, {name: p.grad for name, p in model.named_parameters()}


def _check_gpt(g, variant: str):
    """The GPT with SP vs without it at the same tp: loss, every parameter gradient; and the hidden
    states a non-last pipeline stage sends: [b, s/tp, h], as pipeline_activation declares."""
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(22))
    labels = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(23))
    (loss, grads), (loss_ref, grads_ref) = (_loss_and_grads(m, tokens, labels) for m in _gpt_pair(g, variant))
    errs = {"out": _rel(loss, loss_ref), **{f"d{name}": _rel(grad, grads_ref[name]) for name, grad in grads.items()}}
    first_sp, first_plain = _gpt_pair(g, variant, post_process=False)
    hidden, hidden_ref = first_sp(tokens), first_plain(tokens)
    shapes = {"sent": tuple(hidden.shape), "declared": first_sp.pipeline_activation(2)[0],
              "declared without SP": first_plain.pipeline_activation(2)[0]}
    errs["hidden"] = _rel(hidden, _seq_chunk(hidden_ref, g))
    return errs, shapes


def _check_dropout_stream(g):
    """Under SP the embedding and hidden dropouts draw from the per-rank "tensor-parallel" stream (ranks
    hold different positions), leaving the ambient (replicated) stream untouched; without SP they draw
    from the ambient one."""
    out = {}
    for sp, model in zip(("sp", "plain"), _gpt_pair(g, "gpt model", post_process=False, hidden_dropout=0.2)):
        before = model.rng.state_dict()
        model(torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(24)))
        after = model.rng.state_dict()
        out[sp] = {"ambient drawn": not torch.equal(before["ambient"], after["ambient"]),
                   "tp stream drawn": not torch.equal(before["streams"]["tensor-parallel"],
                                                      after["streams"]["tensor-parallel"])}
    return out


def _all_checks(rank, world_size):
    results = {}
    for tp in (2, 4):
        g = Topology.build(GridShape(world_size, tp=tp), rank).tp_group
        for name, check in (("collectives", _check_collectives), ("column", _check_column), ("row", _check_row),
                            ("embedding", _check_embedding), ("output layer", _check_output_layer),
                            ("norms", _check_norms)):
            results[(tp, name)] = check(g)
        results[(tp, "saved")], results[(tp, "saved shard")] = _check_saved_shard(g)
        for variant in GPT_VARIANTS:
            results[(tp, variant)], results[(tp, variant, "shapes")] = _check_gpt(g, variant)
        results[(tp, "dropout")] = _check_dropout_stream(g)
    return results


@pytest.fixture(scope="module")
def sp_results():
    return run_distributed(_all_checks, 4)


COMPONENTS = ["collectives", "column", "row", "embedding", "output layer", "norms", "saved shard"]


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("component", COMPONENTS + list(GPT_VARIANTS))
def test_sequence_parallel_matches_unsharded(sp_results, tp, component):
    # GPT with vs without SP: the same math, but the replicated parameters' gradients (norms, biases,
    # positions) are summed per rank's positions and then over TP instead of over all positions at
    # once; these sums cancel (test_tensor_parallel's Llama tolerance, observed there up to 5.5e-5): 1e-4
    rtol = 10 * RTOL if component in GPT_VARIANTS else RTOL
    for rank, per_rank in enumerate(sp_results):
        for what, err in per_rank[(tp, component)].items():
            assert err <= rtol, f"rank {rank} tp={tp} {component}: {what} rel err {err:.2e}"


@pytest.mark.parametrize("tp", [2, 4])
def test_pipeline_carries_the_sequence_shard(sp_results, tp):
    for per_rank in sp_results:
        for variant in GPT_VARIANTS:
            shapes = per_rank[(tp, variant, "shapes")]
            assert shapes["sent"] == shapes["declared"] == (2, 16 // tp, 32), (variant, shapes)
            assert shapes["declared without SP"] == (2, 16, 32)


@pytest.mark.parametrize("tp", [2, 4])
def test_sequence_parallel_dropout_uses_the_tensor_parallel_stream(sp_results, tp):
    for per_rank in sp_results:
        got = per_rank[(tp, "dropout")]
        assert got["sp"] == {"ambient drawn": False, "tp stream drawn": True}, got
        assert got["plain"] == {"ambient drawn": True, "tp stream drawn": False}, got



@pytest.mark.parametrize("tp", [2, 4])
def test_sequence_parallel_linear_keeps_the_input_shard(sp_results, tp):
    for per_rank in sp_results:
        got = per_rank[(tp, "saved")]
        shard = got["shard bytes"]
        assert got["column"] == got["output layer"] == shard, got  # weights are parameters: not counted
        assert got["derived weight"] == shard + got["derived weight bytes"], got
        assert got["gather + F.linear"] == got["gathered bytes"] == tp * shard, got  # the control
