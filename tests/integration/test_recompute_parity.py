"""Recomputation changes no bit: per-step loss and grad norm of each layout with full (uniform, block)
or selective recomputation are == those of the same layout without it, over test_layout_parity's 12
steps, with hidden and attention dropout 0.1 (so every dropout mask, the tensor-parallel stream's
included, must be replayed exactly). Covered: GPT-2 and Llama blocks, tp 2 with and without sequence
parallelism, pp 2 (1F1B: several microbatches in flight, each recomputed in its own backward) with and
without vp 2, dp 2 with ZeRO-3 (parameters gathered for the recomputation) and CPU optimizer +
parameter offload, and the checkpointed inputs partitioned across tp ranks
(distribute_saved_activations) and kept in host memory (cpu_offload_activations), both also under
tp 2 x pp 2. Selective and full recomputation each run with tp, sp, pp, vp and ZeRO-3. Two launches (2
and 4 processes); single-process variants (Llama selective, every method) are bitwise-checked in
tests/unit/test_recompute.py.
"""

import pytest

from tests.integration.test_layout_parity import Layout, run_launches

DROPOUT = 0.1
FULL = (("recompute_granularity", "full"),)
SELECTIVE = (("recompute_granularity", "selective"),)
FULL_BLOCK = FULL + (("recompute_method", "block"), ("recompute_num_layers", 1))
OFFLOADED = (("cpu_offload_activations", True),)
PARTITIONED = (("distribute_saved_activations", True),)
FULL_2_OFFLOADED = FULL + (("recompute_num_layers", 2),) + PARTITIONED + OFFLOADED

L = Layout
TP2 = L(tp=2, dropout=DROPOUT)
PP2 = L(pp=2, dropout=DROPOUT)  # 4 layers per stage, 4 microbatches
PP2_VP2 = L(pp=2, vp=2, model="llama", dropout=DROPOUT)  # 2 layers per model chunk
TP2_SP = L(tp=2, dropout=DROPOUT, activation=(("sequence_parallel", True),))
ZERO3 = L(zero=3, offload="cpu+param", dropout=DROPOUT)  # dp 2, accumulation 2
TP2_PP2 = L(tp=2, pp=2, dropout=DROPOUT)  # 4 ranks, dp 1
RECOMPUTED = {  # name -> (world size, layout with recomputation); its twin: the same without (_twin)
    "tp2-full-uniform2-partitioned-offloaded": (2, TP2._replace(activation=FULL_2_OFFLOADED)),
    "tp2-selective": (2, TP2._replace(activation=SELECTIVE)),
    "tp2-sp-full-uniform1-offloaded": (2, TP2_SP._replace(activation=TP2_SP.activation + FULL + OFFLOADED)),
    "tp2-sp-selective": (2, TP2_SP._replace(activation=TP2_SP.activation + SELECTIVE)),
    "pp2-selective": (2, PP2._replace(activation=SELECTIVE)),
    "pp2-full-uniform2-offloaded": (2, PP2._replace(activation=FULL + (("recompute_num_layers", 2),) + OFFLOADED)),
    "pp2-vp2-llama-full-block1": (2, PP2_VP2._replace(activation=FULL_BLOCK)),
    "pp2-vp2-llama-selective": (2, PP2_VP2._replace(activation=SELECTIVE)),
    "dp2-zero3-offload-full-uniform1": (2, ZERO3._replace(activation=FULL)),
    "dp2-zero3-offload-selective": (2, ZERO3._replace(activation=SELECTIVE)),
    "tp2-pp2-full-uniform1-partitioned-offloaded": (4, TP2_PP2._replace(activation=FULL + PARTITIONED + OFFLOADED)),
}


def _twin(layout: Layout) -> Layout:
    return layout._replace(activation=tuple(kv for kv in layout.activation if kv[0] == "sequence_parallel"))


LAUNCHES: dict[int, list[Layout]] = {}  # world size -> the twins, then the recomputed layouts
for _world, _layout in RECOMPUTED.values():
    LAUNCHES.setdefault(_world, [])
    if _twin(_layout) not in LAUNCHES[_world]:
        LAUNCHES[_world].insert(0, _twin(_layout))
    LAUNCHES[_world].append(_layout)


@pytest.fixture(scope="module")
def histories(tiny_dataset):
    return run_launches(LAUNCHES, *tiny_dataset)


@pytest.mark.parametrize("name", list(RECOMPUTED))
def test_recomputation_is_bitwise_the_same_training(histories, name):
    world, layout = RECOMPUTED[name]
    got, twin = histories[(world, layout)], histories[(world, _twin(layout))]
    assert len(got) == len(twin) == 12
    for step, ((loss, norm), (twin_loss, twin_norm)) in enumerate(zip(got, twin), start=1):
        assert (loss, norm) == (twin_loss, twin_norm), f"step {step}: {loss}, {norm} vs {twin_loss}, {twin_norm}"
