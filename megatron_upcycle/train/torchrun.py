"""torchrun as launch/train.sh runs it: a stop signal is the normal requeue path, not a crash.

    python -m megatron_upcycle.train.torchrun [torchrun's arguments]

Under srun every process of the step receives the scheduler's SIGUSR1 (or SIGTERM):
the workers save and exit 75, and torchrun, told to handle the signal
(PET_SIGNALS_TO_HANDLE), passes it on to them, waits for them and then lets its
``SignalException`` escape, which Python prints as a traceback before the
launcher's "exiting 75". This runs torchrun's own ``run`` and ends such a stop with
one line instead: the workers have exited by then, and the launcher reads the
engine's real exit code from $UPCYCLE_EXIT_STATUS_FILE. Workers that all exited 75
(saved for requeue; a signal torchrun did not see itself) end the same way. Any
other failure keeps torchrun's own report of which rank failed, without the
traceback of torchrun's internals.
"""
from __future__ import annotations

import logging
import signal
import sys

from megatron_upcycle.exit_codes import EXIT_REQUEUE

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# torchrun's warnings for a stop ("Received 10 death signal, shutting down workers",
# "Sending process N closing signal SIGUSR1"): replaced by our one line for a stop signal.
_STOP_MESSAGES = ("Received %s death signal", "Sending process %s closing signal %s")


class _QuietStop(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not any(str(record.msg).startswith(m) for m in _STOP_MESSAGES):
            return True
        return not any(_names(arg) & {s.name for s in STOP_SIGNALS} for arg in record.args or ())


def _names(value) -> set[str]:
    """Signal names a log argument stands for (10, Signals.SIGUSR1, 'SIGUSR1')."""
    try:
        return {signal.Signals(int(value)).name}
    except (TypeError, ValueError):
        return {str(value).rsplit(".", 1)[-1]}


def _say(text: str) -> None:
    print(f"torchrun: {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    for name in ("torch.distributed.elastic.agent.server.api", "torch.distributed.elastic.multiprocessing.api"):
        logging.getLogger(name).addFilter(_QuietStop())
    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except SignalException as exc:
        sig = signal.Signals(exc.sigval)
        if sig not in STOP_SIGNALS:
            _say(f"stopped by {sig.name}")
        else:
            _say(f"{sig.name}: passed to the workers, which have exited")
        return 128 + int(sig)
    except ChildFailedError as exc:
        codes = {failure.exitcode for failure in exc.failures.values()}
        if codes == {EXIT_REQUEUE}:
            _say(f"the workers saved and exited {EXIT_REQUEUE} (requeue)")
            return EXIT_REQUEUE
        print(exc.format_msg(), file=sys.stderr, flush=True)  # which rank failed, how, and its error file
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
