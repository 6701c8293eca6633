"""Layout parity: the same tiny GPT, seed and data trained under every tp x pp (x vp) x dp layout that
fits in 8 ranks, and under ZeRO stages 0-3, gives the same per-step loss and grad norm as one process
(fp32, rtol 1e-5).

Dropout is 0: dropout masks on head-sharded activations are drawn per TP rank by design, so they
cannot match a different tp size. Global batch 8 with micro batch 2 makes gradient accumulation 4 / 2
/ 1 at dp 1 / 2 / 4 (and those are the pipeline's microbatches), so accumulation is covered too. One
launch per world size runs every layout of that size.

Offload (cpu / nvme optimizer state, cpu parameters) must match the same layout without offload to
rtol 1e-6: only the optimizer's home and kernel (the CPU Adam) change.
"""

import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from megazero.config import DataConfig, ModelConfig, OptimizerConfig, RunConfig, TrainingConfig
from megazero.topology import GridShape, Topology
from megazero.training.data_setup import ResolvedData
from megazero.training.trainer import Trainer
from megazero.validation import validate
from tests.dist_utils import run_distributed

STEPS = 12
RTOL = 1e-5
OFFLOAD_RTOL = 1e-6
NVME_DIR = Path(tempfile.gettempdir()) / "megazero-parity-nvme"
GLOBAL_BATCH = 8


class Layout(NamedTuple):
    tp: int = 1
    pp: int = 1
    vp: int = 1
    micro: int = 2
    first_stage_layers: int | None = None
    zero: int = 0
    dtype: str = "fp32"
    # none | cpu | nvme (optimizer state) | cpu+param (also ZeRO-3 parameters) | cpu-reference (the CPU
    # Adam's pure-torch reference: the "kernel absent" dispatch path)
    offload: str = "none"
    # adamw | sgd (momentum 0.9, Megatron's default) | sgd-nomomentum (SGD declaring no state); tests/integration/test_sgd.py
    optimizer: str = "adamw"
    model: str = "gpt2"  # gpt2 | llama | llama-tied (MODEL_PARTS); tests/integration/test_llama_parity.py
    # ActivationConfig fields as ((name, value), ...); dropout: hidden and attention dropout (tests/
    # integration/test_recompute_parity.py)
    activation: tuple = ()
    dropout: float = 0.0
    cp: int = 1  # context parallelism (tests/integration/test_context_parallel_parity.py)
    cp_comm: str = "p2p"  # --cp-comm-type


def parity_config(prefix, tokenizer_model, layout: Layout) -> RunConfig:
    tp, pp, vp, micro, first_stage_layers, zero, dtype, offload = layout[:8]
    optimizer_home = offload.split("+")[0].removesuffix("-reference")
    offload_cfg = {"offload_optimizer": optimizer_home, "offload_param": "cpu" if "+param" in offload else "none",
                   "offload_nvme_path": str(NVME_DIR) if optimizer_home == "nvme" else None,
                   "offload_sub_group_size": 5000}  # several sub-groups: the double-buffered path
    return RunConfig(
        model=ModelConfig(num_layers=8, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=512,
                          make_vocab_size_divisible_by=64, hidden_dropout=layout.dropout,
                          attention_dropout=layout.dropout, **MODEL_PARTS[layout.model]),
        optimizer=_optimizer_config(layout.optimizer, layout.model),
        data=DataConfig(data_path=str(prefix), tokenizer_model=str(tokenizer_model), split="90,10,0"),
        training=TrainingConfig(micro_batch_size=micro, global_batch_size=GLOBAL_BATCH, train_iters=STEPS, seed=7,
                                eval_interval=STEPS, eval_iters=1, log_interval=STEPS),
    ).replace(parallel={"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                        "virtual_pipeline_model_parallel_size": vp,
                        "decoder_first_pipeline_num_layers": first_stage_layers,
                        "context_parallel_size": layout.cp, "cp_comm_type": layout.cp_comm},
              zero={"stage": zero, "reduce_bucket_size": 20_000, **offload_cfg},  # several buckets, uneven shards
              precision={"params_dtype": dtype}, activation=dict(layout.activation))


# Llama-family blocks on the parity shape (4 heads): 2 key/value groups, so tp 4 shares each group by 2 ranks
LLAMA_PARTS = dict(normalization="RMSNorm", position_embedding_type="rope", swiglu=True, add_bias_linear=False,
                   group_query_attention=True, num_query_groups=2, untie_embeddings_and_output_weights=True)
LLAMA_LR = 1e-3
MODEL_PARTS = {"gpt2": {}, "llama": LLAMA_PARTS,
               "llama-tied": {**LLAMA_PARTS, "untie_embeddings_and_output_weights": False}}


