"""Checkpoints end to end (megazero/checkpoint/, docs/checkpoints.md), on CPU with gloo.

In-process (tests/dist_utils.run_distributed, real gloo processes):
1. Cross-layout: the parity model trained at tp2 pp2 dp2 ZeRO-1 and saved loads into tp1, tp4 dp2
   ZeRO-3, pp2 vp2 dp4 ZeRO-2 and CPU / NVMe optimizer offload: saving again right after loading
   gives the same global tensors bit for bit, and the next steps match an uninterrupted run.
2. Same-layout resume with dropout on is bitwise identical (losses, grad norms, final state).

pretrain_gpt.py subprocesses (torchrun or one process):
3. SIGKILL of one worker under torchrun --max-restarts 1: the job restarts, resumes from `latest`,
   exits 0, and its final checkpoint equals an uninterrupted run's.
4. SIGKILL inside a save (held there by checkpoint_helpers.py): the previous checkpoint stays
   `latest` and loads; a new run resumes from it.
5. One flipped byte in a shard: one-line checksum error naming the file, exit 2, nothing changed.
6. Bad --load input and elastic resume (keep the global batch on another world size, or say why not).
7. SIGTERM (to one rank only) and --exit-interval: save at a step boundary and exit 0.
8. Checkpoint faults: SIGKILL inside the *first* save under torchrun --max-restarts 1 (the restart
   starts fresh or from the renamed folder, and removes the interrupted save); a disk that fills
   during a save (one line, exit 2 on every rank, previous checkpoint intact); one run per save
   folder (the lock); a finished run re-run: nothing to do.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pretrain_gpt
from megazero.checkpoint.format import LATEST, CheckpointReader, iteration_dirname, read_index, resolve_checkpoint
from megazero.topology import GridShape, Topology
from megazero.training.data_setup import ResolvedData
from megazero.training.trainer import Trainer
from megazero.validation import validate
from tests.checkpoint_utils import assert_same_tensors, checkpoint_tensors  # noqa: F401 (used here and by siblings)
from tests.dist_utils import run_distributed
from tests.integration.test_layout_parity import Layout, layout_id, parity_config

REPO = Path(__file__).resolve().parents[2]
HELPERS = Path(__file__).resolve().with_name("checkpoint_helpers.py")
RTOL = 1e-5  # fp32, different layouts: the layout-parity tolerance


# ----- reading checkpoints -------------------------------------------------------------------------------
def rng_tensors(folder: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(folder)
    return {f"{slot}/{key}": reader.get(entry["file"], f"{entry['prefix']}/{key}")
            for slot, entry in reader.index["rng"].items() for key in [*entry["streams"], "ambient"]}


def assert_complete_optimizer_state(tensors: dict[str, torch.Tensor]) -> None:
    """fp32: model values (= masters) and both Adam moments for every parameter, moments not all zero."""
    params = {n.split("/", 1)[1] for n in tensors}
    kinds = {n.split("/", 1)[0] for n in tensors}
    assert kinds == {"model", "exp_avg", "exp_avg_sq"}, kinds
    assert all(f"{k}/{p}" in tensors for p in params for k in kinds)
    assert any(t.abs().sum() > 0 for n, t in tensors.items() if n.startswith("exp_avg_sq/"))


def state_of(folder: Path) -> dict:
    """The trainer state a checkpoint's index records (iteration, consumed samples, Adam steps, ...)."""
    return read_index(folder)["state"]


# ----- 1. cross-layout load ------------------------------------------------------------------------------
K, M = 6, 3  # steps before the save, steps after the load
SOURCE = Layout(tp=2, pp=2, micro=2, zero=1)
TARGETS = {  # world size -> layouts that load the source checkpoint
    8: [Layout(tp=4, micro=2, zero=3), Layout(pp=2, vp=2, micro=1, zero=2),  # vp: 2 microbatches, a multiple of pp
        Layout(tp=2, pp=2, micro=2, zero=1, offload="nvme")],
    1: [Layout(micro=2), Layout(micro=2, zero=1, offload="cpu")],
}


def _config(prefix, tokenizer_model, layout: Layout, iters: int, nvme: Path, **checkpoint):
    cfg = parity_config(prefix, tokenizer_model, layout).replace(
        training={"train_iters": iters, "eval_iters": 0, "log_interval": 1000, "eval_interval": 1000},
        checkpoint=checkpoint)
    if layout.offload == "nvme":
        cfg = cfg.replace(zero={"offload_nvme_path": str(nvme)})
    return cfg


def _trainer(rank, world_size, cfg, layout, data, log=lambda _: None) -> Trainer:
    validate(cfg, world_size)
    topo = Topology.build(GridShape(world_size, tp=layout.tp, pp=layout.pp), rank)
    return Trainer(cfg, topo, data, torch.device("cpu"), run_dir=None, log=log)


def _records(history) -> list[tuple[float, float]]:
    return [(r.lm_loss, r.grad_norm) for r in history]


