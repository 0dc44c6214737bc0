"""The engine's side of resolving a run: read what ``resolve_run`` needs from disk.

A branch resolves against its parent's resolved config and resumes the parent's
checkpoint for its budget; upcycle and CPT runs (and their branches) against the
metadata of the checkpoint they start from. The meaning itself is
``megatron_upcycle.resolve.resolve_run``, the function the planner uses too.
"""
from __future__ import annotations

from pathlib import Path

from megatron_upcycle.checkpoint import Manifest, read_meta
from megatron_upcycle.config.loading import from_dict, read_yaml
from megatron_upcycle.config.run import RunConfig
from megatron_upcycle.errors import ConfigError
from megatron_upcycle.resolve import ResolvedRun, resolve_run
from megatron_upcycle.run_kinds import INIT_KINDS
from megatron_upcycle.rundir import RunDir


def read_run_config(path: Path) -> RunConfig:
    return from_dict(RunConfig, read_yaml(path), where=str(path))


def _parent_config(parent: RunDir) -> RunConfig:
    if not parent.resolved_config.is_file():
        raise ConfigError(f"parent run {parent.path} has no {parent.resolved_config.name}: has it started?")
    return read_run_config(parent.resolved_config)


def _parent_checkpoint(parent: RunDir, run: ResolvedRun) -> Path:
    budget = run.plan.budget_tokens
    record = Manifest(parent.checkpoints).for_budget(budget)
    if record is None:
        served = _parent_config(parent).schedule.budgets()
        raise ConfigError(
            f"parent {parent.path} has no checkpoint for a budget of {budget:,} tokens "
            f"(it serves {', '.join(f'{b:,}' for b in served)}; finished ones are in its manifest)"
        )
    if record.iteration != run.start_iter:
        raise ConfigError(
            f"parent {parent.path} saved the {budget:,}-token budget at iteration {record.iteration}, but this "
            f"branch decays from iteration {run.start_iter}: the parent's schedule differs from its config"
        )
    return parent.checkpoints / record.name


def load_run(cfg: RunConfig) -> tuple[ResolvedRun, Path | None]:
    """(the resolved run, the parent checkpoint a branch resumes or None)."""
    parent = _parent_config(RunDir(cfg.parent)) if cfg.kind == "branch" else None
    base = parent or cfg
    init = read_meta(base.init_from) if base.kind in INIT_KINDS else None
    run = resolve_run(cfg, parent, init)
    if cfg.kind != "branch":
        return run, None
    return run, _parent_checkpoint(RunDir(cfg.parent), run)
