"""User-facing errors.

`ConfigError` is raised for anything the *user* got wrong (flags, config files, data paths, tokenizer
files). Its message is one line that says what is wrong and how to fix it. The entry point
(`pretrain_gpt.py`, tools/) turns it into that line on stderr, printed by one rank, and exit code 2.
Internal invariants use `assert`, never this class.

Under torchrun the entry point also hands the line to torchrun (`write_elastic_error_file`), so the
launcher's failure summary names it as the root cause (docs/failures.md).
"""

import json
import os
import time


class ConfigError(ValueError):
    """A problem with user input; the message names the problem and the fix."""


class DataError(ConfigError):
    """A problem with a data file, tokenizer or dataset the user pointed at."""


# Under torchrun the first worker to exit gets the others terminated: ranks that found the same bad
# input a moment before rank 0 (all ranks check the same flags) would have rank 0 killed before it
# prints the line. So the other ranks give rank 0 this long before they exit.
OTHER_RANKS_EXIT_AFTER_S = 5.0


def exit_with_error(line: str, rank: int, exit_code: int = 2) -> "NoReturn":  # noqa: F821
    """The bad-input exit: rank 0 prints `line` on stderr, every rank hands it to torchrun (error
    file) and exits with `exit_code`; in a world of more than one, ranks other than 0 wait
    OTHER_RANKS_EXIT_AFTER_S first (torchrun terminates them as soon as rank 0 has exited)."""
    import sys

    if rank == 0:
        print(line, file=sys.stderr, flush=True)
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        time.sleep(OTHER_RANKS_EXIT_AFTER_S)
    write_elastic_error_file(line)
    sys.exit(exit_code)


def write_elastic_error_file(message: str) -> None:
    """torchrun's error-file protocol (torch.distributed.elastic.multiprocessing.errors): each worker
    may write {"message": str, "timestamp": seconds} to $TORCHELASTIC_ERROR_FILE; the agent shows the
    message as that failure's "traceback" and names the earliest one the root cause. No-op outside
    torchrun."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as f:
            json.dump({"message": message, "timestamp": int(time.time())}, f)
    except OSError:
        pass  # the agent then reports the exit code alone


class CollectiveError(RuntimeError):
    """A collective or pipeline transfer failed because another rank did not take part: its connection
    closed (a rank exited or was killed). Raised by megazero/comm.py (the only caller of
    torch.distributed collectives) with what was running in `info` (operation, group, ranks, iteration,
    pipeline action); pretrain_gpt.py turns it into one message for the whole job
    (megazero/watchdog.py) and exit code `exit_code` on every failing rank (docs/failures.md)."""

    exit_code = 4
    kind = "communication failure"

    def __init__(self, message: str, info: dict):
        super().__init__(message)
        self.info = info


class CollectiveTimeout(CollectiveError):
    """A collective or transfer did not complete within --distributed-timeout-minutes: a rank is
    stopped, hung, or too far behind (docs/failures.md)."""

    exit_code = 3
    kind = "collective timeout"
