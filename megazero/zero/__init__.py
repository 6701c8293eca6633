"""ZeRO: gradient buffers and data-parallel reduction (stage 0 today; stages 1-3 in their issue)."""
