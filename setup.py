"""Packaging for megazero.

Core requirements are what a training run needs. Test and benchmark peers live in extras so a
training install never pulls them. torch is pinned by the user (README) before this is installed:
an unpinned `torch` requirement on a fresh CPU machine would download a multi-GB CUDA build, so the
requirement below is a lower bound that an installed torch satisfies.
"""

from setuptools import find_packages, setup

setup(
    name="megazero",
    version="0.1.0",
    description="3D-parallel (tensor x pipeline x ZeRO data) GPT pretraining on PyTorch",
    python_requires=">=3.10",
    packages=find_packages(include=["megazero", "megazero.*", "megatron_kernels", "megatron_kernels.*"]),
    py_modules=["pretrain_gpt"],
    install_requires=[
        "torch>=2.3",
        "sentencepiece>=0.2",
        "numpy>=1.24",
        "tensorboard>=2.14",
        "einops>=0.7",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": ["pytest>=8", "transformers"],
        # bench/vs_peers.py's peer (torch DDP and FSDP2 come with torch). Install without compiling
        # DeepSpeed's ops: DS_BUILD_OPS=0 pip install -e '.[bench]'; on CPU it runs with gloo.
        "bench": ["deepspeed>=0.15"],
    },
    entry_points={
        "console_scripts": [
            "megazero-pretrain-gpt=pretrain_gpt:main",
        ],
    },
)