def _cross_layout(rank, world_size, prefix, tokenizer_model, root: Path, reference_steps: bool):
    """On this world size: (8) train the source layout K of K+M steps and save it (--exit-interval K);
    then for every target layout: load the source checkpoint, save it again at once, train M steps.
    (1) also the uninterrupted K+M-step reference."""
    from megazero.checkpoint.state import save_checkpoint

    data = ResolvedData(prefix=prefix, tokenizer_model=tokenizer_model, vocab_size=512, description="tiny")
    nvme = root / f"nvme-rank{rank}"
    nvme.mkdir(exist_ok=True)
    out = {}
    if world_size == 8:
        cfg = _config(prefix, tokenizer_model, SOURCE, K + M, nvme, save=str(root / "source"), exit_interval=K)
        trainer = _trainer(rank, world_size, cfg, SOURCE, data)
        out["source"] = _records(trainer.train())
        trainer.close()
    if reference_steps:
        cfg = _config(prefix, tokenizer_model, Layout(micro=2), K + M, nvme)
        trainer = _trainer(rank, world_size, cfg, Layout(micro=2), data)
        out["reference"] = _records(trainer.train())
        trainer.close()
    source = resolve_checkpoint(root / "source")
    for layout in TARGETS[world_size]:
        logs = []
        cfg = _config(prefix, tokenizer_model, layout, K + M, nvme, load=str(root / "source"))
        trainer = _trainer(rank, world_size, cfg, layout, data, log=logs.append)
        trainer.load(source)
        save_checkpoint(trainer.checkpoint_subject(), root / f"resaved-{world_size}-{layout_id(world_size, layout)}")
        out[layout] = {"history": _records(trainer.train()), "log": logs}
        trainer.close()
    return out


@pytest.fixture(scope="module")
def cross_layout(tiny_dataset, tmp_path_factory):
    prefix, model = tiny_dataset
    root = tmp_path_factory.mktemp("cross_layout")
    t0 = time.perf_counter()
    eight = run_distributed(_cross_layout, 8, prefix, model, root, False)
    one = run_distributed(_cross_layout, 1, prefix, model, root, True)
    print(f"cross-layout launches: {time.perf_counter() - t0:.1f} s")
    return root, eight, one


def test_source_run_saved_at_the_exit_interval_and_matches_the_reference(cross_layout):
    root, eight, one = cross_layout
    folder = resolve_checkpoint(root / "source")
    assert folder.name == iteration_dirname(K)
    assert (root / "source" / LATEST).read_text() == iteration_dirname(K) + "\n"
    state = state_of(folder)
    assert (state["iteration"], state["consumed_samples"], state["optimizer_steps"], state["adam_steps"]) == \
        (K, K * 8, K, K)
    index = read_index(folder)
    assert {k: index["layout"][k] for k in ("world", "tp", "pp", "vp", "dp", "zero_stage")} == \
        {"world": 8, "tp": 2, "pp": 2, "vp": 1, "dp": 2, "zero_stage": 1}
    assert_complete_optimizer_state(checkpoint_tensors(folder))
    reference = one[0]["reference"]
    assert len(eight[0]["source"]) == K and len(reference) == K + M
    for r in eight[1:]:
        assert r["source"] == eight[0]["source"]
    for (loss, norm), (ref_loss, ref_norm) in zip(eight[0]["source"], reference):
        assert loss == pytest.approx(ref_loss, rel=RTOL) and norm == pytest.approx(ref_norm, rel=RTOL)


CROSS = [(w, layout) for w, layouts in TARGETS.items() for layout in layouts]


@pytest.mark.parametrize("key", CROSS, ids=[layout_id(*k) for k in CROSS])
def test_load_into_another_layout_keeps_every_tensor(cross_layout, key):
    """Save right after loading: every global tensor (model, exp_avg, exp_avg_sq) and the trainer
    state are exactly those of the source checkpoint, though every piece was cut differently."""
    root, _, _ = cross_layout
    world, layout = key
    source = resolve_checkpoint(root / "source")
    resaved = root / f"resaved-{world}-{layout_id(world, layout)}" / iteration_dirname(K)
    assert_same_tensors(checkpoint_tensors(source), checkpoint_tensors(resaved), layout_id(world, layout))
    mine, theirs = state_of(source), state_of(resaved)
    assert {k: mine[k] for k in ("iteration", "consumed_samples", "optimizer_steps", "adam_steps")} == \
        {k: theirs[k] for k in ("iteration", "consumed_samples", "optimizer_steps", "adam_steps")}
    layout_saved = read_index(resaved)["layout"]
    assert (layout_saved["tp"], layout_saved["pp"], layout_saved["vp"], layout_saved["zero_stage"],
            layout_saved["offload_optimizer"]) == (layout.tp, layout.pp, layout.vp, layout.zero, layout.offload)


@pytest.mark.parametrize("key", CROSS, ids=[layout_id(*k) for k in CROSS])
def test_steps_after_a_cross_layout_load_match_the_uninterrupted_run(cross_layout, key):
    root, eight, one = cross_layout
    world, layout = key
    per_rank = eight if world == 8 else one
    got = per_rank[0][layout]["history"]
    for r in per_rank[1:]:
        assert r[layout]["history"] == got, "ranks disagree"
    reference = one[0]["reference"][K:]
    assert len(got) == M
    for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(got, reference), start=K + 1):
        assert loss == pytest.approx(ref_loss, rel=RTOL), f"step {step} loss {loss} vs {ref_loss}"
        assert norm == pytest.approx(ref_norm, rel=RTOL), f"step {step} grad norm {norm} vs {ref_norm}"
    log = " ".join(per_rank[0][layout]["log"])
    assert f"loaded checkpoint {resolve_checkpoint(root / 'source')} (iteration {K}, saved from tp2 pp2 vp1 dp2 zero1)" \
        in log and "optimizer state restored" in log
    same_streams = (layout.tp, layout.pp, layout.vp) == (SOURCE.tp, SOURCE.pp, SOURCE.vp)
    assert ("RNG restored" if same_streams else "RNG not restored: tp/pp/vp changed") in log


