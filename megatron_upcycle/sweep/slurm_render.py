"""Render the sbatch script for one run, or for sibling runs as one job array.

``render_sbatch(options, runs, ...)`` is a pure function (no Slurm, no files
written): the #SBATCH header comes from ``SlurmOptions`` plus the runs' own
resources, the body from the one template (slurm/run.sbatch) whose launch slot
holds ``srun ...`` for training runs and the bare command for a conversion.
Each array task picks its run by SLURM_ARRAY_TASK_ID. Every value is checked
(sweep.shell_values) before anything is rendered, and quoted when rendered.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from megatron_upcycle.config.loading import from_dict
from megatron_upcycle.errors import ConfigError
from megatron_upcycle.resources import sbatch_template_dir
from megatron_upcycle.run_kinds import SINGLE_PROCESS_KINDS
from megatron_upcycle.rundir import RESULT_FILE
from megatron_upcycle.sweep import shell_values as sv
from megatron_upcycle.sweep.dag import RunNode

TEMPLATE_DIR = sbatch_template_dir()


@dataclass
class SlurmOptions:
    """Cluster-wide sbatch settings; a resource set here overrides every run's own."""

    account: str | None = None
    partition: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time_minutes: int | None = None     # default: each run's time_minutes
    nodes: int | None = None            # default: each run's nodes
    gpus_per_node: int | None = None    # default: each run's gpus_per_node (0: no GPU request)
    cpus_per_task: int | None = None    # default: each run's cpus_per_task (None: Slurm's default)
    mem: str | None = None              # per node, as sbatch takes it: "64G", "0" (all of it)
    signal_seconds: int = 180           # SIGUSR1 this long before the time limit (Slurm may send it up to 60 s earlier)
    requeue: bool = True                # requeue when the run exits 75 after that signal
    array_throttle: int | None = None   # at most this many tasks of one array at a time (--array=...%N)
    extra_sbatch: list[str] = field(default_factory=list)  # more options, e.g. "--exclusive", "--mail-type=FAIL"
    setup: list[str] = field(default_factory=list)         # shell lines run first (module load, source, export)
    # Put in front of every job name ("<prefix>-dS-3f2a"); none by default, so that the
    # name's distinguishing part fits squeue's default 8-character NAME column.
    job_name_prefix: str | None = None

    def __post_init__(self) -> None:
        for name in ("time_minutes", "nodes", "cpus_per_task", "signal_seconds", "array_throttle"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"slurm option {name} must be >= 1, got {value}")
        if self.gpus_per_node is not None and self.gpus_per_node < 0:
            raise ConfigError(f"slurm option gpus_per_node must be >= 0, got {self.gpus_per_node}")
        self.extra_sbatch = [sv.check_sbatch_option(line, "slurm option extra_sbatch") for line in self.extra_sbatch]
        self.check()

    def check(self) -> None:
        """The values that reach the script (again at render: options are mutable)."""
        for name in ("account", "partition", "qos", "constraint", "mem"):
            value = getattr(self, name)
            if value is not None:
                sv.check_word(value, f"slurm option {name}")
        if self.job_name_prefix is not None:
            sv.check_name(self.job_name_prefix, "slurm option job_name_prefix")
        for line in self.extra_sbatch:
            sv.check_sbatch_option(line, "slurm option extra_sbatch")
        for line in self.setup:
            sv.check_shell_line(line, "slurm option setup")

    @classmethod
    def from_dict(cls, data: dict) -> "SlurmOptions":
        """Strict: an unknown option name fails and lists the valid ones."""
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in valid:
                close = difflib.get_close_matches(str(key), valid, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"unknown slurm option '{key}'{hint}; valid options: {', '.join(valid)}")
        return from_dict(cls, data, "slurm")


class _SbatchTemplate(string.Template):
    # Bash owns '$'; placeholders in the templates are written @@{name}.
    delimiter = "@@"


def format_time(minutes: int) -> str:
    """Minutes as sbatch's D-HH:MM:SS."""
    days, rest = divmod(minutes, 24 * 60)
    return f"{days}-{rest // 60:02d}:{rest % 60:02d}:00"


TEMPLATE_NAME = "run.sbatch"

