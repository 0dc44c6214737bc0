"""Run a sweep DAG on this machine.

Up to ``max_parallel`` runs at a time, each in its own process group with its
output appended to ``<run_dir>/logs/local.out`` / ``local.err``. A run starts
once its dependencies are done; runs whose result.json exists are skipped, so
re-running an interrupted sweep continues it. A run exiting with
EXIT_REQUEUE (75: "checkpoint saved, run me again") is restarted, at most
``max_requeues`` times; any other failure stops its dependents, which are
reported as blocked. On SIGINT/SIGTERM the executor sends SIGTERM to every
process of every running run (the engine saves a checkpoint and exits 75),
waits up to ``terminate_timeout_s``, kills what is left, and returns with
``interrupted=True``; a second signal kills at once.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TextIO

from megatron_upcycle.exit_codes import EXIT_BUSY, EXIT_REQUEUE
from megatron_upcycle.sweep.dag import RunDAG, RunNode, is_done
from megatron_upcycle.atomic import write_json_atomic
from megatron_upcycle.sweep.jsonfile import read_json, tail
from megatron_upcycle.sweep.status import RunState, RunStatus

LOCAL_STATE_FILE = "local_run.json"  # under <run_dir>/logs: the last attempt's exit code


@dataclass
class RunFailure:
    run_id: str
    exit_code: int
    reason: str
    log_path: Path
    stderr_tail: str

    def describe(self) -> str:
        text = f"run '{self.run_id}' failed: {self.reason} (log: {self.log_path})"
        if self.stderr_tail:
            text += "\n" + "\n".join("    " + line for line in self.stderr_tail.splitlines())
        return text


@dataclass
class LocalReport:
    done: list[str] = field(default_factory=list)        # finished in this call
    skipped: list[str] = field(default_factory=list)     # already done before
    failed: dict[str, RunFailure] = field(default_factory=dict)
    blocked: dict[str, str] = field(default_factory=dict)  # run -> the failed run it needed
    not_started: list[str] = field(default_factory=list)   # left pending by an interrupt
    stopped: list[str] = field(default_factory=list)       # running when interrupted (resume on re-run)
    # run -> "pid P on HOST": another live process holds its run directory (exit 73)
    elsewhere: dict[str, str] = field(default_factory=dict)
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed and not self.blocked and not self.interrupted and not self.elsewhere


@dataclass
class _Attempt:
    node: RunNode
    number: int
    proc: subprocess.Popen
    out: IO
    err: IO


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class LocalExecutor:
    def __init__(
        self,
        max_parallel: int | None = None,
        max_requeues: int = 3,
        workdir: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
        terminate_timeout_s: float = 30.0,
        poll_interval_s: float = 0.1,
        progress: TextIO | None = sys.stderr,
    ):
        self.max_parallel = max_parallel or os.cpu_count() or 1
        if self.max_parallel < 1:
            raise ValueError(f"max_parallel must be >= 1, got {max_parallel}")
        self.max_requeues = max_requeues
        self.workdir = Path(workdir) if workdir is not None else Path.cwd()
        self.env = env or {}
        self.terminate_timeout_s = terminate_timeout_s
        self.poll_interval_s = poll_interval_s
        self.progress = progress
        self._signals_received = 0

    # -- public ----------------------------------------------------------------
    def run(self, dag: RunDAG) -> LocalReport:
        report = LocalReport()
        done = dag.done_ids()
        report.skipped = [n.run_id for n in dag if n.run_id in done]
        pending = [n.run_id for n in dag if n.run_id not in done]
        running: dict[str, _Attempt] = {}
        starts: dict[str, int] = {}
        self._signals_received = 0
        restore = self._install_signal_handlers()
        try:
            self._say(report, running, pending, f"{len(dag)} runs, {len(report.skipped)} already done")
            while (pending or running) and not self._signals_received:
                changed = self._reap(dag, running, pending, done, report)
                while len(running) < self.max_parallel and not self._signals_received:
                    run_id = next((r for r in pending if dag.ready(r, done)), None)
                    if run_id is None:
                        break
                    pending.remove(run_id)
                    starts[run_id] = starts.get(run_id, 0) + 1
                    changed = True
                    try:
                        running[run_id] = self._start(dag[run_id], starts[run_id])
                    except OSError as exc:  # e.g. the command does not exist
                        write_json_atomic(dag[run_id].log_dir / LOCAL_STATE_FILE,
                                          {"attempt": starts[run_id], "exit_code": 127, "finished_at": _now()})
                        self._fail(dag, run_id, 127, f"could not start: {exc}", pending, running, report)
                        continue
                    self._say(report, running, pending, f"started {run_id}"
                              + (f" (attempt {starts[run_id]})" if starts[run_id] > 1 else ""))
                if not changed:
                    time.sleep(self.poll_interval_s)
            if self._signals_received:
                report.interrupted = True
                self._terminate(running, report)
                report.not_started = pending
                self._say(report, running, pending, "interrupted: finished work is kept; re-run to continue")
        finally:
            # Only after an unexpected error: leave no run behind.
            for attempt in running.values():
                _signal_quietly(attempt.proc.pid, signal.SIGKILL, group=True)
                attempt.proc.wait()
                attempt.out.close()
                attempt.err.close()
            restore()
        return report

    def status(self, dag: RunDAG) -> list[RunStatus]:
        """done, failed (the last local attempt failed) or not submitted, from the run directories."""
        statuses = []
        for node in dag:
            last = read_json(node.log_dir / LOCAL_STATE_FILE) or {}
            holder = None if is_done(node) else node.dir.holder()
            if is_done(node):
                state, reason = RunState.DONE, None
            elif holder is not None:
                state, reason = RunState.RUNNING, f"in use by {holder}"
            elif last.get("exit_code") == EXIT_REQUEUE:
                state, reason = RunState.NOT_SUBMITTED, "stopped at a checkpoint: re-run to resume"
            elif "exit_code" in last:
                state, reason = RunState.FAILED, f"exit code {last['exit_code']}"
            else:
                state, reason = RunState.NOT_SUBMITTED, None
            statuses.append(RunStatus(node.run_id, node.kind, state, reason=reason,
                                      log_path=node.log_dir / "local.err"))
        return statuses

    # -- internals ---------------------------------------------------------------
    def _start(self, node: RunNode, number: int) -> _Attempt:
        node.log_dir.mkdir(parents=True, exist_ok=True)
        out = open(node.log_dir / "local.out", "a")
        err = open(node.log_dir / "local.err", "a")
        banner = f"=== {node.run_id} attempt {number} started {_now()}: {' '.join(node.command)}\n"
        for handle in (out, err):
            handle.write(banner)
            handle.flush()
        try:
            proc = subprocess.Popen(
                node.command, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                env={**os.environ, **self.env},
                # Own process group: a terminal Ctrl-C reaches only the executor,
                # which then stops each run once, cleanly.
                start_new_session=True,
            )
        except OSError as exc:
            err.write(f"could not start: {exc}\n")
            out.close()
            err.close()
            raise
        return _Attempt(node, number, proc, out, err)

    def _reap(self, dag, running, pending, done, report) -> bool:
        changed = False
        for run_id, attempt in list(running.items()):
            code = attempt.proc.poll()
            if code is None:
                continue
            changed = True
            del running[run_id]
            self._finish(attempt, code)
            node = attempt.node
            if code == 0 and is_done(node):
                done.add(run_id)
                report.done.append(run_id)
                self._say(report, running, pending, f"finished {run_id}")
            elif code == EXIT_BUSY:
                # Not a failure: the run is alive in another process (a sweep started
                # twice, an executor that died while its runs went on). Its dependents
                # wait for a later sweep run, when it has finished.
                report.elsewhere[run_id] = node.dir.holder() or "another process"
                waiting = [d for d in dag.dependents(run_id) if d in pending]
                for dependent in waiting:
                    pending.remove(dependent)
                report.not_started.extend(waiting)
                self._say(report, running, pending, f"{run_id} is running in another process "
                          f"({report.elsewhere[run_id]}): not started here; re-run when it has finished")
            elif code == EXIT_REQUEUE and attempt.number <= self.max_requeues:
                pending.insert(0, run_id)  # resume it first: it already holds partial work
                self._say(report, running, pending, f"{run_id} asked to be re-run (exit {code}): resuming")
            else:
                if code == 0:
                    reason = "exited 0 without writing result.json"
                elif code == EXIT_REQUEUE:
                    reason = f"asked to be re-run {attempt.number} times (limit: {self.max_requeues} re-runs)"
                else:
                    reason = f"exit code {code}"
                self._fail(dag, run_id, code, reason, pending, running, report)
        return changed

    def _fail(self, dag, run_id, code, reason, pending, running, report) -> None:
        log = dag[run_id].log_dir / "local.err"
        report.failed[run_id] = RunFailure(run_id, code, reason, log, tail(log))
        for dependent in dag.dependents(run_id):
            if dependent in pending:
                pending.remove(dependent)
                report.blocked[dependent] = run_id
        self._say(report, running, pending, f"FAILED {run_id}: {reason}")

    def _finish(self, attempt: _Attempt, code: int) -> None:
        trailer = f"=== attempt {attempt.number} exited {code} at {_now()}\n"
        for handle in (attempt.out, attempt.err):
            handle.write(trailer)
            handle.close()
        write_json_atomic(attempt.node.log_dir / LOCAL_STATE_FILE,
                          {"attempt": attempt.number, "exit_code": code, "finished_at": _now()})

    def _terminate(self, running: dict[str, _Attempt], report: LocalReport) -> None:
        # Like Slurm ending a step: every process of the run gets SIGTERM (the
        # engine's ranks save a checkpoint and exit 75), then what is left is killed.
        for attempt in running.values():
            _signal_quietly(attempt.proc.pid, signal.SIGTERM, group=True)
        deadline = time.monotonic() + self.terminate_timeout_s
        while running and time.monotonic() < deadline and self._signals_received < 2:
            for run_id, attempt in list(running.items()):
                code = attempt.proc.poll()
                if code is not None:
                    del running[run_id]
                    self._finish(attempt, code)
                    # A run that stops cleanly leaves nothing behind in its group.
                    _signal_quietly(attempt.proc.pid, signal.SIGKILL, group=True)
                    if code == 0 and is_done(attempt.node):
                        report.done.append(run_id)
                    else:
                        report.stopped.append(run_id)
            time.sleep(self.poll_interval_s)
        for run_id, attempt in list(running.items()):
            _signal_quietly(attempt.proc.pid, signal.SIGKILL, group=True)
            code = attempt.proc.wait()
            del running[run_id]
            self._finish(attempt, code)
            report.stopped.append(run_id)

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def handler(signum, frame):
            self._signals_received += 1

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

        def restore():
            for sig, old in previous.items():
                signal.signal(sig, old)

        return restore

    def _say(self, report: LocalReport, running, pending, event: str) -> None:
        if self.progress is None:
            return
        done = len(report.done) + len(report.skipped)
        counts = f"{done} done, {len(running)} running, {len(pending)} pending, {len(report.failed)} failed"
        if report.blocked:
            counts += f", {len(report.blocked)} blocked"
        print(f"[local] {counts} | {event}", file=self.progress, flush=True)


def _signal_quietly(pid: int, sig: int, group: bool) -> None:
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
