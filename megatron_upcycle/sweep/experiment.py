"""The experiment file: one YAML describing a whole study (D1 x D2 grid, model
configurations, baselines), from which the planner derives a DAG of runs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from megatron_upcycle.config.loading import from_dict, read_yaml
from megatron_upcycle.config.run import BudgetRange
from megatron_upcycle.data import DataConfig
from megatron_upcycle.errors import ConfigError
from megatron_upcycle.sweep.run_resources import Resources, ResourceTable


@dataclass
class TokenGrid:
    """Token budgets: an explicit list, a log-spaced range, or both (merged)."""

    tokens: list[int] = field(default_factory=list)
    range: BudgetRange | None = None

    def values(self) -> list[int]:
        from megatron_upcycle.schedule import log_spaced_budgets

        values = list(self.tokens)
        if self.range is not None:
            values += log_spaced_budgets(self.range.min_tokens, self.range.max_tokens, self.range.count)
        return sorted(set(values))


@dataclass
class MoEChoice:
    experts: int
    topk: int
    granularity: int = 1
    layers: Literal["all", "every_other"] | list[int] = "all"
    shared_expert: bool = False


@dataclass
class Baselines:
    """Baselines beside the upcycled runs. Dense from scratch needs no switch: the
    decayed dense D1 branches, which every upcycled run starts from, are that baseline."""

    moe_scratch: bool = True  # MoE from scratch at every D1 and D2 budget (for D*)
    # More MoE-from-scratch budgets (e.g. up to max D1 + max D2, so its curve can be fitted).
    moe_scratch_extra: TokenGrid = field(default_factory=TokenGrid)
    cpt: bool = True  # dense continued pretraining at matched FLOPs: D_cpt = D2 * N2 / N1
    # D1 budgets the CPT runs start from (each a subset of d1); empty: every D1.
    cpt_d1: TokenGrid = field(default_factory=TokenGrid)

    REMOVED_KEYS: ClassVar[dict[str, str]] = {
        "dense_scratch": "the decayed dense D1 branches are always the dense-from-scratch baseline",
    }


@dataclass
class Seeds:
    """Seeds: the whole study runs once per seed in ``runs``; ``extra`` more seeds
    (runs[0] + 1, + 2, ...) repeat only a noise probe: the first dense model's stable
    run to D1 = ``d1`` and its decayed branch there, and one upcycled point (that D1,
    D2 = ``d2``, the first MoE choice, upcycled from the first seed's conversion).
    The spread of those losses is the run-to-run noise a fit should not beat."""

    runs: list[int] = field(default_factory=lambda: [1234])
    extra: int = 0
    d1: int | None = None  # tokens, one of the d1 budgets; default: the middle one
    d2: int | None = None  # tokens, one of the d2 budgets; default: the middle one

    def extra_seeds(self) -> list[int]:
        out, candidate = [], self.runs[0]
        while len(out) < self.extra:
            candidate += 1
            if candidate not in self.runs:
                out.append(candidate)
        return out


@dataclass
class Training:
    """Overrides of the model presets' paper recipes (None: the preset's)."""

    global_batch_size: int | None = None
    lr_dense: float | None = None
    lr_moe: float | None = None
    warmup_iters: int | None = None
    eval_tokens: int = 131072
    log_interval_iters: int = 10
    safety_interval_iters: int = 0


@dataclass
class EvalOptions:
    """Downstream evaluation of every final (decayed) model: one eval run each."""

    tasks: list[str] = field(default_factory=lambda: ["code_next_line", "code_identifier", "code_closure"])
    num_fewshot: int = 0
    limit: int | None = None  # items per task (None: all)
    # Evaluate the final models of these dense sizes only (names of dense_models; None: all):
    # a study's evaluation costs one export + harness start per final model.
    models: list[str] | None = None

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ConfigError("experiment: eval.tasks is empty")
        if self.num_fewshot < 0 or (self.limit is not None and self.limit < 1):
            raise ConfigError(f"experiment: eval needs num_fewshot >= 0 and limit >= 1 or null, got "
                              f"num_fewshot {self.num_fewshot}, limit {self.limit}")


@dataclass
class Experiment:
    name: str
    dense_models: list[str]
    moe: list[MoEChoice]
    d1: TokenGrid
    d2: TokenGrid
    decay_fraction: float = 0.1
    # Which dense checkpoint is upcycled: the decayed D1 model (paper) or the stable-phase one.
    upcycle_from: Literal["decayed", "stable"] = "decayed"
    baselines: Baselines = field(default_factory=Baselines)
    data: DataConfig = field(default_factory=DataConfig)
    training: Training = field(default_factory=Training)
    # Layout and job resources: default, per model (its name), by_kind, by_run; see
    # megatron_upcycle.sweep.run_resources for the keys and their precedence.
    resources: dict = field(default_factory=dict)
    # Conversion options (init, noise_scale, drop_fraction, router_init, seed, ...): the
    # converter's own megatron_upcycle.upcycle.UpcycleOptions, strictly checked.
    converter: dict = field(default_factory=dict)
    # sbatch settings (account, partition, qos, mem, signal_seconds, setup, ...): see
    # megatron_upcycle.sweep.slurm_render.SlurmOptions; unknown names are refused.
    slurm: dict = field(default_factory=dict)
    # A list of seeds (the whole study per seed), or a Seeds mapping (with a noise probe).
    seeds: Seeds | list[int] = field(default_factory=Seeds)
    eval: EvalOptions | None = None  # downstream evaluation of every final model (None: none)
    gpu_tflops: float = 400.0  # sustained bf16 TFLOP/s per GPU, for GPU-hour estimates
    output_root: str | None = None  # default: runs_<name> next to the experiment file

    def __post_init__(self) -> None:
        from megatron_upcycle.sweep.shell_values import check_name, check_path

        # The name and the output root end up in directory names, job names and sbatch
        # scripts: refuse what could break out of them at load, not at submission.
        check_name(self.name, "experiment: name")
        if self.output_root is not None:
            check_path(self.output_root, "experiment: output_root")
        if not self.dense_models:
            raise ConfigError("experiment: dense_models is empty")
        if not self.d1.values():
            raise ConfigError("experiment: d1 names no token budgets")
        if self.moe and not self.d2.values():
            raise ConfigError("experiment: d2 names no token budgets")
        if isinstance(self.seeds, list):
            self.seeds = Seeds(runs=self.seeds)
        self._check_seeds()
        if self.eval is not None and self.eval.models is not None:
            unknown = sorted(set(self.eval.models) - set(self.dense_models))
            if unknown or not self.eval.models:
                raise ConfigError(f"experiment: eval.models {unknown or '[]'} must name models of dense_models "
                                  f"({', '.join(self.dense_models)})")
        unknown_cpt = sorted(set(self.baselines.cpt_d1.values()) - set(self.d1.values()))
        if unknown_cpt:
            raise ConfigError(f"experiment: baselines.cpt_d1 {unknown_cpt} are not d1 budgets "
                              f"({self.d1.values()})")
        self.resource_table()  # validate now, not at submission
        self.slurm_options()
        self.converter_options()

    def _check_seeds(self) -> None:
        seeds = self.seeds
        if not seeds.runs:
            raise ConfigError("experiment: seeds is empty")
        if len(set(seeds.runs)) != len(seeds.runs):
            raise ConfigError(f"experiment: seeds.runs repeats a seed: {seeds.runs}")
        if seeds.extra < 0:
            raise ConfigError(f"experiment: seeds.extra must be 0 or more, got {seeds.extra}")
        for key, grid in (("d1", self.d1.values()), ("d2", self.d2.values())):
            value = getattr(seeds, key)
            if value is None:
                if grid:
                    setattr(seeds, key, grid[len(grid) // 2])
            elif value not in grid:
                raise ConfigError(f"experiment: seeds.{key} = {value} is not one of the {key} budgets {grid}")

    def noise_seeds(self) -> list[int]:
        """The extra seeds of the noise probe (empty without one)."""
        return self.seeds.extra_seeds()

    def converter_options(self):
        from megatron_upcycle.upcycle.options import UpcycleOptions

        return from_dict(UpcycleOptions, dict(self.converter), where="experiment.converter")

    def slurm_options(self):
        from megatron_upcycle.sweep.slurm_render import SlurmOptions

        return SlurmOptions.from_dict(dict(self.slurm))

    def resource_table(self) -> ResourceTable:
        return ResourceTable.parse(dict(self.resources), self.dense_models)

    def resources_for(self, model: str) -> Resources:
        """A model size's layout (``default`` then the model's own entry)."""
        return self.resource_table().for_model(model)


def load_experiment(path: str) -> Experiment:
    return from_dict(Experiment, read_yaml(path), where=str(path))
