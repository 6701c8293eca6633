"""Exact mapping between a full megazero Llama-style state dict and Hugging Face's Llama family:
`LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM`.

These four are the same decoder with different optional parts, and megazero's block has each part
(`megazero/model/gpt.py`, attention.py, rope.py): pre-RMSNorm, rotate-half rope (llama3 frequency
scaling optional), SwiGLU, grouped-query attention, untied or tied output layer, and

    family    biases                                      q/k norm   megazero config
    llama     none, or q/k/v/o AND MLP (attention_bias    -          add_bias_linear False / True
              and mlp_bias both true)
    mistral   none                                        -          add_bias_linear False
    qwen2     q/k/v only                                  -          add_bias_linear False, add_qkv_bias
    qwen3     none                                        RMSNorm    add_bias_linear False, qk_layernorm

No value is changed: tensors are split, concatenated and interleaved, and vocabulary padding rows are
dropped (export) or added back as zeros (import). tests/unit/test_hf_llama.py checks logits against
transformers. Like hf_gpt2.py (whose key and shape checks it shares), it imports only torch and
megazero.config; transformers is needed only by whoever builds the HF model.

Names (L = global layer number; G = key/value groups, n = query heads per group, d = head dim,
f = ffn size, V / V_pad = logical / padded vocabulary):

    megazero                                          HF (model.* prefix)                  transform
    word_embeddings.weight        [V_pad, h]          model.embed_tokens.weight [V, h]     drop padding rows
    layers.L.input_layernorm.weight                   model.layers.L.input_layernorm.weight         -
    layers.L.attention.query_key_value.weight         model.layers.L.self_attn.q_proj.weight [G*n*d, h]
                                [G*(n+2)*d, h]        ...k_proj.weight [G*d, h], v_proj.weight [G*d, h]  group
    layers.L.attention.query_key_value.bias           ...{q,k,v}_proj.bias (llama with biases, qwen2) group
    layers.L.attention.q_layernorm.weight [d]         ...self_attn.q_norm.weight (qwen3)             -
    layers.L.attention.k_layernorm.weight [d]         ...self_attn.k_norm.weight (qwen3)             -
    layers.L.attention.dense.{weight,bias} [h, n*G*d] ...self_attn.o_proj.{weight,bias}              -
    layers.L.post_attention_layernorm.weight          model.layers.L.post_attention_layernorm.weight -
    layers.L.mlp.dense_h_to_4h.weight [2f, h]         ...mlp.gate_proj.weight [f, h], up_proj [f, h]  interleave
    layers.L.mlp.dense_h_to_4h.bias [2f]              ...mlp.{gate,up}_proj.bias (llama mlp_bias)    interleave
    layers.L.mlp.dense_4h_to_h.{weight,bias} [h, f]   ...mlp.down_proj.{weight,bias}                 -
    final_layernorm.weight                            model.norm.weight                              -
    output_layer.weight [V_pad, h] (untied)           lm_head.weight [V, h]                drop padding rows
    (tied: word_embeddings.weight)                    lm_head.weight = embed_tokens (not stored)

Both sides store `nn.Linear` weights [out, in], so nothing is transposed. "group": megazero's fused QKV
output dim is [group g, (q heads g*n .. g*n+n-1, k_g, v_g), d] (a contiguous TP split keeps whole query
groups); HF keeps q [heads, d], k [G, d], v [G, d] apart. Export views the fused rows as [G, n+2, d]
and takes [:, :n], [:, n], [:, n+1]; import concatenates them back. "interleave": megazero's gate/up
weight has rows [f, (gate, up)] (row 2i = gate_proj row i, 2i+1 = up_proj row i), so that any TP
split keeps pairs together. Rope needs no permutation: megazero rotates halves as HF does.

Config (`hf_llama_config` / `model_config_from_hf_llama`): num_key_value_heads <-> query groups
(== heads: MHA), head_dim <-> kv_channels, rope_theta <-> rotary_base, rope_scaling {"rope_type":
"llama3", factor, low_freq_factor, high_freq_factor, original_max_position_embeddings} <->
use_rope_scaling and its four fields, rms_norm_eps <-> layernorm_epsilon, tie_word_embeddings <-> not
untie_embeddings_and_output_weights, intermediate_size <-> ffn_hidden_size, attention_dropout,
initializer_range <-> init_method_std. HF Llama has no hidden dropout: import sets hidden_dropout 0
(Llama pretrains without it), export drops it (inference does not use it). Export writes the rope both
as transformers 4 reads it (rope_theta, rope_scaling) and as 5 does (rope_parameters).

Refused, one line naming the key (`ValueError`): on import a sliding window smaller than the
positions (mistral `sliding_window`, qwen2/3 `use_sliding_window`), a rope type other than default /
llama3, partial rotary, an activation other than silu, biases that do not map (llama attention_bias
without mlp_bias or the reverse, qwen3 attention_bias), quantized weights; on export (`llama_refusal`)
every megazero part HF has no class for (LayerNorm, learned or no positions, GELU MLP, partial
rotary, q/k norm with biases, ...).
"""

