"""The battery's bookkeeping: one result per check, its line, the summary, the JSON file.

A check is a function ``check(ctx) -> Outcome``. It raises ``Skip`` when it cannot
run here (too few devices, a prerequisite failed) and ``Failed`` when what it
measured is wrong; any other exception is a failure too, its traceback going to
the log file, not the terminal. Under torchrun every rank runs every check (the
training ones are collective); rank 0 judges, prints and writes, and its verdict
is broadcast so that every rank skips the same later checks.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megatron_upcycle.atomic import write_json_atomic
from megatron_upcycle.exit_codes import RequeueRequested

JSON_FILE = "selftest.json"
LOG_FILE = "selftest.log"
STATUSES = ("PASS", "FAIL", "SKIP")


def _cpu_seconds() -> float:
    """CPU time of this process and of the children it waited for (torchrun jobs, the converter)."""
    return sum(os.times()[:4])


class Skip(Exception):
    """The check cannot run here; the message says why."""


class Failed(Exception):
    """The check ran and what it measured is wrong; the message says what."""


@dataclass
class Outcome:
    """What a passing check reports: one line of detail and the numbers behind it."""

    detail: str
    data: dict = field(default_factory=dict)


@dataclass
class CheckResult:
    name: str
    status: str  # PASS, FAIL or SKIP
    seconds: float
    detail: str
    data: dict = field(default_factory=dict)
    cpu_seconds: float = 0.0  # this process and the processes it waited for

    def line(self) -> str:
        return f"{self.status} {self.name} ({self.seconds:.1f} s): {self.detail}"


class Battery:
    """Runs checks in order and keeps their results (see the module docstring)."""

    def __init__(self, out: Path, is_main: bool, header: dict) -> None:
        self.out = out
        self.is_main = is_main
        self.header = header
        self.results: list[CheckResult] = []
        self._start_wall = time.perf_counter()
        if is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / LOG_FILE).write_text("")

    def status(self, name: str) -> str | None:
        return next((r.status for r in self.results if r.name == name), None)

    def require(self, *names: str) -> None:
        """Skip the calling check unless every named check passed."""
        missing = [n for n in names if self.status(n) != "PASS"]
        if missing:
            raise Skip(f"needs {', '.join(missing)} to pass first")

    def run(self, name: str, check, ctx, abort_on_error: bool = False) -> CheckResult:
        """Run one check. ``abort_on_error``: an unexpected error is re-raised after it
        is recorded (a collective check under torchrun: the other ranks cannot go on)."""
        start, start_cpu = time.perf_counter(), _cpu_seconds()
        data: dict = {}
        error: BaseException | None = None
        try:
            with self._output_to_log():
                outcome = check(ctx)
            status, detail, data = "PASS", outcome.detail, outcome.data
        except Skip as exc:
            status, detail = "SKIP", str(exc)
        except Failed as exc:
            status, detail = "FAIL", str(exc)
        except RequeueRequested:
            # SIGTERM/SIGUSR1 during a run: the battery stops (exit 75), its JSON kept so far.
            raise
        except Exception as exc:  # noqa: BLE001 - a battery reports every error as a failure
            status = "FAIL"
            first = str(exc).splitlines()[0] if str(exc) else ""
            detail = f"{type(exc).__name__}: {first[:300]} (traceback in {self.out / LOG_FILE})"
            self._log(f"== {name}\n{traceback.format_exc()}")
            error = exc
        result = CheckResult(name, status, time.perf_counter() - start, detail, data, _cpu_seconds() - start_cpu)
        if error is None or not abort_on_error:
            # Rank 0's verdict everywhere. After an error inside a collective the other
            # ranks may still be inside it: no agreement then, this rank stops.
            result = ctx.agree(result)
        self.results.append(result)
        if self.is_main:
            print(result.line(), flush=True)
            self.write()
        if error is not None and abort_on_error:
            raise error
        return result

    @contextlib.contextmanager
    def _output_to_log(self):
        """The engine's own lines (progress, run messages) go to the log; the terminal
        gets one line per check."""
        target = self.out / LOG_FILE if self.is_main else os.devnull  # rank 0 speaks for the job
        with open(target, "a") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
            yield

    def _log(self, text: str) -> None:
        if self.is_main:
            with (self.out / LOG_FILE).open("a") as handle:
                handle.write(text + "\n")

    def counts(self) -> dict[str, int]:
        return {s: sum(r.status == s for r in self.results) for s in STATUSES}

    def summary(self) -> str:
        c = self.counts()
        return f"selftest: {c['PASS']} passed, {c['FAIL']} failed, {c['SKIP']} skipped"

    def write(self) -> Path:
        """selftest.json, rewritten atomically after every check (a killed battery leaves
        the checks done so far)."""
        c = self.counts()
        document = dict(
            self.header,
            checks=[asdict(r) for r in self.results],
            passed=c["PASS"], failed=c["FAIL"], skipped=c["SKIP"],
            wall_seconds=time.perf_counter() - self._start_wall,
            # This process and the ones it waited for (torchrun jobs, the CPU converter).
            cpu_seconds=_cpu_seconds(),
        )
        path = self.out / JSON_FILE
        write_json_atomic(path, json.loads(json.dumps(document, default=str)))
        return path
