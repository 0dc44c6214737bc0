"""What a run config means: one pure function shared by the planner and the engine.

``resolve_run(cfg, parent, init)`` turns a ``RunConfig`` (plus, for a branch, its
parent's config, and for upcycle/CPT runs the metadata of the checkpoint it starts
from) into everything the training loop needs and everything the planner counts:
the model, the batch, the peak LR, the WSD plan, where the run starts and stops,
and where a stable run saves. It reads nothing from disk except model presets (the
engine reads the parent config and checkpoint metadata; the planner passes the ones
it plans), so what ``upcycle sweep plan`` prints is what the engine runs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_upcycle.checkpoint.meta import CheckpointMeta
from megatron_upcycle.config.model import ModelConfig, MoEConfig
from megatron_upcycle.config.presets import load_model_config
from megatron_upcycle.config.run import RunConfig
from megatron_upcycle.errors import ConfigError
from megatron_upcycle.run_kinds import INIT_KINDS, MOE_MODEL_KINDS
from megatron_upcycle.schedule import BudgetPlan, budget_plan, check_warmup, stable_save_points


@dataclass(frozen=True)
class ResolvedRun:
    cfg: RunConfig  # what runs; for a branch: the parent's config with this branch's schedule
    kind: str  # as requested (a branch stays "branch")
    model_kind: str  # what the weights are: dense, moe, upcycle or cpt
    model: ModelConfig
    moe: MoEConfig | None
    global_batch_size: int
    peak_lr: float
    warmup_iters: int
    plan: BudgetPlan  # the schedule's budget (full runs, branches) or the largest budget (stable runs)
    start_iter: int  # 0, or for a branch the parent's save iteration it resumes
    stop_iter: int
    save_points: dict[int, int]  # iteration -> budget tokens (stable runs)
    init_meta: CheckpointMeta | None  # what upcycle/CPT runs start from

    @property
    def tokens_per_iter(self) -> int:
        return self.global_batch_size * self.model.seq_length

    @property
    def train_tokens(self) -> int:
        """Tokens this run itself trains on (a branch: its decay only)."""
        return (self.stop_iter - self.start_iter) * self.tokens_per_iter


def branch_config(cfg: RunConfig, parent: RunConfig) -> RunConfig:
    """The config a branch runs: its parent's, with a full schedule to the branch's budget."""
    if parent.kind == "branch":
        raise ConfigError(f"parent {cfg.parent} is itself a branch: branch from a stable run")
    if parent.schedule.mode != "stable":
        raise ConfigError(f"parent {cfg.parent} is not a stable run (schedule.mode={parent.schedule.mode})")
    schedule = dataclasses.replace(
        parent.schedule,
        mode="full",
        train_tokens=cfg.schedule.train_tokens,
        save_budgets=[],
        save_budget_range=None,
        eval_interval_iters=cfg.schedule.eval_interval_iters or parent.schedule.eval_interval_iters,
        eval_tokens=cfg.schedule.eval_tokens,
        log_interval_iters=cfg.schedule.log_interval_iters,
    )
    return dataclasses.replace(parent, schedule=schedule)


def _architecture(cfg: RunConfig, init: CheckpointMeta | None) -> tuple[ModelConfig, MoEConfig | None]:
    if cfg.kind not in INIT_KINDS:
        return load_model_config(cfg.model), cfg.moe
    if init is None:
        raise ConfigError(f"kind '{cfg.kind}' resolves against the metadata of init_from {cfg.init_from}")
    if cfg.kind == "upcycle" and init.moe is None:
        raise ConfigError(f"init_from {cfg.init_from} is a dense checkpoint: upcycle needs a converted MoE one")
    if cfg.kind == "cpt" and init.moe is not None:
        raise ConfigError(f"init_from {cfg.init_from} is an MoE checkpoint: cpt continues a dense one")
    if cfg.moe is not None and cfg.moe != init.moe:
        raise ConfigError(f"moe: section {cfg.moe} differs from the checkpoint's {init.moe}; remove it")
    return init.model, init.moe


def resolve_run(cfg: RunConfig, parent: RunConfig | None = None, init: CheckpointMeta | None = None) -> ResolvedRun:
    """Resolve ``cfg``; ``parent`` is a branch's parent config, ``init`` an upcycle/CPT run's start."""
    if cfg.kind == "branch":
        if parent is None:
            raise ConfigError(f"branch resolves against its parent's config ({cfg.parent})")
        base = branch_config(cfg, parent)
    else:
        base = cfg
    model_kind = base.kind
    model, moe = _architecture(base, init)

    recipe = model.recipe
    gbs = base.global_batch_size or recipe.global_batch_size
    peak_lr = base.optim.lr or (recipe.lr_moe if model_kind in MOE_MODEL_KINDS else recipe.lr_dense)
    warmup = base.optim.warmup_iters if base.optim.warmup_iters is not None else recipe.warmup_iters
    tpi = gbs * model.seq_length
    schedule = base.schedule
    save_points: dict[int, int] = {}
    if schedule.mode == "stable":
        budgets = schedule.budgets()
        save_points = stable_save_points(budgets, tpi, schedule.decay_fraction, warmup)
        plan = budget_plan(budgets[-1], tpi, schedule.decay_fraction)
        stop_iter = plan.decay_start_iter
    else:
        plan = budget_plan(schedule.train_tokens, tpi, schedule.decay_fraction)
        stop_iter = plan.total_iters
    check_warmup(warmup, plan)
    return ResolvedRun(
        cfg=base,
        kind=cfg.kind,
        model_kind=model_kind,
        model=model,
        moe=moe,
        global_batch_size=gbs,
        peak_lr=peak_lr,
        warmup_iters=warmup,
        plan=plan,
        start_iter=plan.decay_start_iter if cfg.kind == "branch" else 0,
        stop_iter=stop_iter,
        save_points=save_points,
        init_meta=init,
    )
