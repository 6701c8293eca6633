"""Optimizer offload: the fp32 master weights and the update rule's state (optim/update_rules.py: Adam
moments, SGD momentum) of this rank's fragments live in host memory (`cpu`) or in files under an NVMe
path (`nvme`), and the host steps them (`UpdateRule.host_step`: megatron_kernels' one-pass CPU Adam for
Adam, torch's op sequence for SGD). The device keeps only the model-dtype parameters and the reduced
gradients.

Owned fragments (zero/layout.py) are cut into *pieces* and packed into *sub-groups* of at most
`sub_group_size` elements; within a sub-group the decayed pieces come first, so one sub-group is at
most two kernel calls. A sub-group's state is one fp32 block of shape (1 + k, n): row 0 the master,
then the rule's k declared state tensors in order (Adam: exp_avg, exp_avg_sq); also the byte layout of
its NVMe file, padded to 4 KiB.

One step (after the ZeRO optimizer has checked overflow and computed the clip coefficient):

    cpu:  gradients were copied to host (fp32) bucket by bucket as each bucket's reduction
          completed (GradSync.register_bucket_reduced_hook), overlapping the rest of backward
          for each sub-group: the rule's host step (unscale x clip as grad_scale; writes the
          bf16/fp16 copy when the model is low precision) -> copy updated values to the device
    nvme: two slots ("double buffering"): while sub-group i is stepped in one slot, sub-group i+1 is
          read into the other; sub-group i is written back asynchronously as soon as it is done.
          Host memory holds two slots whatever the model size; gradients are copied per sub-group.

Files are preallocated at start (a full disk fails there, before training), reused every step, and
removed by `close()` (also run at interpreter exit). O_DIRECT is used where the filesystem allows it
(so the page cache does not quietly hold the "offloaded" state); otherwise buffered IO.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from megazero.optim.update_rules import CpuAdam, UpdateRule

ALIGN = 4096  # O_DIRECT: buffer address, file offset and length multiples


@dataclass(frozen=True)
class Piece:
    fragment: int  # index into the optimizer's fragments
    lo: int  # [lo, hi) of the fragment's flat elements
    hi: int
    offset: int  # where the piece starts in its sub-group
    decays: bool

    @property
    def numel(self) -> int:
        return self.hi - self.lo


def plan_sub_groups(sizes: list[int], decays: list[bool], sub_group_size: int) -> list[list[Piece]]:
    """Cut fragments (sizes, in order) into sub-groups of <= sub_group_size elements, splitting a
    fragment across sub-groups where needed; within each sub-group decayed pieces come first."""
    groups: list[list[Piece]] = []
    current: list[tuple[int, int, int]] = []  # (fragment, lo, hi)
    room = sub_group_size

    def close() -> None:
        nonlocal current, room
        if current:
            ordered = sorted(current, key=lambda c: not decays[c[0]])  # stable: decayed first
            offset, pieces = 0, []
            for frag, lo, hi in ordered:
                pieces.append(Piece(frag, lo, hi, offset, decays[frag]))
                offset += hi - lo
            groups.append(pieces)
        current, room = [], sub_group_size

    for frag, size in enumerate(sizes):
        lo = 0
        while lo < size:
            take = min(room, size - lo)
            current.append((frag, lo, lo + take))
            lo += take
            room -= take
            if room == 0:
                close()
    close()
    return groups


def _runs(pieces: list[Piece]) -> list[tuple[int, int, bool]]:
    """Contiguous (start, end, decays) runs of a sub-group: one kernel call each (at most two)."""
    runs: list[tuple[int, int, bool]] = []
    for p in pieces:
        if runs and runs[-1][2] == p.decays and runs[-1][1] == p.offset:
            runs[-1] = (runs[-1][0], p.offset + p.numel, p.decays)
        else:
            runs.append((p.offset, p.offset + p.numel, p.decays))
    return runs


def host_empty(shape, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, pin_memory=pin)


def aligned_host_empty(numel: int, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """A flat host tensor whose address is ALIGN-aligned and whose byte size is padded to ALIGN."""
    nbytes = -(-numel * dtype.itemsize // ALIGN) * ALIGN
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=pin)
    start = (-raw.data_ptr()) % ALIGN
    return raw[start:start + nbytes].view(dtype)


class _DeviceSync:
    """Host buffers read by non_blocking host->device copies must not be overwritten until those
    copies ran: record after issuing them, wait before reuse (no-op without CUDA)."""

    def __init__(self, device: torch.device):
        self.event = torch.cuda.Event() if device.type == "cuda" else None

    def record(self) -> None:
        if self.event is not None:
            self.event.record()

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


class HostStateStore:
    """cpu: every sub-group's (rows, n) state resident in (pinned) host memory."""

    def __init__(self, sizes: list[int], rows: int, pin: bool):
        self.blocks = [host_empty((rows, n), torch.float32, pin) for n in sizes]

    def init(self, i: int) -> torch.Tensor:
        return self.blocks[i]

    def acquire(self, i: int, following: int | None = -1) -> torch.Tensor:
        return self.blocks[i]

    def release(self, i: int, sync: _DeviceSync | None = None) -> None:
        pass

    def forget(self) -> None:
        pass

    def finish(self) -> None:
        pass

    def nbytes(self) -> int:
        return sum(b.numel() * 4 for b in self.blocks)

    def close(self) -> None:
        pass


