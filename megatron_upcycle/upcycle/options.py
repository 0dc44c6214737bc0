"""Converter options: how experts, the router and the shared expert are initialised.

The MoE *architecture* (E, k, granularity, which layers, shared expert) is a
``MoEConfig``; these are the choices that only matter at conversion time.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from megatron_upcycle.config.model import MoEConfig
from megatron_upcycle.errors import ConfigError

INIT_KINDS = ("copy", "noise", "drop")


def paper_router_std(hidden_size: int) -> float:
    """The paper's router init: N(0, variance 2 / (5 d_model))."""
    return math.sqrt(2.0 / (5.0 * hidden_size))


@dataclass(frozen=True)
class UpcycleOptions:
    # copy: every expert an exact copy of the dense MLP (function preserving).
    # noise: copy + Gaussian noise, std = noise_scale * std(matrix), per matrix.
    # drop: Drop-Upcycling (Nakamura et al., ICLR 2025): a fraction drop_fraction of
    #   each expert's intermediate neurons re-initialised.
    init: str = "copy"
    noise_scale: float = 0.01
    drop_fraction: float = 0.5
    # "paper" (sqrt(2 / (5 d_model))), "zero", or a standard deviation such as "0.02".
    router_init: str = "paper"
    seed: int = 1234
    # With a shared expert, y = alpha * dense(x) + (1 - alpha) * sum_e p_e expert_e(x):
    # both down projections are scaled so the sum is still the dense MLP.
    shared_expert_weight: float = 0.5
    # Carry the dense Adam moments into every expert (needs optimizer state in the source).
    carry_moments: bool = False

    def __post_init__(self) -> None:
        if self.init not in INIT_KINDS:
            raise ConfigError(f"--init must be one of {', '.join(INIT_KINDS)}; got '{self.init}'")
        if not self.noise_scale > 0:
            raise ConfigError(f"--noise-scale must be > 0, got {self.noise_scale}")
        if not 0.0 < self.drop_fraction <= 1.0:
            raise ConfigError(f"--drop-fraction must be in (0, 1], got {self.drop_fraction}")
        if not 0.0 < self.shared_expert_weight <= 1.0:
            raise ConfigError(f"--shared-expert-weight must be in (0, 1], got {self.shared_expert_weight}")
        if self.router_init not in ("paper", "zero"):
            try:
                std = float(self.router_init)
            except ValueError:
                raise ConfigError(
                    f"--router-std must be 'paper', 'zero' or a number; got '{self.router_init}'"
                ) from None
            if not std >= 0 or math.isinf(std):
                raise ConfigError(f"--router-std must be >= 0, got {self.router_init}")

    def router_std(self, hidden_size: int) -> float:
        if self.router_init == "paper":
            return paper_router_std(hidden_size)
        if self.router_init == "zero":
            return 0.0
        return float(self.router_init)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ConvertRunConfig:
    """A conversion as a sweep run (``<run_dir>/config.yaml`` of a convert run)."""

    dense: str  # the dense checkpoint (an iter_* directory)
    moe: MoEConfig
    options: UpcycleOptions = UpcycleOptions()
