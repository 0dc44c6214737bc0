"""The planner: an Experiment -> a DAG of runs, each with its resolved run config.

For every dense model and seed:
  dense stable run  (saves at the decay start of every D1)
    -> dense branch per D1 (the decayed dense model; also the dense-from-scratch baseline)
       -> conversion per (D1, E, k)
          -> upcycled MoE stable run per (D1, E, k) (saves at every D2)
             -> upcycled branch per D2
       -> dense CPT stable run per D1 at matched FLOPs (D_cpt = D2 N2 / N1) -> CPT branches
  MoE-from-scratch stable run per (E, k) over the D1 and D2 budgets -> branches
Tokens and FLOPs (6 N D, N = active non-embedding parameters) are counted per run.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from megatron_upcycle.config.loading import to_dict
from megatron_upcycle.config.model import MoEConfig
from megatron_upcycle.config.presets import load_model_config
from megatron_upcycle.errors import ConfigError
from megatron_upcycle.schedule import budget_plan
from megatron_upcycle.sweep.convert_run import CHECKPOINT_DIR
from megatron_upcycle.sweep.experiment import Experiment, MoEChoice


def _merge_close(sorted_values: list[int], rel: float) -> list[int]:
    kept: list[int] = []
    for value in sorted_values:
        if not kept or value > kept[-1] * (1 + rel):
            kept.append(value)
    return kept


def fmt_tokens(tokens: int) -> str:
    """Compact, filesystem-safe token count: 1048576 -> 1.05M."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if tokens >= scale:
            return f"{tokens / scale:.3g}{unit}"
    return str(tokens)


@dataclass
class PlannedRun:
    run_id: str
    kind: str  # dense, moe, upcycle, branch, cpt, convert
    model_kind: str  # what the weights are: dense, moe, upcycle, cpt (convert: upcycle)
    model: str
    config: dict  # the run's config.yaml (RunConfig, or converter options for convert)
    depends_on: list[str]
    tokens: int  # tokens this run trains on
    active_params: int  # N in 6 N D
    stage: str  # "stable", "branch" or "convert"
    budget_tokens: int | None = None  # the budget a branch emulates
    D1: int | None = None
    D2: int | None = None
    E: int | None = None
    k: int | None = None
    array_group: str | None = None
    resources_model: str = ""

    @property
    def flops(self) -> int:
        return 6 * self.active_params * self.tokens


@dataclass
class Plan:
    experiment: Experiment
    root: Path
    runs: list[PlannedRun] = field(default_factory=list)
    independent_tokens: int = 0
    independent_flops: int = 0

    def by_id(self) -> dict[str, PlannedRun]:
        return {r.run_id: r for r in self.runs}

    def run_dir(self, run: PlannedRun) -> Path:
        return self.root / "runs" / run.run_id

    @property
    def total_tokens(self) -> int:
        return sum(r.tokens for r in self.runs)

    @property
    def total_flops(self) -> int:
        return sum(r.flops for r in self.runs)

    def gpu_hours(self, flops: int) -> float:
        return flops / (self.experiment.gpu_tflops * 1e12) / 3600


@lru_cache(maxsize=None)
def _counts(model_name: str, moe_json: str | None) -> dict:
    """Exact counts from the Megatron model on the meta device (one lone process group)."""
    from megatron_upcycle.backend import select_backend
    from megatron_upcycle.config.loading import from_dict
    from megatron_upcycle.counts import counts_report
    from megatron_upcycle.logging_setup import quiet_megatron
    from megatron_upcycle.parallel import ParallelConfig, init_distributed

    quiet_megatron()
    backend = select_backend(force_cpu=True)
    init_distributed(backend, ParallelConfig(), seed=0)
    moe = from_dict(MoEConfig, json.loads(moe_json)) if moe_json else None
    return counts_report(load_model_config(model_name), moe, backend)


def _counts_for(model: str, moe: MoEConfig | None) -> dict:
    return _counts(model, json.dumps(to_dict(moe), sort_keys=True) if moe else None)