from __future__ import annotations

import torch

from megazero.config import ModelConfig
from megazero.model.hf_gpt2 import check_keys, check_shape

Tensor = torch.Tensor

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
# HF class defaults (transformers' config classes) for keys a hand-written config.json may omit
_HF_DEFAULTS = {
    "llama": dict(num_key_value_heads=None, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0),
    "mistral": dict(num_key_value_heads=8, max_position_embeddings=4096 * 32, rms_norm_eps=1e-6,
                    rope_theta=10000.0, sliding_window=4096),
    "qwen2": dict(num_key_value_heads=32, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=10000.0),
    "qwen3": dict(num_key_value_heads=32, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=10000.0,
                  head_dim=128),
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# ModelConfig fields the export maps (or that do not change the network: dropouts, kernels, names);
# every other field must keep its default (checked in llama_refusal, so a field added later is refused
# until this mapping learns it)
_MAPPED = {"model_size", "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "seq_length",
           "max_position_embeddings", "vocab_size", "make_vocab_size_divisible_by", "hidden_dropout",
           "attention_dropout", "init_method_std", "layernorm_epsilon", "fused_kernels", "normalization",
           "position_embedding_type", "rotary_base", "rotary_percent", "use_rope_scaling", "rope_scaling_factor",
           "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_positions", "swiglu",
           "group_query_attention", "num_query_groups", "kv_channels", "untie_embeddings_and_output_weights",
           "add_bias_linear", "add_qkv_bias", "qk_layernorm", "attention_backend"}


# ----- config ----------------------------------------------------------------------------------------------
def llama_refusal(cfg: ModelConfig) -> str | None:
    """Why no HF Llama-family class can represent `cfg` (one phrase naming the setting), or None."""
    need = (("normalization", "RMSNorm"), ("position_embedding_type", "rope"), ("swiglu", True),
            ("rotary_percent", 1.0))
    for key, value in need:
        if getattr(cfg, key) != value:
            return (f"model setting {key}={getattr(cfg, key)!r} has no Hugging Face Llama-family equivalent "
                    f"(they use {key}={value!r})")
    if cfg.qk_layernorm and cfg.qkv_bias:
        return ("model setting qk_layernorm with linear biases has no Hugging Face equivalent (Qwen3, the family "
                "with q/k norms, has no biases)")
    defaults = ModelConfig()
    for key in sorted(ModelConfig.__dataclass_fields__):
        if key not in _MAPPED and getattr(cfg, key) != getattr(defaults, key):
            return (f"model setting {key}={getattr(cfg, key)!r} has no Hugging Face Llama-family equivalent "
                    f"(hf_llama does not map it)")
    return None


def hf_llama_family(cfg: ModelConfig) -> str:
    """The HF model_type that represents `cfg` (llama_refusal(cfg) must be None): qwen3 with q/k norms,
    qwen2 with a QKV bias only, else llama (its attention_bias / mlp_bias = add_bias_linear)."""
    if cfg.qk_layernorm:
        return "qwen3"
    if cfg.add_qkv_bias and not cfg.add_bias_linear:
        return "qwen2"
    return "llama"


def hf_llama_config(cfg: ModelConfig, *, bos_token_id: int | None = None, eos_token_id: int | None = None,
                    pad_token_id: int | None = None) -> dict:
    """config.json contents (model_type and architectures included) for the HF class of
    hf_llama_family(cfg). `vocab_size` is the logical vocabulary; token ids are the caller's (the
    tokenizer's), None when unknown."""
    why = llama_refusal(cfg)
    if why:
        raise ValueError(why)
    assert cfg.vocab_size is not None, "cfg.vocab_size must be set (from the tokenizer)"
    family = hf_llama_family(cfg)
    rope_scaling = None
    if cfg.use_rope_scaling:
        rope_scaling = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor,
                        "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
                        "original_max_position_embeddings": cfg.rope_original_max_positions}
    out = dict(
        model_type=family, architectures=[ARCHITECTURES[family]],
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.query_groups, head_dim=cfg.head_dim, hidden_act="silu",
        max_position_embeddings=cfg.max_positions, initializer_range=cfg.init_method_std,
        rms_norm_eps=cfg.layernorm_epsilon, tie_word_embeddings=not cfg.untie_embeddings_and_output_weights,
        attention_dropout=cfg.attention_dropout,
        # transformers 4 reads rope_theta / rope_scaling, transformers 5 rope_parameters
        rope_theta=cfg.rotary_base, rope_scaling=rope_scaling,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rotary_base} if rope_scaling is None
        else {**rope_scaling, "rope_theta": cfg.rotary_base},
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, use_cache=True,
    )
    if family == "llama":
        out.update(attention_bias=cfg.add_bias_linear, mlp_bias=cfg.add_bias_linear)
    elif family == "qwen3":
        out.update(attention_bias=False, use_sliding_window=False, sliding_window=None)
    else:  # qwen2
        out.update(use_sliding_window=False, sliding_window=None)
    return out


