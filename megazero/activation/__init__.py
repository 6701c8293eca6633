"""Activation memory: recomputation (recompute.py), the measured bytes of tensors saved for backward
(saved_tensors.py) and the model of those bytes per layout (memory_model.py). docs/activation-memory.md."""