# What fills the template's launch slot (followed by " &"): a training run starts once
# per node through srun; a conversion is one process on one node (no srun, no torchrun).
_LAUNCH = {
    "train": ("# srun forwards SIGUSR1 to the task on every node; --export=ALL because a job\n"
              "# submitted with --export=NONE would otherwise hide this environment from the step.\n"
              'srun --export=ALL --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 "${CMD[@]}"'),
    "convert": '"${CMD[@]}"',
}
_ABOUT = {
    "train": ("srun starts it once per node, where launch/train.sh turns it into torchrun\n"
              "# (MASTER_ADDR is the first host, NODE_RANK is SLURM_NODEID)."),
    "convert": "a conversion or an evaluation: one process on one node.",
}
# A dependency is a Slurm job id ("123", "123_4" for an array task) or, while a
# submission is rendered before sbatch has answered, the placeholder of an earlier
# submission of the same pass ("{job2}", "{job2}_4"): see sweep.slurm.
_JOB_ID = re.compile(r"([0-9]+|\{job[0-9]+\})(_[0-9]+)?")


def template_for(kind: str, template_dir: Path = TEMPLATE_DIR) -> Path:
    """The one template; ``kind`` only chooses what fills its launch slot."""
    return Path(template_dir) / TEMPLATE_NAME


def _resources(options: SlurmOptions, node: RunNode) -> tuple:
    return (
        options.nodes or node.nodes,
        node.gpus_per_node if options.gpus_per_node is None else options.gpus_per_node,
        options.cpus_per_task or node.cpus_per_task,
        options.time_minutes or node.time_minutes,
        "convert" if node.kind in SINGLE_PROCESS_KINDS else "train",
    )


def array_key(options: SlurmOptions, node: RunNode) -> tuple:
    """Runs with equal keys may share one job array."""
    return (node.array_group, tuple(sorted(node.depends_on)), _resources(options, node))


def _header(options: SlurmOptions, runs: Sequence[RunNode], job_name: str, workdir: Path, log_dir: Path,
            dependencies: Sequence[str]) -> list[str]:
    nodes, gpus, cpus, minutes, _ = _resources(options, runs[0])
    is_array = len(runs) > 1
    log_name = "%x-%A_%a.out" if is_array else "%x-%j.out"
    q = sv.sbatch_option
    opts = [
        q("--job-name", job_name),
        q("--chdir", workdir),
        q("--output", log_dir / log_name),
        "--open-mode=append",
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
    ]
    if cpus:
        opts.append(f"--cpus-per-task={cpus}")
    if gpus:
        opts.append(f"--gpus-per-node={gpus}")
    if options.mem:
        opts.append(q("--mem", options.mem))
    opts.append(f"--time={format_time(minutes)}")
    opts.append(f"--signal=B:USR1@{options.signal_seconds}")
    opts.append("--requeue" if options.requeue else "--no-requeue")
    for name in ("account", "partition", "qos", "constraint"):
        if getattr(options, name):
            opts.append(q(f"--{name}", getattr(options, name)))
    if is_array:
        throttle = f"%{options.array_throttle}" if options.array_throttle else ""
        opts.append(f"--array=0-{len(runs) - 1}{throttle}")
    if dependencies:
        opts.append(f"--dependency=afterok:{':'.join(dependencies)}")
        # A failed dependency cancels this job instead of leaving it pending forever.
        opts.append("--kill-on-invalid-dep=yes")
    opts.extend(sv.quote_sbatch_option(line) for line in options.extra_sbatch)
    return [f"#SBATCH {opt}" for opt in opts]


def _select_run(runs: Sequence[RunNode]) -> str:
    lines = ['case "${SLURM_ARRAY_TASK_ID:-0}" in']
    for index, node in enumerate(runs):
        lines.append(f"    {index}) RUN_ID={sv.quote(node.run_id)}; RUN_DIR={sv.quote(str(node.run_dir))}")
        lines.append(f"       CMD=({' '.join(sv.quote(arg) for arg in node.command)}) ;;")
    lines.append('    *) echo "no run for array task ${SLURM_ARRAY_TASK_ID}" >&2; exit 2 ;;')
    lines.append("esac")
    return "\n".join(lines)


