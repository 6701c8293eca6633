"""Ring attention (`--cp-comm-type p2p`): causal attention over a sequence sharded across the cp ranks.

Layout (sharding.py): cp rank r holds q, k, v for global chunks r and 2cp-1-r of 2cp chunks, each
c = s / (2cp) tokens: local tensors [b, heads, 2c, d]. K/V blocks circulate around the cp ring (send
to rank r+1, receive from r-1): at step i (0..cp-1) rank r holds the K/V block of rank j = (r - i) mod
cp. Only the nkv key/value heads travel (GQA); they are repeated to the nq query heads locally, for
the math only.

Which (q chunk, kv chunk) pairs are computed (block_plan), by global chunk index: kv < q -> the full
block, kv == q -> the causal (diagonal) block, kv > q -> skipped. With the load-balanced layout every
rank computes the same amount: step 0 (own block) = 2 diagonal blocks + 1 full one; a block from a
lower rank (j < r) = the kv chunk j against both local q chunks; from a higher rank (j > r) = the late
q chunk against the whole block.

Forward, online softmax. Each block gives its own normalised output o_b = softmax(q k_b^T * scale) v_b
and log-sum-exp lse_b = log sum_k exp(q k^T * scale) (per query row). Two partial results over
disjoint key sets merge exactly:
    lse = logaddexp(lse_1, lse_2),  o = o_1 exp(lse_1 - lse) + o_2 exp(lse_2 - lse).
Accumulation is in fp32 (inputs are upcast per block; K/V travel in their own dtype); the output is
cast back to q's dtype. Step 0 always holds both diagonal blocks, so every row's lse is finite after it.

Backward (flash-attention style), per block, with lse and D = rowsum(dout * out) from the forward:
    p = exp(q k^T * scale - lse)      (0 above the diagonal on a causal block)
    dv += p^T dout,  dp = dout v^T,  ds = p * (dp - D),  dq += ds k * scale,  dk += ds^T q * scale.
K/V circulate again as in the forward. dK/dV of a block are accumulated by travelling with it: the
owner keeps its own step-0 contribution; from step 1 on, the rank holding block j adds its part to
the dK/dV buffer received from r-1 (zeros at step 1) and sends it on to r+1; after step cp-1 the
holder is rank j-1, so that last send lands at the owner, which adds it to its own part. Per call
each rank sends cp-1 K/V blocks forward and cp-1 (K, V, dK, dV) backward (ring_send_bytes); dK/dV
travel in K/V's dtype (Megatron / TransformerEngine do the same), accumulated in fp32 on each rank.

Overlap: the transfer of the next K/V block is posted (comm.batch_isend_irecv) before computing on
the current block and waited after; backward's dK/dV transfer overlaps the next step's compute.
Bytes sent are counted by comm.traffic ("p2p_send" on the cp group) like every p2p transfer.
No dropout (the caller refuses attention dropout with cp > 1).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megazero import comm
from megazero.context_parallel.sharding import chunk_ids

# message tags on the cp group (scoped to that group): each kind keeps its own in-order stream
_TAG_K, _TAG_V, _TAG_DK, _TAG_DV = 1, 2, 3, 4


def block_plan(cp_rank: int, held_rank: int, cp: int) -> list[tuple[int, int, int, bool]]:
    """The blocks rank `cp_rank` computes while holding rank `held_rank`'s K/V: (q half, first kv half,
    end kv half, causal); halves index the two local chunks (at cp 1 a single "half": the whole
    sequence). Adjacent full kv halves of one q half are merged into one block (one matmul)."""
    if cp == 1:
        return [(0, 0, 1, True)]
    plan: list[tuple[int, int, int, bool]] = []
    for qh, qc in enumerate(chunk_ids(cp_rank, cp)):
        for kh, kc in enumerate(chunk_ids(held_rank, cp)):
            if kc > qc:
                continue  # entirely in the future: masked out by causality
            causal = kc == qc
            if plan and plan[-1][0] == qh and plan[-1][2] == kh and not plan[-1][3] and not causal:
                plan[-1] = (qh, plan[-1][1], kh + 1, False)
            else:
                plan.append((qh, kh, kh + 1, causal))
    return plan


def ring_send_bytes(k: torch.Tensor, v: torch.Tensor, cp: int) -> dict[str, int]:
    """Bytes one rank sends in one call: cp-1 local K/V blocks forward; backward cp-1 K/V blocks and
    cp-1 dK/dV buffers (K/V's dtype and shape)."""
    kv = k.numel() * k.element_size() + v.numel() * v.element_size()
    return {"forward": (cp - 1) * kv, "backward": 2 * (cp - 1) * kv}


class _Ring:
    """The cp group as a ring: every transfer goes to group rank r+1 and comes from r-1."""

    def __init__(self, group):
        self.group, self.size, self.rank = group, comm.group_size(group), comm.group_rank(group)
        ranks = dist.get_process_group_ranks(group)  # P2POp peers are global ranks
        self.next, self.prev = ranks[(self.rank + 1) % self.size], ranks[(self.rank - 1) % self.size]

    def post(self, tensors, tags) -> "_Transfer":
        """Send `tensors` on and receive same-shaped ones from behind, without waiting."""
        sent = [t.contiguous() for t in tensors]
        received = [torch.empty_like(t) for t in sent]
        ops = [op for t, buf, tag in zip(sent, received, tags)
               for op in (dist.P2POp(dist.isend, t, self.next, self.group, tag),
                          dist.P2POp(dist.irecv, buf, self.prev, self.group, tag))]
        return _Transfer(received, comm.batch_isend_irecv(ops), sent)


class _Transfer:
    """Transfers in flight: `received` is valid after wait(); the sent tensors are kept alive until then."""

    def __init__(self, received, handles, sent):
        self.received, self._handles, self._sent = received, handles, sent

    def wait(self) -> list[torch.Tensor]:
        for h in self._handles:
            h.wait()
        self._sent = None
        return self.received


def _mask(scores: torch.Tensor) -> torch.Tensor:
    """True above the diagonal of the last two dims (a diagonal block: the same q and kv chunk)."""
    n, m = scores.shape[-2:]
    return torch.ones(n, m, dtype=torch.bool, device=scores.device).triu(1)


def _scores(q, k, scale, causal):
    s = torch.matmul(q, k.transpose(-2, -1)) * scale  # [b, h, cq, ck] fp32
    return s.masked_fill(_mask(s), float("-inf")) if causal else s


def _attend_block(q, k, v, scale: float, causal: bool):
    """One block's forward. q [b, h, cq, d], k, v [b, h, ck, d], fp32, heads already repeated.
    Returns (out [b, h, cq, d] normalised over this block's keys, lse [b, h, cq])."""
    s = _scores(q, k, scale, causal)
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(torch.exp(s - lse.unsqueeze(-1)), v), lse


def _attend_block_backward(q, k, v, dout, lse, delta, scale: float, causal: bool):
    """One block's backward (module docstring). q, dout [b, h, cq, d]; k, v [b, h, ck, d]; lse, delta
    [b, h, cq]; all fp32. Returns this block's (dq, dk, dv)."""
    p = torch.exp(_scores(q, k, scale, causal) - lse.unsqueeze(-1))  # [b, h, cq, ck]
    dv = torch.matmul(p.transpose(-2, -1), dout)
    ds = p * (torch.matmul(dout, v.transpose(-2, -1)) - delta.unsqueeze(-1))
    return torch.matmul(ds, k) * scale, torch.matmul(ds.transpose(-2, -1), q) * scale, dv


def _merge(out, lse, block_out, block_lse):
    """Online-softmax merge of two partial results over disjoint keys (None: nothing yet)."""
    if out is None:
        return block_out, block_lse
    new = torch.logaddexp(lse, block_lse)
    return (out * torch.exp(lse - new).unsqueeze(-1) + block_out * torch.exp(block_lse - new).unsqueeze(-1),
            new)


def _repeat_heads(t: torch.Tensor, rep: int) -> torch.Tensor:
    """[b, nkv, s, d] any dtype -> [b, nkv * rep, s, d] fp32 (kv head m serves query heads m*rep ..)."""
    t = t.float()
    return t.repeat_interleave(rep, dim=1) if rep > 1 else t


def _sum_heads(t: torch.Tensor, rep: int) -> torch.Tensor:
    """Gradient of _repeat_heads: [b, nkv * rep, s, d] -> [b, nkv, s, d]."""
    if rep == 1:
        return t
    b, h, s, d = t.shape
    return t.view(b, h // rep, rep, s, d).sum(2)


class RingAttention(torch.autograd.Function):
    """out = causal softmax(q k^T / sqrt(d)) v over the whole (cp-sharded) sequence; q [b, nq, s/cp, d],
    k, v [b, nkv, s/cp, d] (load-balanced chunk order) -> out [b, nq, s/cp, d] in q's dtype."""

    @staticmethod
    def forward(ctx, q, k, v, cp_group):
        ring = _Ring(cp_group)
        cp, r = ring.size, ring.rank
        rep, scale = q.shape[1] // k.shape[1], q.shape[-1] ** -0.5
        c = q.shape[2] // (1 if cp == 1 else 2)  # tokens per local chunk
        qf = q.float()
        out, lse = [None, None], [None, None]  # per local q chunk, merged over the blocks seen so far
        # contiguous copies, sent and kept for backward: v (often k too) is a view of the fused QKV
        # output, which saving the view would keep whole ([b, s/cp, (nq + 2 nkv) d] instead of nkv d)
        own_kv = kv = (k.contiguous(), v.contiguous())
        for i in range(cp):
            nxt = ring.post(kv, (_TAG_K, _TAG_V)) if i < cp - 1 else None  # posted before the compute
            kf, vf = (_repeat_heads(t, rep) for t in kv)  # [b, nq, 2c, d]
            for qh, k0, k1, causal in block_plan(r, (r - i) % cp, cp):
                o, l = _attend_block(qf[:, :, qh * c:(qh + 1) * c], kf[:, :, k0 * c:k1 * c],
                                     vf[:, :, k0 * c:k1 * c], scale, causal)
                out[qh], lse[qh] = _merge(out[qh], lse[qh], o, l)
            if nxt is not None:
                kv = nxt.wait()
        n = 1 if cp == 1 else 2
        result = torch.cat(out[:n], dim=2).to(q.dtype)
        ctx.save_for_backward(q, *own_kv, result, torch.cat(lse[:n], dim=2))
        ctx.cp_group = cp_group
        return result

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        ring = _Ring(ctx.cp_group)
        cp, r = ring.size, ring.rank
        rep, scale = q.shape[1] // k.shape[1], q.shape[-1] ** -0.5
        c = q.shape[2] // (1 if cp == 1 else 2)
        qf, dof = q.float(), dout.float()
        delta = (dof * out.float()).sum(-1)  # D = rowsum(dout * out) [b, nq, 2c]
        dq = torch.zeros_like(qf)
        kv, own, travelling = (k, v), None, None  # (saved contiguous); travelling: a _Transfer
        for i in range(cp):
            nxt = ring.post(kv, (_TAG_K, _TAG_V)) if i < cp - 1 else None  # posted before the compute
            kf, vf = (_repeat_heads(t, rep) for t in kv)
            dk, dv = torch.zeros_like(kf), torch.zeros_like(vf)  # this block's part, repeated heads
            for qh, k0, k1, causal in block_plan(r, (r - i) % cp, cp):
                rows, cols = slice(qh * c, (qh + 1) * c), slice(k0 * c, k1 * c)
                g = _attend_block_backward(qf[:, :, rows], kf[:, :, cols], vf[:, :, cols], dof[:, :, rows],
                                           lse[:, :, rows], delta[:, :, rows], scale, causal)
                dq[:, :, rows] += g[0]
                dk[:, :, cols] += g[1]
                dv[:, :, cols] += g[2]
            dk, dv = _sum_heads(dk, rep), _sum_heads(dv, rep)  # [b, nkv, 2c, d] fp32
            if i == 0:
                own = (dk, dv)
            else:  # add to the block's travelling dK/dV (zeros at step 1) and pass it on
                if travelling is not None:
                    dk_in, dv_in = travelling.wait()
                    dk, dv = dk + dk_in.float(), dv + dv_in.float()
                travelling = ring.post((dk.to(k.dtype), dv.to(v.dtype)), (_TAG_DK, _TAG_DV))
            if nxt is not None:
                kv = nxt.wait()
        dk, dv = own
        if travelling is not None:  # the last hop brought this rank's own block's dK/dV home
            dk_in, dv_in = travelling.wait()
            dk, dv = dk + dk_in.float(), dv + dv_in.float()
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp_group) -> torch.Tensor:
    """Causal attention of the local q [b, nq, s/cp, d] against the whole sequence's k, v [b, nkv,
    s/cp, d] (nq a multiple of nkv), all in the load-balanced chunk order; returns [b, nq, s/cp, d]."""
    assert q.shape[1] % k.shape[1] == 0 and k.shape == v.shape, (q.shape, k.shape, v.shape)
    assert comm.group_size(cp_group) == 1 or q.shape[2] % 2 == 0, "two equal chunks per rank"
    return RingAttention.apply(q, k, v, cp_group)
