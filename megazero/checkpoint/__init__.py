"""Topology-independent checkpoints: format.py (files, index, atomic commit, reader), state.py (a
training's state <-> a checkpoint, any layout), resume.py (start-up's --load decisions), api.py
(`load_model`: a single-process model; readers for tools), offline.py (write a checkpoint as a chosen
layout would: resharding, Hugging Face import), hf.py (Hugging Face export and import of GPT-2 and
Llama-family models)."""
from megazero.checkpoint.api import load_model  # noqa: E402,F401
