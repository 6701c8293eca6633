"""Topology-independent checkpoints: format.py (files, index, atomic commit, reader), state.py (a
Trainer <-> a checkpoint, any layout), api.py (`load_model`: a single-process model for tools)."""
