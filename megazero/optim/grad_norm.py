"""Moved: the gradient-norm counting rule is `megazero.tensor_parallel.sharding.counts_toward_norm`,
next to the ShardSpec it reads (DESIGN.md principle 5). This name stays for the importers not yet
switched (checkpoint/state.py); new code imports it from sharding.py.

Data-parallel sums (stage 0 replicas hold identical reduced gradients, not summed over dp; stages 1-3
hold distinct shards, summed over dp) are zero/optimizer.py's.
"""

from megazero.tensor_parallel.sharding import counts_toward_norm

__all__ = ["counts_toward_norm"]
