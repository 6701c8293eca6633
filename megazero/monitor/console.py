"""Console lines: formats the per-log-interval training line and the validation block, Megatron-style.

Pure string formatting, no I/O: the monitor hands the strings to the trainer's rank-aware logger.
Field order, labels and widths follow Megatron-LM's `training_log` and
`evaluate_and_print_results`, so scrapers written for Megatron logs (split on '|', grep
'lm loss:') work on megazero logs unchanged. `tokens/s` is megazero's addition.
"""

from __future__ import annotations


def format_train_line(
    iteration: int,
    total_iters: int,
    *,
    consumed_samples: int,
    iteration_time_ms: float,
    tokens_per_sec: float,
    lr: float,
    batch_size: int,
    lm_loss: float,
    grad_norm: float,
) -> str:
    """One training line, e.g.
    ` iteration       20/     200 | consumed samples:          640 | elapsed time per iteration (ms): 123.4 |
    tokens/s: 41,234 | learning rate: 3.000000E-04 | global batch size:    32 | lm loss: 6.123456E+00 |
    grad norm: 1.234 |` (one line)."""
    return (
        f" iteration {iteration:8d}/{total_iters:8d} |"
        f" consumed samples: {consumed_samples:12d} |"
        f" elapsed time per iteration (ms): {iteration_time_ms:.1f} |"
        f" tokens/s: {tokens_per_sec:,.0f} |"
        f" learning rate: {lr:.6E} |"
        f" global batch size: {batch_size:5d} |"
        f" lm loss: {lm_loss:.6E} |"
        f" grad norm: {grad_norm:.3f} |"
    )


def format_eval_line(iteration: int, *, lm_loss: float, ppl: float) -> str:
    """The validation line, e.g.
    ` validation loss at iteration 20 | lm loss value: 5.430000E+00 | lm loss PPL: 2.281492E+02 |`.

    Six significant decimals as Megatron prints them: two are too few to see a plateau.
    """
    return f" validation loss at iteration {iteration} | lm loss value: {lm_loss:.6E} | lm loss PPL: {ppl:.6E} |"


def format_eval_block(iteration: int, *, lm_loss: float, ppl: float) -> list[str]:
    """The validation line framed by dashed rules, as Megatron prints it, so it stands out among
    training lines."""
    line = format_eval_line(iteration, lm_loss=lm_loss, ppl=ppl)
    rule = "-" * (len(line) + 1)
    return [rule, line, rule]
