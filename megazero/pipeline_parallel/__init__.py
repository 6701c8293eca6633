"""Pipeline parallelism: layer partition, schedule plans (1F1B, interleaved 1F1B) and their simulator,
p2p transfers, and the executor that runs a plan on real tensors."""
