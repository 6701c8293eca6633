"""SGD with momentum through every seam an optimizer crosses (issue 11: optimizers as update rules).

The parity model (test_layout_parity.py) trained with Megatron's `--optimizer sgd`: every ZeRO stage,
CPU / NVMe optimizer offload (the host steps SGD with torch's own code) and tp x dp give the single
process's per-step loss and grad norm (fp32, rtol 1e-5), with momentum (state: one momentum buffer per
parameter) and without (an update rule that declares no state). Checkpoints: a tp2 dp2 ZeRO-3 run
saved at step K and resumed in the same layout, in another layout (NVMe offload), and after an offline
reshard to one process continues exactly as the uninterrupted run; the checkpoint holds the momentum
buffers under their own kind and names its optimizer; an Adam checkpoint is refused by an SGD run in
one line unless the optimizer state is not loaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from megazero.checkpoint.format import CheckpointError, read_index, resolve_checkpoint
from megazero.training.data_setup import ResolvedData
from tests.checkpoint_utils import checkpoint_tensors
from tests.dist_utils import run_distributed
from tests.integration.test_checkpoint import _config, _records, _trainer
from tests.integration.test_layout_parity import RTOL, STEPS, Layout, layout_id
from tools import convert_checkpoint

K = 6  # the checkpointed runs save (and stop) after K of STEPS steps
L = Layout
SGD = "sgd"
NO_MOMENTUM = "sgd-nomomentum"
PARITY = {  # world size -> layouts, each compared with the single process of its optimizer
    2: [L(micro=2, zero=z, optimizer=SGD) for z in (0, 1, 2, 3)]
       + [L(micro=2, zero=1, offload="cpu", optimizer=SGD), L(micro=2, zero=2, offload="nvme", optimizer=SGD),
          L(micro=2, zero=3, offload="cpu+param", optimizer=SGD), L(micro=2, zero=2, dtype="fp32", optimizer=NO_MOMENTUM),
          L(micro=2, zero=1, offload="nvme", optimizer=NO_MOMENTUM)],
    4: [L(tp=2, micro=2, zero=1, optimizer=SGD), L(tp=2, micro=2, zero=3, optimizer=SGD)],
}
SOURCE = L(tp=2, micro=2, zero=3, optimizer=SGD)  # 4 ranks: saves at K
RESUMED_4 = [SOURCE, L(tp=2, micro=2, zero=1, offload="nvme", optimizer=SGD)]  # load the source at 4 ranks
RESHARDED = L(micro=2, optimizer=SGD)  # the single process, loading the source resharded offline
REFERENCES = [L(optimizer=SGD), L(optimizer=NO_MOMENTUM)]


def _data(prefix, tokenizer_model) -> ResolvedData:
    return ResolvedData(prefix=prefix, tokenizer_model=tokenizer_model, vocab_size=512, description="tiny")


def _run(rank, world_size, data, layout, root: Path, *, load: Path | None = None, **checkpoint):
    """Train `layout` for STEPS steps (with checkpoint options); (records, log lines)."""
    nvme = root / f"nvme-{world_size}-rank{rank}"
    nvme.mkdir(exist_ok=True)
    logs: list[str] = []
    if load is not None:
        checkpoint["load"] = str(load)
    cfg = _config(data.prefix, data.tokenizer_model, layout, STEPS, nvme, **checkpoint)
    trainer = _trainer(rank, world_size, cfg, layout, data, log=logs.append)
    if load is not None:
        trainer.load(resolve_checkpoint(load))
    records = _records(trainer.train())
    trainer.close()
    return records, logs


def _four(rank, world_size, prefix, tokenizer_model, root: Path):
    data = _data(prefix, tokenizer_model)
    out = {layout: _run(rank, world_size, data, layout, root)[0] for layout in PARITY[4]}
    out["source"] = _run(rank, world_size, data, SOURCE, root, save=str(root / "source"), exit_interval=K)[0]
    for layout in RESUMED_4:
        out[("resumed", layout)] = _run(rank, world_size, data, layout, root, load=root / "source")
    return out


def _two(rank, world_size, prefix, tokenizer_model, root: Path):
    data = _data(prefix, tokenizer_model)
    return {layout: _run(rank, world_size, data, layout, root)[0] for layout in PARITY[2]}


def _one(rank, world_size, prefix, tokenizer_model, root: Path):
    data = _data(prefix, tokenizer_model)
    out = {layout: _run(rank, world_size, data, layout, root)[0] for layout in REFERENCES}
    out["resharded"] = _run(rank, world_size, data, RESHARDED, root, load=root / "resharded")
    # an Adam checkpoint, then an SGD run loading it: refused, unless its optimizer state stays unloaded
    _run(rank, world_size, data, L(micro=2), root, save=str(root / "adam"), exit_interval=K)
    try:
        _run(rank, world_size, data, RESHARDED, root, load=root / "adam")
        out["refusal"] = None
    except CheckpointError as err:
        out["refusal"] = str(err)
    out["no-load-optim"] = _run(rank, world_size, data, RESHARDED, root, load=root / "adam", no_load_optim=True)[1]
    return out


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory):
    prefix, model = tiny_dataset
    root = tmp_path_factory.mktemp("sgd")
    four = run_distributed(_four, 4, prefix, model, root)
    code = convert_checkpoint.main(["--load", str(root / "source"), "--save", str(root / "resharded"),
                                    "--target-tp", "1", "--target-pp", "1", "--target-dp", "1",
                                    "--target-zero-stage", "0"])
    assert code == 0
    two = run_distributed(_two, 2, prefix, model, root)
    one = run_distributed(_one, 1, prefix, model, root)
    records = lambda r: {k: v[0] if isinstance(k, tuple) and k[0] == "resumed" else v for k, v in r.items()}  # noqa: E731
    for per_rank in (four, two):
        for r in per_rank[1:]:
            assert records(r) == records(per_rank[0]), "ranks disagree"
    return root, {**four[0], **two[0]}, one[0]


def _assert_matches(got, reference, first_step=1):
    assert len(got) == len(reference) and got
    for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(got, reference), start=first_step):
        assert loss == pytest.approx(ref_loss, rel=RTOL), f"step {step} loss {loss} vs {ref_loss}"
        assert norm == pytest.approx(ref_norm, rel=RTOL), f"step {step} grad norm {norm} vs {ref_norm}"


def _reference(one, layout):
    return one[L(optimizer=layout.optimizer)]


PARITY_KEYS = [(w, layout) for w, layouts in PARITY.items() for layout in layouts]


@pytest.mark.parametrize("key", PARITY_KEYS, ids=[layout_id(*k) for k in PARITY_KEYS])
def test_sgd_layout_matches_single_process(runs, key):
    _, got, one = runs
    _assert_matches(got[key[1]], _reference(one, key[1]))


def test_sgd_trains_and_momentum_matters(runs):
    _, _, one = runs
    with_momentum, without = [loss for loss, _ in one[L(optimizer=SGD)]], [loss for loss, _ in one[L(optimizer=NO_MOMENTUM)]]
    assert with_momentum[-1] < with_momentum[0] - 0.5, with_momentum
    assert with_momentum[1:] != pytest.approx(without[1:], rel=1e-3)  # the buffers are used


def test_sgd_checkpoint_holds_momentum_buffers_and_names_its_optimizer(runs):
    root, got, one = runs
    folder = resolve_checkpoint(root / "source")
    state = read_index(folder)["state"]
    assert state["optimizer"] == {"type": "sgd", "state": ["momentum_buffer"]} and state["adam_steps"] == K
    tensors = checkpoint_tensors(folder)
    kinds = {n.split("/", 1)[0] for n in tensors}
    assert kinds == {"model", "momentum_buffer"}, kinds  # fp32: the values are the masters
    assert all(f"momentum_buffer/{n.split('/', 1)[1]}" in tensors for n in tensors if n.startswith("model/"))
    assert any(t.abs().sum() > 0 for n, t in tensors.items() if n.startswith("momentum_buffer/"))
    _assert_matches(got["source"], _reference(one, SOURCE)[:K])
    resharded = resolve_checkpoint(root / "resharded")
    assert read_index(resharded)["state"]["optimizer"] == state["optimizer"]
    assert {n: t for n, t in checkpoint_tensors(resharded).items()}.keys() == tensors.keys()


@pytest.mark.parametrize("layout", RESUMED_4, ids=[layout_id(4, x) for x in RESUMED_4])
def test_sgd_resume_continues_the_uninterrupted_run(runs, layout):
    _, got, one = runs
    records, logs = got[("resumed", layout)]
    _assert_matches(records, _reference(one, layout)[K:], first_step=K + 1)
    assert "optimizer state restored" in " ".join(logs)


def test_sgd_resume_after_offline_reshard_to_one_process(runs):
    _, _, one = runs
    records, logs = one["resharded"]
    _assert_matches(records, _reference(one, RESHARDED)[K:], first_step=K + 1)


def test_checkpoint_of_another_optimizer_is_refused_unless_not_loaded(runs):
    root, _, one = runs
    where = resolve_checkpoint(root / "adam") / "index.json"
    assert one["refusal"] == (
        f"{where}: the checkpoint holds the state of optimizer adamw (exp_avg, exp_avg_sq), this run uses sgd "
        f"(momentum_buffer); resume with --optimizer adam, or pass --no-load-optim to load the weights and start "
        f"sgd from fresh state")
    assert "optimizer state reset" in " ".join(one["no-load-optim"])


def test_startup_refuses_another_optimizer_before_any_process_group(runs):
    """pretrain_gpt.py's start-up check (checkpoint/resume.py): the same line, before torch.distributed."""
    from megazero.checkpoint.resume import resolve_resume
    from megazero.config import OptimizerConfig, RunConfig

    root, _, one = runs
    cfg = RunConfig(optimizer=OptimizerConfig(optimizer_type="sgd")).replace(
        checkpoint={"load": str(root / "adam")}, training={"train_iters": STEPS, "micro_batch_size": 2})
    with pytest.raises(CheckpointError) as err:
        resolve_resume(cfg, 1, log=lambda _: None)
    assert str(err.value) == one["refusal"]
    for fresh in ({"no_load_optim": True}, {"finetune": True}):
        _, folder = resolve_resume(cfg.replace(checkpoint=fresh), 1, log=lambda _: None)
        assert folder == resolve_checkpoint(root / "adam")
    sgd_cfg = cfg.replace(checkpoint={"load": str(root / "source")})
    resolve_resume(sgd_cfg, 4, log=lambda _: None)  # its own optimizer: fine
    no_momentum = sgd_cfg.replace(optimizer={"sgd_momentum": 0.0})
    with pytest.raises(CheckpointError, match=r"holds the state of optimizer sgd \(momentum_buffer\), this run uses "
                                              r"sgd \(no state\); resume with the settings it was saved with"):
        resolve_resume(no_momentum, 4, log=lambda _: None)
