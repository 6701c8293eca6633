"""Context-parallel attention operators (megazero/context_parallel/) vs plain full causal attention.

Pure checks (no processes): the load-balanced sharding helpers (round trip, positions) and the ring's
block plan (every causal (query, key) pair computed exactly once, the same work on every rank).

One 4-process gloo launch runs every operator check: cp 4 on all ranks, cp 2 on the strided groups
[0, 2] and [1, 3] (global ranks != group ranks, as under tp x cp), cp 1 on single-rank groups; p2p
(ring) and a2a (Ulysses); MHA, GQA and MQA (for a2a at cp 4 the kv heads, fewer than cp, are
replicated). q, k, v, dout are the same full tensors on every rank; each rank takes its chunks with
shard_sequence, and its output and dq / dk / dv are compared with the matching slices of an fp64
reference on the unsharded sequence (_err): fp32 within rtol 1e-5 with atol 1e-5 x the tensor's max
(measured <= ~6e-7; sdpa at cp 1 alike), bf16 within 1.5e-2 (measured <= ~6e-3, from bf16
rounding of the inputs, the outputs and the travelling dK/dV; single-process bf16 sdpa on the same
data: ~1e-3 .. 3.3e-3). Also: bytes sent (comm.traffic) equal
ring_send_bytes / the all-to-all volume, and the ring posts the next K/V block's transfer before
computing on the current one (recorded call order, deterministic).
"""

from __future__ import annotations

import math

import pytest
import torch

import megazero.context_parallel.ring_attention as ring
from megazero import comm
from megazero.context_parallel import (
    chunk_ids,
    context_parallel_attention,
    local_positions,
    ring_send_bytes,
    shard_sequence,
    unshard_sequence,
)
from megazero.context_parallel.ring_attention import block_plan
from tests.dist_utils import run_distributed

RTOL = 1e-5
BF16_TOL = 1.5e-2
B, S, D, NQ = 2, 24, 8, 8  # S divisible by 2 * cp for cp 1, 2, 4 (chunks of 3 tokens at cp 4)
HEADS = {"mha": 8, "gqa": 2, "mqa": 1}  # kv heads for NQ query heads


# ----- pure: sharding and the block plan ----------------------------------------------------------------

