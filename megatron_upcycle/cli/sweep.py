"""``upcycle sweep plan|run|status|collect|report EXPERIMENT.yaml``."""
from __future__ import annotations

import sys
from pathlib import Path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("sweep", help="plan, run, watch and collect a study (a DAG of runs)")
    sub = parser.add_subparsers(dest="sweep_command", metavar="ACTION")
    sub.required = True
    for name, help_text, func in [
        ("plan", "print the DAG, tokens, FLOPs, GPU-hours and the saving", run_plan),
        ("run", "run what is missing (local or slurm)", run_run),
        ("status", "per-run state from the run directories (and squeue: job id and name per run)", run_status),
        ("collect", "write results.csv from finished runs", run_collect),
        ("report", "REPORT.md + figures from the plan and results.csv (laws, D*, advice, noise)", run_report),
    ]:
        action = sub.add_parser(name, help=help_text)
        action.add_argument("experiment", help="experiment YAML (yaml/experiments/*.yaml)")
        action.add_argument("--root", default=None, help="output root (default: the experiment's output_root "
                                                         "or runs_<name> in the current directory)")
        if name in ("run", "status"):
            action.add_argument("--executor", choices=["local", "slurm"], default="local")
        if name == "run":
            action.add_argument("--max-parallel", type=int, default=None,
                                help="local: concurrent runs (default: number of cores)")
            action.add_argument("--dry-run", action="store_true",
                                help="slurm: print the scripts a submission would make now, in order; "
                                     "submit and write nothing")
        if name == "report":
            action.add_argument("--out", default=None, help="report directory (default: ROOT/report)")
            action.add_argument("--results", default=None,
                                help="results.csv (default: ROOT/results.csv, collected from the runs first)")
        action.set_defaults(run=func)


def _plan(args):
    from megatron_upcycle.sweep.experiment import load_experiment
    from megatron_upcycle.sweep.plan import build_plan

    experiment = load_experiment(args.experiment)
    root = Path(args.root or experiment.output_root or f"runs_{experiment.name}")
    plan = build_plan(experiment, root)
    experiment.resource_table().check_runs(run.run_id for run in plan.runs)  # a by_run glob matching nothing
    return plan


def run_plan(args) -> int:
    from megatron_upcycle.sweep.plan import format_plan

    print(format_plan(_plan(args)))
    return 0


def run_run(args) -> int:
    from megatron_upcycle.sweep.materialize import to_dag, write_run_dirs

    plan = _plan(args)
    if args.executor == "local":
        dag = to_dag(plan, cpu_only=True)
        write_run_dirs(plan)
        report = local_executor(args.max_parallel).run(dag)
        for run_id, holder in report.elsewhere.items():
            print(f"upcycle: {run_id} is running in another process ({holder}); re-run the sweep when it has "
                  "finished", file=sys.stderr)
        return 0 if report.ok else 1
    executor = _slurm_executor(plan)
    dag = to_dag(plan)
    # Every value bound for a script is checked before plan.json or a run directory is written.
    executor.check(dag)
    if args.dry_run:
        # The real submission's own rendering (arrays, dependencies with placeholder ids,
        # job names, order); it writes nothing: no run directory, plan.json or log.
        print(executor.dry_run(dag), end="")
        return 0
    write_run_dirs(plan)
    report = executor.submit(dag)
    print(f"submitted {len(report.submitted)} runs ({len(report.resubmitted)} after a failure), "
          f"{len(report.queued)} already queued or running, {len(report.done)} done")
    for run_id, job_id in report.submitted.items():
        print(f"  {run_id}: job {job_id}")
    return 0


def local_executor(max_parallel: int | None = None, **kwargs):
    """A LocalExecutor whose runs split the cores between them: unbounded OpenMP
    threads in concurrent runs oversubscribe the machine and slow every run."""
    import os

    from megatron_upcycle.sweep.local import LocalExecutor

    parallel = max_parallel or os.cpu_count() or 1
    threads = str(max(1, (os.cpu_count() or 1) // parallel))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    return LocalExecutor(max_parallel=parallel, workdir=Path.cwd(), env=env, **kwargs)


def _slurm_executor(plan):
    from megatron_upcycle.sweep.slurm import SlurmExecutor

    return SlurmExecutor(plan.experiment.slurm_options(), workdir=Path.cwd(), log_dir=plan.root / "slurm")


def run_status(args) -> int:
    from megatron_upcycle.sweep.materialize import to_dag
    from megatron_upcycle.sweep.status import format_status_table

    plan = _plan(args)
    dag = to_dag(plan, cpu_only=args.executor == "local")
    if args.executor == "local":
        statuses = local_executor(progress=None).status(dag)
    else:
        statuses = _slurm_executor(plan).status(dag)
    print(format_status_table(statuses))
    return 0


def run_collect(args) -> int:
    from megatron_upcycle.sweep.collect import write_results_csv

    plan = _plan(args)
    path, count = write_results_csv(plan.root)
    print(f"wrote {count} rows to {path}")
    return 0


def run_report(args) -> int:
    from megatron_upcycle.errors import UserError
    from megatron_upcycle.sweep.collect import write_results_csv
    from megatron_upcycle.sweep.report import write_report

    plan = _plan(args)
    if args.results:
        results = Path(args.results)
        if not results.is_file():
            raise UserError(f"results table {results} does not exist")
    else:
        if not (plan.root / "runs").is_dir():
            raise UserError(f"no runs under {plan.root}: run the sweep first (or pass --root / --results)")
        results, _ = write_results_csv(plan.root)
    path = write_report(plan, results, Path(args.out) if args.out else plan.root / "report")
    print(f"report: {path}")
    return 0
