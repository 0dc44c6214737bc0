"""Submit a sweep DAG to Slurm, idempotently, and report its state.

``SlurmExecutor.submit(dag)`` submits only what is missing: runs with a
result.json are skipped, runs whose recorded job is still queued or running
are left alone (their job id becomes the dependency of their children), and
runs that failed (job gone or ended, no result.json) are submitted again.
Siblings with the same ``array_group``, dependencies and resources become one
job array; edges become ``--dependency=afterok:...`` with
``--kill-on-invalid-dep=yes``, so a failed run cancels its dependents.

Each submitted run records its job in ``<run_dir>/slurm_job.json`` (written
atomically): ``job_id`` is "123", or "123_4" for task 4 of array 123.
``status(dag)`` joins those records with squeue into per-run states.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

from megatron_upcycle.errors import UserError
from megatron_upcycle.sweep.dag import RunDAG, RunNode, is_done
from megatron_upcycle.atomic import write_json_atomic, write_text_atomic
from megatron_upcycle.sweep.jsonfile import read_json, tail
from megatron_upcycle.sweep.slurm_render import (
    TEMPLATE_DIR, SlurmOptions, array_key, check_inputs, default_job_name, render_sbatch,
)
from megatron_upcycle.sweep.status import RunState, RunStatus, format_status_table

JOB_RECORD = "slurm_job.json"

# squeue's long state names, sorted into what they mean for a run.
_PENDING = {"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD", "CONFIGURING", "RESIZING"}
_RUNNING = {"RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"}
# Pending forever: the job waits on a dependency that failed.
_NEVER_STARTS = {"DependencyNeverSatisfied"}


class SlurmError(UserError):
    """Something the user must see about Slurm (one line, then details)."""


class SlurmNotFoundError(SlurmError):
    def __init__(self, command: str):
        self.command = command
        super().__init__(f"{command} not found on PATH: Slurm's commands are needed "
                         "(run this on a Slurm login node, or use the local executor)")


class SlurmCommandError(SlurmError):
    def __init__(self, argv: list[str], returncode: int, stderr: str):
        self.argv, self.returncode, self.stderr_tail = argv, returncode, "\n".join(stderr.strip().splitlines()[-10:])
        last = self.stderr_tail.splitlines()[-1] if self.stderr_tail else "(no message)"
        super().__init__(f"{argv[0]} failed (exit {returncode}): {last}")


class SlurmRunFailedError(SlurmError):
    def __init__(self, status: RunStatus, stderr_tail: str, others: list[str]):
        self.run_id, self.job_id, self.state = status.run_id, status.job_id, status.scheduler_state
        self.reason, self.log_path, self.stderr_tail, self.others = status.reason, status.log_path, stderr_tail, others
        text = (f"run '{status.run_id}' failed: job {status.job_id}, state {status.scheduler_state or 'gone'}"
                f"{f' ({status.reason})' if status.reason else ''}, log {status.log_path}")
        if others:
            text += f"; also failed: {', '.join(others)}"
        if stderr_tail:
            text += "\n" + "\n".join("    " + line for line in stderr_tail.splitlines())
        super().__init__(text)


@dataclass
class JobRecord:
    job_id: str                   # what squeue shows: "123" or "123_4"
    job_name: str
    script: str                   # the rendered sbatch script that was submitted
    submitted_at: str
    previous_job_ids: list[str] = field(default_factory=list)

    @property
    def base_id(self) -> str:
        return self.job_id.split("_")[0]


@dataclass
class SubmitReport:
    submitted: dict[str, str] = field(default_factory=dict)  # run -> new job id
    queued: dict[str, str] = field(default_factory=dict)     # run -> job id already queued or running
    done: list[str] = field(default_factory=list)
    resubmitted: list[str] = field(default_factory=list)     # runs in ``submitted`` that had failed before


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_record(node: RunNode) -> JobRecord | None:
    data = read_json(node.run_dir / JOB_RECORD)
    if not isinstance(data, dict) or "job_id" not in data:
        return None
    return JobRecord(job_id=str(data["job_id"]), job_name=data.get("job_name", ""), script=data.get("script", ""),
                     submitted_at=data.get("submitted_at", ""), previous_job_ids=list(data.get("previous_job_ids", [])))


def log_path(node: RunNode, job_id: str, stream: str = "err") -> Path:
    """Where the sbatch template sends a run's output for one job."""
    return node.log_dir / f"slurm-{job_id}.{stream}"


