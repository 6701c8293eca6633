"""pretrain_gpt.py with a pause injected inside one checkpoint save, so that a test can SIGKILL the
process at a known point of the commit protocol (format.commit) instead of racing a millisecond window,
or with the disk filling up at the start of one save.

    python checkpoint_helpers.py POINT ITERATION MARKER [pretrain_gpt.py flags...]

POINT  rank-files  this rank's file of iter_N.partial/ is written and fsynced; no index.json, nothing
                   renamed (a crash while ranks are still writing)
       renamed     iter_N.partial/ is complete and renamed to iter_N/, `latest` still names the previous
                   checkpoint (a crash between the two renames of the commit)
       full-disk   when the save of ITERATION starts, files may no longer grow beyond 16 KiB
                   (RLIMIT_FSIZE, SIGXFSZ ignored): every write of the save fails with EFBIG, as on a full
                   disk; MARKER is written first
       no-room     when the save of ITERATION starts, the save folder's file system reports 1 MiB free
                   (shutil.disk_usage), less than the checkpoint needs

When the save of iteration ITERATION reaches POINT, the process writes MARKER and sleeps; the test
then kills it with SIGKILL. Only the first process to get there pauses: if MARKER already exists (a
torchrun restart of the killed job, or another rank), the save goes on. Nothing else changes: the
save code runs unmodified up to that point.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _pause(marker: str) -> None:
    try:
        with open(marker, "x") as f:  # the first to get here pauses; a restarted attempt goes on
            f.write("paused inside a checkpoint save\n")
    except FileExistsError:
        return
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
    elif point in ("full-disk", "no-room"):
        save_checkpoint = state.save_checkpoint

        def failing_disk_save(subject, save, keep_last=None):
            if subject.state.iteration == iteration:
                Path(marker).write_text(f"{point} from the save of iteration {iteration}\n")
                if point == "full-disk":
                    import resource
                    import signal

                    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG, do not kill
                    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 2**10, 16 * 2**10))
                else:
                    import collections
                    import shutil

                    usage = collections.namedtuple("usage", "total used free")
                    shutil.disk_usage = lambda path: usage(2**30, 2**30 - 2**20, 2**20)
            return save_checkpoint(subject, save, keep_last)

        state.save_checkpoint = failing_disk_save
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
