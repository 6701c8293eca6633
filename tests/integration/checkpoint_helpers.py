"""pretrain_gpt.py with a pause injected inside one checkpoint save, so that a test can SIGKILL the
process at a known point of the commit protocol (format.commit) instead of racing a millisecond window.

    python checkpoint_helpers.py POINT ITERATION MARKER [pretrain_gpt.py flags...]

POINT  rank-files  this rank's file of iter_N.partial/ is written and fsynced; no index.json, nothing
                   renamed (a crash while ranks are still writing)
       renamed     iter_N.partial/ is complete and renamed to iter_N/, `latest` still names the previous
                   checkpoint (a crash between the two renames of the commit)

When the save of iteration ITERATION reaches POINT, the process writes MARKER and sleeps; the test
then kills it with SIGKILL. Nothing else changes: the save code runs unmodified up to that point.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _pause(marker: str) -> None:
    Path(marker).write_text("paused inside a checkpoint save\n")
    time.sleep(3600)  # until the test's SIGKILL


def install_pause(point: str, iteration: int, marker: str) -> None:
    from megazero.checkpoint import format as fmt
    from megazero.checkpoint import state

    name = fmt.iteration_dirname(iteration)
    if point == "rank-files":
        write_rank_file = state.write_rank_file

        def paused_write_rank_file(folder, rank, tensors):
            meta = write_rank_file(folder, rank, tensors)
            if Path(folder).name == name + ".partial":
                _pause(marker)
            return meta

        state.write_rank_file = paused_write_rank_file
    elif point == "renamed":
        fsync_dir = fmt._fsync_dir

        def paused_fsync_dir(path):
            fsync_dir(path)
            path = Path(path)
            latest = path / fmt.LATEST
            if (path / name / fmt.INDEX).is_file() and (not latest.is_file() or latest.read_text().strip() != name):
                _pause(marker)  # the SAVE folder, fsynced after iter_N was renamed in, before `latest` moves

        fmt._fsync_dir = paused_fsync_dir
    else:
        raise SystemExit(f"unknown pause point {point!r}")


if __name__ == "__main__":
    point, iteration, marker, *argv = sys.argv[1:]
    install_pause(point, int(iteration), marker)
    import pretrain_gpt

    sys.exit(pretrain_gpt.main(argv))
