"""A checkpoint-writer results queue that survives a signal to the whole process group.

Megatron's async filesystem writer (``dist_checkpointing.strategies.filesystem_async``)
collects its workers' results through a queue served by a ``multiprocessing`` Manager,
a child process spawned at the first save and kept (the private global
``_results_queue``). Ctrl-C on the local executor, or a signal a launcher forwards to
the process group, reaches that child too: it dies of SIGTERM, and every later save,
the "save and exit for requeue" one included, fails with BrokenPipeError. This module
starts that Manager itself, ignoring the stop signals the engine handles, and tied to
its parent with PR_SET_PDEATHSIG so it never outlives a killed trainer. Light on
purpose: the spawned Manager imports only this file.
"""
from __future__ import annotations

import ctypes
import signal

_managers: list = []  # kept alive for the life of the process
_PR_SET_PDEATHSIG = 1


def _serve_through_stop_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    try:  # Linux: die with the parent (kill -9 of the trainer included)
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def install() -> bool:
    """Give Megatron's async writer a signal-proof results queue; False if upstream changed."""
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron_upcycle.mcore_compat import async_writer_results_queue_module

    filesystem_async = async_writer_results_queue_module()
    if filesystem_async is None:
        return False  # upstream no longer keeps one: nothing to protect
    if filesystem_async._results_queue is not None:
        return True
    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=_serve_through_stop_signals)
    _managers.append(manager)
    filesystem_async._results_queue = manager.Queue()
    return True
