"""Optimizer settings of a run."""
from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_upcycle.errors import ConfigError


@dataclass
class OptimConfig:
    """AdamW as in the paper (Tables 4-5). ``lr`` None: the model preset's recipe LR for the kind."""

    lr: float | None = None
    min_lr_ratio: float = 0.1  # the decay ends at 10% of the peak
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_iters: int | None = None  # None: the model preset's recipe

    def __post_init__(self) -> None:
        # nan passes every comparison-based check (nan <= 0 is False) and only fails
        # later inside torch, so each field is first required to be finite.
        for name in ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "eps", "clip_grad"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"optim.{name} must be a finite number, got {value}")
        for name in ("lr", "eps"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"optim.{name} must be > 0, got {value}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.clip_grad < 0:
            raise ConfigError(f"optim.clip_grad must be >= 0 (0: no clipping), got {self.clip_grad}")
        if self.warmup_iters is not None and self.warmup_iters < 0:
            raise ConfigError(f"optim.warmup_iters must be >= 0, got {self.warmup_iters}")
