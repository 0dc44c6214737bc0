"""Warmup-stable-decay (WSD) arithmetic: budgets in tokens -> iterations, save points, LR.

A budget D (tokens) at ``tokens_per_iter`` = global batch x sequence length is
``total_iters(D) = round(D / tokens_per_iter)`` iterations. Its decay covers the
last ``round(f * total_iters)`` of them, linearly from the peak to
``min_lr_ratio * peak``. A *stable* run that serves budgets D_1 < ... < D_n
saves at ``decay_start(D_i)`` for each i and stops after the largest; a
*branch* for D_i resumes that checkpoint (optimizer included) and runs the
decay only. Because the stable run and every branch share warmup and peak, the
LR at every step of a branch equals the LR a full, independent WSD run to D_i
would have used: one stable run + cheap decays replaces n full runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_upcycle.errors import ConfigError


@dataclass(frozen=True)
class BudgetPlan:
    """Where one token budget sits on the iteration axis."""

    budget_tokens: int
    total_iters: int
    decay_iters: int

    @property
    def decay_start_iter(self) -> int:
        return self.total_iters - self.decay_iters


def budget_plan(budget_tokens: int, tokens_per_iter: int, decay_fraction: float) -> BudgetPlan:
    if budget_tokens <= 0:
        raise ConfigError(f"token budget must be > 0, got {budget_tokens}")
    if not 0.0 < decay_fraction < 1.0:
        raise ConfigError(f"decay_fraction must be in (0, 1), got {decay_fraction}")
    total = round(budget_tokens / tokens_per_iter)
    if total < 2:
        raise ConfigError(
            f"budget of {budget_tokens:,} tokens is under two iterations of {tokens_per_iter:,} tokens"
        )
    decay = max(1, round(decay_fraction * total))
    return BudgetPlan(budget_tokens, total, decay)


def log_spaced_budgets(min_tokens: int, max_tokens: int, count: int) -> list[int]:
    """``count`` budgets spaced evenly in log(tokens) from min to max, as integers."""
    if count < 1 or min_tokens <= 0 or max_tokens < min_tokens:
        raise ConfigError(f"bad budget range: min={min_tokens} max={max_tokens} count={count}")
    if count == 1:
        return [int(max_tokens)]
    step = (math.log(max_tokens) - math.log(min_tokens)) / (count - 1)
    return [int(round(math.exp(math.log(min_tokens) + i * step))) for i in range(count)]


def wsd_lr(iteration: int, peak_lr: float, warmup_iters: int, plan: BudgetPlan, min_lr_ratio: float = 0.1) -> float:
    """The LR Megatron's OptimizerParamScheduler('WSD', linear) gives at ``iteration``.

    A reference implementation: the engine uses Megatron's scheduler, and a test
    checks the two agree step by step.
    """
    min_lr = peak_lr * min_lr_ratio
    if warmup_iters > 0 and iteration <= warmup_iters:
        return peak_lr * iteration / warmup_iters
    if iteration > plan.total_iters:
        return min_lr
    if iteration <= plan.decay_start_iter:
        return peak_lr
    ratio = (iteration - plan.decay_start_iter) / plan.decay_iters
    return min_lr + (1.0 - ratio) * (peak_lr - min_lr)


def phase_of(iteration: int, warmup_iters: int, plan: BudgetPlan) -> str:
    if iteration <= warmup_iters:
        return "warmup"
    if iteration <= plan.decay_start_iter:
        return "stable"
    return "decay"


def check_warmup(warmup_iters: int, plan: BudgetPlan) -> None:
    """The warmup must end before the decay of ``plan`` starts (and before the run ends)."""
    if warmup_iters >= plan.total_iters:
        raise ConfigError(
            f"warmup_iters={warmup_iters} is not shorter than the run ({plan.total_iters} iterations)"
        )
    if warmup_iters > plan.decay_start_iter:
        raise ConfigError(
            f"warmup_iters={warmup_iters} runs into the decay starting at iteration {plan.decay_start_iter} "
            f"({plan.budget_tokens:,} tokens at {round(plan.budget_tokens / plan.total_iters):,} "
            "tokens/iteration): lower warmup_iters or raise the budget"
        )


def stable_save_points(budgets: list[int], tokens_per_iter: int, decay_fraction: float,
                       warmup_iters: int) -> dict[int, int]:
    """Iteration -> budget (tokens) where a stable run saves for each budget's decay branch.

    Every save point must lie after the warmup (a branch decays from the peak LR) and
    no two budgets may round to the same iteration.
    """
    save_points: dict[int, int] = {}
    for budget in sorted(budgets):
        plan = budget_plan(budget, tokens_per_iter, decay_fraction)
        if plan.decay_start_iter in save_points:
            raise ConfigError(
                f"budgets {save_points[plan.decay_start_iter]:,} and {budget:,} tokens share save iteration "
                f"{plan.decay_start_iter} at {tokens_per_iter:,} tokens/iteration: space them further apart"
            )
        if plan.decay_start_iter <= warmup_iters:
            raise ConfigError(
                f"budget {budget:,} tokens would branch at iteration {plan.decay_start_iter}, inside the "
                f"{warmup_iters}-iteration warmup ({tokens_per_iter:,} tokens/iteration): raise it or shorten warmup"
            )
        save_points[plan.decay_start_iter] = budget
    return save_points


def megatron_scheduler(optimizer, peak_lr: float, warmup_iters: int, plan: BudgetPlan, min_lr_ratio: float,
                       weight_decay: float):
    """Megatron's OptimizerParamScheduler configured as this WSD plan."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    check_warmup(warmup_iters, plan)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=peak_lr,
        min_lr=peak_lr * min_lr_ratio,
        lr_warmup_steps=warmup_iters,
        lr_decay_steps=plan.total_iters,
        lr_decay_style="WSD",
        start_wd=weight_decay,
        end_wd=weight_decay,
        wd_incr_steps=plan.total_iters,
        wd_incr_style="constant",
        # Branches change lr_decay_steps relative to their parent's checkpoint:
        # the values passed here win over the ones saved in the checkpoint.
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
        wsd_decay_steps=plan.decay_iters,
        lr_wsd_decay_style="linear",
    )