def _refuse(key: str, value, why: str):
    raise ValueError(f"{key}={value!r}: {why}")


def _rope_fields(config: dict, defaults: dict) -> dict:
    """rotary_base and llama3 scaling from transformers 5's rope_parameters, else 4's rope_theta and
    rope_scaling (5 prefers rope_parameters when both are present; so do we)."""
    if config.get("rope_parameters") is not None:
        key, rope = "rope_parameters", config["rope_parameters"]
        if not isinstance(rope, dict) or ("rope_theta" not in rope and "rope_type" not in rope):
            _refuse(key, rope, "per-layer rope parameters have no megazero equivalent (one rope for every layer)")
        theta = rope.get("rope_theta", config.get("rope_theta", defaults["rope_theta"]))
    else:
        key, rope = "rope_scaling", config.get("rope_scaling") or {}
        theta = config.get("rope_theta", defaults["rope_theta"])
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        _refuse("partial_rotary_factor", partial, "megazero exports and imports full rotary only (Llama rotates "
                "every head dim)")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    fields = {"rotary_base": float(theta)}
    if rope_type in (None, "default"):
        return fields
    if rope_type != "llama3":
        _refuse(f"{key}.rope_type", rope_type, "megazero implements rope types default and llama3 only")
    unknown = sorted(set(rope) - {"rope_type", "type", "rope_theta", "partial_rotary_factor", *_LLAMA3_KEYS})
    if unknown:
        _refuse(f"{key}.{unknown[0]}", rope[unknown[0]], "not a llama3 rope parameter megazero implements")
    missing = [k for k in _LLAMA3_KEYS if k not in rope]
    if missing:
        _refuse(f"{key}.{missing[0]}", None, "llama3 rope scaling needs it")
    return {**fields, "use_rope_scaling": True, "rope_scaling_factor": float(rope["factor"]),
            "rope_low_freq_factor": float(rope["low_freq_factor"]),
            "rope_high_freq_factor": float(rope["high_freq_factor"]),
            "rope_original_max_positions": int(rope["original_max_position_embeddings"])}


