"""SIGTERM / SIGUSR1 -> "save and exit for requeue", agreed on by every rank."""
from __future__ import annotations

import signal

from megatron_upcycle.parallel import any_rank


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