def _io(fn, fd: int, buf: torch.Tensor, nbytes: int) -> None:
    """Move nbytes between buf (a flat tensor) and the start of file fd, looping over short transfers."""
    view = memoryview(buf.view(torch.uint8).numpy()).cast("B")[:nbytes]
    done = 0
    while done < nbytes:
        n = fn(fd, [view[done:]], done)
        if n <= 0:
            raise OSError(errno.EIO, f"short {'read' if fn is os.preadv else 'write'} at byte {done} of {nbytes}")
        done += n


class NvmeStateStore:
    """nvme: one file per sub-group under a private folder of `path`; two aligned host slots."""

    def __init__(self, sizes: list[int], rows: int, path: str, rank_tag: str, pin: bool):
        self.sizes, self.rows = sizes, rows
        self.dir = tempfile.mkdtemp(prefix=f"megazero-offload-{rank_tag}-", dir=path)
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.dir, True)  # also at interpreter exit
        self.nbytes_of = [-(-rows * n * 4 // ALIGN) * ALIGN for n in sizes]
        slot_numel = rows * max(sizes, default=0)
        self.slots = [aligned_host_empty(slot_numel, torch.float32, pin) for _ in range(min(2, len(sizes)))]
        self.slot_sync: list[_DeviceSync | None] = [None] * len(self.slots)
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="megazero-nvme")
        self.reads: dict[int, Future] = {}
        self.writes: dict[int, Future] = {}  # slot -> the write of the sub-group last stepped in it
        # slot -> the sub-group whose current state it holds (equal to its file once the write is
        # done, or about to be there once the pending read is): acquiring it needs no read
        self.held: dict[int, int] = {}
        self.fds: list[int] = []
        self.direct = True
        for i, nbytes in enumerate(self.nbytes_of):
            fd = self._open(os.path.join(self.dir, f"subgroup{i:05d}.bin"))
            self.fds.append(fd)
            os.posix_fallocate(fd, 0, nbytes)  # ENOSPC / EFBIG here, before training

    def _open(self, name: str) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC
        if self.direct and hasattr(os, "O_DIRECT"):
            try:
                return os.open(name, flags | os.O_DIRECT, 0o600)
            except OSError as err:
                if err.errno != errno.EINVAL:  # EINVAL: this filesystem has no O_DIRECT
                    raise
        self.direct = False
        return os.open(name, flags, 0o600)

    def _block(self, slot: int, i: int) -> torch.Tensor:
        return self.slots[slot][:self.rows * self.sizes[i]].view(self.rows, self.sizes[i])

    def _wait_slot(self, slot: int) -> None:
        if slot in self.writes:
            self.writes.pop(slot).result()
        if self.slot_sync[slot] is not None:
            self.slot_sync[slot].wait()

    def _start_read(self, i: int) -> None:
        """Queue the read of sub-group i into its slot behind that slot's pending write, on the IO
        threads, so the caller goes on stepping the other slot meanwhile."""
        slot = i % 2
        write, sync = self.writes.pop(slot, None), self.slot_sync[slot]
        self.held[slot] = i

        def read() -> None:
            if write is not None:
                write.result()
            if sync is not None:
                sync.wait()
            _io(os.preadv, self.fds[i], self.slots[slot], self.nbytes_of[i])
        self.reads[i] = self.pool.submit(read)

    def init(self, i: int) -> torch.Tensor:
        """A slot to fill with sub-group i's initial state; `release(i)` writes it."""
        self._wait_slot(i % 2)
        self.held[i % 2] = i
        return self._block(i % 2, i)

    def _needs_read(self, i: int) -> bool:
        return i not in self.reads and self.held.get(i % 2) != i

    def acquire(self, i: int, following: int | None = -1) -> torch.Tensor:
        """Sub-group i's state in its slot, read unless the slot still holds it; then start reading
        `following` (the next sub-group of this pass; -1: i + 1, None: none) so the read overlaps
        stepping i.
        Consecutive sub-groups use different slots in either direction, so a pass that starts where
        the previous one ended (reversed order) finds its first two sub-groups already held."""
        if following == -1:
            following = i + 1 if i + 1 < len(self.sizes) else None
        if self._needs_read(i):
            self._start_read(i)
        if i in self.reads:
            self.reads.pop(i).result()
        else:
            self._wait_slot(i % 2)  # held: its last write must be done before the step modifies it
        if following is not None and self._needs_read(following):
            self._start_read(following)  # overlaps stepping sub-group i
        return self._block(i % 2, i)

    def forget(self) -> None:
        """After a failed step: trust only the files."""
        self.held.clear()

    def release(self, i: int, sync: _DeviceSync | None = None) -> None:
        slot = i % 2
        self.slot_sync[slot] = sync
        self.writes[slot] = self.pool.submit(_io, os.pwritev, self.fds[i], self.slots[slot], self.nbytes_of[i])

    def finish(self) -> None:
        for slot in list(self.writes):
            self._wait_slot(slot)

    def nbytes(self) -> int:
        return sum(s.numel() * 4 for s in self.slots)

    def file_bytes(self) -> int:
        return sum(self.nbytes_of)

    def close(self) -> None:
        self.finish()
        self.pool.shutdown()
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self._finalizer()


def _filesystem_of(path: str) -> str | None:
    """The filesystem type of the mount holding path (Linux /proc/mounts), for the run log."""
    try:
        mounts = [line.split()[1:3] for line in open("/proc/mounts", encoding="utf-8")]
    except OSError:
        return None
    path = os.path.realpath(path)
    best = max((m for m in mounts if path == m[0] or path.startswith(m[0].rstrip("/") + "/")),
               key=lambda m: len(m[0]), default=None)
    return best[1] if best else None


class OffloadedOptimizer:
    """An update rule over host- or NVMe-resident state for the ZeRO optimizer's fragments."""

    def __init__(self, values: list[torch.Tensor], decays: list[bool], rule: UpdateRule, *, mode: str,
                 sub_group_size: int, nvme_path: str | None, rank_tag: str, device: torch.device,
                 weight_decay: float):
        """values: each fragment's current values (device views in the model dtype; written after each
        step); decays: whether the rule decays each fragment (by `weight_decay`)."""
        if any(st.dtype != torch.float32 for st in rule.state):
            raise NotImplementedError(f"optimizer offload keeps fp32 state rows; {rule.name} declares "
                                      f"{[(st.name, st.dtype) for st in rule.state]}")
        self.values, self.mode, self.device, self.rule = values, mode, device, rule
        self.weight_decay = weight_decay
        self.rows = 1 + len(rule.state)  # master, then the rule's state in declared order
        self.step_count = 0  # successful steps (torch's state["step"])
        self._reverse = True  # nvme: direction of the next pass over the sub-groups
        pin = device.type == "cuda"
        self.model_dtype = values[0].dtype if values else torch.float32
        self.low_precision = self.model_dtype != torch.float32
        self.groups = plan_sub_groups([v.numel() for v in values], decays, sub_group_size)
        sizes = [sum(p.numel for p in g) for g in self.groups]
        self.runs = [_runs(g) for g in self.groups]
        self.sync = [_DeviceSync(device) for _ in sizes]
        if mode == "cpu":
            self.store = HostStateStore(sizes, self.rows, pin)
            # gradients arrive bucket by bucket during backward; resident fp32 per sub-group
            self.grads = [host_empty(n, torch.float32, pin) for n in sizes]
            self.lp = [host_empty(n, self.model_dtype, pin) for n in sizes] if self.low_precision else None
        else:
            self.store = NvmeStateStore(sizes, self.rows, nvme_path, rank_tag, pin)
            window = max(sizes, default=0)
            self.grads = [host_empty(window, torch.float32, pin) for _ in range(min(2, len(sizes)))]
            self.lp = [host_empty(window, self.model_dtype, pin) for _ in self.grads] if self.low_precision else None
        self.pieces_of_fragment: dict[int, list[tuple[int, Piece]]] = {}
        for i, g in enumerate(self.groups):
            for p in g:
                self.pieces_of_fragment.setdefault(p.fragment, []).append((i, p))
        self._initialise()

    def _grad_buffer(self, i: int) -> torch.Tensor:
        return self.grads[i] if self.mode == "cpu" else self.grads[i % 2]

    def _lp_buffer(self, i: int) -> torch.Tensor | None:
        if self.lp is None:
            return None
        return self.lp[i] if self.mode == "cpu" else self.lp[i % 2]

    @torch.no_grad()
    def _initialise(self) -> None:
        for i, pieces in enumerate(self.groups):
            block = self.store.init(i)
            block[1:].zero_()  # every rule's initial state is zeros (UpdateRule.init_state)
            for p in pieces:
                block[0, p.offset:p.offset + p.numel].copy_(self.values[p.fragment][p.lo:p.hi])
            self.store.release(i)
        self.store.finish()

    # ----- gradients ---------------------------------------------------------------------------------
    def copy_grads_to_host(self, fragments: list[int], grads: list[torch.Tensor]) -> None:
        """cpu mode: copy the final reduced gradients of these fragments into the host buffers
        (called as each bucket's reduction completes)."""
        for frag, g in zip(fragments, grads):
            for i, p in self.pieces_of_fragment.get(frag, ()):
                self.grads[i][p.offset:p.offset + p.numel].copy_(g[p.lo:p.hi], non_blocking=True)

    def _fill_grads(self, i: int, grads: list[torch.Tensor]) -> torch.Tensor:
        buf = self._grad_buffer(i)
        for p in self.groups[i]:
            buf[p.offset:p.offset + p.numel].copy_(grads[p.fragment][p.lo:p.hi], non_blocking=True)
        return buf

    # ----- the step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, grads: list[torch.Tensor], grad_scale: float, lr: float, host_grads_ready: bool) -> None:
        """grads: each fragment's reduced gradient (device); grad_scale = clip coefficient / loss scale.
        host_grads_ready: cpu mode got every gradient through copy_grads_to_host already."""
        self.step_count += 1
        if self.mode == "cpu" and not host_grads_ready:
            for i in range(len(self.groups)):
                self._fill_grads(i, grads)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # device->host gradient copies landed
        order = list(range(len(self.groups)))
        if self.mode == "nvme":
            # Alternate the direction (initialisation went forward): each pass starts with the two
            # sub-groups the last one ended with, still in the slots, so min(2, k) reads are saved
            # per step (every read when k <= 2) and the first read no longer stalls the step.
            if self._reverse:
                order.reverse()
            self._reverse = not self._reverse
        try:
            self._step_in_order(order, grads, grad_scale, lr)
        except BaseException:
            self.store.forget()  # a slot may now hold state its file does not: read everything next time
            raise

    def _step_in_order(self, order: list[int], grads: list[torch.Tensor], grad_scale: float, lr: float) -> None:
        names = self.rule.state_names
        for pos, i in enumerate(order):
            pieces = self.groups[i]
            state = self.store.acquire(i, order[pos + 1] if pos + 1 < len(order) else None)
            if self.mode == "nvme":
                self.sync[i % 2].wait()  # this slot's previous host->device copies are done
                grad = self._fill_grads(i, grads)
                if self.device.type == "cuda":
                    torch.cuda.current_stream(self.device).synchronize()
            else:
                self.sync[i].wait()
                grad = self._grad_buffer(i)
            lp = self._lp_buffer(i)
            for start, end, decays in self.runs[i]:
                self.rule.host_step(state[0, start:end], grad[start:end],
                                    {n: state[1 + k, start:end] for k, n in enumerate(names)},
                                    lr=lr, step=self.step_count, weight_decay=self.weight_decay if decays else 0.0,
                                    grad_scale=grad_scale, low_precision_out=lp[start:end] if lp is not None else None)
            updated = lp if lp is not None else state[0]
            for p in pieces:
                self.values[p.fragment][p.lo:p.hi].copy_(updated[p.offset:p.offset + p.numel], non_blocking=True)
            sync = self.sync[i % 2] if self.mode == "nvme" else self.sync[i]
            sync.record()
            self.store.release(i, sync)
        self.store.finish()

    def describe(self) -> str:
        """One line for the run log: where the state lives and what steps it (which CPU Adam path)."""
        adam = f"{self.rule.describe()} stepped by torch on the host"
        if isinstance(self.rule, CpuAdam):
            from megatron_kernels.build import build_error
            from megatron_kernels.cpu_adam import _use_kernel, kernel_description

            kernel = kernel_description() if _use_kernel() else None  # e.g. "avx512, sqrt torch"
            adam = (f"CPU Adam kernel ({kernel})" if kernel else f"CPU Adam reference "
                    f"({'MEGATRON_KERNELS_FORCE_REFERENCE=1' if not _use_kernel() else build_error('cpu_adam')})")
        mib = 2**20
        where = "host memory"
        if isinstance(self.store, NvmeStateStore):
            io = "O_DIRECT" if self.store.direct else "buffered IO"
            if _filesystem_of(self.store.dir) in ("tmpfs", "ramfs"):
                io += "; the path is in RAM (tmpfs), not on a disk"
            where = f"{self.nvme_bytes() / mib:.1f} MiB of files in {self.store.dir} ({io})"
        return (f"optimizer offload: {self.mode}: fp32 state in {where}, {len(self.groups)} sub-group(s), "
                f"host memory {self.host_bytes() / mib:.1f} MiB; {adam}")

    # ----- checkpoints ------------------------------------------------------------------------------
    def export_state(self) -> list[torch.Tensor]:
        """Each fragment's (1 + k, numel) fp32 state (master, then the rule's state in declared order), on
        the host; nvme reads every sub-group once (the whole state passes through host memory)."""
        out = [torch.empty(self.rows, v.numel()) for v in self.values]
        for i, pieces in enumerate(self.groups):
            block = self.store.acquire(i)
            for p in pieces:
                out[p.fragment][:, p.lo:p.hi] = block[:, p.offset:p.offset + p.numel]
            self.store.release(i)
        self.store.finish()
        return out

    def import_state(self, states: list[torch.Tensor], step_count: int) -> None:
        """The inverse of export_state; the values are left to the caller."""
        self.step_count = step_count
        for i, pieces in enumerate(self.groups):
            block = self.store.init(i)
            for p in pieces:
                block[:, p.offset:p.offset + p.numel] = states[p.fragment][:, p.lo:p.hi]
            self.store.release(i)
        self.store.finish()

    # ----- accounting / lifetime --------------------------------------------------------------------
    def host_bytes(self) -> int:
        """Host memory held for the optimizer: state (cpu) or the two slots (nvme), plus gradient and
        low-precision buffers."""
        extra = sum(t.numel() * t.element_size() for t in self.grads)
        extra += sum(t.numel() * t.element_size() for t in self.lp) if self.lp is not None else 0
        return self.store.nbytes() + extra

    def nvme_bytes(self) -> int:
        return self.store.file_bytes() if isinstance(self.store, NvmeStateStore) else 0

    def close(self) -> None:
        self.store.close()


class OffloadedAdam(OffloadedOptimizer):
    """OffloadedOptimizer with the CPU Adam rule, built from Adam's hyperparameters (tests, bench/)."""

    def __init__(self, values: list[torch.Tensor], decays: list[bool], *, mode: str, sub_group_size: int,
                 nvme_path: str | None, rank_tag: str, device: torch.device, lr: float, betas: tuple[float, float],
                 eps: float, weight_decay: float, adamw: bool):
        del lr  # each step passes its own
        super().__init__(values, decays, CpuAdam(betas, eps, decoupled=adamw), mode=mode,
                         sub_group_size=sub_group_size, nvme_path=nvme_path, rank_tag=rank_tag, device=device,
                         weight_decay=weight_decay)
