"""Rotary position embeddings (RoPE), Llama / Hugging Face convention ("rotate half").

For a head of dim d, the first r = d * rotary_percent dims are rotated (the rest pass through): with
inverse frequencies inv_freq[i] = base^(-2i / r), i < r/2, position p turns the pair (x[i], x[i + r/2])
by the angle p * inv_freq[i]:

    x_rot = x * cos + rotate_half(x) * sin,  rotate_half([x1, x2]) = [-x2, x1],
    cos / sin: [s, r] = cos / sin of cat(freqs, freqs), freqs[p, i] = p * inv_freq[i]

This is the pairing of HF's LlamaAttention and Megatron's non-interleaved rope, so Hugging Face Llama
weights import without permuting q / k rows. Llama 3.1 frequency scaling (`use_rope_scaling`) divides
the low frequencies by the factor and blends the band between (HF "rope_type": "llama3").

Applied per local head in fp32 (the angles and the rotation), then cast back to the activation dtype.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from megazero.config import ModelConfig
from megazero.context_parallel.sharding import local_positions


def rope_inverse_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """inv_freq [r/2] in fp32 (r: rotated dims per head), Llama-3.1-scaled when cfg asks for it."""
    rotated = int(cfg.head_dim * cfg.rotary_percent)
    inv_freq = 1.0 / (cfg.rotary_base ** (torch.arange(0, rotated, 2, dtype=torch.int64).float() / rotated))
    if not cfg.use_rope_scaling:
        return inv_freq
    factor, low, high = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_context = cfg.rope_original_max_positions
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)  # long waves: / factor
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """cos / sin tables for positions [0, seq) (cached per length and device; not parameters). With
    context parallelism (cp > 1) the local seq tokens are cp rank `cp_rank`'s two load-balanced chunks
    of the global seq * cp tokens, and the tables are those of their global positions
    (context_parallel.sharding.local_positions)."""

    def __init__(self, cfg: ModelConfig, cp_rank: int = 0, cp: int = 1):
        super().__init__()
        self.cp_rank, self.cp = cp_rank, cp
        self.rotated = int(cfg.head_dim * cfg.rotary_percent)
        self.register_buffer("inv_freq", rope_inverse_frequencies(cfg), persistent=False)
        self._cache: tuple[int, torch.device, torch.Tensor, torch.Tensor] | None = None

    def tables(self, seq: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [seq, r] fp32."""
        if self._cache is None or self._cache[0] != seq or self._cache[1] != device:
            if self.cp > 1:
                positions = local_positions(seq * self.cp, self.cp_rank, self.cp, device).float()
            else:
                positions = torch.arange(seq, device=device, dtype=torch.float32)
            freqs = torch.outer(positions, self.inv_freq.to(device))  # [seq, r/2]
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cache = (seq, device, emb.cos(), emb.sin())
        return self._cache[2], self._cache[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, heads, s, d] -> x with its first r dims of every head rotated by position."""
        cos, sin = self.tables(x.shape[-2], x.device)
        return apply_rotary(x, cos, sin, self.rotated)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotated: int) -> torch.Tensor:
    """x [..., s, d]; cos / sin [s, rotated] fp32. Computed in fp32, returned in x's dtype."""
    xf = x.float()
    rot, passed = xf[..., :rotated], xf[..., rotated:]
    rot = rot * cos + _rotate_half(rot) * sin
    out = torch.cat((rot, passed), dim=-1) if passed.shape[-1] else rot
    return out.to(x.dtype)