def model_config_from_hf_llama(config: dict) -> dict:
    """ModelConfig fields (a dict: the caller adds seq_length, vocabulary padding) of the network an HF
    Llama-family config.json describes; ValueError naming the key for what megazero cannot represent."""
    family = config.get("model_type")
    if family not in ARCHITECTURES:
        _refuse("model_type", family, f"not a Llama-family model ({', '.join(ARCHITECTURES)})")
    defaults = _HF_DEFAULTS[family]
    for key in _REQUIRED:
        if config.get(key) is None:
            _refuse(key, None, "config.json must give it")
    if config.get("quantization_config"):
        _refuse("quantization_config", config["quantization_config"].get("quant_method", "?"),
                "quantized weights cannot be imported; use the unquantized model")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        _refuse("hidden_act", act, "megazero's SwiGLU uses silu")
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    positions = config.get("max_position_embeddings", defaults["max_position_embeddings"])
    window = config.get("sliding_window", defaults.get("sliding_window"))
    uses_window = config.get("use_sliding_window", False) if family in ("qwen2", "qwen3") else True
    if uses_window and window is not None and window < positions:
        key = "sliding_window" if family == "mistral" else "use_sliding_window"
        _refuse(key, window if family == "mistral" else True,
                f"sliding-window attention (window {window} < {positions} positions) has no megazero equivalent")
    groups = config.get("num_key_value_heads", defaults["num_key_value_heads"]) or heads
    head_dim = config.get("head_dim", defaults.get("head_dim")) or hidden // heads
    fields = dict(num_layers=config["num_hidden_layers"], hidden_size=hidden, num_attention_heads=heads,
                  ffn_hidden_size=config["intermediate_size"], max_position_embeddings=positions,
                  vocab_size=config["vocab_size"], hidden_dropout=0.0,
                  attention_dropout=float(config.get("attention_dropout", 0.0)),
                  init_method_std=config.get("initializer_range", 0.02),
                  layernorm_epsilon=config.get("rms_norm_eps", defaults["rms_norm_eps"]),
                  normalization="RMSNorm", position_embedding_type="rope", swiglu=True,
                  untie_embeddings_and_output_weights=not config.get("tie_word_embeddings", False),
                  add_bias_linear=False, **_rope_fields(config, defaults))
    if groups != heads:
        fields.update(group_query_attention=True, num_query_groups=groups)
    if head_dim * heads != hidden:
        fields["kv_channels"] = head_dim
    attn_bias, mlp_bias = config.get("attention_bias", False), config.get("mlp_bias", False)
    if family == "llama" and attn_bias != mlp_bias:
        key = "attention_bias" if attn_bias else "mlp_bias"
        _refuse(key, True, "megazero has biases in every linear layer or in none (or q/k/v only: Qwen2); set "
                           "both attention_bias and mlp_bias, or neither")
    if family == "llama" and attn_bias:
        fields["add_bias_linear"] = True
    if family == "qwen2":  # Qwen2's q/k/v projections always have a bias, o_proj and the MLP none
        fields["add_qkv_bias"] = True
    if family == "qwen3":
        if attn_bias:
            _refuse("attention_bias", True, "Qwen3's q/k/v/o biases without MLP biases have no megazero equivalent")
        fields["qk_layernorm"] = True
    return fields


# ----- weights ---------------------------------------------------------------------------------------------
# (megazero suffix under layers.L, HF suffix under model.layers.L) copied as they are
_LAYER_MAP = (("input_layernorm.weight", "input_layernorm.weight"),
              ("post_attention_layernorm.weight", "post_attention_layernorm.weight"),
              ("attention.dense.weight", "self_attn.o_proj.weight"),
              ("attention.dense.bias", "self_attn.o_proj.bias"),
              ("attention.q_layernorm.weight", "self_attn.q_norm.weight"),
              ("attention.k_layernorm.weight", "self_attn.k_norm.weight"),
              ("mlp.dense_4h_to_h.weight", "mlp.down_proj.weight"),
              ("mlp.dense_4h_to_h.bias", "mlp.down_proj.bias"))
_EMBED, _NORM, _LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
# Buffers older transformers versions saved with the weights (rope tables): not parameters
_HF_BUFFER_SUFFIXES = (".rotary_emb.inv_freq",)


def _layer_keys(cfg: ModelConfig) -> tuple[list[tuple[str, str]], bool, bool]:
    """(the copied (megazero, HF) suffixes this config has, QKV bias?, MLP bias?)."""
    keep = []
    for mz, hf in _LAYER_MAP:
        if mz.endswith(".bias") and not cfg.add_bias_linear:
            continue
        if "_layernorm.weight" in mz and mz.startswith("attention.") and not cfg.qk_layernorm:
            continue
        keep.append((mz, hf))
    return keep, cfg.qkv_bias, cfg.add_bias_linear