def _optimizer_config(optimizer: str, model: str = "gpt2") -> OptimizerConfig:
    if optimizer == "adamw":
        lr = 2e-3 if model == "gpt2" else LLAMA_LR
        return OptimizerConfig(lr=lr, min_lr=lr / 10, lr_warmup_iters=3, clip_grad=1.0, weight_decay=0.1)
    momentum = {"sgd": 0.9, "sgd-nomomentum": 0.0}[optimizer]
    return OptimizerConfig(optimizer_type="sgd", sgd_momentum=momentum, lr=0.5, min_lr=0.05, lr_warmup_iters=3,
                           clip_grad=1.0, weight_decay=0.1)


def _train_layouts(rank, world_size, prefix, tokenizer_model, layouts, evaluated=()):
    """layout -> [(loss, grad norm)] per step; for the layouts in `evaluated` also ("eval", layout) ->
    the validation loss after training (trainer.evaluate)."""
    data = ResolvedData(prefix=prefix, tokenizer_model=tokenizer_model, vocab_size=512, description="tiny")
    out = {}
    NVME_DIR.mkdir(exist_ok=True)
    for layout in layouts:
        cfg = parity_config(prefix, tokenizer_model, layout)
        validate(cfg, world_size)
        topo = Topology.build(GridShape(world_size, tp=layout.tp, pp=layout.pp, cp=layout.cp), rank)
        os.environ["MEGATRON_KERNELS_FORCE_REFERENCE"] = "1" if layout.offload.endswith("-reference") else "0"
        trainer = Trainer(cfg, topo, data, torch.device("cpu"), run_dir=None, log=lambda _: None)
        history = trainer.train()
        if layout in evaluated:
            out[("eval", layout)] = trainer.evaluate("valid")
        offload = trainer.zero.optimizer.offload
        files = getattr(offload.store, "dir", None) if offload is not None else None
        if layout.offload == "nvme":
            assert files and len(os.listdir(files)) > 1, "nvme state lives in several sub-group files"
        trainer.close()
        assert files is None or not os.path.exists(files), f"NVMe offload files left behind in {files}"
        out[layout] = [(r.lm_loss, r.grad_norm) for r in history]
    return out


L = Layout
ZERO_LAYOUTS = {  # the ZeRO issue's layouts, each with gradient accumulation 2
    2: [L(micro=2)],                                                   # dp2
    4: [L(micro=1), L(tp=2, micro=2), L(pp=2, micro=2), L(pp=2, vp=2, micro=2)],  # dp4, tp2dp2, pp2dp2, pp2vp2dp2
    8: [L(tp=2, pp=2, micro=2)],                                       # tp2pp2dp2
}
# world size -> layouts run in that launch; dp = world / (tp * pp)
LAUNCHES = {
    1: [L(), L(micro=8)],  # reference (accumulation 4) and the no-accumulation single process
    2: [L(tp=2), L(), L(pp=2), L(pp=2, vp=2), L(pp=2, first_stage_layers=3)]
       + [l._replace(zero=z) for z in (1, 2, 3) for l in ZERO_LAYOUTS[2]],
    4: [L(tp=4), L(tp=2), L(pp=4), L(pp=4, vp=2), L(tp=2, pp=2), L(pp=2, vp=2)]
       + [l._replace(zero=z) for z in (1, 2, 3) for l in ZERO_LAYOUTS[4]],
    8: [L(tp=2, micro=1), L(tp=2, pp=2), L(tp=2, pp=2, vp=2)]
       + [l._replace(zero=z) for z in (1, 2, 3) for l in ZERO_LAYOUTS[8]],
}
# Mixed precision vs the fp32 reference. Tolerances are empirical with margin, per 12 steps of this
# model: bf16 (8-bit mantissa) observed <= 1.1e-4 relative loss and 3.7e-3 grad-norm difference ->
# 1e-3 / 1.5e-2; fp16 (11-bit mantissa, loss scale 2^16) observed <= 1.2e-5 / 1.8e-4 -> 1e-4 / 1e-3.
MIXED = [L(zero=0, dtype="bf16"), L(zero=2, dtype="bf16"), L(zero=1, dtype="fp16"), L(zero=3, dtype="fp16"),
         L(pp=2, dtype="bf16")]
LAUNCHES[2] = LAUNCHES[2] + MIXED
# Offload at ZeRO 1, 2, 3 with dp, tp, pp, vp layouts; each compared with its no-offload twin above.
OFFLOAD = {
    2: [L(zero=1, offload="cpu"), L(zero=2, offload="nvme"), L(zero=3, offload="cpu+param"),
        L(zero=1, offload="cpu-reference"), L(zero=2, dtype="bf16", offload="nvme")],
    4: [L(tp=2, micro=2, zero=2, offload="cpu"), L(pp=2, micro=2, zero=1, offload="nvme"),
        L(pp=2, vp=2, micro=2, zero=3, offload="nvme")],
    8: [L(tp=2, pp=2, micro=2, zero=3, offload="cpu+param"), L(tp=2, pp=2, micro=2, zero=1, offload="nvme")],
}
for _world, _layouts in OFFLOAD.items():
    LAUNCHES[_world] = LAUNCHES[_world] + _layouts + [l._replace(offload="none") for l in _layouts
                                                      if l._replace(offload="none") not in LAUNCHES[_world]]
