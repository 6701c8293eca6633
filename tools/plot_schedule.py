r"""Draw a pipeline schedule: the plan of (pp, vp, microbatches) simulated, or a recorded timeline.

    python tools/plot_schedule.py --pp 4 --vp 2 --microbatches 8 [--forward-cost 1 --backward-cost 2] \
        [--out schedule.png]
    python tools/plot_schedule.py --timeline run/pipeline_timeline.json [--out timeline.png]

The first form builds the 1F1B (vp = 1) or interleaved 1F1B (vp > 1) plan of every pipeline rank,
runs it in the pure simulator (megazero.pipeline_parallel.simulate) with the given forward/backward
costs and free communication, and draws one row per rank: F/B boxes coloured by model chunk (forward
light, backward dark) with the microbatch number in each, idle time in grey. It prints each rank's
bubble beside Megatron's theory, as idle/busy = (p-1)/(v*m) and as the idle share of the wall time
= (p-1)/(v*m + p-1). The second form draws a timeline recorded by a real run (format in
docs/pipeline.md) and prints its measured bubble the same way.

Default output: schedule_pp{P}_vp{V}_m{M}.png, or <timeline name>.png, in the current directory.
Bad input: one line `error: ...` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

try:
    import megazero  # noqa: F401
except ImportError:  # run as a script from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megazero.cli import OneLineParser, run_tool
from megazero.errors import ConfigError
from megazero.pipeline_parallel.schedules import build_all_plans, validate_schedule
from megazero.pipeline_parallel.simulate import simulate
from megazero.pipeline_parallel.timeline import draw_timeline, load_timeline, measured_bubble, simulated_timeline


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description="Draw a pipeline-parallel schedule (simulated plan or recorded timeline) as PNG.")
    p.add_argument("--pp", type=int, metavar="P", help="pipeline-parallel size (number of pipeline ranks)")
    p.add_argument("--vp", type=int, metavar="V", help="model chunks per pipeline rank (default 1: plain 1F1B)")
    p.add_argument("--microbatches", type=int, metavar="M", help="microbatches per step")
    p.add_argument("--forward-cost", type=float, metavar="T", help="time of one forward of one chunk (default 1)")
    p.add_argument("--backward-cost", type=float, metavar="T", help="time of one backward of one chunk (default 2)")
    p.add_argument("--timeline", metavar="FILE",
                   help="draw this recorded timeline JSON instead of a plan (excludes the options above)")
    p.add_argument("--out", metavar="FILE.png",
                   help="output PNG (default schedule_pp{P}_vp{V}_m{M}.png or <timeline name>.png)")
    return p


def theory(pp: int, vp: int, m: int) -> tuple[float, float] | None:
    """(idle/busy, idle share of wall time) that Megatron's bubble formula predicts; None if invalid."""
    try:
        validate_schedule(pp, vp, m)
    except ConfigError:
        return None
    ratio = (pp - 1) / (vp * m)
    return ratio, ratio / (1 + ratio)


def bubble_table(ratios: Sequence[float], expected: tuple[float, float] | None) -> list[str]:
    """Lines of the per-rank bubble table: measured idle/busy and idle share, each beside the theory."""
    th_ratio, th_share = (f"{x:.4f}" for x in expected) if expected else ("n/a", "n/a")
    lines = [f"{'rank':>4}  {'idle/busy ratio':>15}  {'theory':>7}  {'idle share of wall time':>23}  {'theory':>7}"]
    for r, b in enumerate(ratios):
        share = b / (1 + b) if b != float("inf") else 1.0
        lines.append(f"{r:>4}  {b:>15.4f}  {th_ratio:>7}  {share:>23.4f}  {th_share:>7}")
    return lines


def _check_out(out: Path) -> None:
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: the output is a PNG; give a file name ending in .png")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: directory {out.parent} does not exist")


def run(args) -> None:
    if args.timeline is not None:
        given = [f"--{k.replace('_', '-')}" for k in ("pp", "vp", "microbatches", "forward_cost", "backward_cost")
                 if getattr(args, k) is not None]
        if given:
            raise ConfigError(f"--timeline draws a recorded run; drop {' '.join(given)} "
                              f"(pp/vp/m come from the file)")
        timeline = load_timeline(args.timeline)
        pp, vp, m = timeline["pp"], timeline["vp"], timeline["num_microbatches"]
        out = Path(args.out or f"{Path(args.timeline).stem}.png")
        _check_out(out)
        what = f"recorded timeline {args.timeline}"
        xlabel = "time from the first recorded event (s)"
    else:
        if args.pp is None or args.microbatches is None:
            raise ConfigError("give --pp and --microbatches (and optionally --vp), or --timeline FILE")
        pp, vp, m = args.pp, 1 if args.vp is None else args.vp, args.microbatches
        fwd = 1.0 if args.forward_cost is None else args.forward_cost
        bwd = 2.0 if args.backward_cost is None else args.backward_cost
        if pp < 1:
            raise ConfigError(f"--pp must be >= 1, got {pp}")
        if vp < 1:
            raise ConfigError(f"--vp must be >= 1, got {vp}")
        if not (fwd > 0 and bwd > 0) or fwd == float("inf") or bwd == float("inf"):
            raise ConfigError(f"--forward-cost and --backward-cost must be positive, got {fwd:g} and {bwd:g}")
        out = Path(args.out or f"schedule_pp{pp}_vp{vp}_m{m}.png")
        _check_out(out)
        plans = build_all_plans(pp, vp, m)  # ConfigError on invalid combinations
        result = simulate(plans, vp, m, forward_cost=fwd, backward_cost=bwd)
        timeline = simulated_timeline(result, pp, vp, m)
        what = f"plan simulated with forward cost {fwd:g}, backward cost {bwd:g}, free communication"
        xlabel = f"time (forward = {fwd:g}, backward = {bwd:g})"

    name = "1F1B" if vp == 1 else "interleaved 1F1B"
    ratios = measured_bubble(timeline)
    expected = theory(pp, vp, m)
    source = "recorded" if args.timeline is not None else "plan"
    title = f"{name} {source}: pp={pp}, vp={vp}, microbatches={m}"
    if expected:
        title += f"   (theory idle/busy (p-1)/(v*m) = {expected[0]:.3f})"
    try:  # drawn before printing, so a closed stdout (| head) cannot cost the picture
        draw_timeline(timeline, out, title, xlabel=xlabel)
    except OSError as e:
        raise ConfigError(f"cannot write {out}: {e}") from None

    print(f"{name} schedule, pp={pp} vp={vp} microbatches={m}: {what}")
    if expected:
        print(f"theory: idle/busy ratio (p-1)/(v*m) = {expected[0]:.4f}, "
              f"idle share of wall time (p-1)/(v*m+p-1) = {expected[1]:.4f}")
    for line in bubble_table(ratios, expected):
        print(line)
    print(f"wrote {out}")


def main(argv: Sequence[str] | None = None) -> int:
    return run_tool(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
