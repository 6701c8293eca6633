"""Each tensor-parallel component vs its unsharded torch counterpart, forward and backward, at tp=2 and
tp=4 on real gloo processes: outputs, input grads and every weight grad (fp32, rtol 1e-5).

One 4-process launch runs every check for both sizes (tp=2 builds two TP groups, tp=4 one) and
returns the max relative errors; the assertions run in pytest.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megazero.config import ModelConfig
from megazero.model import GPTModel
from megazero.random import RNGStreams
from megazero.tensor_parallel.collectives import gather_from_tp_region
from megazero.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megazero.tensor_parallel.init import initialize_parameters, normal_init
from megazero.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megazero.tensor_parallel.sharding import get_shard_spec
from megazero.topology import GridShape, Topology
from tests.dist_utils import run_distributed

RTOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Element-wise relative error |a - b| / |b|, with a floor of 1e-2 x max|b| in the denominator so
    elements that are ~0 by cancellation do not dominate (an atol of 1e-7 x the tensor's scale: fp32
    sums of many terms in a different order differ by that much)."""
    b = b.to(a.dtype)
    return ((a - b).abs() / (b.abs() + 1e-2 * b.abs().max().clamp_min(1e-12))).max().item()


def _gather_full(param: torch.Tensor, group) -> torch.Tensor:
    """Assemble the global tensor from TP shards (independent of the init code)."""
    spec = get_shard_spec(param)
    if spec.tp_dim is None:
        return param.detach().clone()
    chunks = [torch.empty_like(param) for _ in range(dist.get_world_size(group))]
    dist.all_gather(chunks, param.detach().contiguous(), group=group)
    return torch.cat(chunks, dim=spec.tp_dim)


