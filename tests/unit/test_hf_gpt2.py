"""megazero's GPT is numerically Hugging Face's GPT-2: a tiny tp=1 GPTModel, exported with
megazero.model.hf_gpt2 into transformers.GPT2LMHeadModel, gives the same logits, per-token losses, HF's
shifted `labels=` loss and (mapped back) the same gradient for every parameter; export/import round
trips exactly.

Every parameter (biases and LayerNorm weights included, which initialise to 0 / 1 and would hide a
mapping bug) gets noise before the comparison; vocab padding rows stay zero, as megazero keeps them.
The vocab (300) is not a multiple of 128, so padding is exercised.
"""

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from megazero.config import ModelConfig  # noqa: E402
from megazero.model import GPTModel  # noqa: E402
from megazero.model.hf_gpt2 import (  # noqa: E402
    _qkv_to_hf_order,
    from_hf_gpt2_state_dict,
    hf_gpt2_config,
    to_hf_gpt2_state_dict,
)
from megazero.random import RNGStreams  # noqa: E402
from megazero.tensor_parallel.init import initialize_parameters  # noqa: E402

CFG = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=300,
                  hidden_dropout=0.0, attention_dropout=0.0)
TOL = dict(rtol=1e-5, atol=1e-5)
BATCH = 2


@pytest.fixture(scope="module")
def mz_model(tp_group):
    with torch.random.fork_rng():  # RNGStreams reseeds the global generator; keep other tests' RNG intact
        model = GPTModel(CFG, tp_group=tp_group, rng=RNGStreams(1234, 0, 0, torch.device("cpu")))
    initialize_parameters(model, seed=1234)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        model.word_embeddings.weight[CFG.vocab_size:].zero_()  # padding rows are zero in megazero
    assert model.word_embeddings.weight.shape[0] == CFG.padded_vocab_size(1) == 384
    return model.eval()


def _hf_model(attn_implementation: str):
    config = transformers.GPT2Config(**hf_gpt2_config(CFG), attn_implementation=attn_implementation)
    model = transformers.GPT2LMHeadModel(config)
    assert model.config._attn_implementation == attn_implementation
    return model.eval()


def _load(hf, state):
    result = hf.load_state_dict(state, strict=False)
    # Some transformers versions keep causal-mask buffers (attn.bias / attn.masked_bias) in the
    # state dict; those are the only keys the exported dict may lack.
    assert not result.unexpected_keys, result.unexpected_keys
    assert all(k.endswith((".attn.bias", ".attn.masked_bias")) for k in result.missing_keys), result.missing_keys
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr(), "output layer not tied"


def _tokens():
    return torch.randint(0, CFG.vocab_size, (BATCH, CFG.seq_length + 1), generator=torch.Generator().manual_seed(3))