class SlurmExecutor:
    def __init__(
        self,
        options: SlurmOptions | None = None,
        workdir: str | os.PathLike | None = None,
        log_dir: str | os.PathLike | None = None,
        template_dir: str | os.PathLike = TEMPLATE_DIR,
        env: dict[str, str] | None = None,
        progress: TextIO | None = sys.stderr,
    ):
        self.options = options or SlurmOptions()
        self.workdir = Path(workdir or Path.cwd()).resolve()
        self.log_dir = Path(log_dir).resolve() if log_dir is not None else None
        self.template_dir = Path(template_dir)
        self.env = env or {}
        self.progress = progress

    # -- Slurm commands --------------------------------------------------------
    def _slurm(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
        if shutil.which(argv[0]) is None:
            raise SlurmNotFoundError(argv[0])
        proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **self.env}, timeout=120)
        if check and proc.returncode != 0:
            raise SlurmCommandError(argv, proc.returncode, proc.stderr or proc.stdout)
        return proc

    def queue(self, job_ids: set[str]) -> dict[str, tuple[str, str]]:
        """squeue's (state, reason) for every job (and array task) among ``job_ids``, finished ones included."""
        bases = sorted({job_id.split("_")[0] for job_id in job_ids})
        if not bases:
            return {}
        proc = self._slurm(["squeue", "--noheader", "--array", "--states=all", f"--jobs={','.join(bases)}",
                            "--format=%i|%T|%r"], check=False)
        if proc.returncode != 0:
            if "Invalid job id" in proc.stderr:  # every one of them has left the controller
                return {}
            raise SlurmCommandError(["squeue"], proc.returncode, proc.stderr)
        jobs = {}
        for line in proc.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3:
                jobs[parts[0]] = (parts[1], parts[2])
        return jobs

    # -- state ------------------------------------------------------------------
    def _run_status(self, node: RunNode, record: JobRecord | None, queue: dict, done: bool) -> RunStatus:
        job_id = record.job_id if record else None
        log = log_path(node, job_id) if job_id else None
        if done:
            return RunStatus(node.run_id, node.kind, RunState.DONE, job_id, log_path=log)
        holder = node.dir.holder()
        if holder is not None and (job_id is None or job_id not in queue):
            # A live process outside any job of ours holds the run's lock (a local run,
            # a job of another submission): it is running; submitting it again would be
            # a second writer.
            return RunStatus(node.run_id, node.kind, RunState.RUNNING, job_id, None,
                             f"in use by {holder} outside this sweep's jobs", log)
        if record is None:
            return RunStatus(node.run_id, node.kind, RunState.NOT_SUBMITTED)
        if job_id not in queue:
            return RunStatus(node.run_id, node.kind, RunState.FAILED, job_id, None,
                             "job gone from Slurm without result.json", log)
        slurm_state, reason = queue[job_id]
        reason = None if reason in ("None", "") else reason
        if reason in _NEVER_STARTS:
            state = RunState.FAILED
        elif slurm_state in _PENDING:
            state = RunState.PENDING
        elif slurm_state in _RUNNING:
            state = RunState.RUNNING
        else:
            state = RunState.FAILED
            if slurm_state == "COMPLETED":
                reason = "completed without result.json"
        if reason in _NEVER_STARTS:
            reason = f"a dependency failed ({reason})"
        return RunStatus(node.run_id, node.kind, state, job_id, slurm_state, reason, log)

    def status(self, dag: RunDAG) -> list[RunStatus]:
        """Per-run state (done, running, pending, failed, not submitted), in topological order."""
        records = {node.run_id: read_record(node) for node in dag}
        queue = self.queue({r.job_id for r in records.values() if r}) if any(records.values()) else {}
        # After squeue: a job that ended since then has written result.json already.
        return [self._run_status(node, records[node.run_id], queue, is_done(node)) for node in dag]

    def format_status(self, dag: RunDAG) -> str:
        return format_status_table(self.status(dag))

    # -- submit ------------------------------------------------------------------
    def _log_dir(self, dag: RunDAG) -> Path:
        if self.log_dir is not None:
            return self.log_dir
        parents = [str(node.run_dir.resolve().parent) for node in dag]
        return Path(os.path.commonpath(parents)) / ".slurm"

    def check(self, dag: RunDAG) -> None:
        """Refuse (ConfigError) any value that would reach a script unsafely, before
        anything is written; submit and render check again."""
        log_dir = self._log_dir(dag)
        for node in dag:
            check_inputs(self.options, [node], self.workdir, log_dir, (), default_job_name(self.options, [node]))

    def submit(self, dag: RunDAG) -> SubmitReport:
        if shutil.which("sbatch") is None:
            raise SlurmNotFoundError("sbatch")
        self.check(dag)  # before the first directory is made
        log_dir = self._log_dir(dag)
        log_dir.mkdir(parents=True, exist_ok=True)
        with _exclusive(log_dir / ".submit.lock"):
            return self._submit_locked(dag, log_dir)

    def _submit_locked(self, dag: RunDAG, log_dir: Path) -> SubmitReport:
        report = SubmitReport()
        statuses = {s.run_id: s for s in self.status(dag)}
        job_of: dict[str, str] = {}
        groups: OrderedDict[tuple, list[RunNode]] = OrderedDict()
        replaced: list[str] = []  # queued jobs that can never start as they are
        for node in dag:
            status = statuses[node.run_id]
            waits_on_replaced = status.state is RunState.PENDING and any(
                d in report.submitted for d in node.depends_on)
            if status.state is RunState.DONE:
                report.done.append(node.run_id)
            elif status.state in (RunState.PENDING, RunState.RUNNING) and not waits_on_replaced:
                job_of[node.run_id] = report.queued[node.run_id] = status.job_id
            else:
                if status.scheduler_state in _PENDING | _RUNNING:
                    # Still queued behind a failed (or about to be replaced) dependency.
                    replaced.append(status.job_id)
                key = ("array", array_key(self.options, node)) if node.array_group else ("run", node.run_id)
                groups.setdefault(key, []).append(node)
                report.submitted[node.run_id] = ""  # job id filled in below
        if replaced:
            self._slurm(["scancel", *replaced], check=False)
        # Groups appear in the order of their first member, which comes after
        # all its dependencies (and members share dependencies): every
        # dependency has its job id by the time a group is submitted.
        for runs in groups.values():
            deps = sorted({job_of[d] for node in runs for d in node.depends_on if d not in report.done})
            ids = self._submit_group(runs, deps, log_dir)
            for node, job_id in zip(runs, ids):
                job_of[node.run_id] = report.submitted[node.run_id] = job_id
                if statuses[node.run_id].state is not RunState.NOT_SUBMITTED:
                    report.resubmitted.append(node.run_id)
        self._say(f"submitted {len(report.submitted)} runs ({len(report.resubmitted)} again after failing), "
                  f"{len(report.queued)} already queued or running, {len(report.done)} done")
        return report

    def _submit_group(self, runs: list[RunNode], deps: list[str], log_dir: Path) -> list[str]:
        job_name = default_job_name(self.options, runs)
        # Rendering checks every value: nothing is created for a script that is refused.
        script = render_sbatch(self.options, runs, workdir=self.workdir, log_dir=log_dir, dependencies=deps,
                               job_name=job_name, template_dir=self.template_dir)
        for node in runs:
            node.log_dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        script_path = log_dir / f"{job_name}.{stamp}.sbatch"
        write_text_atomic(script_path, script)
        out = self._slurm(["sbatch", "--parsable", str(script_path)]).stdout.strip()
        base = out.split(";")[0].strip()
        if not base.isdigit():
            raise SlurmCommandError(["sbatch"], 0, f"unexpected sbatch output: {out!r}")
        ids = [f"{base}_{i}" for i in range(len(runs))] if len(runs) > 1 else [base]
        for node, job_id in zip(runs, ids):
            old = read_record(node)
            previous = (old.previous_job_ids + [old.job_id]) if old else []
            write_json_atomic(node.run_dir / JOB_RECORD, {
                "job_id": job_id, "job_name": job_name, "script": str(script_path),
                "submitted_at": _now(), "previous_job_ids": previous,
            })
            self._say(f"{node.run_id}: job {job_id}" + (f" after {','.join(deps)}" if deps else ""))
        return ids

    # -- wait / cancel -------------------------------------------------------------
    def wait(self, dag: RunDAG, timeout_s: float | None = None, poll_s: float = 10.0,
             raise_on_failure: bool = True) -> list[RunStatus]:
        """Poll until no run is pending or running; raise SlurmRunFailedError if one failed."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            statuses = self.status(dag)
            if not any(s.state in (RunState.PENDING, RunState.RUNNING) for s in statuses):
                break
            if deadline is not None and time.monotonic() > deadline:
                raise SlurmError(f"runs still pending or running after {timeout_s:.0f} s:\n"
                                 + format_status_table(statuses))
            time.sleep(poll_s)
        failed = [s for s in statuses if s.state is RunState.FAILED]
        if failed and raise_on_failure:
            # Report a run that failed by itself before one cancelled because of it.
            failed.sort(key=lambda s: (s.reason or "").startswith("a dependency failed"))
            first = failed[0]
            raise SlurmRunFailedError(first, tail(first.log_path) if first.log_path else "",
                                      [s.run_id for s in failed[1:]])
        return statuses

    def cancel(self, dag: RunDAG) -> list[str]:
        """scancel every queued or running job of the DAG; returns the job ids."""
        ids = [s.job_id for s in self.status(dag) if s.state in (RunState.PENDING, RunState.RUNNING)]
        if ids:
            self._slurm(["scancel", *ids])
        return ids

    def _say(self, text: str) -> None:
        if self.progress is not None:
            print(f"[slurm] {text}", file=self.progress, flush=True)


@contextmanager
def _exclusive(path: Path):
    """One submit at a time per sweep: two at once could both submit the same run."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
