"""Finding or building the compiled kernels; never raises for a missing toolchain.

`load_extension(name, sources)` returns the extension module or None, in this order:

1. the extension built at install time by setup.py, importable as ``megatron_kernels._<name>``;
2. a JIT build with ``torch.utils.cpp_extension.load`` into a persistent cache
   (``$TORCH_EXTENSIONS_DIR`` if set, else ``~/.cache/megazero/torch_extensions``); a later process
   finds the cached .so and only re-links if the sources or flags changed (torch hashes both);
3. None, with the reason kept for ``build_error(name)`` (no compiler, no ninja, compile error, ...).

Concurrency: torch's JIT ``load`` takes a file baton (``<build dir>/lock``) so concurrent ranks do
not compile into the same directory at once, but a process waiting on the baton polls it and a
process killed mid-build leaves a stale lock that makes every later load wait forever. We hold our
own ``fcntl.flock`` around the whole load: the kernel releases it when the holder dies, so a crash
never wedges later runs, and the ranks that waited find the freshly built module and just load it.

A JIT build takes tens of seconds, so it is announced on stderr, once, by the process that does it
(inside the lock; the ranks that waited find it built and stay quiet): "building the CPU Adam kernel
(once per cache, ~30-60 s) into DIR" and then "... built in N s". Loading a prebuilt or cached build prints
nothing. "Cached" means ``<build dir>/megazero_build.key`` holds the hash of the sources and csrc/
headers, flags and torch / Python versions of the last successful build: the inputs that make torch's
``load`` recompile.

``MEGATRON_KERNELS_NO_JIT=1`` disables step 2 (use only a prebuilt extension or nothing);
``MEGATRON_KERNELS_VERBOSE=1`` shows the compiler output.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

CSRC = Path(__file__).resolve().parent / "csrc"

# -ffp-contract=off: the compiler fuses nothing on its own; the only fused multiply-adds are the
# kernel's explicit ones, where torch's AVX kernels fuse, so every FMA variant follows torch exactly. The ISA itself is chosen at runtime inside the kernel (see
# csrc/cpu_adam.cpp), so the same flags serve the install-time and the JIT build.
CPU_CFLAGS = ("-O3", "-fopenmp", "-ffp-contract=off")
CPU_LDFLAGS = ("-fopenmp",)

# What the build announcement calls each extension, and roughly how long it takes on 2 cores.
_DESCRIPTIONS = {"cpu_adam": ("the CPU Adam kernel", "~30-60 s"), "fused_cuda": ("the fused CUDA kernels", "a few minutes")}
KEY_FILE = "megazero_build.key"

_modules: dict[str, object] = {}
_errors: dict[str, str] = {}
_lock = threading.Lock()


def cache_dir() -> Path:
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env)
    return Path(os.path.expanduser("~/.cache/megazero/torch_extensions"))


def build_error(name: str) -> str | None:
    """Why `name` is unavailable (None if it loaded or was never requested)."""
    return _errors.get(name)


@contextlib.contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on torch's own baton
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _prebuilt(name: str):
    try:
        return importlib.import_module(f"megatron_kernels._{name}")
    except ImportError:
        return None
    except Exception:  # e.g. an ABI mismatch after a torch upgrade: fall through to JIT
        return None


def load_extension(
    name: str,
    sources: Sequence[str | os.PathLike],
    *,
    cuda: bool = False,
    extra_cflags: Sequence[str] = (),
    extra_cuda_cflags: Sequence[str] = (),
    extra_ldflags: Sequence[str] = (),
):
    """The compiled extension `name` (prebuilt, else JIT-built and cached) or None; never raises."""
    with _lock:
        if name in _modules:
            return _modules[name]
        if name in _errors:
            return None
        mod = _prebuilt(name)
        if mod is None:
            mod = _jit(name, sources, cuda, extra_cflags, extra_cuda_cflags, extra_ldflags)
        if mod is not None:
            _modules[name] = mod
        return mod


def _build_key(sources, cuda, extra_cflags, extra_cuda_cflags, extra_ldflags) -> str:
    """Hash of everything that makes torch's JIT load recompile: the sources and the headers beside
    them (csrc/*.h, and *.cuh for CUDA builds: an include changes the build too), flags, torch and
    Python versions."""
    import torch

    h = hashlib.sha256()
    headers = (".h", ".cuh") if cuda else (".h",)
    files = {Path(s).resolve() for s in sources} | {f.resolve() for f in CSRC.iterdir() if f.suffix in headers}
    for f in sorted(files):
        h.update(str(f).encode() + b"\0")
        try:
            h.update(f.read_bytes())
        except OSError:
            h.update(b"<missing>")
    h.update(repr((bool(cuda), list(extra_cflags), list(extra_cuda_cflags), list(extra_ldflags),
                   torch.__version__, sys.version)).encode())
    return h.hexdigest()


def _say(msg: str) -> None:
    print(f"megatron_kernels: {msg}", file=sys.stderr, flush=True)


def _jit(name, sources, cuda, extra_cflags, extra_cuda_cflags, extra_ldflags):
    if os.environ.get("MEGATRON_KERNELS_NO_JIT", "0") not in ("", "0"):
        _errors[name] = "not prebuilt and MEGATRON_KERNELS_NO_JIT is set"
        return None
    announced = None  # (what, start time) once a build was announced
    try:
        import torch
        from torch.utils import cpp_extension

        if cuda and not (torch.cuda.is_available() and cpp_extension.CUDA_HOME):
            _errors[name] = "CUDA extension needs torch with CUDA and nvcc (CUDA_HOME)"
            return None
        if not cpp_extension.is_ninja_available():
            _errors[name] = "JIT build needs ninja (pip install ninja)"
            return None
        root = cache_dir()
        build_dir = root / name
        build_dir.mkdir(parents=True, exist_ok=True)
        verbose = os.environ.get("MEGATRON_KERNELS_VERBOSE", "0") not in ("", "0")
        with _file_lock(root / f"{name}.flock"):
            # Decided inside the lock: ranks that waited for another's build find the key written.
            key = _build_key(sources, cuda, extra_cflags, extra_cuda_cflags, extra_ldflags)
            key_file = build_dir / KEY_FILE
            try:
                cached = key_file.read_text().strip() == key
            except OSError:
                cached = False
            if not cached:
                what, how_long = _DESCRIPTIONS.get(name, (f"the {name} extension", "up to a minute"))
                _say(f"building {what} (once per cache, {how_long}) into {build_dir}")
                announced = (what, time.perf_counter())
            mod = cpp_extension.load(
                name=name,
                sources=[str(s) for s in sources],
                extra_cflags=list(extra_cflags),
                extra_cuda_cflags=list(extra_cuda_cflags),
                extra_ldflags=list(extra_ldflags),
                extra_include_paths=[str(CSRC)],
                build_directory=str(build_dir),
                with_cuda=cuda,
                verbose=verbose,
            )
            if not cached:
                key_file.write_text(key + "\n")
                _say(f"{announced[0]} built in {time.perf_counter() - announced[1]:.1f} s")
            return mod
    except Exception as exc:  # compiler missing, compile error, ...: the reference path covers it
        msg = f"{type(exc).__name__}: {exc}"
        _errors[name] = msg.strip().splitlines()[-1][:500] if msg.strip() else type(exc).__name__
        if os.environ.get("MEGATRON_KERNELS_VERBOSE", "0") not in ("", "0"):
            _say(f"building {name} failed: {msg}")
        elif announced is not None:
            _say(f"building {announced[0]} failed after {time.perf_counter() - announced[1]:.1f} s "
                 f"({_errors[name]}); using the PyTorch reference (MEGATRON_KERNELS_VERBOSE=1 shows why)")
        return None


def cpu_adam_extension():
    """The one-pass CPU Adam extension or None (see `build_error('cpu_adam')`)."""
    return load_extension(
        "cpu_adam",
        [CSRC / "cpu_adam.cpp"],
        extra_cflags=CPU_CFLAGS,
        extra_ldflags=CPU_LDFLAGS,
    )