def test_config_maps_to_gpt2config():
    config = transformers.GPT2Config(**hf_gpt2_config(CFG))
    assert (config.n_embd, config.n_layer, config.n_head, config.n_positions, config.vocab_size, config.n_inner) == (
        64, 2, 4, 32, 300, 256)
    assert config.activation_function == "gelu_new" and config.layer_norm_epsilon == 1e-5
    assert config.tie_word_embeddings


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_logits_losses_and_grads_match_hf(mz_model, attn_implementation):
    mz_model.zero_grad(set_to_none=True)
    state = {k: v.detach().clone() for k, v in mz_model.state_dict().items()}
    hf = _hf_model(attn_implementation)
    _load(hf, to_hf_gpt2_state_dict(state, CFG))

    tokens = _tokens()
    inputs, labels = tokens[:, :-1], tokens[:, 1:]  # [b, s] each
    s, v = CFG.seq_length, CFG.vocab_size

    # Logits: megazero's are vocab-padded; the first `vocab_size` columns are the model's.
    with torch.no_grad():
        mz_logits = mz_model(inputs)
    assert mz_logits.shape == (BATCH, s, CFG.padded_vocab_size(1))
    out = hf(inputs, labels=inputs)  # HF shifts: position t predicts inputs[t + 1]
    torch.testing.assert_close(mz_logits[..., :v], out.logits, **TOL)

    # Per-token losses (megazero takes labels already aligned with positions).
    mz_loss = mz_model(inputs, labels)  # [b, s]
    hf_per_token = F.cross_entropy(out.logits.reshape(-1, v), labels.reshape(-1), reduction="none").view(BATCH, s)
    torch.testing.assert_close(mz_loss, hf_per_token, **TOL)
    # HF's own `labels=` loss covers positions 0..s-2 (its shift drops the last position).
    mz_mean = mz_loss[:, :-1].mean()
    torch.testing.assert_close(mz_mean, out.loss, **TOL)

    # Gradients of every parameter, HF's mapped back into megazero names (wte's grad includes the
    # tied output layer's contribution, as megazero's word_embeddings grad does).
    mz_mean.backward()
    out.loss.backward()
    hf_grads = {name: p.grad for name, p in hf.named_parameters()}
    mapped = from_hf_gpt2_state_dict(hf_grads, CFG)
    mz_grads = dict(mz_model.named_parameters())
    assert mapped.keys() == mz_grads.keys()
    for name, p in mz_grads.items():
        torch.testing.assert_close(p.grad, mapped[name], **TOL, msg=lambda m, n=name: f"grad {n}: {m}")
    # padding rows get exactly zero gradient on both sides
    assert not mz_model.word_embeddings.weight.grad[v:].any()
    mz_model.zero_grad(set_to_none=True)


def test_round_trip_is_exact(mz_model):
    state = {k: v.detach().clone() for k, v in mz_model.state_dict().items()}
    hf_state = to_hf_gpt2_state_dict(state, CFG)
    assert hf_state["lm_head.weight"] is hf_state["transformer.wte.weight"]
    assert hf_state["transformer.wte.weight"].shape == (CFG.vocab_size, CFG.hidden_size)
    back = from_hf_gpt2_state_dict(hf_state, CFG)
    assert back.keys() == state.keys()
    for name, t in state.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    # The import goes through an actual HF model too (its state dict, buffers and all).
    hf = _hf_model("eager")
    _load(hf, hf_state)
    back = from_hf_gpt2_state_dict(hf.state_dict(), CFG)
    mz_model.load_state_dict(back, strict=True)  # same names and shapes as the model itself
    for name, t in state.items():
        assert torch.equal(back[name], t), name
    # Exported tensors do not alias the megazero state.
    hf_state["transformer.h.0.attn.c_attn.bias"].add_(1.0)
    hf_state["transformer.wpe.weight"].add_(1.0)
    assert torch.equal(state["layers.0.attention.query_key_value.bias"],
                       mz_model.state_dict()["layers.0.attention.query_key_value.bias"])
    assert torch.equal(state["position_embeddings"], mz_model.state_dict()["position_embeddings"])


def test_qkv_permutation_layout():
    """Explicit layout check, independent of any model: megazero row (head, j, d) -> HF column j*h + head*hd + d."""
    nh, hd, h = CFG.num_attention_heads, CFG.head_dim, CFG.hidden_size
    mz = torch.arange(3 * h, dtype=torch.float32)  # bias entry = its megazero index
    hf = _qkv_to_hf_order(mz, CFG)
    for head in range(nh):
        for j in range(3):  # q, k, v
            for d in range(hd):
                assert hf[j * h + head * hd + d] == head * 3 * hd + j * hd + d


def test_bad_state_dicts_are_refused():
    with pytest.raises(KeyError, match="missing"):
        to_hf_gpt2_state_dict({}, CFG)
    hf = _hf_model("eager")
    sd = dict(hf.state_dict())
    sd["lm_head.weight"] = sd["transformer.wte.weight"] + 1.0
    with pytest.raises(ValueError, match="untied"):
        from_hf_gpt2_state_dict(sd, CFG)
