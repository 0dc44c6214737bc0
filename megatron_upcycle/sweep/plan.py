"""The planner: an Experiment -> a DAG of runs, each with its resolved run config.

For every dense model and seed:
  dense stable run  (saves at the decay start of every D1)
    -> dense branch per D1 (the decayed dense model; also the dense-from-scratch baseline)
       -> conversion per (D1, E, k)
          -> upcycled MoE stable run per (D1, E, k) (saves at every D2)
             -> upcycled branch per D2
       -> dense CPT stable run per D1 at matched FLOPs (D_cpt = D2 N2 / N1) -> CPT branches
  MoE-from-scratch stable run per (E, k) over the D1 and D2 budgets -> branches
With ``seeds.extra``: a noise probe per extra seed (the first model's dense run to one D1
and one upcycled point), each branch recording the first seed's run it repeats.
With ``eval:``: an eval run after every branch (every final model, noise probe included).
Tokens and FLOPs (6 N D, N = active non-embedding parameters) are counted per run.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from megatron_upcycle.checkpoint.meta import CheckpointMeta
from megatron_upcycle.config.model import MoEConfig
from megatron_upcycle.config.optim import OptimConfig
from megatron_upcycle.config.presets import load_model_config
from megatron_upcycle.config.run import RunConfig, ScheduleConfig
from megatron_upcycle.errors import ConfigError
from megatron_upcycle.evaluation.run import EvalRunConfig
from megatron_upcycle.parallel import ParallelConfig
from megatron_upcycle.resolve import ResolvedRun, resolve_run
from megatron_upcycle.run_kinds import MOE_MODEL_KINDS, ModelKind, Stage
from megatron_upcycle.rundir import RunDir
from megatron_upcycle.sweep.experiment import Experiment, MoEChoice
from megatron_upcycle.upcycle.options import ConvertRunConfig


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
    kind: str  # a run kind (megatron_upcycle.run_kinds.RUN_KINDS)
    model_kind: ModelKind  # what the weights are (convert: upcycle)
    model: str
    config: RunConfig | ConvertRunConfig | EvalRunConfig  # written as the run's config.yaml
    depends_on: list[str]
    tokens: int  # tokens this run trains on
    active_params: int  # N in 6 N D
    stage: Stage
    budget_tokens: int | None = None  # the budget a branch emulates
    D1: int | None = None
    D2: int | None = None
    E: int | None = None
    k: int | None = None
    array_group: str | None = None
    resources_model: str = ""
    resolved: ResolvedRun | None = None  # what the engine will run (None for conversions)
    seed: int | None = None
    repeat_of: str | None = None  # noise probe: the first seed's run this one repeats with another seed

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

    def run_dir(self, run: PlannedRun | str) -> RunDir:
        return RunDir(self.root / "runs" / (run if isinstance(run, str) else run.run_id))

    @property
    def total_tokens(self) -> int:
        return sum(r.tokens for r in self.runs)

    @property
    def total_flops(self) -> int:
        return sum(r.flops for r in self.runs)

    def gpu_hours(self, flops: int) -> float:
        return flops / (self.experiment.gpu_tflops * 1e12) / 3600


def _counts(model_name: str, moe: MoEConfig | None, cache: dict) -> dict:
    """Exact counts from the Megatron model on the meta device (needs process groups)."""
    from megatron_upcycle.backend import select_backend
    from megatron_upcycle.counts import counts_report

    key = (model_name, repr(moe))
    if key not in cache:
        cache[key] = counts_report(load_model_config(model_name), moe, select_backend(force_cpu=True))
    return cache[key]


def _moe_config(choice: MoEChoice, aux: float = 1e-3) -> MoEConfig:
    return MoEConfig(num_experts=choice.experts, topk=choice.topk, granularity=choice.granularity,
                     layers=choice.layers, shared_expert=choice.shared_expert, aux_loss_coeff=aux)


class Planner:
    def __init__(self, experiment: Experiment, root: Path) -> None:
        self.exp = experiment
        self.plan = Plan(experiment, root)
        self._count_cache: dict = {}

    # -- helpers ----------------------------------------------------------------

    def _counts_for(self, model: str, moe: MoEConfig | None) -> dict:
        return _counts(model, moe, self._count_cache)

    def _run_config(self, kind: str, model: str, seed: int, schedule: ScheduleConfig,
                    moe: MoEConfig | None = None, init_from: str | None = None) -> RunConfig:
        """The RunConfig of one stable run (what its config.yaml says)."""
        exp, res, training = self.exp, self.exp.resources_for(model), self.exp.training
        is_moe = kind in MOE_MODEL_KINDS
        return RunConfig(
            kind=kind,
            model=model if kind in ("dense", "moe") else None,
            moe=moe if kind == "moe" else None,
            data=exp.data,
            parallel=ParallelConfig(
                tensor_parallel=res.tensor_parallel,
                expert_parallel=res.expert_parallel if is_moe else 1,
                sequence_parallel=res.sequence_parallel,
            ),
            optim=OptimConfig(lr=training.lr_moe if is_moe else training.lr_dense,
                              warmup_iters=training.warmup_iters),
            schedule=schedule,
            global_batch_size=training.global_batch_size,
            micro_batch_size=res.micro_batch_size,
            init_from=init_from,
            seed=seed,
        )

    def _stable_schedule(self, budgets: list[int]) -> ScheduleConfig:
        training = self.exp.training
        return ScheduleConfig(mode="stable", decay_fraction=self.exp.decay_fraction, save_budgets=list(budgets),
                              eval_tokens=training.eval_tokens, log_interval_iters=training.log_interval_iters,
                              safety_interval_iters=training.safety_interval_iters)

    def _branch_config(self, parent_id: str, budget: int) -> RunConfig:
        training = self.exp.training
        return RunConfig(kind="branch", parent=str(self.plan.run_dir(parent_id).path),
                         schedule=ScheduleConfig(train_tokens=budget, eval_tokens=training.eval_tokens,
                                                 log_interval_iters=training.log_interval_iters))

    @staticmethod
    def _resolve(run_id: str, cfg: RunConfig, parent: RunConfig | None = None,
                 init: CheckpointMeta | None = None) -> ResolvedRun:
        """The engine's own resolution; a mistake fails at planning time, not hours into a job."""
        try:
            return resolve_run(cfg, parent, init)
        except ConfigError as exc:
            raise ConfigError(f"{run_id}: {exc}") from None

    def _add_stable_and_branches(
        self, prefix: str, cfg: RunConfig, model: str, active: int, depends_on: list[str],
        init: CheckpointMeta | None = None, moe: MoEConfig | None = None, d1: int | None = None,
        d2_is_budget: bool = False, repeat_prefix: str | None = None,
    ) -> dict[int, PlannedRun]:
        """A stable run serving ``cfg``'s budgets and one decay branch per budget."""
        stable_id = f"{prefix}-stable"
        resolved = self._resolve(stable_id, cfg, init=init)
        E, k = (moe.num_experts, moe.topk) if moe else (None, None)
        self.plan.runs.append(PlannedRun(
            run_id=stable_id, kind=cfg.kind, model_kind=cfg.kind, model=model, config=cfg,
            depends_on=list(depends_on), tokens=resolved.train_tokens, active_params=active,
            stage="stable", D1=d1, E=E, k=k, resources_model=model, resolved=resolved, seed=cfg.seed,
        ))
        branches = {}
        for budget in cfg.schedule.budgets():
            suffix = f"{'d2' if d2_is_budget else 'd'}_{fmt_tokens(budget)}"
            run_id = f"{prefix}-{suffix}"
            branch_cfg = self._branch_config(stable_id, budget)
            branch = self._resolve(run_id, branch_cfg, parent=cfg, init=init)
            run = PlannedRun(
                run_id=run_id, kind="branch", model_kind=cfg.kind, model=model, config=branch_cfg,
                depends_on=[stable_id], tokens=branch.train_tokens, active_params=active, stage="branch",
                budget_tokens=budget, D1=d1 if d2_is_budget else budget, D2=budget if d2_is_budget else None,
                E=E, k=k, array_group=f"{stable_id}-branches", resources_model=model, resolved=branch,
                seed=cfg.seed, repeat_of=f"{repeat_prefix}-{suffix}" if repeat_prefix else None,
            )
            self.plan.runs.append(run)
            branches[budget] = run
        return branches

    # -- the plan ---------------------------------------------------------------

    def build(self) -> Plan:
        from megatron_upcycle.logging_setup import quiet_megatron
        from megatron_upcycle.parallel import single_process_groups

        quiet_megatron()
        # One set of process groups for every meta-device count, torn down after.
        with single_process_groups():
            return self._build()

    def _build(self) -> Plan:
        exp = self.exp
        d1s, d2s = exp.d1.values(), exp.d2.values()
        for model in exp.dense_models:
            dense_model = load_model_config(model)  # unknown names fail here, with the list of presets
            name = dense_model.name
            n1 = self._counts_for(model, None)["N1"]
            for seed in exp.seeds.runs:
                tag = name if len(exp.seeds.runs) == 1 else f"{name}-s{seed}"
                dense_cfg = self._run_config("dense", model, seed, self._stable_schedule(d1s))
                dense_branches = self._add_stable_and_branches(f"dense-{tag}", dense_cfg, model, n1, [])
                tpi = dense_branches[d1s[0]].resolved.tokens_per_iter
                cpt_budgets: dict[int, set[int]] = {d1: set() for d1 in d1s}
                for choice in exp.moe:
                    moe = _moe_config(choice)
                    n2 = self._counts_for(model, moe)["N2"]
                    ek = f"e{moe.num_experts}k{moe.topk}" + (f"g{moe.granularity}" if moe.granularity > 1 else "")
                    for d1 in d1s:
                        source = self._dense_source(dense_branches[d1])
                        convert = self._add_convert(f"convert-{tag}-d1_{fmt_tokens(d1)}-{ek}", model, moe, source,
                                                    d1, n2)
                        upcycle_cfg = self._run_config(
                            "upcycle", model, seed, self._stable_schedule(d2s), moe=moe,
                            init_from=str(self.plan.run_dir(convert).moe_checkpoint))
                        converted = CheckpointMeta(model=dense_model, moe=moe, has_optimizer=False,
                                                   run_kind="convert", provenance={"source_tokens": d1})
                        self._add_stable_and_branches(
                            f"upcycle-{tag}-d1_{fmt_tokens(d1)}-{ek}", upcycle_cfg, model, n2, [convert.run_id],
                            init=converted, moe=moe, d1=d1, d2_is_budget=True,
                        )
                        for d2 in d2s:  # matched FLOPs: 6 N1 D_cpt = 6 N2 D2, rounded to whole iterations
                            cpt_budgets[d1].add(max(2, round(d2 * n2 / n1 / tpi)) * tpi)
                    scratch_budgets = sorted(set(d1s) | set(d2s) | set(exp.baselines.moe_scratch_extra.values()))
                    if exp.baselines.moe_scratch:
                        self._add_stable_and_branches(
                            f"moe-{tag}-{ek}", self._run_config("moe", model, seed,
                                                                self._stable_schedule(scratch_budgets), moe=moe),
                            model, n2, [], moe=moe,
                        )
                    self.plan.independent_tokens += len(d1s) * sum(d2s)
                    self.plan.independent_flops += len(d1s) * 6 * n2 * sum(d2s)
                    if exp.baselines.moe_scratch:
                        self.plan.independent_tokens += sum(scratch_budgets)
                        self.plan.independent_flops += 6 * n2 * sum(scratch_budgets)
                self.plan.independent_tokens += sum(d1s)
                self.plan.independent_flops += 6 * n1 * sum(d1s)
                if exp.baselines.cpt and exp.moe:
                    for d1 in exp.baselines.cpt_d1.values() or d1s:
                        # (E, k) choices whose N2 differ only by router parameters give
                        # matched-FLOPs budgets within 0.1%: one CPT run serves them all.
                        budgets = _merge_close(sorted(cpt_budgets[d1]), rel=0.005)
                        depends, dense_ckpt = self._dense_source(dense_branches[d1])
                        cpt_cfg = self._run_config("cpt", model, seed, self._stable_schedule(budgets),
                                                   init_from=dense_ckpt)
                        dense_at_d1 = CheckpointMeta(model=dense_model, moe=None, tokens=d1, run_kind="branch")
                        self._add_stable_and_branches(
                            f"cpt-{tag}-d1_{fmt_tokens(d1)}", cpt_cfg, model, n1, [depends], init=dense_at_d1,
                            d1=d1, d2_is_budget=True,
                        )
                        self.plan.independent_tokens += sum(budgets)
                        self.plan.independent_flops += 6 * n1 * sum(budgets)
        for seed in exp.noise_seeds():
            self._add_noise_probe(seed)
        if exp.eval is not None:
            self._add_evals()
        ids = [r.run_id for r in self.plan.runs]
        duplicates = {i for i in ids if ids.count(i) > 1}
        if duplicates:
            raise ConfigError(f"experiment produces duplicate run ids {sorted(duplicates)}: budgets too close")
        return self.plan

    def _add_noise_probe(self, seed: int) -> None:
        """The first model's dense run to D1 = seeds.d1 and one upcycled point (seeds.d1, seeds.d2)
        again with ``seed``; the upcycled run starts from the first seed's conversion, so its
        spread is that of the upcycled training alone."""
        exp, model = self.exp, self.exp.dense_models[0]
        dense_model = load_model_config(model)
        name, d1, d2 = dense_model.name, exp.seeds.d1, exp.seeds.d2
        main_tag = name if len(exp.seeds.runs) == 1 else f"{name}-s{exp.seeds.runs[0]}"
        n1 = self._counts_for(model, None)["N1"]
        cfg = self._run_config("dense", model, seed, self._stable_schedule([d1]))
        self._add_stable_and_branches(f"dense-{name}-s{seed}", cfg, model, n1, [],
                                      repeat_prefix=f"dense-{main_tag}")
        self.plan.independent_tokens += d1
        self.plan.independent_flops += 6 * n1 * d1
        if not exp.moe:
            return
        moe = _moe_config(exp.moe[0])
        n2 = self._counts_for(model, moe)["N2"]
        ek = f"e{moe.num_experts}k{moe.topk}" + (f"g{moe.granularity}" if moe.granularity > 1 else "")
        convert = self.plan.by_id()[f"convert-{main_tag}-d1_{fmt_tokens(d1)}-{ek}"]
        upcycle_cfg = self._run_config("upcycle", model, seed, self._stable_schedule([d2]), moe=moe,
                                       init_from=str(self.plan.run_dir(convert).moe_checkpoint))
        converted = CheckpointMeta(model=dense_model, moe=moe, has_optimizer=False, run_kind="convert",
                                   provenance={"source_tokens": d1})
        self._add_stable_and_branches(
            f"upcycle-{name}-s{seed}-d1_{fmt_tokens(d1)}-{ek}", upcycle_cfg, model, n2, [convert.run_id],
            init=converted, moe=moe, d1=d1, d2_is_budget=True,
            repeat_prefix=f"upcycle-{main_tag}-d1_{fmt_tokens(d1)}-{ek}")
        self.plan.independent_tokens += d2
        self.plan.independent_flops += 6 * n2 * d2

    def _add_evals(self) -> None:
        """One eval run after every final (decayed) model: dense, upcycled, MoE from scratch, CPT."""
        options = self.exp.eval
        finals = [r for r in self.plan.runs if r.stage in ("branch", "full")
                  and (options.models is None or r.model in options.models)]
        for run in finals:
            checkpoint = self.plan.run_dir(run).checkpoint(run.resolved.stop_iter)
            config = EvalRunConfig(checkpoint=str(checkpoint), target=run.run_id, tasks=list(options.tasks),
                                   num_fewshot=options.num_fewshot, limit=options.limit)
            self.plan.runs.append(PlannedRun(
                run_id=f"eval-{run.run_id}", kind="eval", model_kind=run.model_kind, model=run.model, config=config,
                depends_on=[run.run_id], tokens=0, active_params=run.active_params, stage="eval",
                budget_tokens=run.budget_tokens, D1=run.D1, D2=run.D2, E=run.E, k=run.k,
                resources_model=run.resources_model, seed=run.seed,
                repeat_of=f"eval-{run.repeat_of}" if run.repeat_of else None,
            ))

    def _dense_source(self, branch: PlannedRun) -> tuple[str, str]:
        """(run id to depend on, checkpoint path) of the dense model upcycled at the branch's D1."""
        resolved = branch.resolved
        if self.exp.upcycle_from == "decayed":
            return branch.run_id, str(self.plan.run_dir(branch).checkpoint(resolved.stop_iter))
        stable_id = branch.depends_on[0]
        return stable_id, str(self.plan.run_dir(stable_id).checkpoint(resolved.start_iter))

    def _add_convert(self, run_id: str, model: str, moe: MoEConfig, source: tuple[str, str], d1: int,
                     n2: int) -> PlannedRun:
        depends, dense_ckpt = source
        config = ConvertRunConfig(dense=dense_ckpt, moe=moe, options=self.exp.converter_options())
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
