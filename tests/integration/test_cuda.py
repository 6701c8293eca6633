"""The CUDA / NCCL path: the same training step on a GPU. Skipped without CUDA (CI has none); run it
where a GPU is lent. One process with the NCCL backend exercises device-side scalar reductions, the
ZeRO engine's device buffers and the bf16 path; parity with the CPU run is checked loosely (different
kernels and reduction orders)."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _train(rank, world, prefix, tokenizer_model, device_type, dtype, zero):
    import torch.distributed as dist

    from megazero.topology import GridShape, Topology
    from megazero.training.data_setup import ResolvedData
    from megazero.training.trainer import Trainer
    from tests.integration.test_layout_parity import L, parity_config

    if device_type == "cuda":
        torch.cuda.set_device(rank)
        dist.destroy_process_group()  # the helper started gloo; this test needs NCCL
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    cfg = parity_config(prefix, tokenizer_model, L(zero=zero, dtype=dtype))
    topo = Topology.build(GridShape(world), rank)
    data = ResolvedData(prefix=prefix, tokenizer_model=tokenizer_model, vocab_size=512, description="tiny")
    trainer = Trainer(cfg, topo, data, torch.device(device_type), run_dir=None, log=lambda _: None)
    return [r.lm_loss for r in trainer.train()]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,zero", [("fp32", 0), ("bf16", 1), ("bf16", 3)])
def test_cuda_nccl_training_matches_cpu(tiny_dataset, dtype, zero):
    from tests.dist_utils import run_distributed

    prefix, model = tiny_dataset
    gpu = run_distributed(_train, 1, prefix, model, "cuda", dtype, zero)[0]
    cpu = run_distributed(_train, 1, prefix, model, "cpu", dtype, zero)[0]
    assert gpu[-1] < gpu[0] - 0.3
    assert gpu == pytest.approx(cpu, rel=1e-2 if dtype == "bf16" else 1e-4)
