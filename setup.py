"""Packaging for megazero.

Core requirements are what a training run needs. Test and benchmark peers live in extras so a
training install never pulls them. torch is pinned by the user (README) before this is installed:
an unpinned `torch` requirement on a fresh CPU machine would download a multi-GB CUDA build, so the
requirement below is a lower bound that an installed torch satisfies.

Compiled kernels (docs/kernels.md, "Building") are optional and never fail the install. They are
built here when torch is importable by this script, i.e. with `pip install --no-build-isolation`
(pip's default isolated build env has no torch): the CPU Adam extension where a C++ compiler exists,
the CUDA kernels only when torch has CUDA and nvcc is present. Otherwise (the plain
`pip install -e .` CI uses) the first use JIT-builds them into a persistent cache
(~/.cache/megazero/torch_extensions). MEGATRON_KERNELS_BUILD=0 never builds here; any build failure
is a warning and the install continues.
"""

import glob
import os
import warnings

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _kernel_build_config():
    """(ext_modules, cmdclass) for the optional kernels; empty when not requested or not possible."""
    if os.environ.get("MEGATRON_KERNELS_BUILD", "") == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception:  # torch not importable in pip's isolated build env: JIT on first use instead
        return [], {}
    csrc = os.path.join("megatron_kernels", "csrc")
    exts = [
        CppExtension(
            "megatron_kernels._cpu_adam",
            [os.path.join(csrc, "cpu_adam.cpp")],
            include_dirs=[os.path.join(HERE, csrc)],
            # ISA chosen at runtime inside the kernel, so no -march flag: one binary fits any x86.
            extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off"],
            extra_link_args=["-fopenmp"],
        )
    ]
    cu = sorted(glob.glob(os.path.join(csrc, "*.cu")))
    binding = os.path.join(csrc, "fused_cuda_bindings.cpp")
    if cu and os.path.exists(binding) and torch.version.cuda and CUDA_HOME:
        exts.append(
            CUDAExtension(
                "megatron_kernels._fused_cuda",
                [binding] + cu,
                include_dirs=[os.path.join(HERE, csrc)],
                # Same flags as the JIT build (fused_cuda.CUDA_CFLAGS): no --use_fast_math, the kernels
                # rely on accurate expf / rsqrtf.
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
            )
        )

    class OptionalBuildExt(BuildExtension):
        """Build each kernel independently; a failure warns and leaves the JIT/reference fallback."""

        def run(self):
            try:
                super().run()
            except Exception as exc:
                warnings.warn(f"megatron_kernels: kernel build failed, using JIT/reference fallback: {exc}")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                warnings.warn(f"megatron_kernels: could not build {ext.name} ({exc}); "
                              "it will JIT-build on first use or fall back to the PyTorch reference")

    return exts, {"build_ext": OptionalBuildExt.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _kernel_build_config()

setup(
    name="megazero",
    version="0.1.0",
    description="3D-parallel (tensor x pipeline x ZeRO data) GPT pretraining on PyTorch",
    python_requires=">=3.10",
    packages=find_packages(include=["megazero", "megazero.*", "megatron_kernels", "megatron_kernels.*"]),
    py_modules=["pretrain_gpt"],
    package_data={"megatron_kernels": ["csrc/*.cpp", "csrc/*.h", "csrc/*.cu", "csrc/*.cuh"]},
    install_requires=[
        "torch>=2.3",
        "sentencepiece>=0.2",
        "numpy>=1.24",
        "tensorboard>=2.14",
        "einops>=0.7",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "safetensors>=0.4",  # checkpoint files (megazero/checkpoint/format.py)
        "tokenizers>=0.19",  # --tokenizer-type HuggingFaceTokenizer and tokenizer.json export (megazero/data/hf_tokenizer.py)
        # torch.utils.cpp_extension.load needs ninja for the first-use JIT build of the kernels.
        "ninja>=1.11",
    ],
    extras_require={
        "test": ["pytest>=8", "transformers"],
        # bench/vs_peers.py's peer (torch DDP and FSDP2 come with torch). Install without compiling
        # DeepSpeed's ops: DS_BUILD_OPS=0 pip install -e '.[bench]'; on CPU it runs with gloo.
        "bench": ["deepspeed>=0.15"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={
        "console_scripts": [
            "megazero-pretrain-gpt=pretrain_gpt:main",
        ],
    },
)
