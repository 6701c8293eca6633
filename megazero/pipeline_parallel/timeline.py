"""Pipeline timelines: what each pipeline rank computed, when. Recorded, simulated, measured, drawn.

A *timeline* is a plain dict, saved as JSON (docs/pipeline.md, "Recorded timelines"):

    {"pp": 4, "vp": 2, "num_microbatches": 8,
     "ranks": [{"pp_rank": 0,
                "events": [{"kind": "F", "microbatch": 0, "chunk": 0, "start": 0.0, "end": 0.013}, ...]},
               ...]}

- `kind` is "F" (forward) or "B" (backward) of `microbatch` on this rank's model `chunk`;
- `start` / `end` are seconds from an origin common to all ranks (e.g. a time taken right after a
  barrier at the start of the step); only differences matter, so the origin need not be 0;
- `ranks` lists every pipeline rank 0..pp-1 exactly once (any order in a file; this module returns
  them sorted by pp_rank). Keys other than these are allowed and ignored.

The same structure comes from a simulated plan (`simulated_timeline`, times in units of the
simulator's costs) or from a real run (the trainer's events, `save_timeline`), so one drawing and one
bubble measurement serve both. Nothing here imports torch; matplotlib is imported only to draw.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from megazero.errors import ConfigError
from megazero.fileio import atomic_open, atomic_write_bytes
from megazero.pipeline_parallel.schedules import BACKWARD, FORWARD
from megazero.pipeline_parallel.simulate import SimulationResult

KINDS = (FORWARD, BACKWARD)  # "F", "B"


@dataclass(frozen=True)
class Event:
    """One forward or backward of `microbatch` on model `chunk`, from `start` to `end` (seconds)."""

    kind: str  # "F" | "B"
    microbatch: int
    chunk: int
    start: float
    end: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_timeline(pp: int, vp: int, num_microbatches: int, events: Sequence[Sequence[Event | dict]]) -> dict:
    """A timeline dict from per-rank event lists (`events[r]` = pipeline rank r's events), validated."""
    timeline = {"pp": pp, "vp": vp, "num_microbatches": num_microbatches,
                "ranks": [{"pp_rank": r, "events": [_event_dict(e) for e in evs]} for r, evs in enumerate(events)]}
    return validate_timeline(timeline)


def simulated_timeline(result: SimulationResult, pp: int, vp: int, m: int) -> dict:
    """The timeline of a simulated plan (times in units of the simulator's forward/backward costs)."""
    assert len(result.ranks) == pp, (len(result.ranks), pp)
    return make_timeline(pp, vp, m, [
        [Event(a.kind, a.microbatch, a.chunk, float(s), float(e)) for a, s, e in trace.intervals]
        for trace in result.ranks])


def validate_timeline(timeline: Any, where: str = "timeline") -> dict:
    """Check the structure (module docstring) and return a normalised copy; one-line ConfigError if bad.

    Normalised: ranks sorted by pp_rank, events sorted by start, numbers as int / float, extra keys dropped.
    """
    if not isinstance(timeline, dict):
        raise ConfigError(f"{where}: expected a JSON object with pp, vp, num_microbatches, ranks; "
                          f"got {type(timeline).__name__}")
    pp = _int_field(timeline, "pp", where, low=1)
    vp = _int_field(timeline, "vp", where, low=1)
    m = _int_field(timeline, "num_microbatches", where, low=1)
    ranks = timeline.get("ranks")
    if not isinstance(ranks, list):
        raise ConfigError(f"{where}: 'ranks' must be a list with one entry per pipeline rank")
    out_ranks: dict[int, list[dict]] = {}
    for i, rank in enumerate(ranks):
        at = f"{where}: ranks[{i}]"
        if not isinstance(rank, dict):
            raise ConfigError(f"{at} must be an object with pp_rank and events")
        r = _int_field(rank, "pp_rank", at, low=0, high=pp - 1)
        if r in out_ranks:
            raise ConfigError(f"{at}: pp_rank {r} appears twice")
        events = rank.get("events")
        if not isinstance(events, list):
            raise ConfigError(f"{at}: 'events' must be a list")
        out_ranks[r] = sorted((_check_event(e, f"{at}.events[{j}]", vp, m) for j, e in enumerate(events)),
                              key=lambda e: (e["start"], e["end"]))
    missing = sorted(set(range(pp)) - set(out_ranks))
    if missing:
        raise ConfigError(f"{where}: 'ranks' has no entry for pipeline rank(s) {missing} (pp = {pp}); "
                          f"record every rank")
    return {"pp": pp, "vp": vp, "num_microbatches": m,
            "ranks": [{"pp_rank": r, "events": out_ranks[r]} for r in range(pp)]}


def measured_bubble(timeline: dict) -> list[float]:
    """Per pipeline rank (index = pp_rank): idle time / busy time over the step.

    The step spans the earliest start to the latest end over *all* ranks, so a rank that starts late
    or finishes early counts that time as idle, as the (p-1)/(v*m) formula does. Busy time is the
    union of the rank's event intervals (recorded events that overlap by timer noise count once).
    A rank with no events has ratio inf.
    """
    timeline = validate_timeline(timeline)
    all_events = [e for rank in timeline["ranks"] for e in rank["events"]]
    if not all_events:
        return [math.inf] * timeline["pp"]
    span = max(e["end"] for e in all_events) - min(e["start"] for e in all_events)
    out = []
    for rank in timeline["ranks"]:
        busy = _union_length([(e["start"], e["end"]) for e in rank["events"]])
        out.append((span - busy) / busy if busy > 0 else math.inf)
    return out


def load_timeline(path: str | os.PathLike) -> dict:
    """Read and validate a timeline JSON file; one-line ConfigError naming the file if it is bad."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"timeline file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read timeline file {path}: {_one_line(e)}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {_one_line(e)}") from None
    return validate_timeline(data, where=str(path))


def save_timeline(timeline: dict, path: str | os.PathLike) -> None:
    """Validate and write `timeline` as JSON, atomically. Events may be `Event`s or dicts."""
    timeline = dict(timeline)
    if isinstance(timeline.get("ranks"), list):
        timeline["ranks"] = [
            {**rank, "events": [_event_dict(e) for e in rank["events"]]}
            if isinstance(rank, dict) and isinstance(rank.get("events"), list) else rank
            for rank in timeline["ranks"]]
    data = validate_timeline(timeline)
    text = json.dumps(data, indent=1)
    atomic_write_bytes(Path(path), text.encode("utf-8"))


def draw_timeline(timeline: dict, out_path: str | os.PathLike, title: str, *, xlabel: str = "time (s)",
                  bubble_note: Sequence[str] | None = None) -> None:
    """Draw the per-rank timeline as a PNG at `out_path` (atomically), time measured from the first event.

    One row per pipeline rank (rank 0 on top); a box per event, coloured by chunk (forward light,
    backward dark), labelled with its microbatch number when wide enough; idle time shows as the grey
    row background. The right margin gives each rank's idle/busy ratio (`measured_bubble`), or the
    strings in `bubble_note` (one per rank) when given.
    """
    timeline = validate_timeline(timeline)
    # Imported here: matplotlib costs about half a second, paid only by whoever draws.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    pp, vp = timeline["pp"], timeline["vp"]
    ranks = timeline["ranks"]
    events = [e for rank in ranks for e in rank["events"]]
    t0 = min((e["start"] for e in events), default=0.0)
    t1 = max((e["end"] for e in events), default=1.0)
    span = (t1 - t0) or 1.0
    if bubble_note is None:
        bubble_note = [f"idle/busy {b:.3f}" for b in measured_bubble(timeline)]
    assert len(bubble_note) == pp, (len(bubble_note), pp)

    # Width: the shortest typical box (median duration of the cheaper kind) gets ~0.2 inch, so its
    # microbatch number fits; clamped so huge schedules stay a sane image (labels then drop out).
    durations = {k: sorted(e["end"] - e["start"] for e in events if e["kind"] == k) for k in KINDS}
    typical = min((d[len(d) // 2] for d in durations.values() if d), default=span) or span
    plot_w = min(max(span / typical * 0.2, 6.0), 30.0)
    fig_w, fig_h = plot_w + 2.6, 1.5 + 0.55 * pp + 0.25 * math.ceil((2 * vp + 1) / 9)
    fig = Figure(figsize=(fig_w, fig_h), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    pts_per_unit = plot_w * 72.0 / span

    light, dark = _chunk_colours(vp)
    row_h = 0.8
    for rank in ranks:
        y = pp - 1 - rank["pp_rank"]  # rank 0 on top
        ax.add_patch(Rectangle((0, y - row_h / 2), span, row_h, facecolor="#e6e6e6", edgecolor="none", zorder=0))
        for e in rank["events"]:
            x, w = e["start"] - t0, e["end"] - e["start"]  # drawn from the earliest event: the step starts at 0
            colour = (light if e["kind"] == FORWARD else dark)[e["chunk"] % len(light)]
            ax.add_patch(Rectangle((x, y - row_h / 2), w, row_h, facecolor=colour, edgecolor="white",
                                   linewidth=0.6, zorder=1))
            label = str(e["microbatch"])
            size = min(8.5, 0.85 * w * pts_per_unit / (0.62 * len(label)))
            if size >= 4.5:
                ax.text(x + w / 2, y, label, ha="center", va="center", fontsize=size, zorder=2,
                        color="black" if e["kind"] == FORWARD else "white")
        ax.text(1.01 * span, y, bubble_note[rank["pp_rank"]], ha="left", va="center", fontsize=8.5,
                clip_on=False)

    ax.set_xlim(0, span)
    ax.set_ylim(-0.6, pp - 0.4)
    ax.set_yticks(range(pp), [f"pp rank {pp - 1 - y}" for y in range(pp)])
    ax.tick_params(axis="y", length=0)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    handles = [Patch(facecolor=light[c % len(light)], label=f"F chunk {c}") for c in range(vp)] + \
              [Patch(facecolor=dark[c % len(dark)], label=f"B chunk {c}") for c in range(vp)] + \
              [Patch(facecolor="#e6e6e6", label="idle")]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 9), fontsize=8, frameon=False)

    with atomic_open(Path(out_path), "wb") as f:
        fig.savefig(f, format="png")


# ---------------------------------------------------------------------------------------------------------------------

def _chunk_colours(vp: int) -> tuple[list[str], list[str]]:
    """(forward, backward) colour per chunk: light and dark shades of one hue per chunk."""
    pairs = [("#9ecae1", "#2171b5"), ("#fdae6b", "#d94801"), ("#a1d99b", "#238b45"), ("#bcbddc", "#6a51a3"),
             ("#fa9fb5", "#c51b8a"), ("#c7e9c0", "#006d2c"), ("#fdd0a2", "#a63603"), ("#d9d9d9", "#525252")]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _event_dict(e: Event | dict) -> dict:
    return e.to_dict() if isinstance(e, Event) else e


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _int_field(obj: dict, key: str, where: str, low: int, high: int | None = None) -> int:
    if key not in obj:
        raise ConfigError(f"{where}: missing '{key}'")
    x = obj[key]
    if not _is_int(x) or x < low or (high is not None and x > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{where}: '{key}' must be an integer {bound}, got {x!r}")
    return x


def _check_event(e: Any, where: str, vp: int, m: int) -> dict:
    if not isinstance(e, dict):
        raise ConfigError(f"{where} must be an object with kind, microbatch, chunk, start, end")
    if e.get("kind") not in KINDS:
        raise ConfigError(f"{where}: 'kind' must be \"F\" or \"B\", got {e.get('kind')!r}")
    mb = _int_field(e, "microbatch", where, low=0, high=m - 1)
    chunk = _int_field(e, "chunk", where, low=0, high=vp - 1)
    times = []
    for key in ("start", "end"):
        if key not in e:
            raise ConfigError(f"{where}: missing '{key}'")
        x = e[key]
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise ConfigError(f"{where}: '{key}' must be a finite number of seconds, got {x!r}")
        times.append(float(x))
    if times[1] < times[0]:
        raise ConfigError(f"{where}: end {times[1]} is before start {times[0]}")
    return {"kind": e["kind"], "microbatch": mb, "chunk": chunk, "start": times[0], "end": times[1]}


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total
