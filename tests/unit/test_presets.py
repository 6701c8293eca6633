"""Model presets (megazero/presets.py, `--model-size`): the published dims (their parameter counts, by
arithmetic and by the model megazero builds), the expansion under explicit flags and a ds_config, the
unknown-name error, config.json's record, checkpoint shape checks and validation at tp 1 / 8."""

import json

import pytest

from megazero.cli import parse_args
from megazero.config import ModelConfig, RunConfig
from megazero.errors import ConfigError
from megazero.presets import PRESETS, canonical_name, parameter_count, preset
from megazero.validation import validate
from tests.unit.test_cli import error

LLAMA3 = [n for n in PRESETS if n.startswith("llama3")]


@pytest.mark.parametrize("name", list(PRESETS))
def test_expansion_sets_the_preset_fields_and_records_the_name(name):
    m = parse_args(["--model-size", name]).model
    assert m.model_size == name and m.vocab_size is None  # the vocab comes from the tokenizer
    assert {k: getattr(m, k) for k in preset(name)} == preset(name)
    assert "vocab_size" not in preset(name) and "model_size" not in preset(name)


def test_published_dims():
    m = {n: ModelConfig(**preset(n)) for n in PRESETS}
    shape = lambda c: (c.num_layers, c.hidden_size, c.num_attention_heads, c.query_groups, c.ffn_size)  # noqa: E731
    assert [shape(m[n]) for n in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")] == [
        (12, 768, 12, 12, 3072), (24, 1024, 16, 16, 4096), (36, 1280, 20, 20, 5120), (48, 1600, 25, 25, 6400)]
    assert [shape(m[n]) for n in LLAMA3] == [(16, 2048, 32, 8, 8192), (28, 3072, 24, 8, 8192),
                                             (32, 4096, 32, 8, 14336), (80, 8192, 64, 8, 28672),
                                             (126, 16384, 128, 8, 53248)]
    for n in LLAMA3:
        c = m[n]
        assert (c.rotary_base, c.max_positions, c.rope_original_max_positions) == (500000.0, 131072, 8192)
        assert c.rope_scaling_factor == (32.0 if n.startswith("llama3.2") else 8.0) and c.use_rope_scaling
        assert c.untie_embeddings_and_output_weights == n.startswith("llama3.1")  # 3.2's 1B/3B are tied
    tiny = m["llama-tiny"]
    assert (tiny.normalization, tiny.swiglu, tiny.query_groups, tiny.ffn_size % 64, tiny.add_bias_linear,
            tiny.untie_embeddings_and_output_weights) == ("RMSNorm", True, 2, 0, False, True)


def test_parameter_counts_match_the_published_ones():
    assert parameter_count(preset("gpt2"), 50257) == pytest.approx(124e6, rel=0.01)
    assert parameter_count(preset("llama3.1-8b"), 128256) == pytest.approx(8.03e9, rel=0.001)
    for p in PRESETS.values():
        if p.params is not None:
            assert parameter_count(p.fields, p.vocab) == p.params, p.name


def test_parameter_count_is_what_megazero_builds():
    """The count equals the built model's (on the meta device: no memory), unpadded vocab, for every
    preset (GPT-2 and the Llama family)."""
    from megazero.checkpoint.api import build_gpt, single_process_group

    with single_process_group() as group:
        for p in PRESETS.values():
            vocab = p.vocab or 4096
            cfg = ModelConfig(**p.fields, vocab_size=vocab, make_vocab_size_divisible_by=1)
            model = build_gpt(cfg, group, device="meta")
            assert sum(t.numel() for t in model.parameters()) == parameter_count(cfg, vocab), p.name


def test_names_any_case_aliases_and_hugging_face_ids():
    for spelling, name in (("GPT2", "gpt2"), ("gpt2-124m", "gpt2"), ("openai-community/gpt2-xl", "gpt2-xl"),
                           ("gpt2-1.5b", "gpt2-xl"), ("meta-llama/Llama-3.1-8B", "llama3.1-8b"),
                           ("Llama-3.2-1B", "llama3.2-1b")):
        assert canonical_name(spelling) == name
    assert parse_args(["--model-size", "meta-llama/Llama-3.1-70B"]).model.model_size == "llama3.1-70b"


