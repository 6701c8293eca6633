"""Command-line flags -> RunConfig (megazero/cli.py, megazero/flags.py): the optimizer choice and its
hyperparameter flags. Pure and fast: parse_args only, no processes. (Bad-input messages of the whole
entry point are tested end to end in tests/integration/test_bad_input.py.)"""

import pytest

from megazero.cli import parse_args
from megazero.config import OptimizerConfig, RunConfig
from megazero.errors import ConfigError
from megazero.validation import validate


def error(argv) -> str:
    with pytest.raises(ConfigError) as e:
        parse_args(argv)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_sgd_with_momentum():
    cfg = parse_args(["--optimizer", "sgd", "--sgd-momentum", "0.5"])
    assert (cfg.optimizer.optimizer_type, cfg.optimizer.sgd_momentum) == ("sgd", 0.5)
    validate(cfg, 1)
    assert parse_args(["--optimizer", "SGD"]).optimizer.sgd_momentum == 0.9  # Megatron's default


@pytest.mark.parametrize("spelling", ["adam", "adamw", "Adam", "ADAMW"])
def test_adam_and_adamw_are_adamw(spelling):
    assert parse_args(["--optimizer", spelling]).optimizer.optimizer_type == "adamw"  # as Megatron's adam


def test_defaults():
    o = parse_args([]).optimizer
    assert (o.optimizer_type, o.sgd_momentum) == ("adamw", 0.9) and o == OptimizerConfig()


def test_negative_momentum_is_one_line():
    assert error(["--optimizer", "sgd", "--sgd-momentum", "-0.1"]) == "--sgd-momentum must be >= 0, got -0.1"


def test_the_other_optimizers_flags_are_refused():
    assert error(["--sgd-momentum", "0.5"]) == ("--sgd-momentum 0.5 applies only to --optimizer sgd, and this run's "
                                                "optimizer is adamw; drop --sgd-momentum or make the optimizer sgd")
    assert error(["--optimizer", "sgd", "--adam-beta2", "0.95"]).startswith(
        "--adam-beta2 0.95 applies only to --optimizer adam, and this run's optimizer is sgd;")
    assert parse_args(["--optimizer", "adam", "--adam-beta2", "0.99"]).optimizer.adam_beta2 == 0.99


def test_unknown_optimizer_type_is_refused_by_validation():
    cfg = RunConfig().replace(optimizer={"optimizer_type": "lamb"})
    with pytest.raises(ConfigError, match="optimizer must be adamw, adam_l2 or sgd, got 'lamb'"):
        validate(cfg, 1)
