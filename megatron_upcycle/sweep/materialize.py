"""From a Plan to run directories on disk and the RunDAG executors consume."""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

from megatron_upcycle.atomic import write_json_atomic, write_text_atomic
from megatron_upcycle.config.loading import to_dict
from megatron_upcycle.errors import ConfigError
from megatron_upcycle.sweep.dag import RunDAG, RunNode
from megatron_upcycle.sweep.plan import Plan, PlannedRun

PLAN_FILE = "plan.json"


def config_text(run: PlannedRun) -> str:
    """The run's config.yaml: its RunConfig (or conversion config) without defaults."""
    return yaml.safe_dump(to_dict(run.config, skip_defaults=True), sort_keys=False)


def command_for(run: PlannedRun, config_path: Path) -> list[str]:
    if run.kind == "convert":
        return [sys.executable, "-m", "megatron_upcycle.sweep.convert_run", "--config", str(config_path)]
    if run.kind == "eval":
        return [sys.executable, "-m", "megatron_upcycle.evaluation.run", "--config", str(config_path)]
    from megatron_upcycle.resources import launcher

    return ["bash", str(launcher()), "--config", str(config_path)]


def write_run_dirs(plan: Plan) -> None:
    """Write every run's config.yaml and the plan; refuse to change a started run."""
    for run in plan.runs:
        run_dir = plan.run_dir(run)
        path = run_dir.config
        text = config_text(run)
        if path.exists() and path.read_text() != text:
            if run_dir.started():
                raise ConfigError(
                    f"run {run.run_id} already started with a different config ({path}); the experiment "
                    "changed under it: use a new output_root, or delete that run directory"
                )
        if not path.exists() or path.read_text() != text:
            write_text_atomic(path, text)
    write_json_atomic(plan.root / PLAN_FILE, {
        "experiment": plan.experiment.name,
        "runs": [
            {"run_id": r.run_id, "kind": r.kind, "model_kind": r.model_kind, "model": r.model,
             "depends_on": r.depends_on, "tokens": r.tokens, "flops": r.flops, "stage": r.stage,
             "budget_tokens": r.budget_tokens, "D1": r.D1, "D2": r.D2, "E": r.E, "k": r.k}
            for r in plan.runs
        ],
        "total_tokens": plan.total_tokens,
        "independent_tokens": plan.independent_tokens,
    })


def to_dag(plan: Plan, cpu_only: bool = False) -> RunDAG:
    """The plan's runs as RunNodes; each job's resources by model, kind and run
    (megatron_upcycle.sweep.run_resources). ``cpu_only``: one node, no GPU (local)."""
    table = plan.experiment.resource_table()
    table.check_runs(run.run_id for run in plan.runs)
    nodes = []
    for run in plan.runs:
        res = table.for_run(run.run_id, run.kind, run.resources_model)
        run_dir = plan.run_dir(run)
        gpus = 0 if cpu_only else res.gpus_per_node
        single = cpu_only or run.kind == "eval"
        if run.kind == "eval":  # one process on one GPU (when the run's nodes have any)
            gpus = min(1, gpus)
        nodes.append(RunNode(
            run_id=run.run_id,
            kind=run.kind,
            run_dir=run_dir.path,
            command=command_for(run, run_dir.config),
            depends_on=run.depends_on,
            nodes=1 if single else res.nodes,
            gpus_per_node=gpus,
            cpus_per_task=None if cpu_only else res.cpus_per_task,
            time_minutes=res.time_minutes,
            array_group=run.array_group,
        ))
    return RunDAG(nodes)