def test_unknown_name_is_one_line_with_the_names():
    msg = error(["--model-size", "llama3-8b"])
    assert msg.startswith("--model-size llama3-8b: unknown preset; did you mean llama3.1-8b? choose one of gpt2, ")
    assert all(n in msg for n in PRESETS)
    assert "did you mean" not in error(["--model-size", "bert"])


def test_explicit_flags_override_the_preset():
    m = parse_args(["--model-size", "llama3.1-8b", "--seq-length", "2048", "--num-layers", "2",
                    "--num-query-groups", "4", "--norm-epsilon", "1e-6", "--rope-scaling-factor", "4"]).model
    assert (m.seq_length, m.num_layers, m.num_query_groups, m.layernorm_epsilon, m.rope_scaling_factor) == (
        2048, 2, 4, 1e-6, 4.0)
    assert (m.hidden_size, m.ffn_hidden_size, m.max_position_embeddings, m.model_size) == (
        4096, 14336, 131072, "llama3.1-8b")  # the rest stays the preset's; the name stays recorded
    gpt2 = parse_args(["--model-size", "gpt2", "--disable-bias-linear", "--hidden-dropout", "0"]).model
    assert (gpt2.add_bias_linear, gpt2.hidden_dropout, gpt2.attention_dropout) == (False, 0.0, 0.1)
    # flags the preset does not touch keep their defaults
    assert parse_args(["--model-size", "gpt2"]).training == RunConfig().training


def test_gpt2_positions_bound_the_sequence():
    with pytest.raises(ConfigError, match="--seq-length 2048 exceeds --max-position-embeddings 1024"):
        validate(parse_args(["--model-size", "gpt2", "--seq-length", "2048"]), 1)


def test_with_a_ds_config_the_preset_is_more_defaults(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True}}))
    cfg = parse_args(["--deepspeed-config", str(path), "--model-size", "llama-tiny", "--num-layers", "2"])
    assert (cfg.training.micro_batch_size, cfg.precision.params_dtype) == (2, "bf16")
    assert cfg.model == ModelConfig(**{**preset("llama-tiny"), "num_layers": 2, "model_size": "llama-tiny"})


def test_config_json_records_the_name_and_the_expansion():
    d = json.loads(parse_args(["--model-size", "llama3.2-1b", "--seq-length", "4096"]).to_json())["model"]
    assert d["model_size"] == "llama3.2-1b" and d["seq_length"] == 4096
    assert {k: d[k] for k in preset("llama3.2-1b") if k != "seq_length"} == {
        k: v for k, v in preset("llama3.2-1b").items() if k != "seq_length"}


def test_a_preset_name_alone_does_not_refuse_a_checkpoint(tmp_path):
    """Resume: the shape check compares fields; a run spelling the same shape by flags (no preset name)
    loads a preset run's checkpoint, and the index's config reads back."""
    from megazero.checkpoint.api import run_config_from_dict
    from megazero.checkpoint.format import CheckpointError
    from megazero.checkpoint.state import check_model_shape

    saved = parse_args(["--model-size", "gpt2"]).replace(model={"vocab_size": 50257})
    index = {"config": json.loads(saved.to_json())}
    by_flags = parse_args(["--num-layers", "12", "--hidden-size", "768", "--num-attention-heads", "12",
                           "--seq-length", "1024"]).replace(model={"vocab_size": 50257})
    check_model_shape(index, by_flags, tmp_path / "index.json")
    check_model_shape(index, saved, tmp_path / "index.json")
    assert run_config_from_dict(index["config"]).model == saved.model
    with pytest.raises(CheckpointError, match="checkpoint has num-layers 12, this run has 24"):
        check_model_shape(index, parse_args(["--model-size", "gpt2-medium"]).replace(model={"vocab_size": 50257}),
                          tmp_path / "index.json")


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_validates_at_tp1(name):
    validate(parse_args(["--model-size", name]), 1)


@pytest.mark.parametrize("name", ["llama-tiny", *LLAMA3])
def test_llama_presets_validate_at_tp8(name):
    validate(parse_args(["--model-size", name, "--tp", "8"]), 8)


def test_gpt2_heads_limit_tp():
    validate(parse_args(["--model-size", "gpt2-xl", "--tp", "5"]), 5)  # 25 heads
    with pytest.raises(ConfigError, match="--num-attention-heads 25 is not divisible by tensor-parallel size 8"):
        validate(parse_args(["--model-size", "gpt2-xl", "--tp", "8"]), 8)
