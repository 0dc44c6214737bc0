"""An experiment's ``resources:``: the layout per model size, and what each job asks
Slurm for, per model size, per run kind and per run.

    resources:
      default: {nodes: 1, gpus_per_node: 8, micro_batch_size: 8, time_minutes: 720}
      1B:      {nodes: 4, tensor_parallel: 2}          # a model of dense_models
      by_kind:                                          # a kind of run_kinds.RUN_KINDS
        convert: {cpus_per_task: 32, time_minutes: 60}
        branch:  {nodes: 1, time_minutes: 240}
      by_run:                                           # a run id, or a glob of them
        "upcycle-1B-*-stable": {time_minutes: 2880}

Each value is decided field by field, the last of these that sets it winning:

  1. the built-in defaults (``Resources``)
  2. ``default``
  3. the run's model (``resources.<model>``: the fields it names)
  4. conversions only: ``nodes: 1, gpus_per_node: 0`` (one process, no GPU)
  5. ``by_kind.<kind>``
  6. ``by_run.<glob>``, every glob that matches the run id, in file order
  7. ``slurm:``'s nodes / gpus_per_node / cpus_per_task / time_minutes, which are
     cluster-wide and override every run (sweep.slurm_render.SlurmOptions)

Levels 5 and 6 set what a job asks for (``JobResources``: nodes, GPUs, CPUs, time),
never the model's parallel layout (tensor/expert/sequence parallel, micro batch),
which belongs to the model size. Everything is checked strictly: an unknown key, an
unknown kind, a layout key per kind or run, or a glob that matches no run of the
plan fails with one line.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Iterable

from megatron_upcycle.config.loading import from_dict
from megatron_upcycle.errors import ConfigError
from megatron_upcycle.run_kinds import RUN_KINDS, SINGLE_PROCESS_KINDS


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
    cpus_per_task: int | None = None  # None: Slurm's default


@dataclass
class JobResources:
    """What one job asks Slurm for, set per run kind or per run; None: inherited."""

    nodes: int | None = None
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    time_minutes: int | None = None

    def __post_init__(self) -> None:
        for name in ("nodes", "cpus_per_task", "time_minutes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.gpus_per_node is not None and self.gpus_per_node < 0:
            raise ValueError(f"gpus_per_node must be >= 0, got {self.gpus_per_node}")

    def set_fields(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


JOB_FIELDS = tuple(f.name for f in dataclasses.fields(JobResources))
LAYOUT_FIELDS = tuple(f.name for f in dataclasses.fields(Resources) if f.name not in JOB_FIELDS)
SECTIONS = ("default", "by_kind", "by_run")
# A conversion is one process on one node and needs no GPU, unless told otherwise.
CONVERT_DEFAULTS = JobResources(nodes=1, gpus_per_node=0)


def _did_you_mean(key: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _job_resources(value, where: str) -> JobResources:
    if isinstance(value, dict):
        for key in value:
            if key in LAYOUT_FIELDS:
                raise ConfigError(f"{where}: '{key}' is the model's parallel layout, set per model size only; "
                                  f"per kind or run: {', '.join(JOB_FIELDS)}")
            if key not in JOB_FIELDS:
                raise ConfigError(f"{where}: unknown key '{key}'{_did_you_mean(str(key), JOB_FIELDS)}; "
                                  f"valid keys: {', '.join(JOB_FIELDS)}")
    return from_dict(JobResources, value, where)


@dataclass
class ResourceTable:
    """The parsed ``resources:`` of an experiment (see the module docstring)."""

    default: Resources = field(default_factory=Resources)
    models: dict[str, dict] = field(default_factory=dict)  # model -> the fields its entry sets
    by_kind: dict[str, JobResources] = field(default_factory=dict)
    by_run: dict[str, JobResources] = field(default_factory=dict)  # glob -> resources, in file order

    @classmethod
    def parse(cls, data: dict, models: Iterable[str], where: str = "experiment.resources") -> "ResourceTable":
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping, got {data!r}")
        models = [str(m) for m in models]
        table = cls()
        for key, value in data.items():
            key = str(key)
            if key == "default":
                table.default = from_dict(Resources, value, f"{where}.default")
            elif key == "by_kind":
                if not isinstance(value, dict):
                    raise ConfigError(f"{where}.by_kind: expected a mapping of run kinds, got {value!r}")
                for kind, res in value.items():
                    if kind not in RUN_KINDS:
                        raise ConfigError(f"{where}.by_kind: unknown run kind '{kind}'"
                                          f"{_did_you_mean(str(kind), RUN_KINDS)}; kinds: {', '.join(RUN_KINDS)}")
                    table.by_kind[kind] = _job_resources(res, f"{where}.by_kind.{kind}")
                for kind in SINGLE_PROCESS_KINDS:
                    single = table.by_kind.get(kind)
                    if single is not None and single.nodes not in (None, 1):
                        raise ConfigError(f"{where}.by_kind.{kind}: nodes must be 1 (a {kind} run is one process), "
                                          f"got {single.nodes}")
            elif key == "by_run":
                if not isinstance(value, dict):
                    raise ConfigError(f"{where}.by_run: expected a mapping of run ids or globs, got {value!r}")
                for pattern, res in value.items():
                    table.by_run[str(pattern)] = _job_resources(res, f"{where}.by_run.{pattern}")
            elif key in models:
                checked = from_dict(Resources, value, f"{where}.{key}")
                table.models[key] = {name: getattr(checked, name) for name in value}
            else:
                raise ConfigError(f"{where}: unknown key '{key}'{_did_you_mean(key, [*SECTIONS, *models])}: "
                                  f"keys are {', '.join(SECTIONS)} or a model of dense_models "
                                  f"({', '.join(models)})")
        return table

    def for_model(self, model: str) -> Resources:
        """The layout of a model size: the defaults, then ``default``, then the model's entry."""
        return self._merge(self.default, self.models.get(model, {}))

    def for_run(self, run_id: str, kind: str, model: str) -> Resources:
        """Everything one run's job asks for, levels 1-6 of the module docstring
        (level 7, the cluster-wide ``slurm:`` values, is applied when rendering)."""
        res = self.for_model(model)
        if kind == "convert":
            res = self._merge(res, CONVERT_DEFAULTS.set_fields())
        if kind in self.by_kind:
            res = self._merge(res, self.by_kind[kind].set_fields())
        for pattern, override in self.by_run.items():
            if fnmatch.fnmatchcase(run_id, pattern):
                res = self._merge(res, override.set_fields())
        return res

    def check_runs(self, run_ids: Iterable[str], where: str = "experiment.resources.by_run") -> None:
        """Every by_run entry must match a run of the plan: a typo would otherwise do nothing."""
        run_ids = list(run_ids)
        for pattern in self.by_run:
            if not any(fnmatch.fnmatchcase(run_id, pattern) for run_id in run_ids):
                raise ConfigError(f"{where}: '{pattern}' matches no run of this experiment"
                                  f"{_did_you_mean(pattern, run_ids)} (`upcycle sweep plan` lists the run ids)")

    @staticmethod
    def _merge(base: Resources, changes: dict) -> Resources:
        return dataclasses.replace(base, **changes)