def _qkv_split(x: Tensor, cfg: ModelConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Fused [G*(n+2)*d, ...] -> q [G*n*d, ...], k [G*d, ...], v [G*d, ...] (new contiguous tensors)."""
    g, d = cfg.query_groups, cfg.head_dim
    n = cfg.num_attention_heads // g
    grouped = x.reshape(g, n + 2, d, *x.shape[1:])
    rest = tuple(x.shape[1:])
    return (grouped[:, :n].reshape(g * n * d, *rest).clone(), grouped[:, n].reshape(g * d, *rest).clone(),
            grouped[:, n + 1].reshape(g * d, *rest).clone())


def _qkv_fuse(q: Tensor, k: Tensor, v: Tensor, cfg: ModelConfig) -> Tensor:
    """Inverse of _qkv_split."""
    g, d = cfg.query_groups, cfg.head_dim
    n = cfg.num_attention_heads // g
    rest = tuple(q.shape[1:])
    return torch.cat((q.reshape(g, n, d, *rest), k.reshape(g, 1, d, *rest), v.reshape(g, 1, d, *rest)),
                     dim=1).reshape(g * (n + 2) * d, *rest)


def _vocab_rows(t: Tensor, v: int, h: int, name: str) -> Tensor:
    if t.dim() != 2 or t.shape[0] < v or t.shape[1] != h:
        raise ValueError(f"{name}: shape {tuple(t.shape)}, expected [>= {v}, {h}]")
    return t.detach()[:v].clone()


def _padded(t: Tensor, padded: int) -> Tensor:
    table = t.new_zeros((padded, t.shape[1]))
    table[:t.shape[0]].copy_(t)
    return table


def to_hf_llama_state_dict(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Full megazero state dict (padded or logical vocabulary) -> HF state dict of
    hf_llama_family(cfg)'s CausalLM. New contiguous tensors in the input dtype; a tied model has no
    `lm_head.weight` (HF ties it to embed_tokens on load; safetensors stores no aliases)."""
    why = llama_refusal(cfg)
    if why:
        raise ValueError(why)
    h, f, v, d = cfg.hidden_size, cfg.ffn_size, cfg.vocab_size, cfg.head_dim
    heads, g = cfg.num_attention_heads, cfg.query_groups
    assert v is not None, "cfg.vocab_size must be set (from the tokenizer)"
    copied, qkv_bias, mlp_bias = _layer_keys(cfg)
    layer_keys = [m for m, _ in copied] + ["attention.query_key_value.weight", "mlp.dense_h_to_4h.weight"]
    layer_keys += ["attention.query_key_value.bias"] if qkv_bias else []
    layer_keys += ["mlp.dense_h_to_4h.bias"] if mlp_bias else []
    globals_ = {"word_embeddings.weight", "final_layernorm.weight"}
    globals_ |= {"output_layer.weight"} if cfg.untie_embeddings_and_output_weights else set()
    check_keys(state, globals_ | {f"layers.{i}.{k}" for i in range(cfg.num_layers) for k in layer_keys}, "megazero")

    out: dict[str, Tensor] = {_EMBED: _vocab_rows(state["word_embeddings.weight"], v, h, "word_embeddings.weight"),
                              _NORM: state["final_layernorm.weight"].detach().clone()}
    if cfg.untie_embeddings_and_output_weights:
        out[_LM_HEAD] = _vocab_rows(state["output_layer.weight"], v, h, "output_layer.weight")
    for i in range(cfg.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        qkv = state[src + "attention.query_key_value.weight"].detach()
        check_shape(qkv, (g * (heads // g + 2) * d, h), src + "attention.query_key_value.weight")
        for name, t in zip("qkv", _qkv_split(qkv, cfg)):
            out[f"{dst}self_attn.{name}_proj.weight"] = t
        if qkv_bias:
            for name, t in zip("qkv", _qkv_split(state[src + "attention.query_key_value.bias"].detach(), cfg)):
                out[f"{dst}self_attn.{name}_proj.bias"] = t
        gate_up = state[src + "mlp.dense_h_to_4h.weight"].detach()
        check_shape(gate_up, (2 * f, h), src + "mlp.dense_h_to_4h.weight")
        out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = (
            gate_up[0::2].clone(), gate_up[1::2].clone())  # rows [f, (gate, up)]
        if mlp_bias:
            b = state[src + "mlp.dense_h_to_4h.bias"].detach()
            out[dst + "mlp.gate_proj.bias"], out[dst + "mlp.up_proj.bias"] = b[0::2].clone(), b[1::2].clone()
        for mz, hf in copied:
            out[dst + hf] = state[src + mz].detach().clone()
        check_shape(out[dst + "self_attn.o_proj.weight"], (h, heads * d), src + "attention.dense.weight")
    return out


def from_hf_llama_state_dict(hf_state: dict[str, Tensor], cfg: ModelConfig, *,
                             padded_vocab_size: int | None = None) -> dict[str, Tensor]:
    """HF Llama-family state dict -> full megazero state dict (inverse of to_hf_llama_state_dict).

    Word embedding (and untied output layer) get zero rows up to `padded_vocab_size` (default
    cfg.padded_vocab_size(1)). A tied config accepts `lm_head.weight` only equal to embed_tokens; keys
    without the `model.` prefix (saved from the base model) and old rope buffers are accepted."""
    h, f, v, d = cfg.hidden_size, cfg.ffn_size, cfg.vocab_size, cfg.head_dim
    heads, g = cfg.num_attention_heads, cfg.query_groups
    assert v is not None, "cfg.vocab_size must be set (from the tokenizer)"
    padded = padded_vocab_size if padded_vocab_size is not None else cfg.padded_vocab_size(1)
    if padded < v:
        raise ValueError(f"padded_vocab_size {padded} < vocab_size {v}")
    if not any(k.startswith("model.") for k in hf_state):  # saved from LlamaModel (no LM head wrapper)
        hf_state = {(k if k == _LM_HEAD else f"model.{k}"): t for k, t in hf_state.items()}
    hf_state = {k: t for k, t in hf_state.items() if not k.endswith(_HF_BUFFER_SUFFIXES)}
    untied = cfg.untie_embeddings_and_output_weights
    lm_head = None if untied else hf_state.pop(_LM_HEAD, None)
    copied, qkv_bias, mlp_bias = _layer_keys(cfg)
    layer_keys = [hf for _, hf in copied] + [f"self_attn.{p}_proj.weight" for p in "qkv"]
    layer_keys += ["mlp.gate_proj.weight", "mlp.up_proj.weight"]
    layer_keys += [f"self_attn.{p}_proj.bias" for p in "qkv"] if qkv_bias else []
    layer_keys += ["mlp.gate_proj.bias", "mlp.up_proj.bias"] if mlp_bias else []
    globals_ = {_EMBED, _NORM} | ({_LM_HEAD} if untied else set())
    check_keys(hf_state, globals_ | {f"model.layers.{i}.{k}" for i in range(cfg.num_layers) for k in layer_keys},
                "Hugging Face")

    embed = hf_state[_EMBED].detach()
    check_shape(embed, (v, h), _EMBED)
    if lm_head is not None and not torch.equal(lm_head.detach(), embed):
        raise ValueError("lm_head.weight differs from model.embed_tokens.weight although tie_word_embeddings is "
                         "true; set tie_word_embeddings false in config.json to import the untied head")
    out = {"word_embeddings.weight": _padded(embed, padded), "final_layernorm.weight": hf_state[_NORM].detach().clone()}
    check_shape(out["final_layernorm.weight"], (h,), _NORM)
    if untied:
        check_shape(hf_state[_LM_HEAD], (v, h), _LM_HEAD)
        out["output_layer.weight"] = _padded(hf_state[_LM_HEAD].detach(), padded)
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        q, k, val = (hf_state[f"{src}self_attn.{p}_proj.weight"].detach() for p in "qkv")
        for t, rows, p in ((q, heads * d, "q"), (k, g * d, "k"), (val, g * d, "v")):
            check_shape(t, (rows, h), f"{src}self_attn.{p}_proj.weight")
        out[dst + "attention.query_key_value.weight"] = _qkv_fuse(q, k, val, cfg)
        if qkv_bias:
            out[dst + "attention.query_key_value.bias"] = _qkv_fuse(
                *(hf_state[f"{src}self_attn.{p}_proj.bias"].detach() for p in "qkv"), cfg)
        gate, up = hf_state[src + "mlp.gate_proj.weight"].detach(), hf_state[src + "mlp.up_proj.weight"].detach()
        check_shape(gate, (f, h), src + "mlp.gate_proj.weight")
        check_shape(up, (f, h), src + "mlp.up_proj.weight")
        out[dst + "mlp.dense_h_to_4h.weight"] = torch.stack((gate, up), dim=1).reshape(2 * f, h)  # [f, (gate, up)]
        if mlp_bias:
            out[dst + "mlp.dense_h_to_4h.bias"] = torch.stack(
                (hf_state[src + "mlp.gate_proj.bias"].detach(), hf_state[src + "mlp.up_proj.bias"].detach()),
                dim=1).reshape(2 * f)
        for mz, hf in copied:
            out[dst + mz] = hf_state[src + hf].detach().clone()
        check_shape(out[dst + "attention.dense.weight"], (h, heads * d), src + "self_attn.o_proj.weight")
        check_shape(out[dst + "mlp.dense_4h_to_h.weight"], (h, f), src + "mlp.down_proj.weight")
    return out
