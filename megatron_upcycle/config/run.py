"""The run config: everything one training run needs, composed of per-component configs.

One YAML per run (``<run_dir>/config.yaml`` holds the fully resolved one).
Kinds:
  dense, moe  from scratch;
  upcycle     from a converted MoE checkpoint (``init_from``), fresh optimizer and WSD at the MoE LR;
  cpt         dense continued pretraining from a dense checkpoint (``init_from``), fresh optimizer and WSD;
  branch      resumes a stable-phase checkpoint of ``parent`` (a run directory) and runs only the decay
              to ``schedule.train_tokens``; model, data and optimizer settings come from the parent.
Schedule modes:
  full        warmup, stable, linear decay to ``train_tokens`` (the run's budget D);
  stable      warmup and stable only, saving at the decay start of every budget in ``save_budgets``
              (or ``save_budget_range``), stopping at the last; branches then decay each budget.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from megatron_upcycle.config.model import MoEConfig
from megatron_upcycle.config.optim import OptimConfig
from megatron_upcycle.data import DataConfig
from megatron_upcycle.errors import ConfigError
from megatron_upcycle.parallel import ParallelConfig
from megatron_upcycle.run_kinds import INIT_KINDS, TrainKind


@dataclass
class BudgetRange:
    """``count`` log-spaced budgets from ``min_tokens`` to ``max_tokens``."""

    min_tokens: int
    max_tokens: int
    count: int


@dataclass
class ScheduleConfig:
    mode: Literal["full", "stable"] = "full"
    train_tokens: int | None = None  # the budget D (mode full, and branches)
    decay_fraction: float = 0.1
    save_budgets: list[int] = field(default_factory=list)
    save_budget_range: BudgetRange | None = None
    # Safety checkpoints every N iterations (0: none); only the newest keep_safety are kept.
    safety_interval_iters: int = 0
    keep_safety: int = 2
    eval_interval_iters: int = 0  # 0: evaluate only at the end
    eval_tokens: int = 131072  # held-out tokens per evaluation
    log_interval_iters: int = 10

    def __post_init__(self) -> None:
        for name in ("safety_interval_iters", "keep_safety", "eval_interval_iters"):
            if getattr(self, name) < 0:
                raise ConfigError(f"schedule.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("log_interval_iters", "eval_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"schedule.{name} must be >= 1, got {getattr(self, name)}")

    def budgets(self) -> list[int]:
        from megatron_upcycle.schedule import log_spaced_budgets

        budgets = list(self.save_budgets)
        if self.save_budget_range is not None:
            r = self.save_budget_range
            budgets += log_spaced_budgets(r.min_tokens, r.max_tokens, r.count)
        return sorted(set(budgets))


@dataclass
class RunConfig:
    kind: TrainKind
    model: str | None = None  # preset name or model YAML; upcycle/cpt/branch take it from the checkpoint
    moe: MoEConfig | None = None
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    global_batch_size: int | None = None  # None: the model preset's recipe
    micro_batch_size: int = 1
    init_from: str | None = None  # upcycle: converted MoE checkpoint; cpt: dense checkpoint
    parent: str | None = None  # branch: the parent run directory
    seed: int = 1234
    tensorboard: bool = True

    # Keys that older versions accepted: the strict loader names why they went.
    REMOVED_KEYS: ClassVar[dict[str, str]] = {
        "max_restarts_on_nan": "a non-finite loss stops the run (exit 3) at the last finite checkpoint; "
                               "re-run it with a lower optim.lr",
    }

    def __post_init__(self) -> None:
        needs_init = INIT_KINDS
        if self.kind in needs_init and not self.init_from:
            raise ConfigError(f"kind '{self.kind}' needs init_from: the checkpoint to start from")
        if self.kind not in needs_init and self.init_from:
            raise ConfigError(f"init_from is only for kinds upcycle and cpt, not '{self.kind}'")
        if self.kind == "branch":
            if not self.parent:
                raise ConfigError("kind 'branch' needs parent: the stable run's directory")
            if not self.schedule.train_tokens:
                raise ConfigError("kind 'branch' needs schedule.train_tokens: the budget D it decays to")
        elif self.parent:
            raise ConfigError(f"parent is only for kind branch, not '{self.kind}'")
        if self.kind in ("dense", "moe") and not self.model:
            raise ConfigError(f"kind '{self.kind}' needs model: a preset name or model YAML")
        if self.kind == "moe" and self.moe is None:
            raise ConfigError("kind 'moe' needs a moe: section (num_experts, topk, ...)")
        if self.kind in ("dense", "cpt") and self.moe is not None:
            raise ConfigError(f"kind '{self.kind}' is dense: remove the moe: section")
        schedule = self.schedule
        if schedule.mode == "full" and (schedule.save_budgets or schedule.save_budget_range):
            raise ConfigError(
                f"schedule.save_budgets/save_budget_range {schedule.budgets()} are only used with schedule.mode "
                "stable; a full run saves no budget checkpoints: set mode: stable or remove them"
            )
        if schedule.mode == "stable" and schedule.train_tokens:
            raise ConfigError(
                f"schedule.train_tokens={schedule.train_tokens:,} is not used with schedule.mode stable (it stops at "
                f"the decay start of its largest budget, {max(schedule.budgets() or [0]):,} tokens): remove it"
            )
        if self.kind != "branch":
            if self.schedule.mode == "full" and not self.schedule.train_tokens:
                raise ConfigError("schedule.train_tokens is required for schedule.mode full")
            if self.schedule.mode == "stable" and not self.schedule.budgets():
                raise ConfigError("schedule.mode stable needs save_budgets or save_budget_range")
        if self.micro_batch_size < 1:
            raise ConfigError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
