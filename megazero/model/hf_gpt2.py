"""Exact mapping between a full megazero GPT state dict and Hugging Face's `GPT2LMHeadModel`.

megazero's GPT (`megazero/model/gpt.py`) is numerically the GPT-2 architecture, so a checkpoint maps
onto `transformers.GPT2LMHeadModel` by renaming, transposing and permuting tensors; no value is changed
except that vocabulary padding rows are dropped (export) or added back as zeros (import).
`tests/unit/test_hf_gpt2.py` checks logits, losses and gradients against transformers.

Input is the *full, unsharded* state dict (what a tp=1, pp=1 `GPTModel.state_dict()` holds, or TP
shards already gathered). This module imports only torch and megazero.config: transformers is an
optional dependency, needed only by whoever builds the HF model (`GPT2Config(**hf_gpt2_config(cfg))`).

Names (L = layer number; megazero's layer names are global, `layers.{L}`):

    megazero                                      GPT2LMHeadModel                        transform
    word_embeddings.weight       [V_pad, h]       transformer.wte.weight      [V, h]     drop padding rows
                                                  lm_head.weight              [V, h]     tied: same tensor as wte
    position_embeddings          [P, h]           transformer.wpe.weight      [P, h]     -
    layers.L.input_layernorm.{weight,bias}        transformer.h.L.ln_1.{weight,bias}     -
    layers.L.attention.query_key_value.weight [3h, h]  transformer.h.L.attn.c_attn.weight [h, 3h]  permute + T
    layers.L.attention.query_key_value.bias   [3h]     transformer.h.L.attn.c_attn.bias   [3h]     permute
    layers.L.attention.dense.weight [h, h]        transformer.h.L.attn.c_proj.weight [h, h]  T
    layers.L.attention.dense.bias                 transformer.h.L.attn.c_proj.bias       -
    layers.L.post_attention_layernorm.{weight,bias}  transformer.h.L.ln_2.{weight,bias}  -
    layers.L.mlp.dense_h_to_4h.weight [f, h]      transformer.h.L.mlp.c_fc.weight [h, f]    T
    layers.L.mlp.dense_h_to_4h.bias               transformer.h.L.mlp.c_fc.bias          -
    layers.L.mlp.dense_4h_to_h.weight [h, f]      transformer.h.L.mlp.c_proj.weight [f, h]  T
    layers.L.mlp.dense_4h_to_h.bias               transformer.h.L.mlp.c_proj.bias        -
    final_layernorm.{weight,bias}                 transformer.ln_f.{weight,bias}         -

Transposes (T): megazero's linears store `nn.Linear` weights [out, in] (y = x W^T + b); HF GPT-2 uses
`Conv1D`, which stores [in, out] (y = x W + b). Every projection weight is transposed; biases are not.

QKV permutation: megazero's fused QKV output dim is ordered [head, (q,k,v), head_dim] (so a contiguous
TP split gives whole heads); HF's `c_attn` output dim is ordered [(q,k,v), head, head_dim] (it splits
the output into q, k, v thirds, then heads). Export views the output dim as [nh, 3, hd] and swaps the
first two axes (then transposes the weight); import does the inverse. The bias gets the same
permutation.

Vocabulary padding: megazero pads the vocabulary to a multiple of make_vocab_size_divisible_by x tp
with zero rows that are never looked up and masked out of the loss. HF gets the logical vocabulary
(`vocab_size = cfg.vocab_size`): export keeps the first `cfg.vocab_size` rows; import appends zero rows
up to `cfg.padded_vocab_size(1)` (or a given padded size). megazero logits are vocab-padded: their first
`cfg.vocab_size` columns equal HF's logits. The round trip from_hf(to_hf(state)) is exact for every
megazero state (padding rows are zero by construction: zero init, zero gradient).

Config (`hf_gpt2_config`): GPT-2 numerics are learned positions, pre-LN blocks, tanh-approximate GELU
("gelu_new", GPT-2's own activation), biases, attention scale 1/sqrt(head_dim) (no per-layer scaling,
no reordered upcast), final LayerNorm and tied output embedding; dropouts map as hidden_dropout ->
resid_pdrop and embd_pdrop, attention_dropout -> attn_pdrop.
"""

from __future__ import annotations

import torch

from megazero.config import ModelConfig

Tensor = torch.Tensor

