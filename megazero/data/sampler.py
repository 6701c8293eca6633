"""Which samples each data-parallel rank reads, step by step, and the DataLoader around it.

Order (Megatron-LM's pretraining sampler): the dataset is read front to back from
`consumed_samples`. Each step takes the next ``micro_batch_size * dp_size`` consecutive sample
indices; dp rank r gets the slice ``[r * mbs, (r + 1) * mbs)`` of that chunk. An incomplete
trailing chunk is dropped.

Consequences the trainer relies on:

* The union over dp ranks of step k's micro-batches is the same set of samples for any dp size
  with the same ``mbs * dp`` (and, with gradient accumulation, the global batch of consecutive
  chunks is the same sample range for any layout with the same global batch size).
* Resume: a sampler built with ``consumed_samples = c`` yields exactly what an uninterrupted one
  yields once c samples have been consumed; the checkpoint stores only c.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset


class DataParallelSampler(torch.utils.data.Sampler):
    """Batch sampler: iterates over lists of `micro_batch_size` sample indices for one dp rank."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int):
        if total_samples <= 0:
            raise ValueError(f"total_samples must be positive, got {total_samples}; the dataset is empty")
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        if dp_size <= 0:
            raise ValueError(f"dp_size must be positive, got {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} out of range for dp_size {dp_size}")
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(f"consumed_samples {consumed_samples} is outside [0, {total_samples}]; "
                             f"the checkpoint was made with a larger dataset: train with at least "
                             f"as many samples as the run that wrote it")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.step_size = micro_batch_size * dp_size  # samples per step over all dp ranks

    def __len__(self) -> int:
        """Number of micro-batches this rank will yield."""
        return (self.total_samples - self.consumed_samples) // self.step_size

    def __iter__(self) -> Iterator[list[int]]:
        first = self.consumed_samples + self.dp_rank * self.micro_batch_size
        for k in range(len(self)):
            start = first + k * self.step_size
            yield list(range(start, start + self.micro_batch_size))


def build_data_iterator(dataset: Dataset | None, consumed_samples: int, micro_batch_size: int,
                        dp_rank: int, dp_size: int, num_workers: int = 0
                        ) -> Iterator[dict[str, torch.Tensor]] | None:
    """Iterator of {"tokens", "labels"}: int64[mbs, seq] batches for this dp rank, or None."""
    if dataset is None:
        return None
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    sampler = DataParallelSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    # A generator of its own: creating a DataLoader iterator draws a base seed from the generator it is
    # given, by default torch's global one, which is the ambient RNG stream hidden dropout draws from
    # (megazero/random.py). A resumed run creates its iterator after restoring that stream, so the
    # draw would shift every later dropout mask relative to the uninterrupted run.
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=False,
                        persistent_workers=False, generator=torch.Generator())
    return iter(loader)