# ----- 2. same-layout resume, dropout on: bitwise ---------------------------------------------------------
RESUME = Layout(tp=2, micro=2, zero=2)  # 4 ranks: tp2 dp2, accumulation 2
RESUME_STEPS = 20


def _resume_config(prefix, tokenizer_model, **checkpoint):
    return parity_config(prefix, tokenizer_model, RESUME).replace(
        model={"hidden_dropout": 0.1, "attention_dropout": 0.1},
        training={"train_iters": RESUME_STEPS, "deterministic": True, "eval_iters": 0, "log_interval": 1000,
                  "eval_interval": 1000},
        checkpoint=checkpoint)


def _straight_and_resumed(rank, world_size, prefix, tokenizer_model, root: Path):
    data = ResolvedData(prefix=prefix, tokenizer_model=tokenizer_model, vocab_size=512, description="tiny")
    out = {}
    # A: 20 steps straight (saves at the end)
    trainer = _trainer(rank, world_size, _resume_config(prefix, tokenizer_model, save=str(root / "A")), RESUME, data)
    out["A"] = _records(trainer.train())
    trainer.close()
    # B: 10 steps and save (--exit-interval 10), then new Trainers load it and run the other 10
    cfg = _resume_config(prefix, tokenizer_model, save=str(root / "B"), exit_interval=RESUME_STEPS // 2)
    trainer = _trainer(rank, world_size, cfg, RESUME, data)
    first = _records(trainer.train())
    trainer.close()
    logs = []
    cfg = _resume_config(prefix, tokenizer_model, save=str(root / "B"), load=str(root / "B"))
    trainer = _trainer(rank, world_size, cfg, RESUME, data, log=logs.append)
    trainer.load(resolve_checkpoint(root / "B"))
    out["B"] = first + _records(trainer.train())
    trainer.close()
    out["log"] = logs
    # the same model without dropout (guards against a vacuous comparison): its step-1 loss
    cfg = _resume_config(prefix, tokenizer_model).replace(model={"hidden_dropout": 0.0, "attention_dropout": 0.0},
                                                          training={"train_iters": 1})
    trainer = _trainer(rank, world_size, cfg, RESUME, data)
    out["no_dropout_first_loss"] = trainer.train()[0].lm_loss
    trainer.close()
    return out


@pytest.fixture(scope="module")
def resumed(tiny_dataset, tmp_path_factory):
    prefix, model = tiny_dataset
    root = tmp_path_factory.mktemp("resume")
    return root, run_distributed(_straight_and_resumed, 4, prefix, model, root)


def test_same_layout_resume_with_dropout_is_bitwise_identical(resumed):
    root, per_rank = resumed
    a, b = per_rank[0]["A"], per_rank[0]["B"]
    assert len(a) == len(b) == RESUME_STEPS
    first_diff = next((step for step, (x, y) in enumerate(zip(a, b), start=1) if x != y), None)
    assert first_diff is None, f"resumed run differs from step {first_diff}: {b[first_diff - 1]} vs {a[first_diff - 1]}"
    assert any("RNG restored" in line for line in per_rank[0]["log"])
    for r in per_rank[1:]:
        assert r["A"] == a and r["B"] == b
    final_a, final_b = (resolve_checkpoint(root / run) for run in "AB")
    assert final_a.name == final_b.name == iteration_dirname(RESUME_STEPS)
    assert_same_tensors(checkpoint_tensors(final_a), checkpoint_tensors(final_b), "final state")
    assert_same_tensors(rng_tensors(final_a), rng_tensors(final_b), "final RNG streams")
    assert state_of(final_a) == state_of(final_b)
    assert (root / "B" / iteration_dirname(RESUME_STEPS // 2)).is_dir()  # the mid-run checkpoint B resumed from


def test_dropout_is_on_in_the_resume_test(resumed):
    """Guard against a vacuous test 2: without dropout the same model's first loss is different."""
    _, per_rank = resumed
    assert per_rank[0]["no_dropout_first_loss"] != pytest.approx(per_rank[0]["A"][0][0], rel=1e-4)


# ----- pretrain_gpt.py subprocesses -------------------------------------------------------------------------
TINY_MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32"]
TINY_RUN = ["--micro-batch-size", "2", "--lr", "2e-3", "--lr-warmup-iters", "2", "--split", "90,10,0",
            "--eval-interval", "1000", "--eval-iters", "1", "--no-tensorboard", "--no-csv"]
KILL_ITERS, KILL_SAVE_INTERVAL = 60, 5  # test 3: 2 ranks, dp2, ZeRO-1 (both ranks write shards), dropout on
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def data_flags(tiny_dataset) -> list[str]:
    prefix, model = tiny_dataset
    return ["--data-path", str(prefix), "--tokenizer-model", str(model)]


def torchrun(nproc: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *extra,
            str(REPO / "pretrain_gpt.py")]


def kill_run_flags(tiny_dataset, save: Path, output: Path) -> list[str]:
    return [*data_flags(tiny_dataset), *TINY_MODEL, *TINY_RUN, "--global-batch-size", "8", "--zero-stage", "1",
            "--train-iters", str(KILL_ITERS), "--log-interval", "5", "--save", str(save), "--load", str(save),
            "--save-interval", str(KILL_SAVE_INTERVAL), "--output-dir", str(output)]


def run_checked(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=ENV, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def latest_iteration(save: Path) -> int | None:
    try:
        return int((save / LATEST).read_text().strip().removeprefix("iter_"))
    except (OSError, ValueError):
        return None


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def worker_rank(pid: int, script: str = "pretrain_gpt.py") -> int | None:
    """RANK from a process's environment, if it is a worker running `script`."""
    try:
        if script not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
            return None
        env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
                   .split("\0") if "=" in kv)
    except OSError:
        return None
    return int(env["RANK"]) if "RANK" in env else None


def workers_of(launcher: int, script: str = "pretrain_gpt.py") -> dict[int, int]:
    """{rank: pid} of torchrun's live workers (running pretrain_gpt.py, or `script`)."""
    return {rank: pid for pid in children(launcher) if (rank := worker_rank(pid, script)) is not None}


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher started with start_new_session=True and every process of its session
    (torchrun's workers), if still running."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def wait_exit(proc: subprocess.Popen, timeout: float) -> int | None:
    """The exit code, or None after `timeout` seconds (the caller's finally kills the session)."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 180.0, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    raise AssertionError(f"never saw {what} (exit code {proc.returncode}); "
                         + (log.read_text()[-3000:] if log is not None and log.exists() else ""))


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def uninterrupted(tiny_dataset, tmp_path_factory):
    """The test-3 run without a kill: torchrun, 2 ranks, dp2 ZeRO-1, KILL_ITERS steps, saving every
    KILL_SAVE_INTERVAL. Its checkpoints also serve tests 5 and 6 (copied before any change)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    proc = run_checked(torchrun(2) + kill_run_flags(tiny_dataset, root / "ckpt", root / "run"), root)
    assert "loaded checkpoint" not in proc.stdout  # `--load X` of a missing X starts from scratch, and says so
    assert proc.stdout.count(f"no checkpoint in {root / 'ckpt'}: starting from scratch\n") == 1
    return root / "ckpt", proc.stdout


# ----- 3. SIGKILL under torchrun ---------------------------------------------------------------------------
def test_sigkill_of_a_worker_restarts_and_finishes_like_an_uninterrupted_run(tiny_dataset, tmp_path, uninterrupted):
    ref_save, _ = uninterrupted
    save, log = tmp_path / "ckpt", tmp_path / "torchrun.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(torchrun(2, "--max-restarts", "1")
                                + kill_run_flags(tiny_dataset, save, tmp_path / "run"),
                                cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    try:
        # as soon as a checkpoint is committed, mid-run: SIGKILL rank 1 (no chance to clean up)
        wait_for(lambda: (latest_iteration(save) or 0) >= KILL_SAVE_INTERVAL, proc, "a first checkpoint", log=log)
        workers = workers_of(proc.pid)
        assert sorted(workers) == [0, 1], workers
        killed_at = latest_iteration(save)
        os.kill(workers[1], signal.SIGKILL)
        # normally ~10 s: torchrun stops rank 0, starts two new workers, they resume from `latest`
        assert wait_exit(proc, 120) == 0, log.read_text()[-4000:]
    finally:
        kill_session(proc)
    text = log.read_text()
    assert killed_at < KILL_ITERS, "the kill must land mid-run"
    loads = [line for line in text.splitlines() if "loaded checkpoint" in line]
    assert len(loads) == 1, "expected one restart that resumed from `latest`:\n" + text[-4000:]
    resumed = int(loads[0].split("(iteration ")[1].split(",")[0])
    assert KILL_SAVE_INTERVAL <= resumed < KILL_ITERS and resumed % KILL_SAVE_INTERVAL == 0, loads[0]
    assert "RNG restored" in loads[0] and "optimizer state restored" in loads[0]
    assert f"iteration {KILL_ITERS:8d}/{KILL_ITERS:8d}" in text
    final, reference = resolve_checkpoint(save), resolve_checkpoint(ref_save)
    assert final.name == reference.name == iteration_dirname(KILL_ITERS)
    # same layout, same data position and RNG streams on CPU: bit for bit
    assert_same_tensors(checkpoint_tensors(final), checkpoint_tensors(reference), "killed-and-resumed vs uninterrupted")
    assert_same_tensors(rng_tensors(final), rng_tensors(reference), "RNG streams")
    assert state_of(final) == state_of(reference)
    assert not list(save.glob("*.partial")) and not list(save.glob("*.old"))


# ----- 4. SIGKILL inside a save -----------------------------------------------------------------------------
@pytest.mark.parametrize("point", ["rank-files", "renamed"])
def test_sigkill_inside_a_save_leaves_the_previous_checkpoint(tiny_dataset, tmp_path, point):
    """Saves every 2 iterations; the save of iteration 4 is held at POINT (checkpoint_helpers.py) and the
    process is SIGKILLed there. `latest` still names iteration 2, which verifies and resumes."""
    save, marker = tmp_path / "ckpt", tmp_path / "paused"
    flags = [*data_flags(tiny_dataset), *TINY_MODEL, *TINY_RUN, "--global-batch-size", "8", "--log-interval", "1",
             "--save", str(save), "--save-interval", "2", "--output-dir", str(tmp_path / "run")]
    proc = subprocess.Popen([sys.executable, str(HELPERS), point, "4", str(marker), *flags, "--train-iters", "6"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        wait_for(marker.exists, proc, f"the save of iteration 4 reach {point}")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    proc.stdout.close()
    two, four = save / iteration_dirname(2), save / iteration_dirname(4)
    if point == "rank-files":  # the interrupted save: files, no index, never renamed
        partial = save / (four.name + ".partial")
        assert (partial / "rank00000.safetensors").is_file() and not (partial / "index.json").exists()
        assert not four.exists()
    else:  # renamed into place and complete, but `latest` was never moved to it
        assert (four / "index.json").is_file()
    assert (save / LATEST).read_text() == two.name + "\n"
    assert resolve_checkpoint(save) == two
    tensors = checkpoint_tensors(two)  # every file's sha256 verified
    assert_complete_optimizer_state(tensors)
    assert state_of(two)["iteration"] == 2
    # a new run resumes from iteration 2 and saves 4 and 6 over the leftovers
    proc = run_checked([sys.executable, str(REPO / "pretrain_gpt.py"), *flags, "--load", str(save),
                        "--train-iters", "6", "--output-dir", str(tmp_path / "run2")], tmp_path)
    assert f"loaded checkpoint {two} (iteration 2," in proc.stdout
    assert resolve_checkpoint(save) == save / iteration_dirname(6)
    assert state_of(four)["iteration"] == 4 and checkpoint_tensors(four)
    assert sorted(p.name for p in save.iterdir()) == [two.name, four.name, iteration_dirname(6), LATEST]


# ----- 5. a corrupted shard ---------------------------------------------------------------------------------
def test_corrupted_shard_is_a_one_line_checksum_error(tiny_dataset, tmp_path, uninterrupted):
    ref_save, _ = uninterrupted
    save = tmp_path / "ckpt"
    shutil.copytree(ref_save, save)
    shard = resolve_checkpoint(save) / "rank00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) - 1000] ^= 0x01  # one bit of one float in the tensor data (past the header)
    shard.write_bytes(bytes(raw))
    before = file_hashes(save)
    proc = subprocess.run([sys.executable, str(REPO / "pretrain_gpt.py"), *data_flags(tiny_dataset), *TINY_MODEL,
                           *TINY_RUN, "--train-iters", str(KILL_ITERS + 5), "--load", str(save), "--save", str(save),
                           "--output-dir", str(tmp_path / "run")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV, check=False)
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.stdout[-2000:], err[-2000:])
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert f"{shard}: checksum mismatch" in err, err
    assert "iteration " not in proc.stdout.replace("(iteration", "")  # no training step ran
    assert file_hashes(save) == before  # nothing written, nothing overwritten
    assert not (tmp_path / "run").exists(), "a failed load must not leave a run directory behind"


# ----- 6. bad --load input, elastic resume ------------------------------------------------------------------
def run_main(argv, capsys, monkeypatch, world_size=1):
    """pretrain_gpt.run in this process (these errors come before any process group): (code, stderr)."""
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exc:
        pretrain_gpt.run(argv)
    return exc.value.code, capsys.readouterr().err.strip()


def _bad_load(kind: str, ref_save: Path, tmp_path: Path) -> tuple[Path, list[str], list[str]]:
    """(--load folder, extra flags, substrings of the one-line error) for one bad-input case."""
    load = tmp_path / "ckpt"
    final = resolve_checkpoint(ref_save)
    if kind == "not-a-checkpoint":
        load.mkdir()
        (load / "notes.txt").write_text("not a checkpoint\n")
        return load, [], [f"--load {load}: not a checkpoint folder (no 'latest' and no index.json; it holds "
                          f"notes.txt); pass the --save folder of a run, or a missing or empty folder to start from "
                          f"scratch"]
    if kind == "load-is-a-file":
        load.write_text("not a checkpoint\n")
        return load, [], [f"--load {load}: is a file, not a checkpoint folder; pass the --save folder of a run (or "
                          f"one of its iter_* folders), or a missing or empty folder to start from scratch"]
    shutil.copytree(ref_save, load)
    if kind == "latest-names-a-missing-folder":
        (load / LATEST).write_text("iter_0000999\n")
        return load, [], [f"--load {load}: 'latest' names iter_0000999, which is missing or incomplete"]
    if kind in ("latest-garbage", "latest-a-path"):
        raw = b"\x89\xfe\x00\x13binary" if kind == "latest-garbage" else b"../../elsewhere\n"
        (load / LATEST).write_bytes(raw)
        return load, [], [f"{load / LATEST}: corrupted: it must hold one checkpoint name like iter_0000100, but holds "
                          f"{raw!r}; write the name of a complete iter_* folder into it, or name that folder itself "
                          f"instead"]
    if kind == "model-shape":
        return load, ["--hidden-size", "128"], [
            f"{load / final.name / 'index.json'}: checkpoint has hidden-size 64, this run has 128",
            "pass --hidden-size 64"]
    if kind == "batch-cannot-be-kept":
        return load, ["--micro-batch-size", "3"], [f"{load / final.name}: cannot keep the checkpoint's global batch 8",
                                                   "micro batch 3", "data-parallel size 1", "--global-batch-size"]
    raise ValueError(kind)


BAD_LOADS = ["not-a-checkpoint", "load-is-a-file", "latest-names-a-missing-folder", "latest-garbage",
             "latest-a-path", "model-shape", "batch-cannot-be-kept"]
EXACT = ("not-a-checkpoint", "load-is-a-file", "latest-garbage", "latest-a-path")  # needles = the whole line


@pytest.mark.parametrize("kind", BAD_LOADS)
def test_bad_load_is_one_line_and_changes_nothing(kind, tiny_dataset, uninterrupted, tmp_path, capsys, monkeypatch):
    ref_save, _ = uninterrupted
    load, extra, needles = _bad_load(kind, ref_save, tmp_path)
    before = file_hashes(load)
    monkeypatch.chdir(tmp_path)
    argv = [*data_flags(tiny_dataset), *TINY_MODEL, *TINY_RUN, "--train-iters", "100", "--load", str(load),
            "--save", str(load), *extra]
    code, err = run_main(argv, capsys, monkeypatch)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err
    if kind in EXACT:
        assert err == f"error: {needles[0]}"
    assert file_hashes(load) == before and not (tmp_path / "output").exists()
    if load.is_file():
        assert load.read_text() == "not a checkpoint\n"


def test_checkpoint_info_on_a_corrupted_latest(uninterrupted, tmp_path):
    ref_save, _ = uninterrupted
    save = tmp_path / "ckpt"
    shutil.copytree(ref_save, save)
    raw = b"\xff\xfe\x00garbage"
    (save / LATEST).write_bytes(raw)
    before = file_hashes(save)
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "checkpoint_info.py"), str(save)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (f"error: {save / LATEST}: corrupted: it must hold one checkpoint name like iter_0000100, "
                           f"but holds {raw!r}; write the name of a complete iter_* folder into "
                           f"it, or name that folder itself instead\n")
    assert file_hashes(save) == before


def test_elastic_resume_on_another_process_count_keeps_the_global_batch(tiny_dataset, tmp_path, uninterrupted):
    """The dp2 checkpoint (micro 2 x accumulation 2 x dp 2 = 8) resumed by one process with only
    --micro-batch-size: accumulation becomes 4, the global batch and data position continue."""
    ref_save, _ = uninterrupted
    save = tmp_path / "ckpt"
    shutil.copytree(ref_save, save)
    proc = run_checked([sys.executable, str(REPO / "pretrain_gpt.py"), *data_flags(tiny_dataset), *TINY_MODEL,
                        *TINY_RUN, "--zero-stage", "1", "--train-iters", str(KILL_ITERS + 2), "--log-interval", "1",
                        "--load", str(save), "--save", str(save), "--output-dir", str(tmp_path / "run")], tmp_path)
    out = proc.stdout
    assert "resume: keeping the checkpoint's global batch 8: gradient accumulation 2 -> 4 (micro 2 x dp 1)" in out
    assert "global batch 8 = micro 2 x 4 accumulation x 1 dp" in out
    assert f"loaded checkpoint {save / iteration_dirname(KILL_ITERS)} (iteration {KILL_ITERS}, saved from tp1 pp1 " \
           f"vp1 dp2 zero1)" in out
    assert f"consumed samples: {(KILL_ITERS + 2) * 8:12d}" in out
    state = state_of(resolve_checkpoint(save))
    assert (state["iteration"], state["consumed_samples"]) == (KILL_ITERS + 2, (KILL_ITERS + 2) * 8)
    assert read_index(resolve_checkpoint(save))["layout"]["dp"] == 1


# ----- 7. SIGTERM and --exit-interval ----------------------------------------------------------------------
def test_sigterm_to_one_rank_saves_at_the_next_step_and_exits_0(tiny_dataset, tmp_path):
    """Preemption reaching only rank 1: both ranks agree to stop at the same step boundary, save a
    checkpoint of that iteration, and exit 0 (so does torchrun)."""
    save, log = tmp_path / "ckpt", tmp_path / "torchrun.log"
    iters = 100_000
    with open(log, "w") as out:
        proc = subprocess.Popen(torchrun(2) + [*data_flags(tiny_dataset), *TINY_MODEL, *TINY_RUN,
                                               "--global-batch-size", "4", "--zero-stage", "2",
                                               "--train-iters", str(iters), "--log-interval", "1",
                                               "--save", str(save), "--output-dir", str(tmp_path / "run")],
                                cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    try:
        wait_for(lambda: "iteration        3/" in log.read_text(), proc, "iteration 3", log=log)
        workers = workers_of(proc.pid)
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[1], signal.SIGTERM)
        assert wait_exit(proc, 120) == 0, log.read_text()[-4000:]
    finally:
        kill_session(proc)
    text = log.read_text()
    stops = [line for line in text.splitlines() if line.startswith("SIGTERM: stopping at iteration")]
    assert len(stops) == 1 and stops[0].endswith("after saving a checkpoint"), text[-3000:]
    stopped = int(stops[0].split()[4])
    assert 3 <= stopped < iters
    assert f"iteration {stopped + 1:8d}/" not in text  # no step after the one the signal interrupted
    assert latest_iteration(save) == stopped
    assert [p.name for p in save.iterdir() if p.is_dir()] == [iteration_dirname(stopped)]
    folder = resolve_checkpoint(save)
    assert state_of(folder)["iteration"] == stopped and checkpoint_tensors(folder)


def test_exit_interval_saves_and_exits_at_n(tiny_dataset, tmp_path):
    save = tmp_path / "ckpt"
    proc = run_checked([sys.executable, str(REPO / "pretrain_gpt.py"), *data_flags(tiny_dataset), *TINY_MODEL,
                        *TINY_RUN, "--train-iters", "100", "--log-interval", "1", "--exit-interval", "3",
                        "--save", str(save), "--output-dir", str(tmp_path / "run")], tmp_path)
    assert "--exit-interval 3: stopping at iteration 3 after saving a checkpoint" in proc.stdout
    assert "iteration        4/" not in proc.stdout
    assert sorted(p.name for p in save.iterdir()) == [iteration_dirname(3), LATEST]
    assert latest_iteration(save) == 3 and state_of(resolve_checkpoint(save))["iteration"] == 3


# ----- 8. checkpoint faults -------------------------------------------------------------------------------
FAULT_FLAGS = [*TINY_MODEL, *TINY_RUN, "--global-batch-size", "8", "--zero-stage", "1", "--log-interval", "1",
               "--save-interval", "2"]


@pytest.mark.parametrize("point", ["rank-files", "renamed"])
def test_sigkill_inside_the_first_save_restarts_cleanly(tiny_dataset, tmp_path, point):
    """torchrun --max-restarts 1, 2 ranks, `--save X --load X`; the *first* save (iteration 2) is held
    at POINT and a worker SIGKILLed. An interrupted first save is no save: the restart starts from
    scratch and removes the `.partial` folder (rank-files), or resumes from the complete folder the
    commit had renamed into place before writing `latest` (renamed); either way the job finishes."""
    save, marker, log = tmp_path / "ckpt", tmp_path / "paused", tmp_path / "torchrun.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts",
           "1", str(HELPERS), point, "2", str(marker), *data_flags(tiny_dataset), *FAULT_FLAGS, "--train-iters", "4",
           "--save", str(save), "--load", str(save), "--output-dir", str(tmp_path / "run")]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=ENV,
                                start_new_session=True)
    try:
        wait_for(marker.exists, proc, f"the first save reach {point}", log=log)
        time.sleep(0.5)  # let the other rank reach the save's next collective
        workers = workers_of(proc.pid, HELPERS.name)
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[1], signal.SIGKILL)
        assert wait_exit(proc, 180) == 0, log.read_text()[-4000:]
    finally:
        kill_session(proc)
    text = log.read_text()
    assert "has iter_* folders but no 'latest'" not in text and "not a checkpoint folder" not in text, text[-4000:]
    assert text.count(f"no checkpoint in {save}: starting from scratch\n") == 1  # the first attempt
    assert "is in use by another run" not in text  # the restart takes the save folder's lock again
    if point == "rank-files":
        assert text.count(f"no checkpoint in {save}, only the interrupted save iter_0000002.partial (never committed): "
                          f"starting from scratch\n") == 1, text[-4000:]
        assert text.count(f"removed the interrupted save {save / 'iter_0000002.partial'} (never committed)\n") == 1
        assert "loaded checkpoint" not in text
    else:
        assert text.count(f"{save} has no 'latest' file (a first save interrupted before writing it, or folders "
                          f"copied without it): resuming from the newest complete checkpoint iter_0000002\n") == 1
        assert f"loaded checkpoint {save / iteration_dirname(2)} (iteration 2," in text
    assert f"iteration {4:8d}/{4:8d}" in text
    assert sorted(p.name for p in save.iterdir()) == [iteration_dirname(2), iteration_dirname(4), LATEST]
    assert latest_iteration(save) == 4 and checkpoint_tensors(resolve_checkpoint(save))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(cmd: list[str], world: int, cwd: Path, timeout: int = 300) -> list[tuple[int, str, str]]:
    """`world` processes of cmd, rendezvous through MASTER_ADDR/PORT (no torchrun): each rank's stderr
    is its own, so "printed once, by rank 0" can be checked exactly. [(code, stdout, stderr)] by rank."""
    port = free_port()
    procs = [subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**ENV, "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in range(world)]
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
        return [(p.returncode, *out) for p, out in zip(procs, outputs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.mark.parametrize("fault", ["full-disk", "no-room"])
def test_a_disk_full_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tiny_dataset, tmp_path, fault):
    """2 ranks (dp2 ZeRO-1: both write shards) save every 2 iterations; at the save of iteration 4 the
    disk fills (every write fails: EFBIG) or reports less room than the checkpoint needs (refused before
    writing). Every rank stops with exit 2, rank 0 prints one line naming the folder and the space
    needed, the interrupted save is removed and iteration 2 stays `latest`, intact."""
    save, run_dir = tmp_path / "ckpt", tmp_path / "run"
    cmd = [sys.executable, str(HELPERS), fault, "4", str(tmp_path / "marker"), *data_flags(tiny_dataset),
           *FAULT_FLAGS, "--train-iters", "6", "--save", str(save), "--output-dir", str(run_dir)]
    (code0, out0, err0), (code1, out1, err1) = launch_ranks(cmd, 2, tmp_path)
    assert (code0, code1) == (2, 2), (err0[-3000:], err1[-3000:])
    where = re.escape(f"cannot save checkpoint iter_0000004 into {save}: ")
    reason = (re.escape(f"File too large writing {save / 'iter_0000004.partial'}/rank0000") + r"[01]\.safetensors"
              if fault == "full-disk" else "not enough free space")
    room = r"[\d.]+ [MG]iB free there" if fault == "full-disk" else re.escape("1.0 MiB free there")
    line = (f"error: {where}{reason}; it needs about [\\d.]+ MiB \\({room}\\); free space or choose another --save "
            f"folder \\(the previous checkpoint, if any, is intact\\)\n")
    assert re.fullmatch(line, err0), err0  # one line, rank 0 only, no traceback
    assert err1 == "", err1
    assert "iteration        4/" in out1 + out0 and "iteration        5/" not in out0 + out1
    assert sorted(p.name for p in save.iterdir()) == [iteration_dirname(2), LATEST]  # no .partial, lock released
    assert latest_iteration(save) == 2 and state_of(resolve_checkpoint(save))["iteration"] == 2
    assert_complete_optimizer_state(checkpoint_tensors(save / iteration_dirname(2)))  # every sha256 verified
    assert (run_dir / "config.json").is_file()  # the run folder and its logs stay


def test_one_run_per_save_folder(tiny_dataset, tmp_path):
    """Run A holds --save X; run B with the same --save is refused (one line naming A, nothing
    written); once A is SIGKILLed its lock is gone with it, and run C takes the folder, saying so."""
    import socket

    save = tmp_path / "ckpt"
    base = [sys.executable, str(REPO / "pretrain_gpt.py"), *data_flags(tiny_dataset), *TINY_MODEL, *TINY_RUN,
            "--log-interval", "1", "--save", str(save)]
    log = tmp_path / "a.log"
    with open(log, "w") as out:
        a = subprocess.Popen(base + ["--train-iters", "100000", "--output-dir", str(tmp_path / "run_a")], cwd=tmp_path,
                             stdout=out, stderr=subprocess.STDOUT, env=ENV)
    try:
        wait_for(lambda: "iteration        2/" in log.read_text(), a, "run A training", log=log)
        before = file_hashes(save)
        b = subprocess.run(base + ["--train-iters", "2", "--output-dir", str(tmp_path / "run_b")], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300, env=ENV)
        assert b.returncode == 2, b.stderr[-3000:]
        assert re.fullmatch(re.escape(f"error: --save {save} is in use by another run (pid {a.pid} on host "
                                      f"{socket.gethostname()}, started ") + r"[\d-]+ [\d:]+" +
                            re.escape("), which would replace this run's checkpoints or have them replaced; wait for "
                                      "it to finish, or choose another --save folder") + "\n", b.stderr), b.stderr
        assert file_hashes(save) == before and not (tmp_path / "run_b").exists()
        assert a.poll() is None, "run A must be unaffected"
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=60)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    assert (save / ".megazero-save.lock").is_file()  # the record stays; the kernel released the lock itself
    c = run_checked(base + ["--train-iters", "2", "--output-dir", str(tmp_path / "run_c")], tmp_path)
    assert c.stdout.count(f"{save / '.megazero-save.lock'}: the previous run saving here (pid {a.pid} on host "
                          f"{socket.gethostname()}, started ") == 1, c.stdout
    assert "ended without releasing it (killed or crashed; a torchrun restart looks like this too): taking it over" \
        in c.stdout
    assert sorted(p.name for p in save.iterdir()) == [iteration_dirname(2), LATEST]  # lock file removed at exit


def test_rerunning_a_finished_run_has_nothing_to_do(tiny_dataset, uninterrupted, tmp_path, capsys, monkeypatch):
    """`--save X --load X` again after the run reached --train-iters: one line, exit 0, no run folder,
    nothing saved or changed."""
    ref_save, _ = uninterrupted
    save = tmp_path / "ckpt"
    shutil.copytree(ref_save, save)
    run_dir = Path(read_index(resolve_checkpoint(save))["config"]["logging"]["output_dir"])
    before, run_before = file_hashes(save), file_hashes(run_dir)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    argv = [*data_flags(tiny_dataset), *TINY_MODEL, *TINY_RUN, "--train-iters", str(KILL_ITERS), "--load", str(save),
            "--save", str(save)]
    assert pretrain_gpt.main(argv) == 0
    out, err = capsys.readouterr()
    assert out == f"checkpoint {save / iteration_dirname(KILL_ITERS)} is at iteration {KILL_ITERS} = --train-iters: " \
                  f"nothing to do\n" and err == ""
    assert file_hashes(save) == before and file_hashes(run_dir) == run_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no new run folder, no lock left
