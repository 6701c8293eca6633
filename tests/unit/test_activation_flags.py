"""Activation-memory flags (Megatron's spellings) -> RunConfig.activation, and their one-line refusals
(megazero/config.py ActivationConfig.check, megazero/validation.py). Pure: parse_args + validate."""

import pytest

from megazero.activation.recompute import recompute_spans
from megazero.cli import parse_args
from megazero.config import ActivationConfig
from megazero.errors import ConfigError
from megazero.validation import validate


def activation(*argv):
    return parse_args(list(argv)).activation


def refusal(argv, world_size=2) -> str:
    with pytest.raises(ConfigError) as e:
        validate(parse_args(argv), world_size)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_megatron_spellings():
    assert activation() == ActivationConfig()
    assert activation("--recompute-activations").selective
    a = activation("--checkpoint-activations")  # older Megatron: full, uniform, one layer per checkpoint
    assert (a.recompute_granularity, a.method, a.layers_per_checkpoint) == ("full", "uniform", 1)
    a = activation("--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "2",
                   "--distribute-saved-activations", "--cpu-offload-activations", "--sequence-parallel")
    assert (a.method, a.layers_per_checkpoint, a.distribute_saved_activations, a.cpu_offload_activations,
            a.sequence_parallel) == ("block", 2, True, True, True)
    assert activation("--recompute-granularity", "selective").method is None  # methods belong to full


@pytest.mark.parametrize("argv,expected", [
    (["--sequence-parallel"], "--sequence-parallel shards activations across tensor-parallel ranks and --tp is 1"),
    (["--sequence-parallel", "--tp", "2", "--seq-length", "33", "--max-position-embeddings", "64"],
     "--seq-length 33 must be a multiple of 2"),
    (["--recompute-method", "block"], "--recompute-method applies to full recomputation"),
    (["--recompute-activations", "--recompute-num-layers", "2"],
     "--recompute-num-layers applies to full recomputation (the checkpointed layer inputs), and this run has "
     "--recompute-granularity selective; add --recompute-granularity full or drop it"),
    (["--cpu-offload-activations"], "--cpu-offload-activations (cpu_checkpointing) applies to full recomputation"),
    (["--checkpoint-activations", "--distribute-saved-activations"], "--tp is 1"),
    (["--checkpoint-activations", "--distribute-saved-activations", "--tp", "2", "--sequence-parallel"],
     "already split across the tensor-parallel ranks"),
    (["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "3",
      "--num-layers", "4", "--pp", "2"], "each pipeline chunk holds at most 2 layers"),
])
def test_refusals_are_one_line(argv, expected):
    assert expected in refusal(argv)


def test_bad_choices_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--recompute-granularity", "partial"])
    assert e.value.code == 2 and "invalid choice: 'partial'" in capsys.readouterr().err


@pytest.mark.parametrize("method,n,expected", [
    ("uniform", 1, [([0], True), ([1], True), ([2], True), ([3], True), ([4], True)]),
    ("uniform", 2, [([0, 1], True), ([2, 3], True), ([4], True)]),  # Megatron: the last span may be shorter
    ("block", 2, [([0], True), ([1], True), ([2, 3, 4], False)]),
    ("block", 5, [([0], True), ([1], True), ([2], True), ([3], True), ([4], True)]),
])
def test_recompute_spans(method, n, expected):
    act = ActivationConfig(recompute_granularity="full", recompute_method=method, recompute_num_layers=n)
    assert recompute_spans([0, 1, 2, 3, 4], act) == expected
    assert recompute_spans([0, 1], ActivationConfig(recompute_granularity="selective")) == [([0, 1], False)]
