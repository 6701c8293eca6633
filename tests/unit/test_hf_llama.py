"""Hugging Face Llama family in and out (megazero/model/hf_llama.py, tools/convert_checkpoint.py).

The oracle is transformers itself: tiny Llama / Mistral / Qwen2 / Qwen3 models built from configs here
(random init plus noise on every parameter, so norms and biases that initialise to 1 / 0 cannot hide a
mapping bug), saved with save_pretrained, imported with the tool, and their logits compared with
load_model's (fp32, atol 1e-4). Export: one 2-rank job (tp2) continues pretraining two imported models
(tied GQA, untied MHA) for 3 steps and saves; --to-hf of those gives HF logits equal to load_model's
within 1e-5, and importing the export again is exact. Refusals are one line naming the key.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megazero.checkpoint import format as fmt  # noqa: E402
from megazero.checkpoint.api import load_model  # noqa: E402
from megazero.config import ModelConfig  # noqa: E402
from megazero.model.parts import check_parts  # noqa: E402
from megazero.model.hf_llama import (  # noqa: E402
    from_hf_llama_state_dict,
    hf_llama_config,
    llama_refusal,
    model_config_from_hf_llama,
    to_hf_llama_state_dict,
)
from tests.checkpoint_utils import checkpoint_tensors  # noqa: E402
from tests.dist_utils import run_distributed  # noqa: E402
from tests.tool_utils import load_tool, one_line_error, refused_export, run_main  # noqa: E402
from tests.unit.hf_llama_runs import continue_pretraining  # noqa: E402

VOCAB, POSITIONS = 512, 32  # the tiny dataset's tokenizer vocabulary
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}  # 8 < 32 positions: every scaling band is used
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=POSITIONS)
# name -> (config class, model class, config kwargs)
MODELS = {
    "llama_tied_gqa": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama_untied_mha": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "llama3_rope": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, rope_theta=500000.0,
                                                            rope_scaling=LLAMA3)),
    "llama_biases": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=1, attention_bias=True,
                                                             mlp_bias=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=24)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=None)),
    # a window covering every position is no window: accepted
    "mistral_wide_window": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2,
                                                                        sliding_window=POSITIONS)),
}


convert = load_tool("convert_checkpoint")


def _run(argv, capsys) -> tuple[int, str, str]:
    return run_main(convert, argv, capsys)


def _hf_model(name: str, seed: int = 0):
    config_cls, model_cls, kwargs = MODELS[name]
    config = getattr(transformers, config_cls)(**SHAPE, **copy.deepcopy(kwargs))  # configs edit dicts in place
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():  # tied lm_head is embed_tokens: noised once, still tied
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, POSITIONS), generator=torch.Generator().manual_seed(seed))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ----- import: HF logits ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MODELS))
def test_import_logits_equal_transformers(name, tmp_path, capsys):
    hf = _hf_model(name)
    sharded = name == "llama_untied_mha"  # also the sharded safetensors format (index + 2+ files)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="200KB" if sharded else "5GB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file() == sharded
    target = ["--target-tp", "2", "--target-pp", "2"] if name == "llama_tied_gqa" else []
    code, out, err = _run(["--from-hf", tmp_path / "hf", "--save", tmp_path / "mz", *target], capsys)
    assert code == 0, err
    model = load_model(tmp_path / "mz")
    index = json.loads((fmt.resolve_checkpoint(tmp_path / "mz") / "index.json").read_text())
    assert index["iteration"] == 0 and index["state"]["optimizer"] == {"type": None, "state": []}
    tokens = _tokens()
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert ours.shape == theirs.shape == (2, POSITIONS, VOCAB)
    print(f"import {name}: max |logit diff| {_max_diff(ours, theirs):.3g}")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_mapping_round_trips_exactly():
    """from_hf(state) then to_hf gives the HF tensors back, bit for bit, for every family."""
    for name in MODELS:
        hf = _hf_model(name)
        cfg = ModelConfig(seq_length=POSITIONS, **model_config_from_hf_llama(hf.config.to_dict()))
        check_parts(cfg)
        state = hf.state_dict()
        mz = from_hf_llama_state_dict(state, cfg)
        assert mz["word_embeddings.weight"].shape[0] == cfg.padded_vocab_size(1)
        back = to_hf_llama_state_dict(mz, cfg)
        if hf.config.tie_word_embeddings:
            state.pop("lm_head.weight")
        assert back.keys() == state.keys(), name
        assert all(torch.equal(back[k], state[k]) for k in back), name
        exported = hf_llama_config(cfg)
        family = hf.config.model_type
        assert exported["model_type"] == ("llama" if family == "mistral" else family), name  # same network
        assert model_config_from_hf_llama(exported) == model_config_from_hf_llama(hf.config.to_dict()), name


# ----- export of a trained checkpoint --------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    """{name: trained checkpoint folder} for llama_tied_gqa and llama_untied_mha."""
    prefix, tokenizer_model = tiny_dataset
    root, names = tmp_path_factory.mktemp("hf_llama"), ("llama_tied_gqa", "llama_untied_mha")
    for name in names:
        _hf_model(name).save_pretrained(root / f"{name}_hf")
        assert convert.main(["--from-hf", str(root / f"{name}_hf"), "--save", str(root / f"{name}_import"),
                             "--make-vocab-size-divisible-by", "100"]) == 0  # 512 -> 600: padding rows
    run_distributed(continue_pretraining, 2, prefix, tokenizer_model, str(root), names, VOCAB)
    return {name: fmt.resolve_checkpoint(root / f"{name}_trained") for name in names}


@pytest.mark.parametrize("name", ["llama_tied_gqa", "llama_untied_mha"])
def test_export_of_trained_checkpoint(trained, name, tmp_path, capsys):
    src = trained[name]
    index = json.loads((src / "index.json").read_text())
    assert index["iteration"] == 3 and index["layout"]["tp"] == 2
    code, out, err = _run(["--load", src, "--to-hf", tmp_path / "hf"], capsys)
    assert code == 0, err
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["tie_word_embeddings"] == (name == "llama_tied_gqa")
    assert config["num_key_value_heads"] == (2 if name == "llama_tied_gqa" else 4)
    # the run's tokenizer goes along (tests/unit/test_hf_tokenizer.py checks it with AutoTokenizer)
    assert (tmp_path / "hf" / "tokenizer.json").is_file() and isinstance(config["eos_token_id"], int)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.vocab_size == VOCAB
    model = load_model(src)
    tokens = _tokens(1)
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    print(f"export {name}: max |logit diff| {_max_diff(ours, theirs):.3g}")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    # the training moved the weights away from the import
    start = load_model(src.parent.parent / f"{name}_import")
    assert _max_diff(start(tokens), ours) > 1e-3

    # import(export(x)) is exact, at another layout
    code, out, err = _run(["--from-hf", tmp_path / "hf", "--save", tmp_path / "back", "--target-tp", "2",
                           "--make-vocab-size-divisible-by", "100"], capsys)
    assert code == 0, err
    a = {n: t for n, t in checkpoint_tensors(src).items() if n.startswith("model/")}
    b = checkpoint_tensors(fmt.resolve_checkpoint(tmp_path / "back"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)


# ----- refusals ------------------------------------------------------------------------------------------
def _config_json(name: str, **changes) -> dict:
    config_cls, model_cls, kwargs = MODELS[name]
    config = getattr(transformers, config_cls)(**SHAPE, **copy.deepcopy(kwargs)).to_dict()
    config.update(changes)
    return config


@pytest.mark.parametrize("config, key", [
    (_config_json("mistral", sliding_window=16), "sliding_window=16"),
    (_config_json("qwen2", use_sliding_window=True, sliding_window=8), "use_sliding_window=True"),
    (_config_json("llama_tied_gqa", rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
     "rope_parameters.rope_type='yarn'"),
    ({**_config_json("llama_tied_gqa", rope_scaling={"type": "linear", "factor": 2.0}), "rope_parameters": None},
     "rope_scaling.rope_type='linear'"),
    (_config_json("llama_tied_gqa", rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                     "partial_rotary_factor": 0.5}), "partial_rotary_factor=0.5"),
    (_config_json("llama_tied_gqa", hidden_act="gelu"), "hidden_act='gelu'"),
    (_config_json("llama_tied_gqa", mlp_bias=True), "mlp_bias=True"),
    (_config_json("llama_tied_gqa", attention_bias=True), "attention_bias=True"),
    (_config_json("qwen3", attention_bias=True), "attention_bias=True"),
    (_config_json("llama_tied_gqa", model_type="gemma"), "model_type='gemma'"),
])
def test_import_refusals_are_one_line_naming_the_key(config, key, tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    code, _, err = _run(["--from-hf", tmp_path / "hf", "--save", tmp_path / "out"], capsys)
    assert code == 2 and key in one_line_error(err), err
    assert not (tmp_path / "out").exists()


def test_import_refuses_untied_head_in_a_tied_config(tmp_path, capsys):
    hf = _hf_model("llama_untied_mha")
    hf.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    code, _, err = _run(["--from-hf", tmp_path / "hf", "--save", tmp_path / "out"], capsys)
    assert code == 2 and "lm_head.weight differs" in one_line_error(err) and not (tmp_path / "out").exists()


def test_export_refusals_name_the_part(trained, tmp_path, capsys):
    for change, key in (({"position_embedding_type": "learned_absolute"}, "position_embedding_type='learned_absolute'"),
                        ({"normalization": "LayerNorm"}, "normalization='LayerNorm'"),
                        ({"rotary_percent": 0.5}, "rotary_percent=0.5"),
                        ({"swiglu": False}, "swiglu=False")):
        assert key in refused_export(convert, trained["llama_tied_gqa"], change, tmp_path, capsys)


def test_llama_refusal_and_family():
    llama = dict(normalization="RMSNorm", position_embedding_type="rope", swiglu=True, add_bias_linear=False,
                 vocab_size=VOCAB)
    assert llama_refusal(ModelConfig(**llama)) is None
    assert hf_llama_config(ModelConfig(**llama, add_qkv_bias=True))["model_type"] == "qwen2"
    assert hf_llama_config(ModelConfig(**llama, qk_layernorm=True))["model_type"] == "qwen3"
    assert "qk_layernorm" in llama_refusal(ModelConfig(**llama, qk_layernorm=True, add_qkv_bias=True))
    assert "learned_absolute" in llama_refusal(ModelConfig(**{**llama, "position_embedding_type": "learned_absolute"}))


def test_transformers_4_rope_keys_map_as_5_does():
    """config.json written by transformers 4 (rope_theta + rope_scaling, "type" or "rope_type") and by 5
    (rope_parameters) describe the same model."""
    v5 = _config_json("llama3_rope")
    assert v5["rope_parameters"]["rope_type"] == "llama3"
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    v4.update(rope_theta=500000.0, rope_scaling={**{k: v for k, v in LLAMA3.items() if k != "rope_type"},
                                                 "type": "llama3"})
    fields = model_config_from_hf_llama(v5)
    assert fields == model_config_from_hf_llama(v4)
    assert fields["rotary_base"] == 500000.0 and fields["use_rope_scaling"]
    assert fields["rope_original_max_positions"] == 8
    exported = hf_llama_config(ModelConfig(seq_length=POSITIONS, **fields))
    assert exported["rope_scaling"] == LLAMA3 and exported["rope_parameters"] == {**LLAMA3, "rope_theta": 500000.0}


def test_llama_3_2_1b_config_imports_as_the_preset(tmp_path):
    """meta-llama/Llama-3.2-1B's published config.json (transformers 4 keys) gives exactly the
    llama3.2-1b preset's ModelConfig, the default --seq-length included (docs/models.md)."""
    import dataclasses

    from megazero.checkpoint.hf import model_config_from_hf
    from megazero.presets import preset

    published = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
                 "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64,
                 "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
                 "max_position_embeddings": 131072, "mlp_bias": False, "num_attention_heads": 32,
                 "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
                 "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                  "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                 "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
                 "vocab_size": 128256}
    imported = model_config_from_hf(published, tmp_path / "config.json", seq_length=None,
                                    make_vocab_size_divisible_by=128)
    expected = ModelConfig(**preset("llama3.2-1b"), vocab_size=128256)
    assert dataclasses.replace(imported, model_size=None) == dataclasses.replace(expected, model_size=None)
