"""The experiment file: one YAML describing a whole study (D1 x D2 grid, model
configurations, baselines), from which the planner derives a DAG of runs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from megatron_upcycle.config.loading import from_dict, read_yaml
from megatron_upcycle.config.run import BudgetRange
from megatron_upcycle.data import DataConfig
from megatron_upcycle.errors import ConfigError


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
class Resources:
    """Per model size: how one run of it is laid out on the cluster."""

    nodes: int = 1
    gpus_per_node: int = 8
    tensor_parallel: int = 1
    expert_parallel: int = 1
    sequence_parallel: bool = False
    micro_batch_size: int = 1
    time_minutes: int = 240


@dataclass
class Baselines:
    """Baselines beside the upcycled runs. Dense from scratch needs no switch: the
    decayed dense D1 branches, which every upcycled run starts from, are that baseline."""

    moe_scratch: bool = True  # MoE from scratch at every D1 and D2 budget (for D*)
    # More MoE-from-scratch budgets (e.g. up to max D1 + max D2, so its curve can be fitted).
    moe_scratch_extra: TokenGrid = field(default_factory=TokenGrid)
    cpt: bool = True  # dense continued pretraining at matched FLOPs: D_cpt = D2 * N2 / N1

    REMOVED_KEYS: ClassVar[dict[str, str]] = {
        "dense_scratch": "the decayed dense D1 branches are always the dense-from-scratch baseline",
    }


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
    resources: dict[str, Resources] = field(default_factory=dict)  # model name (or "default") -> layout
    # Conversion options (init, noise_scale, drop_fraction, router_init, seed, ...): the
    # converter's own megatron_upcycle.upcycle.UpcycleOptions, strictly checked.
    converter: dict = field(default_factory=dict)
    # sbatch settings (account, partition, qos, mem, signal_seconds, setup, ...): see
    # megatron_upcycle.sweep.slurm_render.SlurmOptions; unknown names are refused.
    slurm: dict = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [1234])
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
        if not self.seeds:
            raise ConfigError("experiment: seeds is empty")
        self.slurm_options()  # validate now, not at submission
        self.converter_options()

    def converter_options(self):
        from megatron_upcycle.upcycle.options import UpcycleOptions

        return from_dict(UpcycleOptions, dict(self.converter), where="experiment.converter")

    def slurm_options(self):
        from megatron_upcycle.sweep.slurm_render import SlurmOptions

        return SlurmOptions.from_dict(dict(self.slurm))

    def resources_for(self, model: str) -> Resources:
        return self.resources.get(model) or self.resources.get("default") or Resources()


def load_experiment(path: str) -> Experiment:
    return from_dict(Experiment, read_yaml(path), where=str(path))
