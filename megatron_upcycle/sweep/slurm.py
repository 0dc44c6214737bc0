"""Submit a sweep DAG to Slurm, idempotently, and report its state.

``SlurmExecutor.render(dag)`` decides and renders a submission pass without
writing anything: the scripts in submission order, each with its sbatch
arguments, dependencies on jobs of the same pass as placeholders ("{job2}").
``submit`` runs that same rendering and only adds the sbatch calls, putting each
returned job id where its placeholder stood; ``dry_run`` prints it instead.

It submits only what is missing: runs with a
result.json are skipped, runs whose recorded job is still queued or running
are left alone (their job id becomes the dependency of their children), and
runs that failed (job gone or ended, no result.json) are submitted again.
Siblings with the same ``array_group``, dependencies and resources become one
job array; edges become ``--dependency=afterok:...`` with
``--kill-on-invalid-dep=yes``, so a failed run cancels its dependents.

Each submitted run records its job in ``<run_dir>/slurm_job.json`` (written
atomically): ``job_id`` is "123", or "123_4" for task 4 of array 123.
``status(dag)`` joins those records with squeue into per-run states.
Job names are ``<kind><stage>-<hash>`` (``dS-3f2a``: sweep.slurm_render.job_code).
"""
from __future__ import annotations

import fcntl
import os
import re
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


_PLACEHOLDER = re.compile(r"\{job[0-9]+\}")
DEPENDENCY_LINE = "#SBATCH --dependency="
# Each script of a dry run starts after a line beginning with this.
SUBMISSION_MARK = "# ===== submission "


def substitute_ids(text: str, ids: dict[str, str]) -> str:
    """Placeholders ("{job2}") replaced by the job ids sbatch returned for them."""
    return _PLACEHOLDER.sub(lambda m: ids[m.group(0)], text)


@dataclass
class Submission:
    """One sbatch call of a pass: its runs (one, or an array's tasks in order), the job
    name, its dependencies and the rendered script. Dependencies on jobs submitted
    earlier in the same pass are placeholders, "{jobN}" for submission N
    ("{jobN}_i" for task i of an array): sbatch alone knows the ids."""

    index: int                       # 1-based position in the submission order
    runs: list[RunNode]
    job_name: str
    dependencies: list[str]          # job ids ("123", "123_4") or placeholders ("{job2}", "{job2}_4")
    script: str                      # rendered, placeholders in its --dependency line
    sbatch_args: list[str] = field(default_factory=lambda: ["--parsable"])  # before the script path

    @property
    def placeholder(self) -> str:
        return f"{{job{self.index}}}"

    def job_ids(self, base: str) -> list[str]:
        """The id of each run's job (an array's tasks are base_i)."""
        return [f"{base}_{i}" for i in range(len(self.runs))] if len(self.runs) > 1 else [base]

    def script_with_ids(self, ids: dict[str, str]) -> str:
        """The script with real job ids in its dependency line (the only line that can
        hold a placeholder: a path that looks like one is left alone)."""
        lines = self.script.split("\n")
        for i, line in enumerate(lines):
            if line.startswith(DEPENDENCY_LINE):
                lines[i] = substitute_ids(line, ids)
        return "\n".join(lines)


@dataclass
class SubmissionPlan:
    """What one ``submit`` pass does, in order: scancel ``cancel``, then each submission."""

    log_dir: Path
    submissions: list[Submission] = field(default_factory=list)
    cancel: list[str] = field(default_factory=list)  # queued jobs that can never start as they are
    report: SubmitReport = field(default_factory=lambda: SubmitReport())


