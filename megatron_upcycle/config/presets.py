"""Locating and loading the model presets (the package's yaml/models/, see megatron_upcycle.resources)."""
from __future__ import annotations

import difflib
from pathlib import Path

from megatron_upcycle.config.loading import from_dict, read_yaml
from megatron_upcycle.config.model import ModelConfig
from megatron_upcycle.errors import ConfigError
from megatron_upcycle.resources import yaml_root




def model_names() -> list[str]:
    return sorted(p.stem for p in (yaml_root() / "models").glob("*.yaml"))


def load_model_config(name_or_path: str) -> ModelConfig:
    """A preset name (``0.1B``, ``cpu-tiny``) or a path to a model YAML."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        path = yaml_root() / "models" / f"{name_or_path}.yaml"
        if not path.exists():
            names = model_names()
            close = difflib.get_close_matches(name_or_path, names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown model '{name_or_path}'{hint} (known: {', '.join(names)})")
    data = read_yaml(path)
    data.setdefault("name", path.stem)
    return from_dict(ModelConfig, data, where=str(path.name))
