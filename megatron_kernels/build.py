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

``MEGATRON_KERNELS_NO_JIT=1`` disables step 2 (use only a prebuilt extension or nothing);
``MEGATRON_KERNELS_VERBOSE=1`` shows the compiler output.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
from pathlib import Path
from typing import Sequence

CSRC = Path(__file__).resolve().parent / "csrc"

# -ffp-contract=off: no fused multiply-add, so every ISA variant is bit-identical and follows
# torch's operation order. The ISA itself is chosen at runtime inside the kernel (see
# csrc/cpu_adam.cpp), so the same flags serve the install-time and the JIT build.
CPU_CFLAGS = ("-O3", "-fopenmp", "-ffp-contract=off")
CPU_LDFLAGS = ("-fopenmp",)

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


def _jit(name, sources, cuda, extra_cflags, extra_cuda_cflags, extra_ldflags):
    if os.environ.get("MEGATRON_KERNELS_NO_JIT", "0") not in ("", "0"):
        _errors[name] = "not prebuilt and MEGATRON_KERNELS_NO_JIT is set"
        return None
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
            return cpp_extension.load(
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
    except Exception as exc:  # compiler missing, compile error, ...: the reference path covers it
        msg = f"{type(exc).__name__}: {exc}"
        _errors[name] = msg.strip().splitlines()[-1][:500] if msg.strip() else type(exc).__name__
        if os.environ.get("MEGATRON_KERNELS_VERBOSE", "0") not in ("", "0"):
            print(f"megatron_kernels: building {name} failed: {msg}", file=sys.stderr)
        return None


def cpu_adam_extension():
    """The one-pass CPU Adam extension or None (see `build_error('cpu_adam')`)."""
    return load_extension(
        "cpu_adam",
        [CSRC / "cpu_adam.cpp"],
        extra_cflags=CPU_CFLAGS,
        extra_ldflags=CPU_LDFLAGS,
    )
