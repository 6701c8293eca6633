"""NVMe optimizer offload: step time and effective disk GB/s vs plain sequential IO of the same bytes.

For each parameter count N and sub-group size, on the same directory (--path), this script times:

- the offload: `OffloadedAdam(mode="nvme")` over N values in 2K fragments (K decayed "weights", 99%
  of N, and K small non-decayed "biases/norms"). It reports the median and best of --repeats steps
  after --warmup. The store reads and writes every sub-group file whole, 2 x nvme_bytes() per step;
  the script counts the bytes its IO threads actually move, so a store that skips some is still
  reported truthfully. Effective GB/s = those bytes / step time.
- plain IO: fresh files of the same count and sizes, preallocated like the store's. They use the
  same open mode (O_DIRECT if the store got it), the same aligned host buffer and one IO call per
  file (the store's own `_io`). The script writes all of them in sequence, then reads all of them.
  This is what the disk does with these bytes when nothing else runs.
- compute: `OffloadedAdam(mode="cpu")` on the same fragments and sub-groups: the gradient copy, the
  one-pass CPU Adam and the copy back, with no disk.

The step overlaps the Adam of sub-group i with the write of i-1 and the read of i+1. Its floor is
therefore ideal = max(plain IO, compute).

columns:
  files    sub-group files (each one read/step/write unit)
  stateMB  fp32 master + exp_avg + exp_avg_sq = 12 B x params: what would live in host RAM (cpu mode)
  hostMB   host RAM the nvme offload holds (host_bytes(): two slots + two gradient windows)
  GB/step  bytes read + written per step, as counted (2 x nvme_bytes() when every file moves whole)
  step ms  median nvme step; best = fastest; stall = part of the step blocked on the disk (waiting for
           a read in acquire(), or for the last writes in finish())
  GB/s     GB/step / step time (effective disk GB/s)
  IOonly   the store's IO schedule alone (acquire + release of every sub-group, no Adam): what the
           two-slot order and mixed read/write traffic cost on this device
  W/R GB/s plain sequential write / read; IO ms = plain write + read time
  vsplain  plain IO ms / step ms: while every file moves whole, the step's GB/s over the plain IO's
  cpu ms   the cpu-mode step (compute alone)
  ideal    max(IO ms, cpu ms): perfect overlap
  pipe     model of the two-slot schedule with the plain rates and the compute time:
           r(0) + sum_i max(c(i), w(i-1) + r(i+1)) + w(last); the first read and the last write
           overlap nothing
  serial   IO ms + cpu ms: no overlap at all
  eff      ideal / step ms (1.00 = perfect overlap); bound: which of IO and compute is larger

Usage:
    python bench/nvme_offload.py                          # /tmp; 20M,50M,100M; about 1 min
    python bench/nvme_offload.py --path /mnt/nvme --params 100M,500M --sub-group-size 10M,50M,100M

Page cache: with O_DIRECT every byte goes to the device. Without it (some network or FUSE
filesystems) the store falls back to buffered IO. Reads can then come from the page cache and writes
can return before they reach the device. tmpfs (/dev/shm) accepts O_DIRECT on Linux >= 6.6, but its
files are RAM. The script warns in both cases, because the numbers then measure memory copies.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from megatron_kernels.cpu_adam import kernel_isa
from megazero.zero import offload
from megazero.zero.offload import ALIGN, OffloadedAdam, _io, aligned_host_empty

GB, MB = 1e9, 1e6
SUFFIX = {"K": 10**3, "M": 10**6, "G": 10**9}


def count(text: str) -> int:
    """'20M' -> 20_000_000; '1.5G', '300K', '12345' also accepted."""
    text = text.strip().upper()
    mult = SUFFIX.get(text[-1:], 1)
    return int(float(text[:-1] if text[-1:] in SUFFIX else text) * mult)


def fs_of(path: str) -> tuple[str, str]:
    """('ext4', 'ext4 on /dev/vda (/)'): the mount holding path, from /proc/mounts (longest mount point)."""
    path, best = os.path.realpath(path), None
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                inside = path == mnt or path.startswith(mnt.rstrip("/") + "/")
                if inside and (best is None or len(mnt) > len(best[1])):
                    best = (dev, mnt, fstype)
    except OSError:
        pass
    return (best[2], f"{best[2]} on {best[0]} ({best[1]})") if best else ("unknown", "unknown filesystem")


def fragments(n: int, k: int, dtype: torch.dtype):
    """2k fragments, layer by layer: a decayed weight (99% of the layer) then a non-decayed bias/norm."""
    sizes, decays = [], []
    for j in range(k):
        layer = n // k + (1 if j < n % k else 0)
        small = max(1, layer // 100)
        sizes += [layer - small, small]
        decays += [True, False]
    values = [torch.randn(s).to(dtype) for s in sizes]
    grads = [torch.randn(s) * 1e-2 for s in sizes]
    return values, decays, grads


def make_opt(values, decays, mode: str, sub_group_size: int, path: str | None) -> OffloadedAdam:
    return OffloadedAdam(values, decays, mode=mode, sub_group_size=sub_group_size, nvme_path=path,
                         rank_tag="bench", device=torch.device("cpu"), lr=1e-4, betas=(0.9, 0.95),
                         eps=1e-8, weight_decay=0.1, adamw=True)


class Meter:
    """What the nvme step waits for and moves. `waited`: time blocked on the disk, from wrapping the
    store's two blocking calls on this one instance, acquire() (a read not done yet) and finish()
    (the last writes). `moved`: bytes the store's IO threads transfer, from wrapping offload._io
    until close(); the measured count, not an assumption that every file moves whole."""

    def __init__(self, store):
        self.waited, self.moved = 0.0, 0
        store.acquire, store.finish = self._timed(store.acquire), self._timed(store.finish)
        self._io, lock = offload._io, threading.Lock()

        def counted(fn, fd, buf, nbytes):
            self._io(fn, fd, buf, nbytes)
            with lock:  # two IO threads; only whole, successful transfers count
                self.moved += nbytes
        offload._io = counted

    def reset(self) -> None:
        self.waited, self.moved = 0.0, 0

    def close(self) -> None:
        offload._io = self._io

    def _timed(self, fn):
        def call(*args):
            t = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.waited += time.perf_counter() - t
        return call


class PlainFiles:
    """Fresh files of the store's count and sizes under `path`, preallocated and opened like the
    store's (O_DIRECT or not), moved by the store's own `_io` from one aligned buffer, one call per
    file: the plain sequential IO the offload is compared with."""

    def __init__(self, path: str, sizes: list[int], direct: bool):
        self.sizes, self.fds = sizes, []
        self.dir = tempfile.mkdtemp(prefix="megazero-bench-plain-", dir=path)
        try:
            flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
            for i, nbytes in enumerate(sizes):
                self.fds.append(os.open(os.path.join(self.dir, f"plain{i:05d}.bin"), flags, 0o600))
                os.posix_fallocate(self.fds[-1], 0, nbytes)
            self.buf = aligned_host_empty(max(sizes) // 4, torch.float32, pin=False)
            self.buf.normal_()  # random bytes, like the state: nothing a device could compress
        except BaseException:
            self.close()
            raise

    def write_all(self) -> None:
        for fd, nbytes in zip(self.fds, self.sizes):
            _io(os.pwritev, fd, self.buf, nbytes)

    def read_all(self) -> None:
        for fd, nbytes in zip(self.fds, self.sizes):
            _io(os.preadv, fd, self.buf, nbytes)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        shutil.rmtree(self.dir, ignore_errors=True)


def store_io_only(opt: OffloadedAdam) -> None:
    """The store's own IO schedule with no compute: acquire (read, prefetching the next) and release
    (write back, unchanged) every sub-group, as step() does. Separates what the two-slot order and
    mixed read/write traffic cost on this device from what overlapping the CPU Adam costs."""
    for i in range(len(opt.groups)):
        opt.store.acquire(i)
        opt.store.release(i)
    opt.store.finish()


def pipeline_model(sizes: list[int], w_rate: float, r_rate: float, compute: list[float]) -> float:
    """The two-slot schedule's time with these per-file write/read rates (B/s) and per-sub-group
    compute times: read 0; then, while i is stepped, write i-1 then read i+1 (one slot, so serial);
    then write the last sub-group."""
    r = [b / r_rate for b in sizes]
    w = [b / w_rate for b in sizes]
    k = len(sizes)
    t = r[0]
    for i in range(k):
        io = (w[i - 1] if i > 0 else 0.0) + (r[i + 1] if i + 1 < k else 0.0)
        t += max(compute[i], io)
    return t + w[-1]


def run_row(args, n: int, sg: int, values, decays, grads) -> dict:
    """All measurements of one (N, sub-group size), interleaved round by round: on a shared machine
    the disk's and the CPU's speed drift, and interleaving lets the drift hit every column alike."""
    nvme = cpu = plain = meter = None
    try:
        nvme = make_opt(values, decays, "nvme", sg, args.path)
        files = list(nvme.store.nbytes_of)
        plain = PlainFiles(args.path, files, nvme.store.direct)
        cpu = make_opt(values, decays, "cpu", sg, None)
        meter = Meter(nvme.store)

        def timed(fn) -> float:
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t

        def step(opt):
            return lambda: opt.step(grads, grad_scale=0.5, lr=1e-4, host_grads_ready=False)

        # name -> callable; each round times every one once, in this order. "w" precedes "r" from
        # the warm-up round on: a preallocated extent never written reads back as zeros without
        # touching the device, so the timed reads must find written files.
        work = {"nvme": step(nvme), "io_only": lambda: store_io_only(nvme), "w": plain.write_all,
                "r": plain.read_all, "cpu": step(cpu)}
        t = {name: [] for name in work}
        t["stall"], t["moved"] = [], []
        for rnd in range(args.warmup + args.repeats):
            for name, fn in work.items():
                meter.reset()
                took = timed(fn)
                if rnd >= args.warmup:
                    t[name].append(took)
                    if name == "nvme":
                        t["stall"].append(meter.waited)
                        t["moved"].append(meter.moved)
        direct, host, disk = nvme.store.direct, nvme.host_bytes(), nvme.nvme_bytes()
        groups = [sum(p.numel for p in g) for g in nvme.groups]
    finally:
        for thing in (meter, nvme, cpu, plain):
            if thing is not None:
                thing.close()
    med = {name: statistics.median(v) for name, v in t.items()}
    io = med["w"] + med["r"]
    compute = [med["cpu"] * g / n for g in groups]
    return {"n": n, "sg": sg, "k": len(groups), "direct": direct, "host": host, "state": 12 * n, "disk": disk,
            "nvme_best": min(t["nvme"]), **med, "io": io, "ideal": max(io, med["cpu"]),
            "serial": io + med["cpu"], "pipe": pipeline_model(files, disk / med["w"], disk / med["r"], compute)}


MS = 1e3
COLUMNS = [  # (title, width, cell)
    ("params", 6, lambda r: f"{r['n'] / 1e6:g}M"),
    ("subgrp", 6, lambda r: f"{r['sg'] / 1e6:g}M"),
    ("files", 5, lambda r: r["k"]),
    ("stateMB", 7, lambda r: f"{r['state'] / MB:.0f}"),
    ("hostMB", 6, lambda r: f"{r['host'] / MB:.0f}"),
    ("GB/step", 7, lambda r: f"{r['moved'] / GB:.2f}"),
    ("step ms", 7, lambda r: f"{r['nvme'] * MS:.0f}"),
    ("best", 5, lambda r: f"{r['nvme_best'] * MS:.0f}"),
    ("stall", 5, lambda r: f"{r['stall'] * MS:.0f}"),
    ("GB/s", 5, lambda r: f"{r['moved'] / r['nvme'] / GB:.2f}"),
    ("IOonly", 6, lambda r: f"{r['io_only'] * MS:.0f}"),
    ("W GB/s", 6, lambda r: f"{r['disk'] / r['w'] / GB:.2f}"),
    ("R GB/s", 6, lambda r: f"{r['disk'] / r['r'] / GB:.2f}"),
    ("IO ms", 6, lambda r: f"{r['io'] * MS:.0f}"),
    ("vsplain", 7, lambda r: f"{r['io'] / r['nvme']:.2f}"),
    ("cpu ms", 7, lambda r: f"{r['cpu'] * MS:.0f}"),
    ("ideal", 6, lambda r: f"{r['ideal'] * MS:.0f}"),
    ("pipe", 6, lambda r: f"{r['pipe'] * MS:.0f}"),
    ("serial", 6, lambda r: f"{r['serial'] * MS:.0f}"),
    ("eff", 5, lambda r: f"{r['ideal'] / r['nvme']:.2f}"),
    ("bound", 7, lambda r: "IO" if r["io"] >= r["cpu"] else "compute"),
]
MEMORY_FS = ("tmpfs", "ramfs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--path", default=tempfile.gettempdir(),
                    help="directory on the disk to test (the offload's --offload-nvme-path); default %(default)s")
    ap.add_argument("--params", default="20M,50M,100M", help="parameter counts, comma separated (K/M/G suffixes)")
    ap.add_argument("--sub-group-size", default="10M",
                    help="elements per sub-group (one file, one read/step/write unit); a list sweeps")
    ap.add_argument("--fragments", type=int, default=4, help="layers: each a decayed + a non-decayed fragment")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                    help="model dtype of the values (bf16: the step also writes a bf16 copy)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5, help="timed steps (and plain IO rounds); median shown")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU Adam threads (torch/OpenMP)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.path, exist_ok=True)
    params = [count(s) for s in args.params.split(",")]
    sgs = [count(s) for s in args.sub_group_size.split(",")]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    # the offload's files and the plain files of the same sizes exist together
    need = 2 * max(12 * p + ALIGN * (p // min(sgs) + 2) for p in params)
    free = shutil.disk_usage(args.path).free
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU Adam kernel "
          f"{kernel_isa() or 'unavailable (torch reference)'}, load average {os.getloadavg()[0]:.2f}")
    fstype, fs = fs_of(args.path)
    print(f"path {args.path}: {fs}, {free / GB:.1f} GB free, needs {need / GB:.2f} GB "
          f"(offload + plain files), host RAM about {24 * max(params) / GB:.1f} GB (values, grads, cpu-mode state)")
    if need > free:
        sys.exit(f"not enough free space under {args.path}")
    print(f"values {args.dtype} in {2 * args.fragments} fragments (99% decayed); median of {args.repeats} "
          f"interleaved rounds after {args.warmup} warm-up; GB = 1e9 B, MB = 1e6 B")

    print(" ".join(f"{title:>{width}}" for title, width, _ in COLUMNS))
    print("-" * sum(width + 1 for _, width, _ in COLUMNS))
    rows = []
    try:
        for n in params:
            values, decays, grads = fragments(n, args.fragments, dtype)
            for sg in sgs:
                row = run_row(args, n, sg, values, decays, grads)
                rows.append(row)
                print(" ".join(f"{cell(row):>{width}}" for _, width, cell in COLUMNS), flush=True)
            del values, grads
    except KeyboardInterrupt:
        print("interrupted (files removed)")
    if not rows:
        return
    if fstype in MEMORY_FS:
        print(f"WARNING: {args.path} is {fstype}: the files live in RAM (tmpfs accepts O_DIRECT since Linux 6.6, "
              "but there is no device behind it), so these GB/s are memory copies and the 'offloaded' state "
              "occupies host memory after all")
    elif not all(r["direct"] for r in rows):
        print(f"WARNING: O_DIRECT is not available on {args.path}: buffered IO, so reads may be served "
              "from the page cache and writes may return before reaching the device; these GB/s can "
              "measure memory copies, not the disk")
    else:
        print("O_DIRECT: yes (every byte went to the device, bypassing the page cache)")
    print(__doc__[__doc__.index("columns:"):__doc__.index("Usage")].strip())
    big = max(rows, key=lambda r: (r["n"], -r["sg"]))
    worst = min(rows, key=lambda r: r["ideal"] / r["nvme"])
    print(f"summary: at {big['n'] / 1e6:.0f}M params the step moves {big['moved'] / GB:.2f} GB at "
          f"{big['moved'] / big['nvme'] / GB:.2f} GB/s, {big['io'] / big['nvme']:.0%} of plain sequential IO "
          f"and {big['ideal'] / big['nvme']:.0%} of ideal overlap ({COLUMNS[-1][2](big)}-bound), "
          f"holding {big['host'] / big['state']:.0%} of the state in host RAM; worst overlap "
          f"{worst['ideal'] / worst['nvme']:.0%} ({worst['n'] / 1e6:.0f}M, sub-group {worst['sg'] / 1e6:g}M)")


if __name__ == "__main__":
    main()
