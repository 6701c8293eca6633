"""Optional compiled kernels for megazero (C++/CUDA sources under csrc/, thin bindings here).

Imports torch only, never megazero (docs/architecture.md, principle 9). Every kernel is found
prebuilt (setup.py), else JIT-built into a cache, else reported absent; megazero dispatches to it or
to its pure-PyTorch reference. See docs/kernels.md.
"""

from .build import build_error, cache_dir, load_extension
from .cpu_adam import cpu_adam_step, cpu_adam_step_reference, has_non_finite

__all__ = [
    "build_error",
    "cache_dir",
    "load_extension",
    "cpu_adam_step",
    "cpu_adam_step_reference",
    "has_non_finite",
]
