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


def _loss_ppl(loss: float | None, ppl: float | None) -> str:
    return "n/a" if loss is None else f"lm loss {loss:.4f}, ppl {ppl:.2f}"


def format_closing_summary(summary: dict, *, run_dir: str, test_loss: float | None,
                           test_ppl: float | None) -> list[str]:
    """The lines a finished (or stopped) run ends with: where it got to, its final and best losses,
    validation and test loss, throughput, wall time and where every result went."""
    extra = summary.get("extra", {})
    wall = summary.get("total_wall_time_s") or 0.0
    minutes, seconds = divmod(int(round(wall)), 60)
    rule = "=" * 100
    lines = [rule, f" run finished at iteration {summary.get('iterations')}/{summary.get('total_iters')} "
                   f"({extra.get('exit_reason', 'done')}) in {minutes}:{seconds:02d}"]
    final, best = summary.get("final_train_loss"), summary.get("best_train_loss")
    if final is not None:
        lines.append(f" train lm loss: final {final:.4f} (mean of the last log interval), best {best:.4f} "
                     f"at iteration {summary.get('best_train_loss_iteration')}")
    if summary.get("final_validation_loss") is not None:
        lines.append(f" validation: {_loss_ppl(summary['final_validation_loss'], summary['final_validation_ppl'])} "
                     f"at iteration {summary['final_validation_iteration']}; best "
                     f"{summary['best_validation_loss']:.4f} at iteration {summary['best_validation_iteration']}")
    if test_loss is not None:
        lines.append(f" test: {_loss_ppl(test_loss, test_ppl)}")
    if summary.get("mean_tokens_per_sec") is not None:
        lines.append(f" throughput: {summary['mean_tokens_per_sec']:,.0f} tokens/s "
                     f"(mean over the log intervals after the first)")
    lines += [f" results: {run_dir} (summary.json, training_metrics.csv, validation_metrics.csv, "
              f"tensorboard/, training_curves.png)", rule]
    return lines
