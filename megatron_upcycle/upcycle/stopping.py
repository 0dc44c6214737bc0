"""Stopping a conversion cleanly on SIGTERM / SIGUSR1 / SIGINT, and finding the
temporary outputs of attempts that could not stop cleanly (SIGKILL, a lost node).

A conversion has no checkpoint to save: stopping means removing the partial
output, which is 170-200 MB for a small model and far more for a big one, and
asking to be run again (exit 75). The handlers only record the signal; the
converter stops at its next safe point (between tensors), so no file is left
half written and the cleanup runs in ordinary code, not in a signal handler.

Each temporary output holds ``OWNER_FILE``, locked (flock) by its writer for as
long as it works: the kernel drops the lock when the writer dies, on any host of
a shared filesystem, so a free lock means a stale directory. The writer's host
and PID are in the directory name too, for directories without the file.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import threading
from pathlib import Path

from megatron_upcycle.exit_codes import RequeueRequested

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
OWNER_FILE = ".owner"


class StopFlag:
    """Set by a signal handler; ``check()`` at safe points raises RequeueRequested."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handler(self, signum, _frame) -> None:
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def requeue(self) -> RequeueRequested:
        return RequeueRequested(f"stopped by {self.name}: partial output removed; re-run to convert again")

    def check(self) -> None:
        if self.signum is not None:
            raise self.requeue()


@contextlib.contextmanager
def stop_on_signals(signals=STOP_SIGNALS):
    """Record ``signals`` in a StopFlag for the body; the previous handlers come back after."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():  # Python allows handlers only there
        yield flag
        return
    previous = {sig: signal.signal(sig, flag._handler) for sig in signals}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def temp_dir_for(out: Path) -> Path:
    return out.parent / f".tmp-{out.name}.{socket.gethostname()}.{os.getpid()}"


@contextlib.contextmanager
def owned(tmp: Path):
    """Create ``tmp`` and hold its owner lock for the body (the lock file is removed at the end)."""
    tmp.mkdir(parents=True)
    fd = os.open(tmp / OWNER_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        yield tmp
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp / OWNER_FILE)
        os.close(fd)


def release(tmp: Path) -> None:
    """Drop the owner file before ``tmp`` becomes the output (the lock goes with the descriptor)."""
    with contextlib.suppress(OSError):
        os.unlink(tmp / OWNER_FILE)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(tmp: Path, prefix: str) -> bool:
    try:
        fd = os.open(tmp / OWNER_FILE, os.O_RDONLY)
    except FileNotFoundError:
        # No owner file: being created or renamed right now, or left by an older
        # version. Only a dead PID on this host proves it stale.
        host, _, pid = tmp.name[len(prefix):].rpartition(".")
        return host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: its writer is alive
        return False
    finally:
        os.close(fd)
    return True


def remove_stale_temp_dirs(out: Path, log=None) -> list[Path]:
    """Remove the temporary outputs for ``out`` whose writers are gone; returns them."""
    prefix = f".tmp-{out.name}."
    removed = []
    for tmp in sorted(out.parent.glob(f"{prefix}*")):
        if tmp.is_dir() and _is_stale(tmp, prefix):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
            if log:
                log(f"removed {tmp.name}, left by an attempt that did not finish")
    return removed
