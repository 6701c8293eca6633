"""tools/plot_schedule.py and megazero.pipeline_parallel.timeline: drawn schedules, recorded timelines.

The tool is run as a user runs it (subprocess, from another directory, without PYTHONPATH) for the
plan pictures and a recorded timeline; the error paths and the timeline module run in-process.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megazero.errors import ConfigError
from megazero.pipeline_parallel.schedules import build_all_plans
from megazero.pipeline_parallel.simulate import simulate
from megazero.pipeline_parallel.timeline import (Event, draw_timeline, load_timeline, make_timeline, measured_bubble,
                                                 save_timeline, simulated_timeline, validate_timeline)

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "plot_schedule.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROW = re.compile(r"^\s*(\d+)\s+([0-9.]+)\s+(\S+)\s+([0-9.]+)\s+(\S+)\s*$")


def _run_tool(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the tool must find megazero itself
    return subprocess.run([sys.executable, str(TOOL), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def _bubble_rows(stdout: str) -> list[tuple[int, float, str, float, str]]:
    rows = []
    for line in stdout.splitlines():
        if m := ROW.match(line):
            rows.append((int(m[1]), float(m[2]), m[3], float(m[4]), m[5]))
    return rows


def _assert_png(path: Path, min_bytes: int = 10_000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > min_bytes, (path, len(data))
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")], "temp file left behind"


def _load_tool():
    spec = importlib.util.spec_from_file_location("plot_schedule_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------ the tool

@pytest.mark.parametrize("vp", [2, 1])
def test_plan_picture_and_bubble_equal_theory(tmp_path, vp):
    pp, m = 4, 8
    out = tmp_path / "sub" / "schedule.png"
    out.parent.mkdir()
    proc = _run_tool(["--pp", str(pp), "--vp", str(vp), "--microbatches", str(m), "--out", str(out)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    _assert_png(out)
    ratio = (pp - 1) / (vp * m)
    share = ratio / (1 + ratio)
    assert "idle/busy ratio" in proc.stdout and "idle share of wall time" in proc.stdout
    rows = _bubble_rows(proc.stdout)
    assert [r[0] for r in rows] == list(range(pp)), proc.stdout
    for _, b, th_b, s, th_s in rows:
        assert b == pytest.approx(ratio, abs=1e-4) and float(th_b) == pytest.approx(ratio, abs=1e-4)
        assert s == pytest.approx(share, abs=1e-4) and float(th_s) == pytest.approx(share, abs=1e-4)


def test_recorded_timeline_is_drawn_and_measured(tmp_path):
    # pp=2, m=2, seconds from an arbitrary origin (t=100): the step spans 100.0 .. 100.8.
    rank0 = [Event("F", 0, 0, 100.0, 100.1), Event("F", 1, 0, 100.1, 100.2),
             Event("B", 0, 0, 100.35, 100.55), Event("B", 1, 0, 100.6, 100.8)]  # busy 0.6 -> 0.2/0.6
    rank1 = [Event("F", 0, 0, 100.1, 100.2), Event("B", 0, 0, 100.2, 100.4),
             Event("F", 1, 0, 100.4, 100.5), Event("B", 1, 0, 100.5, 100.6)]  # busy 0.5 -> 0.3/0.5
    path = tmp_path / "run_timeline.json"
    save_timeline(make_timeline(2, 1, 2, [rank0, rank1[::-1]]), path)  # events in any order
    proc = _run_tool(["--timeline", str(path)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    _assert_png(tmp_path / "run_timeline.png", min_bytes=5_000)
    rows = _bubble_rows(proc.stdout)
    assert [(r[0], r[1]) for r in rows] == [(0, pytest.approx(1 / 3, abs=1e-4)), (1, pytest.approx(0.6, abs=1e-4))]
    assert all(r[2] == "0.5000" for r in rows)  # theory (p-1)/(v*m) for the file's pp/vp/m, for comparison


def test_invalid_combination_exits_2_with_the_config_error_line(tmp_path):
    proc = _run_tool(["--pp", "4", "--vp", "2", "--microbatches", "6"], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: interleaved pipeline schedule needs"), proc.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args,fragment", [
    (["--pp", "1", "--vp", "2", "--microbatches", "4"], "needs --pipeline-model-parallel-size > 1"),
    (["--pp", "4", "--microbatches", "0"], "microbatches must be >= 1"),
    (["--pp", "0", "--microbatches", "4"], "--pp must be >= 1"),
    (["--pp", "4", "--vp", "0", "--microbatches", "4"], "--vp must be >= 1"),
    (["--pp", "4", "--microbatches", "4", "--backward-cost", "-1"], "must be positive"),
    (["--pp", "4"], "give --pp and --microbatches"),
    (["--pp", "4", "--microbatches", "4", "--out", "x.svg"], "ending in .png"),
    (["--pp", "4", "--microbatches", "4", "--out", "no/such/dir/x.png"], "does not exist"),
    (["--timeline", "missing.json"], "does not exist"),
    (["--timeline", "t.json", "--pp", "4"], "drop --pp"),
    (["--pp", "four"], "invalid int value"),
])
def test_bad_input_one_line_exit_2(tmp_path, monkeypatch, capsys, args, fragment):
    monkeypatch.chdir(tmp_path)
    tool = _load_tool()
    try:
        rc = tool.main(args)
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and fragment in err, err
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------ timeline module

def test_simulated_timeline_measures_like_the_simulator(tmp_path):
    pp, vp, m = 4, 2, 8
    result = simulate(build_all_plans(pp, vp, m), vp, m)
    tl = simulated_timeline(result, pp, vp, m)
    assert [r["pp_rank"] for r in tl["ranks"]] == list(range(pp))
    assert all(len(r["events"]) == 2 * m * vp for r in tl["ranks"])
    assert measured_bubble(tl) == pytest.approx([result.bubble_ratio(r) for r in range(pp)], abs=1e-12)
    assert measured_bubble(tl) == pytest.approx([(pp - 1) / (vp * m)] * pp, abs=1e-12)
    path = tmp_path / "t.json"
    save_timeline(tl, path)
    assert load_timeline(path) == tl
    assert json.loads(path.read_text())["ranks"][0]["events"][0] == \
        {"kind": "F", "microbatch": 0, "chunk": 0, "start": 0.0, "end": 1.0}
    had_pyplot = "matplotlib.pyplot" in sys.modules
    draw_timeline(tl, tmp_path / "t.png", "pp=4 vp=2 m=8")
    _assert_png(tmp_path / "t.png")
    assert had_pyplot or "matplotlib.pyplot" not in sys.modules  # Figure API only


def test_measured_bubble_span_union_and_empty_rank():
    tl = {"pp": 3, "vp": 1, "num_microbatches": 1, "ranks": [
        {"pp_rank": 2, "events": [{"kind": "F", "microbatch": 0, "chunk": 0, "start": 5.0, "end": 6.0}]},
        # two events overlapping by timer noise count once: busy [1, 4] = 3, span [1, 6] = 5
        {"pp_rank": 0, "events": [{"kind": "F", "microbatch": 0, "chunk": 0, "start": 1.0, "end": 3.0},
                                  {"kind": "B", "microbatch": 0, "chunk": 0, "start": 2.5, "end": 4.0}]},
        {"pp_rank": 1, "events": []},
    ]}
    b = measured_bubble(tl)
    assert b[0] == pytest.approx(2 / 3) and b[2] == pytest.approx(4.0) and math.isinf(b[1])
    assert [r["pp_rank"] for r in validate_timeline(tl)["ranks"]] == [0, 1, 2]


def _good() -> dict:
    return {"pp": 2, "vp": 1, "num_microbatches": 1, "extra": "ignored", "ranks": [
        {"pp_rank": 0, "events": [{"kind": "F", "microbatch": 0, "chunk": 0, "start": 0, "end": 1}]},
        {"pp_rank": 1, "events": [{"kind": "F", "microbatch": 0, "chunk": 0, "start": 1, "end": 2.5}]}]}


def _bad(edit) -> dict:
    d = _good()
    edit(d)
    return d


@pytest.mark.parametrize("content,fragment", [
    ("{not json", "is not valid JSON"),
    ("[]", "expected a JSON object"),
    (_bad(lambda d: d.pop("vp")), "missing 'vp'"),
    (_bad(lambda d: d.update(pp=0)), "'pp' must be an integer >= 1"),
    (_bad(lambda d: d.update(num_microbatches=True)), "'num_microbatches' must be an integer"),
    (_bad(lambda d: d.update(ranks={})), "'ranks' must be a list"),
    (_bad(lambda d: d["ranks"].pop()), "no entry for pipeline rank(s) [1]"),
    (_bad(lambda d: d["ranks"][1].update(pp_rank=0)), "pp_rank 0 appears twice"),
    (_bad(lambda d: d["ranks"][1].update(pp_rank=2)), "'pp_rank' must be an integer in [0, 1]"),
    (_bad(lambda d: d["ranks"][0]["events"][0].update(kind="W")), "'kind' must be \"F\" or \"B\""),
    (_bad(lambda d: d["ranks"][0]["events"][0].update(chunk=1)), "ranks[0].events[0]: 'chunk' must be"),
    (_bad(lambda d: d["ranks"][0]["events"][0].update(microbatch=-1)), "'microbatch' must be"),
    (_bad(lambda d: d["ranks"][0]["events"][0].update(end=-1)), "end -1.0 is before start 0.0"),
    (_bad(lambda d: d["ranks"][0]["events"][0].update(start="0")), "'start' must be a finite number"),
    (_bad(lambda d: d["ranks"][0]["events"][0].pop("end")), "missing 'end'"),
])
def test_load_timeline_rejects_bad_files_with_one_line(tmp_path, content, fragment):
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ConfigError) as excinfo:
        load_timeline(path)
    msg = str(excinfo.value)
    assert "\n" not in msg and str(path) in msg and fragment in msg, msg


def test_load_good_file_and_atomic_save(tmp_path):
    path = tmp_path / "good.json"
    path.write_text(json.dumps(_good()))
    tl = load_timeline(path)
    assert "extra" not in tl and tl["ranks"][1]["events"][0]["end"] == 2.5
    with pytest.raises(ConfigError):  # an invalid timeline is not written, and the old file stays
        save_timeline({**tl, "pp": 3}, path)
    assert load_timeline(path) == tl
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.json"]
    with pytest.raises(ConfigError, match="does not exist"):
        load_timeline(tmp_path / "missing.json")