def _moe_config(choice: MoEChoice, aux: float = 1e-3) -> MoEConfig:
    return MoEConfig(num_experts=choice.experts, topk=choice.topk, granularity=choice.granularity,
                     layers=choice.layers, shared_expert=choice.shared_expert, aux_loss_coeff=aux)


class Planner:
    def __init__(self, experiment: Experiment, root: Path) -> None:
        self.exp = experiment
        self.plan = Plan(experiment, root)

    # -- helpers ----------------------------------------------------------------

    def _tokens_per_iter(self, model: str) -> int:
        cfg = load_model_config(model)
        gbs = self.exp.training.global_batch_size or cfg.recipe.global_batch_size
        return gbs * cfg.seq_length

    def _base_config(self, kind: str, model: str, seed: int, moe: MoEConfig | None) -> dict:
        exp, res = self.exp, self.exp.resources_for(model)
        training = exp.training
        is_moe = kind in ("moe", "upcycle")
        lr = training.lr_moe if is_moe else training.lr_dense
        config = {
            "kind": kind,
            "data": to_dict(exp.data),
            "parallel": {
                "tensor_parallel": res.tensor_parallel,
                "expert_parallel": res.expert_parallel if is_moe else 1,
                "sequence_parallel": res.sequence_parallel,
            },
            "optim": {"lr": lr, "warmup_iters": training.warmup_iters},
            "global_batch_size": training.global_batch_size,
            "micro_batch_size": res.micro_batch_size,
            "seed": seed,
        }
        if kind in ("dense", "moe"):
            config["model"] = model
        if kind == "moe":
            config["moe"] = to_dict(moe)
        return config

    def _schedule(self, mode: str, budgets: list[int] | None = None, train_tokens: int | None = None) -> dict:
        training = self.exp.training
        schedule = {
            "mode": mode,
            "decay_fraction": self.exp.decay_fraction,
            "eval_tokens": training.eval_tokens,
            "log_interval_iters": training.log_interval_iters,
            "safety_interval_iters": training.safety_interval_iters,
        }
        if budgets is not None:
            schedule["save_budgets"] = budgets
        if train_tokens is not None:
            schedule["train_tokens"] = train_tokens
        return schedule

    def _check_budgets(self, model: str, budgets: list[int], what: str) -> None:
        """Fail at planning time, not hours into a cluster job."""
        tpi = self._tokens_per_iter(model)
        cfg = load_model_config(model)
        warmup = self.exp.training.warmup_iters
        warmup = cfg.recipe.warmup_iters if warmup is None else warmup
        starts = {}
        for budget in budgets:
            plan = budget_plan(budget, tpi, self.exp.decay_fraction)
            if plan.decay_start_iter <= warmup:
                raise ConfigError(
                    f"{what}: budget {budget:,} tokens decays from iteration {plan.decay_start_iter}, inside the "
                    f"{warmup}-iteration warmup of {model} ({tpi:,} tokens/iteration)"
                )
            if plan.decay_start_iter in starts:
                raise ConfigError(
                    f"{what}: budgets {starts[plan.decay_start_iter]:,} and {budget:,} tokens round to the same "
                    f"save iteration at {tpi:,} tokens/iteration"
                )
            starts[plan.decay_start_iter] = budget

    def _add_stable_and_branches(
        self, prefix: str, kind: str, model: str, seed: int, budgets: list[int], active: int,
        base: dict, depends_on: list[str], moe: MoEConfig | None = None, d1: int | None = None,
        d2_is_budget: bool = False,
    ) -> dict[int, PlannedRun]:
        """A stable run serving ``budgets`` and one decay branch per budget."""
        self._check_budgets(model, budgets, prefix)
        tpi = self._tokens_per_iter(model)
        stable_id = f"{prefix}-stable"
        last = budget_plan(budgets[-1], tpi, self.exp.decay_fraction)
        stable_cfg = dict(base, schedule=self._schedule("stable", budgets=budgets))
        E, k = (moe.num_experts, moe.topk) if moe else (None, None)
        self.plan.runs.append(PlannedRun(
            run_id=stable_id, kind=kind, model_kind=kind, model=model, config=stable_cfg,
            depends_on=list(depends_on), tokens=last.decay_start_iter * tpi, active_params=active,
            stage="stable", D1=d1, E=E, k=k, resources_model=model,
        ))
        branches = {}
        for budget in budgets:
            plan = budget_plan(budget, tpi, self.exp.decay_fraction)
            run_id = f"{prefix}-{'d2' if d2_is_budget else 'd'}_{fmt_tokens(budget)}"
            config = {
                "kind": "branch",
                "parent": str(self.plan.root / "runs" / stable_id),
                "schedule": {"train_tokens": budget, "eval_tokens": self.exp.training.eval_tokens,
                             "log_interval_iters": self.exp.training.log_interval_iters},
            }
            run = PlannedRun(
                run_id=run_id, kind="branch", model_kind=kind, model=model, config=config,
                depends_on=[stable_id], tokens=plan.decay_iters * tpi, active_params=active, stage="branch",
                budget_tokens=budget, D1=d1 if d2_is_budget else budget, D2=budget if d2_is_budget else None,
                E=E, k=k, array_group=f"{stable_id}-branches", resources_model=model,
            )
            self.plan.runs.append(run)
            branches[budget] = run
        return branches

    # -- the plan ---------------------------------------------------------------

    def build(self) -> Plan:
        exp = self.exp
        d1s, d2s = exp.d1.values(), exp.d2.values()
        for model in exp.dense_models:
            name = load_model_config(model).name  # unknown names fail here, with the list of presets
            dense_counts = _counts_for(model, None)
            n1 = dense_counts["N1"]
            for seed in exp.seeds:
                tag = name if len(exp.seeds) == 1 else f"{name}-s{seed}"
                dense_branches = self._add_stable_and_branches(
                    f"dense-{tag}", "dense", model, seed, d1s, n1, self._base_config("dense", model, seed, None), [],
                )
                cpt_budgets: dict[int, set[int]] = {d1: set() for d1 in d1s}
                for choice in exp.moe:
                    moe = _moe_config(choice)
                    counts = _counts_for(model, moe)
                    n2 = counts["N2"]
                    ek = f"e{moe.num_experts}k{moe.topk}" + (f"g{moe.granularity}" if moe.granularity > 1 else "")
                    for d1 in d1s:
                        source = self._dense_source(model, dense_branches[d1], d1)
                        convert = self._add_convert(f"convert-{tag}-d1_{fmt_tokens(d1)}-{ek}", model, moe, source,
                                                    d1, n2)
                        base = self._base_config("upcycle", model, seed, moe)
                        base["init_from"] = str(self.plan.run_dir(convert) / CHECKPOINT_DIR)
                        self._add_stable_and_branches(
                            f"upcycle-{tag}-d1_{fmt_tokens(d1)}-{ek}", "upcycle", model, seed, d2s, n2, base,
                            [convert.run_id], moe=moe, d1=d1, d2_is_budget=True,
                        )
                        tpi = self._tokens_per_iter(model)
                        for d2 in d2s:  # matched FLOPs: 6 N1 D_cpt = 6 N2 D2, rounded to whole iterations
                            cpt_budgets[d1].add(max(2, round(d2 * n2 / n1 / tpi)) * tpi)
                    scratch_budgets = sorted(set(d1s) | set(d2s) | set(exp.baselines.moe_scratch_extra.values()))
                    if exp.baselines.moe_scratch:
                        self._add_stable_and_branches(
                            f"moe-{tag}-{ek}", "moe", model, seed, scratch_budgets, n2,
                            self._base_config("moe", model, seed, moe), [], moe=moe,
                        )
                    self.plan.independent_tokens += len(d1s) * sum(d2s)
                    self.plan.independent_flops += len(d1s) * 6 * n2 * sum(d2s)
                    if exp.baselines.moe_scratch:
                        self.plan.independent_tokens += sum(scratch_budgets)
                        self.plan.independent_flops += 6 * n2 * sum(scratch_budgets)
                self.plan.independent_tokens += sum(d1s)
                self.plan.independent_flops += 6 * n1 * sum(d1s)
                if exp.baselines.cpt and exp.moe:
                    for d1 in d1s:
                        # (E, k) choices whose N2 differ only by router parameters give
                        # matched-FLOPs budgets within 0.1%: one CPT run serves them all.
                        budgets = _merge_close(sorted(cpt_budgets[d1]), rel=0.005)
                        depends, dense_ckpt = self._dense_source(model, dense_branches[d1], d1)
                        base = dict(self._base_config("cpt", model, seed, None), init_from=dense_ckpt)
                        self._add_stable_and_branches(
                            f"cpt-{tag}-d1_{fmt_tokens(d1)}", "cpt", model, seed, budgets, n1, base,
                            [depends], d1=d1, d2_is_budget=True,
                        )
                        self.plan.independent_tokens += sum(budgets)
                        self.plan.independent_flops += 6 * n1 * sum(budgets)
        ids = [r.run_id for r in self.plan.runs]
        duplicates = {i for i in ids if ids.count(i) > 1}
        if duplicates:
            raise ConfigError(f"experiment produces duplicate run ids {sorted(duplicates)}: budgets too close")
        return self.plan

    def _dense_source(self, model: str, branch: PlannedRun, d1: int) -> tuple[str, str]:
        """(run id to depend on, checkpoint path) of the dense model upcycled at D1."""
        tpi = self._tokens_per_iter(model)
        plan = budget_plan(d1, tpi, self.exp.decay_fraction)
        if self.exp.upcycle_from == "decayed":
            path = self.plan.run_dir(branch) / "checkpoints" / f"iter_{plan.total_iters:07d}"
            return branch.run_id, str(path)
        stable_id = branch.depends_on[0]
        path = self.plan.root / "runs" / stable_id / "checkpoints" / f"iter_{plan.decay_start_iter:07d}"
        return stable_id, str(path)

    def _add_convert(self, run_id: str, model: str, moe: MoEConfig, source: tuple[str, str], d1: int,
                     n2: int) -> PlannedRun:
        depends, dense_ckpt = source
        config = {"dense": dense_ckpt, "moe": to_dict(moe), "options": to_dict(self.exp.converter_options())}
        run = PlannedRun(run_id=run_id, kind="convert", model_kind="upcycle", model=model, config=config,
                         depends_on=[depends], tokens=0, active_params=n2, stage="convert", D1=d1,
                         E=moe.num_experts, k=moe.topk, resources_model=model)
        self.plan.runs.append(run)
        return run