def format_dry_run(plan: SubmissionPlan) -> str:
    """Every script in submission order, each after a line naming its place, job name and runs."""
    report = plan.report
    count = len(plan.submissions)
    lines = [
        f"# Dry run: the {count} sbatch submission{'s' if count != 1 else ''} `upcycle sweep run --executor slurm` "
        "would make now, in this order. Nothing was submitted or written.",
        "# {jobN} stands for the job id sbatch will return for submission N ({jobN}_i: task i of its array).",
        f"# {len(report.submitted)} runs to submit ({len(report.resubmitted)} again after failing), "
        f"{len(report.queued)} already queued or running (their real job ids appear as they are), "
        f"{len(report.done)} done.",
    ]
    if plan.cancel:
        lines.append(f"# First: scancel {' '.join(plan.cancel)} (queued behind a run that is submitted again).")
    text = "\n".join(lines) + "\n"
    for sub in plan.submissions:
        runs = ", ".join(node.run_id for node in sub.runs)
        text += (f"\n{SUBMISSION_MARK}{sub.index}/{count}: sbatch {' '.join(sub.sbatch_args)} "
                 f"{plan.log_dir}/{sub.job_name}.<time>.sbatch -> {sub.placeholder}; job {sub.job_name}; "
                 f"runs: {runs}\n{sub.script}")
    return text


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
        name = record.job_name or None if record else None
        if done:
            return RunStatus(node.run_id, node.kind, RunState.DONE, job_id, log_path=log, job_name=name)
        holder = node.dir.holder()
        if holder is not None and (job_id is None or job_id not in queue):
            # A live process outside any job of ours holds the run's lock (a local run,
            # a job of another submission): it is running; submitting it again would be
            # a second writer.
            return RunStatus(node.run_id, node.kind, RunState.RUNNING, job_id, None,
                             f"in use by {holder} outside this sweep's jobs", log, name)
        if record is None:
            return RunStatus(node.run_id, node.kind, RunState.NOT_SUBMITTED)
        if job_id not in queue:
            return RunStatus(node.run_id, node.kind, RunState.FAILED, job_id, None,
                             "job gone from Slurm without result.json", log, name)
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
        return RunStatus(node.run_id, node.kind, state, job_id, slurm_state, reason, log, name)

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
        anything is written; rendering checks again."""
        log_dir = self._log_dir(dag)
        for node in dag:
            check_inputs(self.options, [node], self.workdir, log_dir, (), default_job_name(self.options, [node]))

    def render(self, dag: RunDAG) -> SubmissionPlan:
        """What ``submit`` would do now, in order, and nothing else: reads the job records
        and squeue, writes nothing. Dependencies on jobs of this pass are placeholders."""
        log_dir = self._log_dir(dag)
        plan = SubmissionPlan(log_dir=log_dir)
        report = plan.report
        statuses = {s.run_id: s for s in self.status(dag)}
        job_of: dict[str, str] = {}
        groups: OrderedDict[tuple, list[RunNode]] = OrderedDict()
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
                    plan.cancel.append(status.job_id)
                key = ("array", array_key(self.options, node)) if node.array_group else ("run", node.run_id)
                groups.setdefault(key, []).append(node)
                report.submitted[node.run_id] = ""  # a placeholder below, the job id once submitted
                if status.state is not RunState.NOT_SUBMITTED:
                    report.resubmitted.append(node.run_id)
        # Names of queued jobs stay theirs: a new job never shares one.
        taken = {status.job_name for run_id, status in statuses.items() if run_id in report.queued}
        # Groups appear in the order of their first member, which comes after
        # all its dependencies (and members share dependencies): every
        # dependency has its job id, or its placeholder, when a group is rendered.
        for index, runs in enumerate(groups.values(), start=1):
            deps = sorted({job_of[d] for node in runs for d in node.depends_on if d not in report.done})
            job_name = self._job_name(dag, runs, taken)
            taken.add(job_name)
            # Rendering checks every value: a refused one fails before anything is written.
            script = render_sbatch(self.options, runs, workdir=self.workdir, log_dir=log_dir, dependencies=deps,
                                   job_name=job_name, template_dir=self.template_dir)
            submission = Submission(index, list(runs), job_name, deps, script)
            plan.submissions.append(submission)
            for node, job_id in zip(runs, submission.job_ids(submission.placeholder)):
                job_of[node.run_id] = report.submitted[node.run_id] = job_id
        return plan

    def _job_name(self, dag: RunDAG, runs: list[RunNode], taken: set[str]) -> str:
        node = runs[0]
        parent_kind = None
        if node.kind in ("branch", "eval"):
            # What the weights are: a branch's stable run's kind; an eval's branch's (two hops).
            parents = [dag[d] for d in node.depends_on if d in dag]
            if node.kind == "eval":
                parents = [dag[d] for p in parents for d in p.depends_on if d in dag] if all(
                    p.kind == "branch" for p in parents) else parents
            kinds = {p.kind for p in parents}
            parent_kind = kinds.pop() if len(kinds) == 1 else None
        for chars in range(4, 41):  # a longer hash on the (rare) collision
            name = default_job_name(self.options, runs, parent_kind, hash_chars=chars)
            if name not in taken:
                return name
        raise SlurmError(f"no unique job name for runs {[n.run_id for n in runs]}")

    def dry_run(self, dag: RunDAG) -> str:
        """The scripts and the order ``submit`` would use now, as text; nothing is written."""
        self.check(dag)
        return format_dry_run(self.render(dag))

    def submit(self, dag: RunDAG) -> SubmitReport:
        if shutil.which("sbatch") is None:
            raise SlurmNotFoundError("sbatch")
        self.check(dag)  # before the first directory is made
        log_dir = self._log_dir(dag)
        log_dir.mkdir(parents=True, exist_ok=True)
        with _exclusive(log_dir / ".submit.lock"):
            return self._submit_locked(dag)

    def _submit_locked(self, dag: RunDAG) -> SubmitReport:
        # The dry run's rendering, unchanged: this only adds the sbatch calls and puts
        # each job id where its placeholder stood.
        plan = self.render(dag)
        report = plan.report
        if plan.cancel:
            self._slurm(["scancel", *plan.cancel], check=False)
        ids: dict[str, str] = {}  # placeholder -> job id
        for submission in plan.submissions:
            script = submission.script_with_ids(ids)
            for node in submission.runs:
                node.log_dir.mkdir(parents=True, exist_ok=True)
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
            script_path = plan.log_dir / f"{submission.job_name}.{stamp}.sbatch"
            write_text_atomic(script_path, script)
            out = self._slurm(["sbatch", *submission.sbatch_args, str(script_path)]).stdout.strip()
            base = out.split(";")[0].strip()
            if not base.isdigit():
                raise SlurmCommandError(["sbatch"], 0, f"unexpected sbatch output: {out!r}")
            ids[submission.placeholder] = base
            deps = [substitute_ids(d, ids) for d in submission.dependencies]
            for node, job_id in zip(submission.runs, submission.job_ids(base)):
                old = read_record(node)
                previous = (old.previous_job_ids + [old.job_id]) if old else []
                write_json_atomic(node.run_dir / JOB_RECORD, {
                    "job_id": job_id, "job_name": submission.job_name, "script": str(script_path),
                    "submitted_at": _now(), "previous_job_ids": previous,
                })
                report.submitted[node.run_id] = job_id
                self._say(f"{node.run_id}: job {job_id} ({submission.job_name})"
                          + (f" after {','.join(deps)}" if deps else ""))
        self._say(f"submitted {len(report.submitted)} runs ({len(report.resubmitted)} again after failing), "
                  f"{len(report.queued)} already queued or running, {len(report.done)} done")
        return report

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