def test_sharding_round_trip_and_positions():
    assert chunk_ids(0, 2) == (0, 3) and chunk_ids(1, 2) == (1, 2) and chunk_ids(3, 4) == (3, 4)
    assert local_positions(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert local_positions(8, 1, 2).tolist() == [2, 3, 4, 5]
    assert local_positions(6, 0, 1).tolist() == list(range(6))
    x = torch.randn(2, 3, 16, 5)
    for cp in (1, 2, 4, 8):
        parts = [shard_sequence(x, 2, r, cp) for r in range(cp)]
        assert all(p.shape == (2, 3, 16 // cp, 5) for p in parts)
        assert torch.equal(unshard_sequence(parts, 2, cp), x)
        for r in range(cp):  # the positions name the tokens each rank holds
            assert torch.equal(shard_sequence(torch.arange(16), 0, r, cp), local_positions(16, r, cp))
        assert sorted(torch.cat([local_positions(16, r, cp) for r in range(cp)]).tolist()) == list(range(16))
    with pytest.raises(AssertionError):
        shard_sequence(x, 2, 0, 3)  # 16 tokens do not make 6 equal chunks


@pytest.mark.parametrize("cp", [1, 2, 3, 4, 8])
def test_block_plan_covers_the_causal_triangle_once_with_even_work(cp):
    s = 4 * cp if cp > 1 else 4
    c = s // (2 * cp) if cp > 1 else s
    covered = torch.zeros(s, s, dtype=torch.long)
    work = []
    for r in range(cp):
        pos_q, done = local_positions(s, r, cp), 0
        for i in range(cp):
            j = (r - i) % cp
            pos_k = local_positions(s, j, cp)
            for qh, k0, k1, causal in block_plan(r, j, cp):
                qp, kp = pos_q[qh * c:(qh + 1) * c], pos_k[k0 * c:k1 * c]
                keep = torch.ones(len(qp), len(kp), dtype=torch.bool)
                if causal:
                    keep = keep.tril()
                    assert torch.equal(qp, kp)
                assert (kp[None, :] <= qp[:, None])[keep].all(), "a computed pair is in the future"
                covered[qp[:, None].expand_as(keep)[keep], kp[None, :].expand_as(keep)[keep]] += 1
                done += int(keep.sum())
        work.append(done)
    assert torch.equal(covered, torch.ones(s, s, dtype=torch.long).tril())
    assert len(set(work)) == 1, work


# ----- distributed -------------------------------------------------------------------------------------

def _reference(q, k, v, dout):
    """fp64 causal attention on the full sequence and its grads (k, v repeated for GQA)."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ kr.transpose(-2, -1)) / q.shape[-1] ** 0.5
    s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    out = torch.softmax(s, -1) @ vr
    out.backward(dout.double())
    return out.detach(), q.grad, k.grad, v.grad


def _err(a, b) -> float:
    """max |a - b| / (|b| + max|b|): err < tol is rtol = tol with atol = tol x the tensor's largest
    magnitude (fp32 sums in another order differ by ~1e-7 of it; a wrong block is off by O(1))."""
    a, b = a.double(), b.double()
    return ((a - b).abs() / (b.abs() + b.abs().max().clamp_min(1e-12))).max().item()


def _inputs(nkv, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(B, n, S, D, generator=g).to(dtype) for n in (NQ, nkv, nkv, NQ))
    return q, k, v, dout


def _check_op(group, comm_type, nkv, dtype, seed=0) -> dict[str, float]:
    """Errors of this rank's out / dq / dk / dv vs the reference's slices."""
    cp, r = comm.group_size(group), comm.group_rank(group)
    q, k, v, dout = _inputs(nkv, seed, dtype)
    ref = _reference(q, k, v, dout)
    local = [shard_sequence(t, 2, r, cp).clone().requires_grad_() for t in (q, k, v)]
    out = context_parallel_attention(*local, cp_group=group, comm_type=comm_type)
    assert out.dtype == dtype and out.shape == local[0].shape
    out.backward(shard_sequence(dout, 2, r, cp))
    got = (out, *(t.grad for t in local))
    return {name: _err(a, shard_sequence(b, 2, r, cp)) for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref)}


def _bf16_baseline(nkv) -> dict[str, float]:
    """Single-process bf16 sdpa errors on the same data (the yardstick for BF16_TOL)."""
    q, k, v, dout = _inputs(nkv, 0, torch.bfloat16)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    rep = NQ // nkv
    out = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1),
                                                           v.repeat_interleave(rep, 1), is_causal=True)
    out.backward(dout)
    ref = _reference(q, k, v, dout)
    return {n: _err(a, b) for n, a, b in zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad), ref)}


def _record_ring_order(group) -> list[tuple]:
    """Call order in one forward + backward of the ring: ("post", tags) / ("fwd",) / ("bwd",)."""
    events, post, fwd, bwd = [], comm.batch_isend_irecv, ring._attend_block, ring._attend_block_backward

    def rec_post(ops):
        events.append(("post", tuple(sorted({op.tag for op in ops}))))
        return post(ops)

    def rec(name, fn):
        def wrapped(*a):
            events.append((name,))
            return fn(*a)
        return wrapped

    comm.batch_isend_irecv, ring._attend_block, ring._attend_block_backward = (
        rec_post, rec("fwd", fwd), rec("bwd", bwd))
    try:
        q, k, v, dout = _inputs(2, 5, torch.float32)
        r, cp = comm.group_rank(group), comm.group_size(group)
        local = [shard_sequence(t, 2, r, cp).requires_grad_() for t in (q, k, v)]
        ring.ring_attention(*local, group).backward(shard_sequence(dout, 2, r, cp))
    finally:
        comm.batch_isend_irecv, ring._attend_block, ring._attend_block_backward = post, fwd, bwd
    return events


def _traffic(group, comm_type, nkv) -> tuple[dict, dict]:
    """(bytes sent in forward, in backward) by comm.traffic, and what theory says."""
    cp, r = comm.group_size(group), comm.group_rank(group)
    q, k, v, dout = (shard_sequence(t, 2, r, cp) for t in _inputs(nkv, 7, torch.float32))
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    comm.traffic.name_group(group, "cp")
    comm.traffic.enabled = True
    try:
        out = context_parallel_attention(q, k, v, cp_group=group, comm_type=comm_type)
        fwd = comm.traffic.reset()
        out.backward(dout)
        bwd = comm.traffic.reset()
    finally:
        comm.traffic.enabled = False
    if comm_type == "p2p":
        theory = ring_send_bytes(k, v, cp)
    else:  # q, k, v (kv heads replicated up to lcm(nkv, cp)) and out cross twice: (cp-1)/cp each
        kv_heads = nkv * cp // math.gcd(nkv, cp)
        moved = (2 * NQ + 2 * kv_heads) * B * (S // cp) * D * 4 * (cp - 1) / cp
        theory = {"forward": moved, "backward": moved}
    return (fwd, bwd), theory


def _worker(rank, world):
    cp4 = comm.new_group([0, 1, 2, 3])
    cp2 = [comm.new_group([0, 2]), comm.new_group([1, 3])][rank % 2]  # strided, like tp 2 x cp 2
    cp1 = [comm.new_group([i]) for i in range(4)][rank]
    errors, bf16 = {}, {}
    for cp, group in ((4, cp4), (2, cp2), (1, cp1)):
        for comm_type in ("p2p", "a2a"):
            for heads, nkv in HEADS.items():
                errors[(cp, comm_type, heads)] = _check_op(group, comm_type, nkv, torch.float32, seed=cp)
            if cp > 1:
                bf16[(cp, comm_type)] = _check_op(group, comm_type, HEADS["gqa"], torch.bfloat16)
    # the ring itself at cp 1 (the entry point hands cp 1 to the core)
    q, k, v, dout = _inputs(2, 3, torch.float32)
    ref = _reference(q, k, v, dout)
    local = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ring.ring_attention(*local, cp1)
    out.backward(dout)
    ring_cp1 = {n: _err(a, b) for n, a, b in zip(("out", "dq", "dk", "dv"), (out, *(t.grad for t in local)), ref)}
    sdpa_equal = torch.equal(context_parallel_attention(q, k, v, cp_group=cp1, comm_type="p2p"),
                             torch.nn.functional.scaled_dot_product_attention(
                                 q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True))
    traffic = {(cp, t): _traffic(g, t, 2) for cp, g in ((4, cp4), (2, cp2)) for t in ("p2p", "a2a")}
    traffic[(4, "a2a", "mqa")] = _traffic(cp4, "a2a", 1)
    return {"errors": errors, "bf16": bf16, "bf16_baseline": _bf16_baseline(HEADS["gqa"]), "ring_cp1": ring_cp1,
            "sdpa_equal": sdpa_equal, "order": {cp: _record_ring_order(g) for cp, g in ((4, cp4), (2, cp2))},
            "traffic": traffic}


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, 4)


def test_fp32_matches_full_attention(results):
    for rank, res in enumerate(results):
        for case, errs in res["errors"].items():
            for name, err in errs.items():
                assert err < RTOL, (rank, case, name, err)
        for name, err in res["ring_cp1"].items():
            assert err < RTOL, (rank, "ring at cp 1", name, err)
        assert res["sdpa_equal"], "cp 1 is the core attention itself"


def test_bf16_within_tolerance(results):
    for rank, res in enumerate(results):
        assert max(res["bf16_baseline"].values()) < BF16_TOL
        for case, errs in res["bf16"].items():
            for name, err in errs.items():
                assert err < BF16_TOL, (rank, case, name, err, "bf16 sdpa baseline", res["bf16_baseline"])


def test_traffic_matches_theory(results):
    for rank, res in enumerate(results):
        for case, ((fwd, bwd), theory) in res["traffic"].items():
            kind = "p2p_send" if case[1] == "p2p" else "all_to_all"
            assert set(fwd) == {(kind, "cp")} and set(bwd) == {(kind, "cp")}, (case, fwd, bwd)
            assert fwd[(kind, "cp")] == pytest.approx(theory["forward"], rel=1e-12), (rank, case)
            assert bwd[(kind, "cp")] == pytest.approx(theory["backward"], rel=1e-12), (rank, case)


def test_ring_posts_the_next_block_before_computing(results):
    kv, dkv = ("post", (ring._TAG_K, ring._TAG_V)), ("post", (ring._TAG_DK, ring._TAG_DV))
    for rank, res in enumerate(results):
        for cp, events in res["order"].items():
            r = rank if cp == 4 else rank // 2  # group rank in [0, 2] / [1, 3]
            expected = []
            for i in range(cp):  # forward: the transfer of block i+1 is posted before block i's compute
                expected += ([kv] if i < cp - 1 else []) + [("fwd",)] * len(block_plan(r, (r - i) % cp, cp))
            for i in range(cp):  # backward: likewise; the dK/dV hop after the compute that fills it
                expected += ([kv] if i < cp - 1 else []) + [("bwd",)] * len(block_plan(r, (r - i) % cp, cp))
                expected += [dkv] if i > 0 else []
            assert events == expected, (rank, cp, events)
