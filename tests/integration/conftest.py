"""Fixtures shared by the integration tests that run pretrain_gpt.py as processes."""

import pytest

from tests.integration.checkpoint_runs import kill_run_flags, run_checked, torchrun


@pytest.fixture(scope="session")
def uninterrupted(tiny_dataset, tmp_path_factory):
    """The test-3 run without a kill: torchrun, 2 ranks, dp2 ZeRO-1, KILL_ITERS steps, saving every
    KILL_SAVE_INTERVAL. Its checkpoints also serve tests 5 and 6 (copied before any change)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    proc = run_checked(torchrun(2) + kill_run_flags(tiny_dataset, root / "ckpt", root / "run"), root)
    assert "loaded checkpoint" not in proc.stdout  # `--load X` of a missing X starts from scratch, and says so
    assert proc.stdout.count(f"no checkpoint in {root / 'ckpt'}: starting from scratch\n") == 1
    return root / "ckpt", proc.stdout