def build_plan(experiment: Experiment, root: str | Path) -> Plan:
    return Planner(experiment, Path(root).resolve()).build()


def format_plan(plan: Plan) -> str:
    """The DAG as text: one line per run, then totals; the last line is the saving."""
    lines = [f"experiment {plan.experiment.name}: {len(plan.runs)} runs under {plan.root}"]
    header = f"{'run':<48} {'kind':<8} {'depends on':<40} {'tokens':>12} {'FLOPs':>10}"
    lines += [header, "-" * len(header)]
    for run in plan.runs:
        deps = ",".join(run.depends_on) or "-"
        if len(deps) > 40:
            deps = deps[:37] + "..."
        lines.append(f"{run.run_id:<48} {run.kind:<8} {deps:<40} {run.tokens:>12,} {run.flops:>10.3g}")
    lines.append("-" * len(header))
    lines.append(f"planned:     {plan.total_tokens:,} tokens, {plan.total_flops:.4g} FLOPs, "
                 f"{plan.gpu_hours(plan.total_flops):,.1f} GPU-hours at {plan.experiment.gpu_tflops:g} TFLOP/s")
    lines.append(f"independent: {plan.independent_tokens:,} tokens, {plan.independent_flops:.4g} FLOPs, "
                 f"{plan.gpu_hours(plan.independent_flops):,.1f} GPU-hours (every budget a full run)")
    ratio = plan.independent_tokens / max(plan.total_tokens, 1)
    lines.append(f"tokens_saving_vs_independent: {ratio:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - debugging aid
    from megatron_upcycle.sweep.experiment import load_experiment

    print(format_plan(build_plan(load_experiment(sys.argv[1]), sys.argv[2])))
