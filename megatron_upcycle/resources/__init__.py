"""The files shipped inside the package, and the one place that finds them.

    resources/yaml/models/*.yaml         model presets (paper sizes, CPU sizes)
    resources/yaml/experiments/*.yaml    experiment presets
    resources/slurm/*.sbatch             sbatch templates (sweep.slurm_render fills them)
    resources/launch/train.sh            torchrun launcher for one node

They live in the package (declared as package data in setup.py) so that a
non-editable ``pip install .`` works; the checkout's top-level ``yaml``,
``slurm`` and ``launch`` are symlinks into this folder for users. Found through
importlib.resources rather than ``__file__`` arithmetic so that nothing assumes
a repository around the package.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

YAML_OVERRIDE_ENV = "MEGATRON_UPCYCLE_YAML"


def resource_root() -> Path:
    root = resources.files(__name__)
    # Executors and bash need real paths; a package installed from a wheel is always a
    # directory on disk (zip imports are not supported for this package).
    if not isinstance(root, Path):
        raise RuntimeError(f"megatron_upcycle must be installed as files on disk, not {root!r}")
    return root


def yaml_root() -> Path:
    """The presets' folder (models/, experiments/); MEGATRON_UPCYCLE_YAML overrides it."""
    override = os.environ.get(YAML_OVERRIDE_ENV)
    if override:
        return Path(override)
    return resource_root() / "yaml"


def experiment_preset(name: str) -> Path:
    """A shipped experiment file, e.g. ``cpu_demo`` (not affected by the override)."""
    return resource_root() / "yaml" / "experiments" / f"{name}.yaml"


def sbatch_template_dir() -> Path:
    """The folder of the sbatch template(s) that sweep.slurm_render fills."""
    return resource_root() / "slurm"


def launcher() -> Path:
    """launch/train.sh; invoke it through bash (wheels need not keep the executable bit)."""
    return resource_root() / "launch" / "train.sh"
