"""GPT models built from tensor-parallel layers."""

from megazero.model.gpt import GPTModel

__all__ = ["GPTModel"]
