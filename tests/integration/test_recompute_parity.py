"""Recomputation changes no bit: per-step loss and grad norm of each layout with full (uniform, block)
or selective recomputation are == those of the same layout without it, over test_layout_parity's 12
steps, with hidden and attention dropout 0.1 (so every dropout mask, the tensor-parallel stream's
included, must be replayed exactly). Covered: GPT-2 and Llama blocks, tp 2 with and without sequence
parallelism, pp 2 with vp 2, dp 2 with ZeRO-3 (parameters gathered for the recomputation) and CPU
optimizer + parameter offload, and the checkpointed inputs partitioned across tp ranks
(distribute_saved_activations) and kept in host memory (cpu_offload_activations). One 2-process launch trains them all (~50 s); single-process variants (Llama
selective, every method) are bitwise-checked in tests/unit/test_recompute.py.
"""

import pytest

from tests.integration.test_layout_parity import Layout, run_launches

DROPOUT = 0.1
FULL = (("recompute_granularity", "full"),)
SELECTIVE = (("recompute_granularity", "selective"),)
FULL_BLOCK = FULL + (("recompute_method", "block"), ("recompute_num_layers", 1))
FULL_2_OFFLOADED = FULL + (("recompute_num_layers", 2), ("distribute_saved_activations", True),
                           ("cpu_offload_activations", True))

L = Layout
TP2 = L(tp=2, dropout=DROPOUT)
PP2_VP2 = L(pp=2, vp=2, model="llama", dropout=DROPOUT)  # 2 layers per model chunk
TP2_SP = L(tp=2, dropout=DROPOUT, activation=(("sequence_parallel", True),))
ZERO3 = L(zero=3, offload="cpu+param", dropout=DROPOUT)  # dp 2, accumulation 2
RECOMPUTED = {  # name -> layout with recomputation; its twin: the same without (_twin)
    "tp2-full-uniform2-partitioned-offloaded": TP2._replace(activation=FULL_2_OFFLOADED),
    "tp2-selective": TP2._replace(activation=SELECTIVE),
    "tp2-sp-full-uniform1-offloaded": TP2_SP._replace(activation=TP2_SP.activation + FULL
                                                      + (("cpu_offload_activations", True),)),
    "pp2-vp2-llama-full-block1": PP2_VP2._replace(activation=FULL_BLOCK),
    "dp2-zero3-offload-full-uniform1": ZERO3._replace(activation=FULL),
}


def _twin(layout: Layout) -> Layout:
    return layout._replace(activation=tuple(kv for kv in layout.activation if kv[0] == "sequence_parallel"))


TWINS = list(dict.fromkeys(_twin(layout) for layout in RECOMPUTED.values()))


@pytest.fixture(scope="module")
def histories(tiny_dataset):
    return run_launches({2: TWINS + list(RECOMPUTED.values())}, *tiny_dataset)


@pytest.mark.parametrize("name", list(RECOMPUTED))
def test_recomputation_is_bitwise_the_same_training(histories, name):
    layout = RECOMPUTED[name]
    got, twin = histories[(2, layout)], histories[(2, _twin(layout))]
    assert len(got) == len(twin) == 12
    for step, ((loss, norm), (twin_loss, twin_norm)) in enumerate(zip(got, twin), start=1):
        assert (loss, norm) == (twin_loss, twin_norm), f"step {step}: {loss}, {norm} vs {twin_loss}, {twin_norm}"

