"""ZeRO stages 0-3 over the data-parallel group: flat bucket layout, gradient sync, parameter storage,
the fragment optimizer and stage-3 gather/release hooks (engine.py composes them)."""