MIXED_RTOL = {"bf16": 1e-3, "fp16": 1e-4}  # loss
MIXED_NORM_RTOL = {"bf16": 1.5e-2, "fp16": 1e-3}  # grad norm
REFERENCE = (1, L())


def layout_id(world: int, layout: Layout) -> str:
    tp, pp, vp, micro, first, zero, dtype, offload = layout[:8]
    dp = world // (tp * pp * layout.cp)
    uneven = f"-first{first}" if first is not None else ""
    return (f"tp{tp}-pp{pp}{f'-vp{vp}' if vp > 1 else ''}{uneven}-dp{dp}-accum{GLOBAL_BATCH // (micro * dp)}"
            f"{f'-zero{zero}' if zero else ''}{f'-{dtype}' if dtype != 'fp32' else ''}"
            f"{f'-offload-{offload}' if offload != 'none' else ''}"
            f"{f'-{layout.optimizer}' if layout.optimizer != 'adamw' else ''}"
            f"{f'-{layout.model}' if layout.model != 'gpt2' else ''}"
            f"{f'-cp{layout.cp}-{layout.cp_comm}' if layout.cp > 1 else ''}")


def agreed(world: int, per_rank: list[dict]) -> dict:
    """{(world, key): value} for what every rank of one launch returned under key; the ranks must agree."""
    for key in per_rank[0]:
        for r in per_rank[1:]:
            assert r[key] == per_rank[0][key], f"ranks disagree in {key}"
    return {(world, key): value for key, value in per_rank[0].items()}


def run_launches(launches: dict[int, list[Layout]], prefix, model, launch=None, *extra) -> dict:
    """One launch per world size running `launch(rank, world, prefix, model, layouts, *extra)` (default:
    training the layouts); {(world, key): value} of what the ranks returned, which they must agree on
    (every rank reports the same pipeline- and dp-reduced loss and the same global grad norm)."""
    merged = {}
    for world, layouts in launches.items():
        merged.update(agreed(world, run_distributed(launch or _train_layouts, world, prefix, model, layouts, *extra)))
    return merged


@pytest.fixture(scope="module")
def histories(tiny_dataset):
    return run_launches(LAUNCHES, *tiny_dataset)


ALL = [(w, layout) for w, layouts in LAUNCHES.items() for layout in layouts if (w, layout) != REFERENCE]


@pytest.mark.parametrize("key", ALL, ids=[layout_id(*k) for k in ALL])
def test_layout_matches_single_process(histories, key):
    reference, got = histories[REFERENCE], histories[key]
    rtol = MIXED_RTOL.get(key[1].dtype, RTOL)
    assert len(got) == len(reference) == STEPS
    for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(got, reference), start=1):
        assert loss == pytest.approx(ref_loss, rel=rtol), f"step {step} loss {loss} vs {ref_loss}"
        norm_rtol = MIXED_NORM_RTOL.get(key[1].dtype, RTOL)
        assert norm == pytest.approx(ref_norm, rel=norm_rtol), f"step {step} grad norm {norm} vs {ref_norm}"


OFFLOADED = [(w, layout) for w, layouts in OFFLOAD.items() for layout in layouts]


@pytest.mark.parametrize("key", OFFLOADED, ids=[layout_id(*k) for k in OFFLOADED])
def test_offload_matches_the_same_layout_without_offload(histories, key):
    # rtol 1e-6 stands for "identical": the CPU Adam equals torch.optim.AdamW bit for bit (its square
    # root is torch's where torch.sqrt is not IEEE, docs/kernels.md); in bf16 a 1-ulp master difference
    # flips bf16 roundings and shows as ~1e-5. The failure message names the kernel variant that ran.
    from megatron_kernels.cpu_adam import kernel_description

    world, layout = key
    got, twin = histories[key], histories[(world, layout._replace(offload="none"))]
    for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(got, twin), start=1):
        if loss != pytest.approx(ref_loss, rel=OFFLOAD_RTOL) or norm != pytest.approx(ref_norm, rel=OFFLOAD_RTOL):
            adam = ("CPU Adam reference" if layout.offload.endswith("-reference")
                    else f"CPU Adam kernel ({kernel_description() or 'unavailable: reference'})")
            pytest.fail(f"step {step} loss {loss} vs {ref_loss}, grad norm {norm} vs {ref_norm} ({adam})")


def test_training_moves_the_loss(histories):
    losses = [loss for loss, _ in histories[REFERENCE]]
    assert losses[-1] < losses[0] - 0.5, losses
