"""SIGTERM / SIGUSR1 -> "save and exit for requeue", agreed on by every rank."""
from __future__ import annotations

import signal
from typing import NoReturn

from megatron_upcycle.exit_codes import RequeueRequested
from megatron_upcycle.parallel import all_ranks, any_rank


class RequeueSignal:
    """Records that the scheduler asked us to stop; ranks agree at step boundaries."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self._received: int | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum, _frame) -> None:
        self._received = signum

    def agreed(self) -> bool:
        """True on every rank if any rank received a signal (a collective call)."""
        return any_rank(self._received is not None)

    @staticmethod
    def exit_for_requeue() -> NoReturn:
        """Raise RequeueRequested (exit 75) once every rank has got here, i.e. has done
        its part of the save, manifest included (a collective call).

        The first node to exit 75 ends its srun task, and srun (--kill-on-bad-exit)
        then SIGTERMs the other nodes: without this agreement a rank still writing
        could be killed mid-save by a faster node's exit."""
        all_ranks(True)
        raise RequeueRequested()
