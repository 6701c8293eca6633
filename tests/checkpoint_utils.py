"""Reading whole checkpoints in tests: every global tensor assembled, and exact comparison."""

from pathlib import Path

import torch

from megazero.checkpoint.format import CheckpointReader


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every global tensor of a committed checkpoint, assembled whole (every file's sha256 verified)."""
    reader = CheckpointReader(folder)
    out = {}
    for name in reader.tensors:
        shape = reader.shape(name)
        out[name] = reader.read(name, (0,) * len(shape), tuple(shape))
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(a) == sorted(b), f"{what}: different tensor sets"
    for name, x in a.items():
        y = b[name]
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what}: {name}"
        assert torch.equal(x, y), f"{what}: {name} differs (max abs {(x.double() - y.double()).abs().max().item():.3g})"
