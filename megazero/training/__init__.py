"""Training: the trainer (composition + train step) and data resolution."""
