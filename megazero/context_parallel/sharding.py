"""Load-balanced causal sharding of the sequence over the cp ranks (Megatron-LM's layout).

With causal attention, token t attends to tokens 0..t, so a plain split (rank r holds the r-th s/cp
slice) leaves the last rank cp times the work of the first. Instead the sequence of length s is cut
into 2*cp chunks of s/(2cp) tokens and cp rank r holds chunks r and 2cp-1-r, concatenated: every rank
then holds one "early" and one "late" chunk and does the same attention work. Worked example, cp 2,
s 8 (chunks of 2): rank 0 holds tokens [0 1 | 6 7], rank 1 holds [2 3 | 4 5].

Everything here is a pure function of (seq_length, cp_rank, cp): positions for learned or rotary
embeddings come from `local_positions` (the global token index), never from the local index.
"""

from __future__ import annotations

from typing import Sequence

import torch


def chunk_ids(cp_rank: int, cp: int) -> tuple[int, int]:
    """The two global chunk indices (of 2*cp) that cp rank `cp_rank` holds, in local order."""
    assert 0 <= cp_rank < cp, (cp_rank, cp)
    return cp_rank, 2 * cp - 1 - cp_rank


def chunk_length(seq_length: int, cp: int) -> int:
    """Tokens per chunk: s / (2 cp); the sequence must divide into 2*cp equal chunks."""
    assert seq_length % (2 * cp) == 0, f"sequence length {seq_length} is not divisible by 2 * cp = {2 * cp}"
    return seq_length // (2 * cp)


def local_positions(seq_length: int, cp_rank: int, cp: int, device=None) -> torch.Tensor:
    """LongTensor [s / cp]: the global token index of each local position (for position embeddings
    and rope). At cp 1 it is arange(s)."""
    c = chunk_length(seq_length, cp)
    return torch.cat([torch.arange(i * c, (i + 1) * c, device=device) for i in chunk_ids(cp_rank, cp)])


def shard_sequence(x: torch.Tensor, dim: int, cp_rank: int, cp: int) -> torch.Tensor:
    """This rank's two chunks of `x` along `dim` (the global sequence), concatenated: [.., s, ..] ->
    [.., s / cp, ..]. At cp 1 it returns `x` itself."""
    if cp == 1:
        return x
    c = chunk_length(x.shape[dim], cp)
    return torch.cat([x.narrow(dim, i * c, c) for i in chunk_ids(cp_rank, cp)], dim=dim)


def unshard_sequence(parts_in_rank_order: Sequence[torch.Tensor], dim: int, cp: int) -> torch.Tensor:
    """Inverse of shard_sequence: every cp rank's local tensor [.., s / cp, ..] (rank order) -> the
    global sequence [.., s, ..] in natural token order."""
    assert len(parts_in_rank_order) == cp, (len(parts_in_rank_order), cp)
    if cp == 1:
        return parts_in_rank_order[0]
    chunks: list[torch.Tensor | None] = [None] * (2 * cp)
    for rank, part in enumerate(parts_in_rank_order):
        first, second = part.chunk(2, dim=dim)
        chunks[chunk_ids(rank, cp)[0]], chunks[chunk_ids(rank, cp)[1]] = first, second
    return torch.cat(chunks, dim=dim)
