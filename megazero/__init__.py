"""megazero: a 3D-parallel (tensor x pipeline x data/ZeRO) GPT pretraining framework on PyTorch."""

__version__ = "0.1.0"
