"""One run per save folder: rank 0 holds an exclusive lock on `SAVE/.megazero-save.lock` for the whole run.

Two runs saving into the same folder would both write `iter_N` folders and `latest`, and the second
would silently replace the first's checkpoints. The lock is a POSIX record lock on the file
(`fcntl.lockf`; unlike flock it is not inherited by forked data-loader workers, and it works on NFS):
the kernel releases it when the holding process exits, however it exits (SIGKILL included), so a torchrun restart (--max-restarts) of the same job, whose earlier attempt's processes
are gone, takes it again, and no stale lock ever blocks a run. The file also holds a record of its
holder (pid, host, start time) that names the other run in the refusal, and tells the next holder
when the previous one ended without releasing it (killed or crashed; explained in the log, not an
error). A clean exit removes the file.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path

from megazero.checkpoint.format import LOCK, CheckpointError


def _describe(record: dict) -> str:
    return (f"pid {record.get('pid', '?')} on host {record.get('host', '?')}, started "
            f"{record.get('started', '?')}")


class SaveLock:
    """`SaveLock(save).acquire()` on rank 0 before anything is written to SAVE; `release()` at exit."""

    def __init__(self, save: str | Path):
        self.save = Path(save)
        self.path = self.save / LOCK
        self._fd: int | None = None
        self.created: Path | None = None  # the topmost folder acquire() created (removed if left empty)

    def acquire(self) -> str | None:
        """Take the lock, or raise CheckpointError naming the run holding it. Returns a note to log when
        the previous holder ended without releasing it (its record is still there)."""
        if self.save.exists() and not self.save.is_dir():
            raise CheckpointError(f"--save {self.save}: exists and is not a folder; choose a folder")
        self.created = next((p for p in reversed([self.save, *self.save.parents]) if not p.exists()), None)
        try:
            self.save.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as err:
                    if err.errno not in (errno.EACCES, errno.EAGAIN):
                        os.close(fd)
                        raise
                    holder = self._read(fd)
                    os.close(fd)
                    raise CheckpointError(
                        f"--save {self.save} is in use by another run ({_describe(holder)}), which would replace "
                        f"this run's checkpoints or have them replaced; wait for it to finish, or choose another "
                        f"--save folder") from None
                try:  # the file may have been removed by a holder releasing it between our open and lock
                    same = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            previous = self._read(fd)
            record = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": datetime.datetime.now().isoformat(sep=" ", timespec="seconds")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        except OSError as err:
            self._cleanup_created()
            raise CheckpointError(f"--save {self.save}: cannot create the run lock {self.path} "
                                  f"({err.strerror or err}); choose a writable folder") from None
        self._fd = fd
        if previous:
            return (f"{self.path}: the previous run saving here ({_describe(previous)}) ended without releasing it "
                    f"(killed or crashed; a torchrun restart looks like this too): taking it over")
        return None

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            return record if isinstance(record, dict) else {}
        except (OSError, ValueError):
            return {}

    def release(self, remove_created_if_empty: bool = False) -> None:
        """Remove the lock file and unlock. With remove_created_if_empty (a run that failed before saving
        anything), also remove the folders acquire() created."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: no one can take a removed file's lock
        finally:
            os.close(self._fd)
            self._fd = None
        if remove_created_if_empty:
            self._cleanup_created()

    def _cleanup_created(self) -> None:
        if self.created is None:
            return
        for folder in [self.save, *self.save.parents]:
            try:
                folder.rmdir()  # only if empty
            except OSError:
                return
            if folder == self.created:
                return