# (megazero suffix under layers.L, HF suffix under transformer.h.L, transposed Conv1D weight?)
_LAYER_MAP: tuple[tuple[str, str, bool], ...] = (
    ("input_layernorm.weight", "ln_1.weight", False),
    ("input_layernorm.bias", "ln_1.bias", False),
    ("attention.dense.weight", "attn.c_proj.weight", True),
    ("attention.dense.bias", "attn.c_proj.bias", False),
    ("post_attention_layernorm.weight", "ln_2.weight", False),
    ("post_attention_layernorm.bias", "ln_2.bias", False),
    ("mlp.dense_h_to_4h.weight", "mlp.c_fc.weight", True),
    ("mlp.dense_h_to_4h.bias", "mlp.c_fc.bias", False),
    ("mlp.dense_4h_to_h.weight", "mlp.c_proj.weight", True),
    ("mlp.dense_4h_to_h.bias", "mlp.c_proj.bias", False),
)
_QKV_W, _QKV_B = "attention.query_key_value.weight", "attention.query_key_value.bias"
_HF_QKV_W, _HF_QKV_B = "attn.c_attn.weight", "attn.c_attn.bias"
_GLOBAL_MAP: tuple[tuple[str, str], ...] = (
    ("position_embeddings", "transformer.wpe.weight"),
    ("final_layernorm.weight", "transformer.ln_f.weight"),
    ("final_layernorm.bias", "transformer.ln_f.bias"),
)
_WTE, _LM_HEAD = "transformer.wte.weight", "lm_head.weight"
# Non-parameter buffers some transformers versions put in the state dict (causal mask constants).
_HF_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def hf_gpt2_config(cfg: ModelConfig, *, bos_token_id: int | None = None,
                   eos_token_id: int | None = None) -> dict:
    """Keyword arguments for `transformers.GPT2Config` describing the same network as `cfg`.

    `vocab_size` is the logical (unpadded) vocabulary. bos/eos ids default to None rather than
    GPT2Config's 50256 (GPT-2's own tokenizer), which is meaningless for a megazero vocabulary; an
    exporter that knows the tokenizer passes its ids.
    """
    assert cfg.vocab_size is not None, "cfg.vocab_size must be set (from the tokenizer)"
    assert cfg.hidden_size % cfg.num_attention_heads == 0, "hidden_size must be divisible by heads"
    return dict(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.max_positions,
        n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers,
        n_head=cfg.num_attention_heads,
        n_inner=cfg.ffn_size,
        activation_function="gelu_new",
        layer_norm_epsilon=cfg.layernorm_epsilon,
        resid_pdrop=cfg.hidden_dropout,
        embd_pdrop=cfg.hidden_dropout,
        attn_pdrop=cfg.attention_dropout,
        initializer_range=cfg.init_method_std,
        scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False,
        tie_word_embeddings=True,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )


def _permuted_copy(view: Tensor, shape: torch.Size) -> Tensor:
    """A new contiguous tensor holding `view`'s elements in its (permuted) order, reshaped to `shape`
    (always a copy, so results never alias the input state dict)."""
    out = torch.empty(view.shape, dtype=view.dtype, device=view.device)
    out.copy_(view)
    return out.view(shape)


def _qkv_to_hf_order(x: Tensor, cfg: ModelConfig) -> Tensor:
    """Dim 0 (3h) from [head, (q,k,v), head_dim] to [(q,k,v), head, head_dim]."""
    nh, hd = cfg.num_attention_heads, cfg.head_dim
    return _permuted_copy(x.reshape(nh, 3, hd, *x.shape[1:]).transpose(0, 1), x.shape)


def _qkv_from_hf_order(x: Tensor, cfg: ModelConfig) -> Tensor:
    """Dim 0 (3h) from [(q,k,v), head, head_dim] to [head, (q,k,v), head_dim]."""
    nh, hd = cfg.num_attention_heads, cfg.head_dim
    return _permuted_copy(x.reshape(3, nh, hd, *x.shape[1:]).transpose(0, 1), x.shape)


def check_keys(state: dict, expected: set[str], what: str) -> None:
    """KeyError naming (the first few) missing and unexpected keys; shared with hf_llama.py."""
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise KeyError(f"{what} state dict does not match the config: missing {sorted(missing)[:4]}, "
                       f"unexpected {sorted(unexpected)[:4]}")


def check_shape(t: Tensor, shape: tuple[int, ...], name: str) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {shape}")


