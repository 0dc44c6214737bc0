"""Per-run state, shared by the executors, and its printable table."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Iterable


class RunState(str, Enum):
    DONE = "done"
    RUNNING = "running"
    PENDING = "pending"
    FAILED = "failed"
    NOT_SUBMITTED = "not submitted"


@dataclass
class RunStatus:
    run_id: str
    kind: str
    state: RunState
    job_id: str | None = None           # Slurm job id ("123" or "123_4" for an array task)
    scheduler_state: str | None = None  # what the scheduler says (RUNNING, CANCELLED, ...)
    reason: str | None = None           # why pending/failed, when known
    log_path: Path | None = None        # the run's stderr log
    job_name: str | None = None         # what squeue's NAME column shows (dS-3f2a)


def count_states(statuses: Iterable[RunStatus]) -> dict[RunState, int]:
    counts = Counter(s.state for s in statuses)
    return {state: counts.get(state, 0) for state in RunState}


def summary_line(statuses: Iterable[RunStatus]) -> str:
    counts = count_states(statuses)
    return ", ".join(f"{n} {state.value}" for state, n in counts.items())


def _show_log(status: RunStatus) -> bool:
    # Where to look after a failure; a run cancelled before it started has no log.
    return status.state is RunState.FAILED and status.log_path is not None and status.log_path.exists()


def format_status_table(statuses: Iterable[RunStatus]) -> str:
    """A fixed-width table, one line per run (its Slurm job id and name next to it:
    what squeue shows), then the counts."""
    statuses = list(statuses)
    header = ("run", "job", "name", "kind", "state", "slurm", "reason", "log")
    rows = [header] + [
        (s.run_id, s.job_id or "-", s.job_name or "-", s.kind, s.state.value, s.scheduler_state or "-",
         s.reason or "-", str(s.log_path) if _show_log(s) else "-")
        for s in statuses
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    return "\n".join(line.rstrip() for line in lines) + "\n" + summary_line(statuses)