def _local(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    return get_shard_spec(param).local_slice(full)


def _same_on_all_ranks(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _check_column(tp_group, gather_output):
    layer = ColumnParallelLinear(16, 24, tp_group=tp_group, init_method=normal_init(0.5), gather_output=gather_output)
    initialize_parameters(layer, seed=3)
    ref = torch.nn.Linear(16, 24)
    with torch.no_grad():
        ref.weight.copy_(_gather_full(layer.weight, tp_group))
        ref.bias.copy_(_gather_full(layer.bias, tp_group))
        ref.bias.add_(0.1)
        layer.bias.add_(0.1)
    x = _same_on_all_ranks(3, 5, 16, seed=1).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    proj = _same_on_all_ranks(3, 5, 24, seed=2)
    y = layer(x)
    y_ref = ref(x_ref)
    errs = {}
    if gather_output:
        errs["out"] = _rel(y, y_ref)
        (y * proj).sum().backward()
    else:
        # local output is this rank's chunk of the output features
        y_ref_local = y_ref.chunk(dist.get_world_size(tp_group), -1)[dist.get_rank(tp_group)]
        errs["out"] = _rel(y, y_ref_local)
        proj_local = proj.chunk(dist.get_world_size(tp_group), -1)[dist.get_rank(tp_group)]
        (y * proj_local).sum().backward()
    (y_ref * proj).sum().backward()
    errs["dx"] = _rel(x.grad, x_ref.grad)
    errs["dW"] = _rel(layer.weight.grad, _local(ref.weight.grad, layer.weight))
    errs["db"] = _rel(layer.bias.grad, _local(ref.bias.grad, layer.bias))
    return errs


def _check_row(tp_group, input_is_parallel):
    tp, tp_rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    layer = RowParallelLinear(24, 16, tp_group=tp_group, init_method=normal_init(0.5), input_is_parallel=input_is_parallel)
    initialize_parameters(layer, seed=4)
    with torch.no_grad():
        layer.bias.add_(0.3)
    ref = torch.nn.Linear(24, 16)
    with torch.no_grad():
        ref.weight.copy_(_gather_full(layer.weight, tp_group))
        ref.bias.copy_(layer.bias)
    x_full = _same_on_all_ranks(3, 5, 24, seed=5)
    x = (x_full.chunk(tp, -1)[tp_rank].clone() if input_is_parallel else x_full.clone()).requires_grad_()
    x_ref = x_full.clone().requires_grad_()
    proj = _same_on_all_ranks(3, 5, 16, seed=6)
    y, y_ref = layer(x), ref(x_ref)
    (y * proj).sum().backward()
    (y_ref * proj).sum().backward()
    dx_ref = x_ref.grad.chunk(tp, -1)[tp_rank] if input_is_parallel else x_ref.grad
    return {"out": _rel(y, y_ref), "dx": _rel(x.grad, dx_ref),
            "dW": _rel(layer.weight.grad, _local(ref.weight.grad, layer.weight)),
            "db": _rel(layer.bias.grad, ref.bias.grad)}


def _check_embedding(tp_group):
    tp = dist.get_world_size(tp_group)
    vocab, padded = 1000, -(-1000 // (128 * tp)) * (128 * tp)  # padding lands on the last rank(s)
    layer = VocabParallelEmbedding(padded, 8, tp_group=tp_group, init_method=normal_init(1.0), logical_vocab_size=vocab)
    initialize_parameters(layer, seed=7)
    full = _gather_full(layer.weight, tp_group)
    assert torch.all(full[vocab:] == 0), "padding rows must be zero"
    ref = torch.nn.Embedding(vocab, 8)
    with torch.no_grad():
        ref.weight.copy_(full[:vocab])
    ids = torch.randint(0, vocab, (4, 7), generator=torch.Generator().manual_seed(8))
    ids[0, :3] = torch.tensor([0, vocab - 1, padded // tp])  # range edges
    proj = _same_on_all_ranks(4, 7, 8, seed=9)
    y, y_ref = layer(ids), ref(ids)
    (y * proj).sum().backward()
    (y_ref * proj).sum().backward()
    ref_grad = torch.cat([ref.weight.grad, torch.zeros(padded - vocab, 8)])
    return {"out": _rel(y, y_ref), "dW": _rel(layer.weight.grad, _local(ref_grad, layer.weight))}


def _check_cross_entropy(tp_group):
    tp, tp_rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    vocab, padded = 1000, -(-1000 // (128 * tp)) * (128 * tp)
    logits_full = _same_on_all_ranks(3, 6, vocab, seed=10) * 4
    # Padding columns hold large garbage: the loss must not see them.
    padded_full = torch.cat([logits_full, torch.full((3, 6, padded - vocab), 50.0)], -1)
    target = torch.randint(0, vocab, (3, 6), generator=torch.Generator().manual_seed(11))
    local = padded_full.chunk(tp, -1)[tp_rank].clone().requires_grad_()
    ref_in = logits_full.clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, tp_group, tp_rank * (padded // tp), vocab)
    loss_ref = F.cross_entropy(ref_in.reshape(-1, vocab), target.reshape(-1), reduction="none").reshape(3, 6)
    weights = _same_on_all_ranks(3, 6, seed=12)
    (loss * weights).sum().backward()
    (loss_ref * weights).sum().backward()
    ref_grad = torch.cat([ref_in.grad, torch.zeros(3, 6, padded - vocab)], -1).chunk(tp, -1)[tp_rank]
    return {"out": _rel(loss, loss_ref), "dlogits": _rel(local.grad, ref_grad)}


def _check_gather_scatter(tp_group):
    tp, tp_rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    x = (_same_on_all_ranks(2, 3, 4 * tp, seed=13).chunk(tp, -1)[tp_rank]).clone().requires_grad_()
    y = gather_from_tp_region(x, tp_group)
    full = _same_on_all_ranks(2, 3, 4 * tp, seed=13)
    proj = _same_on_all_ranks(2, 3, 4 * tp, seed=14)
    (y * proj).sum().backward()
    return {"out": _rel(y, full), "dx": _rel(x.grad, proj.chunk(tp, -1)[tp_rank])}


LLAMA = dict(normalization="RMSNorm", position_embedding_type="rope", swiglu=True, add_bias_linear=False,
             untie_embeddings_and_output_weights=True)
# Llama-family blocks (docs/models.md): name -> ModelConfig fields over the GPT-2 test shape (heads 8)
GPT_VARIANTS = {
    "gpt model": {},
    # 2 key/value groups: whole groups per rank at tp 2; at tp 4 each group is shared by 2 ranks
    "llama gqa": {**LLAMA, "group_query_attention": True, "num_query_groups": 2},
    # one key/value head (MQA): the QKV weight is held whole by every rank, gradients summed over TP
    "llama mqa tied": {**LLAMA, "group_query_attention": True, "num_query_groups": 1,
                       "untie_embeddings_and_output_weights": False},
    # Qwen2-like: QKV bias only; q/k norms; half the head dims rotated; Llama 3.1 rope scaling; kv channels
    "llama qkv-bias qk-norm rope-scaled": {**LLAMA, "add_qkv_bias": True, "qk_layernorm": True,
                                           "rotary_percent": 0.5, "use_rope_scaling": True,
                                           "rope_original_max_positions": 8, "kv_channels": 8},
    "llama no positions": {**LLAMA, "position_embedding_type": "none", "normalization": "LayerNorm"},
}


def _check_gpt(tp_group, single_group, variant: str = "gpt model"):
    """The whole GPT at tp vs the same GPT at tp=1 (layout-invariant init), loss and every grad."""
    heads = 4 if variant == "gpt model" else 8
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=heads, seq_length=16,
                      vocab_size=300, make_vocab_size_divisible_by=64, hidden_dropout=0.0, attention_dropout=0.0,
                      **GPT_VARIANTS[variant])
    cpu = torch.device("cpu")
    model = GPTModel(cfg, tp_group=tp_group, rng=RNGStreams(1, dist.get_rank(tp_group), 0, cpu))
    ref = GPTModel(cfg, tp_group=single_group, rng=RNGStreams(1, 0, 0, cpu))
    initialize_parameters(model, seed=21)
    initialize_parameters(ref, seed=21)
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(22))
    labels = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(23))
    loss, loss_ref = model(tokens, labels), ref(tokens, labels)
    loss.mean().backward()
    loss_ref.mean().backward()
    errs = {"out": _rel(loss, loss_ref)}
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        rp = ref_params[name]
        spec = get_shard_spec(p)
        full_grad = rp.grad
        if spec.tp_dim is not None and spec.global_shape != tuple(rp.shape):  # padded vocab differs by tp
            pad = list(spec.global_shape)
            pad[spec.tp_dim] -= cfg.vocab_size
            full_grad = torch.cat([full_grad[: cfg.vocab_size], torch.zeros(pad)], spec.tp_dim)
        errs[f"d{name}"] = _rel(p.grad, spec.local_slice(full_grad))
    return errs


def _check_rng_streams(tp_group, single_group):
    """Dropout is identical where activations are replicated and distinct where they are sharded:
    the tensor-parallel stream differs per TP rank, the ambient stream does not, and a GPT with
    dropout on still produces the same replicated hidden states on every TP rank (hidden dropout
    drawn from a per-rank stream would make them differ; the loss alone could not show it, since
    the vocab-parallel loss is all-reduced)."""
    tp, tp_rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    rng = RNGStreams(5, tp_rank, 0, torch.device("cpu"))
    ambient = torch.rand(8)
    with rng.fork("tensor-parallel"):
        sharded = torch.rand(8)
    ambient_after = torch.rand(8)  # the fork restored the ambient stream: it continues, unaffected
    RNGStreams(5, tp_rank, 0, torch.device("cpu"))  # re-seeds the ambient stream from its start
    expected = torch.rand(16)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=300,
                      make_vocab_size_divisible_by=64, hidden_dropout=0.2, attention_dropout=0.2)
    model = GPTModel(cfg, tp_group=tp_group, rng=RNGStreams(1, tp_rank, 0, torch.device("cpu")),
                     post_process=False)  # returns the replicated hidden states [b, s, h]
    initialize_parameters(model, seed=21)
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(22))
    hidden = model(tokens).detach()
    model.eval()
    hidden_no_dropout = model(tokens).detach()
    out = {}
    out["dropout active"] = not torch.equal(hidden, hidden_no_dropout)
    for name, t in (("ambient", ambient), ("sharded", sharded), ("hidden", hidden)):
        parts = [torch.empty_like(t) for _ in range(tp)]
        dist.all_gather(parts, t, group=tp_group)
        out[name] = all(torch.equal(parts[0], q) for q in parts[1:])
    out["ambient continues"] = torch.equal(torch.cat([ambient, ambient_after]), expected)
    return out


def _all_checks(rank, world_size):
    singles = [dist.new_group([r]) for r in range(world_size)]
    results = {}
    for tp in (2, 4):
        topo = Topology.build(GridShape(world_size, tp=tp), rank)
        g = topo.tp_group
        for gather in (False, True):
            results[(tp, f"column gather_output={gather}")] = _check_column(g, gather)
        for parallel_in in (True, False):
            results[(tp, f"row input_is_parallel={parallel_in}")] = _check_row(g, parallel_in)
        results[(tp, "vocab embedding")] = _check_embedding(g)
        results[(tp, "vocab cross-entropy")] = _check_cross_entropy(g)
        results[(tp, "gather/scatter")] = _check_gather_scatter(g)
        for variant in GPT_VARIANTS:
            results[(tp, variant)] = _check_gpt(g, singles[rank], variant)
        results[(tp, "rng streams")] = _check_rng_streams(g, singles[rank])
    return results


@pytest.fixture(scope="module")
def tp_results():
    return run_distributed(_all_checks, 4)


@pytest.mark.parametrize("tp", [2, 4])
def test_dropout_streams_replicated_vs_sharded(tp_results, tp):
    for per_rank in tp_results:
        got = per_rank[(tp, "rng streams")]
        assert got["ambient"], "replicated-region dropout stream must match across TP ranks"
        assert not got["sharded"], "sharded-region dropout stream must differ across TP ranks"
        assert got["dropout active"]
        assert got["hidden"], "with dropout on, replicated hidden states must be identical on every TP rank"
        assert got["ambient continues"], "a fork must not disturb the ambient stream"


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("component", [
    "column gather_output=False", "column gather_output=True", "row input_is_parallel=True",
    "row input_is_parallel=False", "vocab embedding", "vocab cross-entropy", "gather/scatter", *GPT_VARIANTS,
])
def test_component_matches_unsharded(tp_results, tp, component):
    # Single components: rtol 1e-5 element-wise. The whole 2-block GPT composes several reordered fp32
    # reductions (TP partial sums at every row-parallel layer), so its element-wise errors compound
    # (observed up to 1.4e-5): 5e-5 there. The Llama variants add RMSNorm weight gradients, sums over
    # every token of products that cancel (observed up to 5.5e-5, in llama gqa's first input norm at tp
    # 2): 1e-4 for them. A wrong gradient (a missing replica sum, an unsummed q/k norm) is off by ~1.
    rtol = RTOL if component not in GPT_VARIANTS else 5 * RTOL if component == "gpt model" else 10 * RTOL
    for rank, per_rank in enumerate(tp_results):
        for what, err in per_rank[(tp, component)].items():
            assert err <= rtol, f"rank {rank} tp={tp} {component}: {what} rel err {err:.2e}"
