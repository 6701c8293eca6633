"""The block's parts as ModelConfig chooses them (docs/models.md): their one-line checks and their
description for logs. Pure functions of the config (no torch), called by validation.validate, the
offline layout checks and the Hugging Face import before anything is built."""

from __future__ import annotations

from megazero.config import ModelConfig
from megazero.errors import ConfigError

NORMALIZATIONS = ("LayerNorm", "RMSNorm")
POSITION_EMBEDDINGS = ("learned_absolute", "rope", "none")
ATTENTION_BACKENDS = ("auto", "sdpa", "fused", "unfused")


def describe_parts(m: ModelConfig) -> str:
    """The block's parts in a few words ("RMSNorm, rope, SwiGLU, 2 query groups, ...")."""
    parts = [m.normalization, {"learned_absolute": "learned positions", "rope": "rope", "none": "no positions"}[
        m.position_embedding_type], "SwiGLU" if m.swiglu else "GELU"]
    if m.query_groups != m.num_attention_heads:
        parts.append(f"{m.query_groups} query groups")
    if m.position_embedding_type == "rope" and m.use_rope_scaling:
        parts.append(f"llama3 rope scaling x{m.rope_scaling_factor:g}")
    if not m.add_bias_linear:
        parts.append("QKV bias only" if m.add_qkv_bias else "no linear biases")
    if m.qk_layernorm:
        parts.append("q/k norms")
    parts.append("untied output" if m.untie_embeddings_and_output_weights else "tied output")
    return ", ".join(parts)


def check_parts(m: ModelConfig) -> None:
    """The parts' names and the head arithmetic they need (ConfigError, one line)."""
    for name, value, allowed in (("--normalization", m.normalization, NORMALIZATIONS),
                                 ("--position-embedding-type", m.position_embedding_type, POSITION_EMBEDDINGS),
                                 ("--attention-backend", m.attention_backend, ATTENTION_BACKENDS)):
        if value not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    if m.num_attention_heads % m.query_groups:
        raise ConfigError(f"--num-attention-heads {m.num_attention_heads} is not divisible by --num-query-groups "
                          f"{m.query_groups}; each key/value head serves the same number of query heads")
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"--hidden-size {m.hidden_size} is not divisible by --num-attention-heads "
                          f"{m.num_attention_heads}; change one, or give --kv-channels (the head dim)")
    if m.num_query_groups != 1 and not m.group_query_attention:
        raise ConfigError(f"--num-query-groups {m.num_query_groups} is used only with --group-query-attention "
                          f"(Megatron ignores it otherwise); add --group-query-attention or drop --num-query-groups")
    if m.position_embedding_type == "rope":
        rotated = int(m.head_dim * m.rotary_percent)
        if rotated < 2 or rotated % 2:
            source = f"--kv-channels {m.kv_channels}" if m.kv_channels else \
                f"hidden {m.hidden_size} / {m.num_attention_heads} heads"
            raise ConfigError(f"--rotary-percent {m.rotary_percent:g} of head dim {m.head_dim} ({source}) rotates "
                              f"{rotated} dims; rope needs an even number >= 2")
        if m.use_rope_scaling and m.rope_high_freq_factor <= m.rope_low_freq_factor:
            raise ConfigError(f"--rope-high-freq-factor {m.rope_high_freq_factor:g} must exceed "
                              f"--rope-low-freq-factor {m.rope_low_freq_factor:g} (Llama 3.1: 4 and 1)")
    elif m.use_rope_scaling:
        raise ConfigError("--use-rope-scaling applies to --position-embedding-type rope; add it or drop the scaling")