# Job names: <model kind><stage>-<hash>, e.g. dS-3f2a. Kind first, so that squeue's
# 8-character NAME column tells a stable run (dS-...) from its branch array (dB-...)
# and a conversion (uC-...); the hash of the job's run ids keeps names unique
# (lengthened on a collision, see sweep.slurm) and equal across resubmissions.
MODEL_KIND_LETTER = {"dense": "d", "moe": "m", "upcycle": "u", "cpt": "c"}
STAGE_LETTER = {"start": "S", "branch": "B", "convert": "C", "eval": "E"}


def job_code(runs: Sequence[RunNode], parent_kind: str | None = None) -> str:
    """Two letters: what the weights are (d dense, m moe, u upcycled, c cpt; b a branch of
    an unknown parent) and the stage (S trains from its start: stable or full run,
    B decay branch(es), C conversion, E evaluation of a final model)."""
    node = runs[0]
    if node.kind == "convert":
        return "u" + STAGE_LETTER["convert"]  # it makes the upcycled model
    if node.kind in ("branch", "eval"):
        return MODEL_KIND_LETTER.get(parent_kind or "", "b") + STAGE_LETTER[node.kind]
    return MODEL_KIND_LETTER[node.kind] + STAGE_LETTER["start"]


def default_job_name(options: SlurmOptions, runs: Sequence[RunNode], parent_kind: str | None = None,
                     hash_chars: int = 4) -> str:
    """``[<prefix>-]<code>-<hash>``: ``job_code`` and the first ``hash_chars`` hex digits of
    the sha1 of the job's run ids (one run, or an array's runs in task order)."""
    digest = hashlib.sha1("\n".join(node.run_id for node in runs).encode()).hexdigest()[:hash_chars]
    name = f"{job_code(runs, parent_kind)}-{digest}"
    return f"{options.job_name_prefix}-{name}" if options.job_name_prefix else name


def check_inputs(options: SlurmOptions, runs: Sequence[RunNode], workdir, log_dir,
                 dependencies: Sequence[str], job_name: str) -> None:
    """Every value bound for the script, checked in one place before anything is rendered."""
    options.check()
    for node in runs:  # first: the default job name is made of them
        sv.check_name(node.run_id, "run id")
        if node.array_group is not None:
            sv.check_name(node.array_group, f"run '{node.run_id}': array group")
        sv.check_path(node.run_dir, f"run '{node.run_id}': run directory")
        for arg in node.command:
            sv.check_arg(arg, f"run '{node.run_id}': command argument")
    sv.check_name(job_name, "slurm job name")
    sv.check_path(workdir, "slurm working directory")
    sv.check_path(log_dir, "slurm log directory")
    for job_id in dependencies:
        if not _JOB_ID.fullmatch(str(job_id)):
            raise ConfigError(f"slurm dependency {job_id!r} is not a job id like 123 or 123_4")


def render_sbatch(
    options: SlurmOptions,
    runs: Sequence[RunNode],
    *,
    workdir: str | Path,
    log_dir: str | Path,
    dependencies: Sequence[str] = (),
    job_name: str | None = None,
    template_dir: str | Path = TEMPLATE_DIR,
) -> str:
    """The sbatch script for ``runs`` (one run, or sibling runs as an array in this order).

    ``dependencies`` are Slurm job ids ("123" or "123_4") that must succeed first.
    """
    if not runs:
        raise ValueError("render_sbatch needs at least one run")
    keys = {array_key(options, node) for node in runs}
    if len(keys) > 1:
        raise ValueError(f"runs {[n.run_id for n in runs]} differ in group, dependencies or resources: "
                         "they cannot share one job array")
    job_name = job_name or default_job_name(options, runs)
    check_inputs(options, runs, workdir, log_dir, dependencies, job_name)
    launch = "convert" if runs[0].kind in SINGLE_PROCESS_KINDS else "train"
    template = _SbatchTemplate(template_for(runs[0].kind, Path(template_dir)).read_text())
    setup = "\n".join(options.setup) if options.setup else "# (no setup lines)"
    return template.substitute(
        header="\n".join(_header(options, runs, job_name, Path(workdir), Path(log_dir), dependencies)),
        about=_ABOUT[launch],
        select_run=_select_run(runs),
        result_file=sv.quote(RESULT_FILE),
        setup=setup,
        launch=_LAUNCH[launch],
        requeue="1" if options.requeue else "0",
        signal_seconds=str(options.signal_seconds),
    )
