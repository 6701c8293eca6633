"""Optimizer offload pieces in one process: sub-group planning, the NVMe store's files and window,
OffloadedAdam == torch AdamW, and peak host memory bounded by the window. Training parity with
offload lives in tests/integration/test_layout_parity.py."""

import os
import re
from pathlib import Path

import pytest
import torch

from megatron_kernels import cpu_adam
from megazero.zero.offload import NvmeStateStore, OffloadedAdam, plan_sub_groups


def test_sub_groups_cover_every_element_once_decayed_first():
    sizes, decays = [7, 3, 12, 1, 5], [True, False, True, False, True]
    groups = plan_sub_groups(sizes, decays, sub_group_size=6)
    assert all(sum(p.numel for p in g) <= 6 for g in groups)
    seen = {i: [] for i in range(len(sizes))}
    for g in groups:
        offsets = [(p.offset, p.offset + p.numel) for p in g]
        assert offsets[0][0] == 0 and all(a[1] == b[0] for a, b in zip(offsets, offsets[1:])), "packed"
        flags = [p.decays for p in g]
        assert flags == sorted(flags, reverse=True), "decayed pieces first: at most two kernel calls"
        for p in g:
            seen[p.fragment].append((p.lo, p.hi))
    for frag, ranges in seen.items():
        ranges.sort()
        assert ranges[0][0] == 0 and ranges[-1][1] == sizes[frag]
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), f"fragment {frag} split without gaps"
    assert len(groups) == -(-sum(sizes) // 6)


def test_nvme_store_round_trips_and_removes_its_files(tmp_path):
    sizes = [1000, 2500, 40]
    store = NvmeStateStore(sizes, 3, str(tmp_path), "rank0", pin=False)  # 3 rows: master + Adam moments
    folder = Path(store.dir)
    assert sorted(f.name for f in folder.iterdir()) == [f"subgroup{i:05d}.bin" for i in range(3)]
    for i, n in enumerate(sizes):  # write distinct values through the slots
        store.init(i).copy_(torch.arange(3 * n, dtype=torch.float32).view(3, n) + 1000 * i)
        store.release(i)
    store.finish()
    for k in range(1, 3):  # read (the next read overlapping this one's use), modify, write back; twice
        for i, n in enumerate(sizes):
            block = store.acquire(i)
            assert torch.equal(block, torch.arange(3 * n, dtype=torch.float32).view(3, n) + 1000 * i + k - 1)
            block.add_(1)
            store.release(i)
        store.finish()
    for i, n in enumerate(sizes):
        assert torch.equal(store.acquire(i), torch.arange(3 * n, dtype=torch.float32).view(3, n) + 1000 * i + 2)
        store.release(i)
    store.close()
    assert not folder.exists()


def _fragments(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sizes = [n // 2, 7, n // 4, 3, n - n // 2 - n // 4 - 10]
    values = [torch.randn(s, generator=g) for s in sizes]
    decays = [len(v) > 10 for v in values]
    return values, decays, g


@pytest.mark.parametrize("mode", ["cpu", "nvme"])
def test_offloaded_adam_equals_torch_adamw(mode, tmp_path):
    values, decays, g = _fragments(3000)
    masters = [torch.nn.Parameter(v.clone()) for v in values]
    torch_opt = torch.optim.AdamW([{"params": [m for m, d in zip(masters, decays) if d], "weight_decay": 0.1},
                                   {"params": [m for m, d in zip(masters, decays) if not d], "weight_decay": 0.0}],
                                  lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    ours = OffloadedAdam([v.clone() for v in values], decays, mode=mode, sub_group_size=700, nvme_path=str(tmp_path),
                         rank_tag="t", device=torch.device("cpu"), lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                         weight_decay=0.1, adamw=True)
    for step in range(10):
        grads = [torch.randn(v.numel(), generator=g) * 3 for v in values]
        scale = 0.5 if step % 2 else 1.0  # unscale x clip folded into grad_scale
        for m, gr in zip(masters, grads):
            m.grad = gr * scale
        torch_opt.step()
        ours.step(grads, scale, 1e-2, host_grads_ready=False)
    # Bit for bit: the CPU Adam (kernel or reference) is torch.optim.AdamW's arithmetic, square root
    # included (docs/kernels.md); only the kernel's generic variant (no FMA) may differ in the last bits.
    isa = cpu_adam.kernel_isa() if cpu_adam._use_kernel() else None
    path = f"CPU Adam kernel ({cpu_adam.kernel_description()})" if isa else "CPU Adam reference"
    states = ours.export_state()
    for i, (got, want) in enumerate(zip(ours.values, masters)):
        if isa == "generic":
            torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-7, msg=lambda m: f"{path}: {m}")
            continue
        st = torch_opt.state[want]
        for name, a, b in (("param", got, want.detach()), ("exp_avg", states[i][1], st["exp_avg"]),
                           ("exp_avg_sq", states[i][2], st["exp_avg_sq"])):
            diff = int((a.view(torch.int32) != b.view(torch.int32)).sum())
            assert diff == 0, f"{path}: fragment {i} {name} differs from torch AdamW in {diff} of {a.numel()} elements"
    ours.close()


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _measure_peak(mode: str, folder: str) -> dict:
    """In a fresh process (an allocator that has freed memory before reuses it without growing RSS):
    build the optimizer for 4M elements and step it 3 times; how far the peak RSS grew."""
    n, sub_group = 4_000_000, 65_536
    values = [torch.zeros(n)]
    grads = [torch.full((n,), 1e-3)]
    # Warm up what any first step loads once (the CPU Adam extension, OpenMP and IO threads), so the
    # measurement sees the optimizer's own memory only.
    warm = OffloadedAdam([torch.zeros(1000)], [True], mode=mode, sub_group_size=500, nvme_path=folder,
                         rank_tag="warm", device=torch.device("cpu"), lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
                         weight_decay=0.0, adamw=True)
    warm.step([torch.ones(1000)], 1.0, 1e-3, host_grads_ready=False)
    warm.close()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    adam = OffloadedAdam(values, [True], mode=mode, sub_group_size=sub_group, nvme_path=folder,
                         rank_tag="t", device=torch.device("cpu"), lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
                         weight_decay=0.0, adamw=True)
    for _ in range(3):
        adam.step(grads, 1.0, 1e-3, host_grads_ready=False)
    out = {"grew": (_status_kib("VmHWM") - before) * 1024, "window": adam.host_bytes(), "state": 12 * n,
           "nvme": adam.nvme_bytes(), "stepped": float(values[0][0]) < 0}
    adam.close()
    return out


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
@pytest.mark.parametrize("mode", ["nvme", "cpu"])
def test_peak_memory_nvme_bounded_by_the_window_cpu_holds_the_state(mode, tmp_path):
    """48 MiB of fp32 state. nvme streams it through 2 x 64K-element sub-groups, so the peak resident
    memory of building and stepping the optimizer grows by about that window; cpu (the control,
    showing the measurement sees the state) grows by the state and more."""
    import json
    import subprocess
    import sys

    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r}); "
            f"from tests.unit.test_offload import _measure_peak; "
            f"print(json.dumps(_measure_peak({mode!r}, {str(tmp_path)!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    mib = {k: f"{v / 2**20:.1f} MiB" for k, v in m.items() if k != "stepped"}
    if mode == "nvme":
        assert m["state"] > 20 * m["window"], mib
        assert m["grew"] < m["window"] + 8 * 2**20, mib
        assert m["nvme"] >= m["state"], mib
    else:
        assert m["grew"] >= m["state"], mib
    assert m["stepped"]  # Adam moved against the positive gradient
    assert os.listdir(tmp_path) == []
