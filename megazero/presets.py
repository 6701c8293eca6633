"""Model presets (`--model-size NAME`; torchtitan calls them flavors): named ModelConfig shapes with the
published dims of GPT-2 and Llama 3.x, plus a tiny Llama-style shape for CPU demos.

Pure data and arithmetic, no torch: cli.py expands a preset into ModelConfig field values *below* the
flags (an explicit flag overrides the preset's value; with a ds_config the preset is more defaults),
and the planner reuses `preset(name)`, `PRESETS[name].vocab` and `parameter_count`. A preset never sets
vocab_size (that comes from the tokenizer); the vocab it was published with is `Preset.vocab`, and
`Preset.params` is the published parameter count at that vocab, which `parameter_count` reproduces
(tests/unit/test_presets.py). docs/models.md ("Presets") has the table.

Imports nothing of megazero but errors and config (docs/architecture.md, "Imports flow one way").
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from megazero.config import ModelConfig
from megazero.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    name: str  # canonical name (what --model-size records in config.json)
    fields: Mapping[str, Any]  # ModelConfig field -> value (never vocab_size)
    vocab: int | None  # the published tokenizer's vocab (metadata: parameter counts, the planner)
    params: int | None  # published parameter count at `vocab` (None: no published model)
    source: str  # where the dims come from
    aliases: tuple[str, ...] = field(default=())


# GPT-2 (HF openai-community/gpt2*, config.json): pre-LayerNorm eps 1e-5, learned positions (1024), GELU
# MLP of 4 x hidden (ffn_hidden_size left to that default), biases everywhere, tied output layer,
# dropout 0.1 (resid/attn/embd_pdrop).
_GPT2 = dict(seq_length=1024, max_position_embeddings=1024, ffn_hidden_size=None, kv_channels=None,
             normalization="LayerNorm", layernorm_epsilon=1e-5, position_embedding_type="learned_absolute",
             swiglu=False, group_query_attention=False, num_query_groups=1,
             untie_embeddings_and_output_weights=False, add_bias_linear=True, add_qkv_bias=False,
             qk_layernorm=False, use_rope_scaling=False, hidden_dropout=0.1, attention_dropout=0.1,
             init_method_std=0.02)

# Llama: pre-RMSNorm eps 1e-5, rope on whole heads, SwiGLU, grouped-query attention, no biases, no
# dropout. Llama 3.x (HF meta-llama/Llama-3.*, config.json): theta 500000, "llama3" rope scaling with
# low/high frequency factors 1/4 over the original 8192 positions, max positions 131072 (what the
# rope scaling reaches); seq_length 8192 is the pretraining context (--seq-length overrides).
_LLAMA = dict(normalization="RMSNorm", layernorm_epsilon=1e-5, position_embedding_type="rope",
              rotary_percent=1.0, swiglu=True, group_query_attention=True, kv_channels=None,
              add_bias_linear=False, add_qkv_bias=False, qk_layernorm=False, hidden_dropout=0.0,
              attention_dropout=0.0, init_method_std=0.02)
_LLAMA3 = dict(_LLAMA, seq_length=8192, max_position_embeddings=131072, rotary_base=500000.0,
               use_rope_scaling=True, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
               rope_original_max_positions=8192, num_query_groups=8)


def _shape(layers: int, hidden: int, heads: int, **rest: Any) -> dict[str, Any]:
    return dict(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, **rest)


def _llama3(version: str, layers: int, hidden: int, heads: int, ffn: int, scaling: float, tied: bool,
            params: int) -> Preset:
    """A published Llama 3.x shape ("3.1-8b"): named llama3.1-8b, alias llama-3.1-8b (the HF id, any case)."""
    fields = {**_LLAMA3, **_shape(layers, hidden, heads), "ffn_hidden_size": ffn, "rope_scaling_factor": scaling,
              "untie_embeddings_and_output_weights": not tied}
    return Preset(f"llama{version}", fields, 128256, params, f"meta-llama/Llama-{version.upper()}",
                  (f"llama-{version}",))


_TABLE: tuple[Preset, ...] = (
    Preset("gpt2", {**_GPT2, **_shape(12, 768, 12)}, 50257, 124_439_808,
           "openai-community/gpt2", ("gpt2-124m", "gpt2-small")),
    Preset("gpt2-medium", {**_GPT2, **_shape(24, 1024, 16)}, 50257, 354_823_168,
           "openai-community/gpt2-medium", ("gpt2-355m",)),
    Preset("gpt2-large", {**_GPT2, **_shape(36, 1280, 20)}, 50257, 774_030_080,
           "openai-community/gpt2-large", ("gpt2-774m",)),
    Preset("gpt2-xl", {**_GPT2, **_shape(48, 1600, 25)}, 50257, 1_557_611_200,
           "openai-community/gpt2-xl", ("gpt2-1.5b",)),
    # A CPU demo: Llama 3's parts at a size that trains in minutes on two cores (ffn: 2/3 x 4h rounded up to
    # a multiple of 256, Llama's rule); no published model, so no vocab or count.
    Preset("llama-tiny", {**_LLAMA, **_shape(4, 256, 8), "ffn_hidden_size": 768, "num_query_groups": 2,
                          "seq_length": 256, "max_position_embeddings": 2048, "rotary_base": 10000.0,
                          "use_rope_scaling": False, "untie_embeddings_and_output_weights": True},
           None, None, "megazero (CPU demo)", ("llama-debug",)),
    # Llama 3.x: version, layers, hidden, heads, ffn, rope scaling factor, tied, published parameters
    _llama3("3.2-1b", 16, 2048, 32, 8192, 32.0, True, 1_235_814_400),
    _llama3("3.2-3b", 28, 3072, 24, 8192, 32.0, True, 3_212_749_824),
    _llama3("3.1-8b", 32, 4096, 32, 14336, 8.0, False, 8_030_261_248),
    _llama3("3.1-70b", 80, 8192, 64, 28672, 8.0, False, 70_553_706_496),
    _llama3("3.1-405b", 126, 16384, 128, 53248, 8.0, False, 405_853_388_800),
)

# canonical name -> Preset, in table order (iterating lists the names)
PRESETS: Mapping[str, Preset] = MappingProxyType({p.name: p for p in _TABLE})
_LOOKUP = {**{a: p.name for p in _TABLE for a in p.aliases}, **{p.name: p.name for p in _TABLE}}


def canonical_name(name: str) -> str:
    """The canonical preset name for `name`: any case, an alias (`gpt2-124m`) or a Hugging Face id
    (`meta-llama/Llama-3.1-8B`). ConfigError (one line, with the nearest name) when there is none."""
    key = name.strip().lower().rsplit("/", 1)[-1]
    if key in _LOOKUP:
        return _LOOKUP[key]
    close = difflib.get_close_matches(key, list(_LOOKUP), n=1, cutoff=0.6)
    hint = f"did you mean {_LOOKUP[close[0]]}? " if close else ""
    raise ConfigError(f"--model-size {name}: unknown preset; {hint}choose one of {', '.join(PRESETS)} "
                      f"(docs/models.md, \"Presets\")")


def preset(name: str) -> dict[str, Any]:
    """ModelConfig field values of preset `name` (a fresh dict; never vocab_size)."""
    return dict(PRESETS[canonical_name(name)].fields)


def parameter_count(model: ModelConfig | Mapping[str, Any], vocab: int) -> int:
    """Parameters of a model of this shape with a `vocab`-token embedding (unpadded, as published counts
    are): embeddings (+ learned positions), per layer two norms, QKV (grouped), output projection and the
    MLP (gate + up with SwiGLU), the final norm, and an output layer when untied."""
    m = model if isinstance(model, ModelConfig) else ModelConfig(**model)
    h, d, f = m.hidden_size, m.head_dim, m.ffn_size
    norm = h * (2 if m.normalization == "LayerNorm" else 1)  # LayerNorm has a bias, RMSNorm does not
    q, kv = m.num_attention_heads * d, 2 * m.query_groups * d
    attention = h * (q + kv) + (q + kv) * m.qkv_bias + q * h + h * m.add_bias_linear
    if m.qk_layernorm:  # one norm over the head dim for queries, one for keys
        attention += 2 * d * (2 if m.normalization == "LayerNorm" else 1)
    mlp_in = 2 * f if m.swiglu else f
    mlp = h * mlp_in + f * h + (mlp_in + h) * m.add_bias_linear
    embeddings = vocab * h + (m.max_positions * h if m.position_embedding_type == "learned_absolute" else 0)
    output = vocab * h if m.untie_embeddings_and_output_weights else 0
    return embeddings + m.num_layers * (2 * norm + attention + mlp) + norm + output