def to_hf_gpt2_state_dict(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Full megazero GPT state dict -> GPT2LMHeadModel state dict (loadable with strict=True, apart
    from mask buffers that some transformers versions keep in the state dict).

    Returned tensors are new contiguous tensors (no aliasing with `state`), in the input dtype, except
    `lm_head.weight`, which is the same tensor object as `transformer.wte.weight` (tied weights).
    """
    h, f, v = cfg.hidden_size, cfg.ffn_size, cfg.vocab_size
    assert v is not None, "cfg.vocab_size must be set (from the tokenizer)"
    layer_keys = [_QKV_W, _QKV_B] + [m for m, _, _ in _LAYER_MAP]
    expected = {"word_embeddings.weight"} | {m for m, _ in _GLOBAL_MAP} | {
        f"layers.{i}.{k}" for i in range(cfg.num_layers) for k in layer_keys}
    check_keys(state, expected, "megazero")

    out: dict[str, Tensor] = {}
    wte = state["word_embeddings.weight"]
    if wte.dim() != 2 or wte.shape[0] < v or wte.shape[1] != h:
        raise ValueError(f"word_embeddings.weight: shape {tuple(wte.shape)}, expected [>= {v}, {h}]")
    out[_WTE] = wte.detach()[:v].clone()
    out[_LM_HEAD] = out[_WTE]
    check_shape(state["position_embeddings"], (cfg.max_positions, h), "position_embeddings")
    for mz, hf in _GLOBAL_MAP:
        out[hf] = state[mz].detach().clone()

    for i in range(cfg.num_layers):
        src, dst = f"layers.{i}.", f"transformer.h.{i}."
        qkv_w, qkv_b = state[src + _QKV_W].detach(), state[src + _QKV_B].detach()
        check_shape(qkv_w, (3 * h, h), src + _QKV_W)
        check_shape(state[src + "mlp.dense_h_to_4h.weight"], (f, h), src + "mlp.dense_h_to_4h.weight")
        out[dst + _HF_QKV_W] = _qkv_to_hf_order(qkv_w, cfg).t().contiguous()
        out[dst + _HF_QKV_B] = _qkv_to_hf_order(qkv_b, cfg)
        for mz, hf, transpose in _LAYER_MAP:
            t = state[src + mz].detach()
            out[dst + hf] = t.t().contiguous() if transpose else t.clone()
    return out


def from_hf_gpt2_state_dict(hf_state: dict[str, Tensor], cfg: ModelConfig, *,
                            padded_vocab_size: int | None = None) -> dict[str, Tensor]:
    """GPT2LMHeadModel state dict -> full megazero GPT state dict (inverse of to_hf_gpt2_state_dict).

    The word embedding gets zero rows up to `padded_vocab_size` (default `cfg.padded_vocab_size(1)`,
    a tp=1 model's table). `lm_head.weight` may be absent; if present it must equal the word
    embedding (GPT-2 ties them; megazero has no separate output layer). Mask buffers
    (`*.attn.bias`, `*.attn.masked_bias`) that some transformers versions store are ignored.
    """
    h, f, v = cfg.hidden_size, cfg.ffn_size, cfg.vocab_size
    assert v is not None, "cfg.vocab_size must be set (from the tokenizer)"
    padded = padded_vocab_size if padded_vocab_size is not None else cfg.padded_vocab_size(1)
    if padded < v:
        raise ValueError(f"padded_vocab_size {padded} < vocab_size {v}")
    hf_state = {k: t for k, t in hf_state.items()
                if not (k.startswith("transformer.h.") and k.endswith(_HF_BUFFER_SUFFIXES))}
    lm_head = hf_state.pop(_LM_HEAD, None)
    layer_keys = [_HF_QKV_W, _HF_QKV_B] + [hf for _, hf, _ in _LAYER_MAP]
    expected = {_WTE} | {hf for _, hf in _GLOBAL_MAP} | {
        f"transformer.h.{i}.{k}" for i in range(cfg.num_layers) for k in layer_keys}
    check_keys(hf_state, expected, "GPT2LMHeadModel")

    wte = hf_state[_WTE].detach()
    check_shape(wte, (v, h), _WTE)
    if lm_head is not None and not (lm_head is wte or torch.equal(lm_head.detach(), wte)):
        raise ValueError("lm_head.weight differs from transformer.wte.weight; megazero ties the output "
                         "layer to the word embedding and cannot represent an untied head")

    out: dict[str, Tensor] = {}
    table = wte.new_zeros((padded, h))
    table[:v].copy_(wte)
    out["word_embeddings.weight"] = table
    check_shape(hf_state["transformer.wpe.weight"], (cfg.max_positions, h), "transformer.wpe.weight")
    for mz, hf in _GLOBAL_MAP:
        out[mz] = hf_state[hf].detach().clone()

    for i in range(cfg.num_layers):
        src, dst = f"transformer.h.{i}.", f"layers.{i}."
        c_attn_w, c_attn_b = hf_state[src + _HF_QKV_W].detach(), hf_state[src + _HF_QKV_B].detach()
        check_shape(c_attn_w, (h, 3 * h), src + _HF_QKV_W)
        check_shape(hf_state[src + "mlp.c_fc.weight"], (h, f), src + "mlp.c_fc.weight")
        out[dst + _QKV_W] = _qkv_from_hf_order(c_attn_w.t(), cfg)
        out[dst + _QKV_B] = _qkv_from_hf_order(c_attn_b, cfg)
        for mz, hf, transpose in _LAYER_MAP:
            t = hf_state[src + hf].detach()
            out[dst + mz] = t.t().contiguous() if transpose else t.clone()
    return out
