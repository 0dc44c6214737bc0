"""Exit codes of every entry point, and the one mapping from errors to them.

Every command (the ``upcycle`` subcommands, the train module, conversion runs,
the demo) runs its body through ``run_entry``: a user mistake prints one line
and exits 2; a requeue request exits 75; an unexpected exception (a bug) prints
one line naming the log file its traceback went to, never the traceback itself.

| code | meaning                                                         | who acts on it            |
|------|-----------------------------------------------------------------|---------------------------|
| 0    | done (a run: result.json written, last and atomically)           |                           |
| 1    | internal error: a bug; the traceback is in the named log file    | the user (report it)      |
| 2    | bad input: the one-line message says what to fix                 | the user                  |
| 3    | non-finite loss: stopped, the last good checkpoint is kept       | the user (lower the LR)   |
| 73   | the run directory is in use by another live process (its lock)   | executors: "running"      |
| 74   | the disk is full or read-only; the previous checkpoint is intact | the user (free space)     |
| 75   | stopped by SIGTERM/SIGUSR1, work saved (a training checkpoint) or | executors: requeue        |
|      | partial output removed (a conversion): run me again              |                           |
| 130  | interrupted (Ctrl-C) outside a run                               |                           |
"""
from __future__ import annotations

import datetime
import errno
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable

from megatron_upcycle.errors import UserError

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USER_ERROR = 2
EXIT_NON_FINITE = 3
EXIT_BUSY = 73
EXIT_DISK = 74
EXIT_REQUEUE = 75
EXIT_INTERRUPTED = 130


class RequeueRequested(Exception):
    """A checkpoint was saved (or partial output cleaned up) after SIGTERM/SIGUSR1: exit 75."""


class NonFiniteLoss(UserError):
    """Training diverged; the last good checkpoint is kept."""


class RunBusy(UserError):
    """Another live process holds the run directory's lock."""


class DiskError(UserError):
    """The disk is full or read-only; what was there before is intact."""


_DISK_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EROFS: "read-only file system",
                errno.EDQUOT: "disk quota exceeded"}


def disk_error_from(exc: BaseException) -> DiskError | None:
    """A DiskError naming the path when ``exc`` (or its cause chain) is ENOSPC/EROFS/EDQUOT."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
            where = exc.filename or "the output"
            return DiskError(f"{where}: {_DISK_ERRNOS[exc.errno]}")
        exc = exc.__cause__ or exc.__context__
    return None


# OS errors about a path the user named (an input they cannot read, an output
# folder they cannot write, a path through a file): fixable by the user, so exit 2
# with one line naming the path rather than a traceback.
_PATH_ERRNOS = {
    errno.EACCES: "permission denied; check its permissions or choose another path",
    errno.EPERM: "operation not permitted; check its permissions or choose another path",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "a part of this path is a file, not a directory; choose another path",
    errno.EISDIR: "is a directory, where a file is expected",
    errno.EEXIST: "already exists; choose another path",
}


def path_error_from(exc: BaseException) -> UserError | None:
    """A UserError naming the path when ``exc`` (or what it was raised from) is such an OSError."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.filename is not None and exc.errno in _PATH_ERRNOS:
            return UserError(f"{exc.filename}: {_PATH_ERRNOS[exc.errno]}")
        exc = exc.__cause__  # an explicit `raise ... from`, not an error raised while handling another
    return None


def exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, RequeueRequested):
        return EXIT_REQUEUE
    if isinstance(exc, NonFiniteLoss):
        return EXIT_NON_FINITE
    if isinstance(exc, RunBusy):
        return EXIT_BUSY
    if isinstance(exc, DiskError) or disk_error_from(exc) is not None:
        return EXIT_DISK
    if isinstance(exc, UserError) or path_error_from(exc) is not None:
        return EXIT_USER_ERROR
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_INTERNAL


def _traceback_log(prog: str, log_dir: Path | None) -> Path:
    """Where an unexpected traceback goes: the run's logs/ when known, else the temp dir."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{prog.replace(' ', '-').replace('/', '_')}-error-{stamp}-{os.getpid()}.log"
    for folder in ([log_dir] if log_dir else []) + [Path(tempfile.gettempdir())]:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.write_text("".join(traceback.format_exc()))
            return path
        except OSError:
            continue
    return Path(tempfile.gettempdir()) / name


def report(prog: str, exc: BaseException, log_dir: Path | None = None) -> int:
    """Print the one line for ``exc`` on stderr and return its exit code (call inside ``except``)."""
    code = exit_code_for(exc)
    if code == EXIT_REQUEUE:
        if str(exc):
            print(f"{prog}: {exc}", file=sys.stderr)
    elif code == EXIT_INTERRUPTED:
        print(f"{prog}: interrupted", file=sys.stderr)
    elif code == EXIT_INTERNAL:
        path = _traceback_log(prog, log_dir)
        line = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
        print(f"{prog}: internal error: {line[:300]} (traceback in {path})", file=sys.stderr)
    else:
        if not isinstance(exc, UserError):
            exc = disk_error_from(exc) or path_error_from(exc) or exc
        message = " ".join(str(exc).split("\n")) if str(exc) else type(exc).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def run_entry(prog: str, body: Callable[[], int | None], log_dir: Path | None = None) -> int:
    """Run ``body`` and map whatever escapes it to one stderr line and an exit code."""
    try:
        return int(body() or 0)
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - this is the one place that maps them all
        return report(prog, exc, log_dir)
