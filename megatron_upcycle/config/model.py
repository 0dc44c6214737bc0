"""Typed model configuration: the dense architecture and the MoE options.

A model YAML (yaml/models/NAME.yaml) holds a ``ModelConfig``; MoE options come
from the command line or a run/experiment file as a ``MoEConfig``. Both validate
in ``__post_init__`` with messages that name the field, the value and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_upcycle.errors import ConfigError


@dataclass
class PaperRecipe:
    """Training hyper-parameters of the paper (Tables 4-5) for this size.

    Used as defaults by run and experiment configs; all learning rates are peaks.
    """

    warmup_iters: int = 200
    global_batch_size: int = 128
    max_iters: int = 17600
    lr_dense: float = 8e-3
    lr_moe: float = 2e-3


@dataclass
class ModelConfig:
    """Llama-style GPT: SwiGLU, RoPE, RMSNorm, no biases, untied embeddings."""

    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int | None = None  # default 4 * hidden_size (the paper's d_mlp)
    num_query_groups: int | None = None  # None: multi-head attention (the paper's)
    vocab_size: int = 32000
    seq_length: int = 1024
    init_method_std: float = 0.02
    rotary_base: int = 10000
    norm_epsilon: float = 1e-5
    recipe: PaperRecipe = field(default_factory=PaperRecipe)

    def __post_init__(self) -> None:
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                     "vocab_size", "seq_length"):
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"model '{self.name}': {name} must be >= 1, got {value}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model '{self.name}': num_attention_heads={self.num_attention_heads} does not divide "
                f"hidden_size={self.hidden_size}"
            )
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ConfigError(
                f"model '{self.name}': head dim {self.hidden_size // self.num_attention_heads} must be "
                "even for RoPE"
            )
        if self.num_query_groups is not None and self.num_query_groups < 1:
            raise ConfigError(
                f"model '{self.name}': num_query_groups must be >= 1 (or unset for multi-head attention), "
                f"got {self.num_query_groups}"
            )
        if self.num_query_groups is not None and self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model '{self.name}': num_query_groups={self.num_query_groups} does not divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if not self.init_method_std > 0:  # written so that nan fails too
            raise ConfigError(f"model '{self.name}': init_method_std must be > 0, got {self.init_method_std}")


@dataclass
class MoEConfig:
    """Mixture-of-Experts options layered on a dense ``ModelConfig``.

    Routing is token-choice top-k, dropless, with Megatron's default
    top-k-then-softmax (``router_pre_softmax: false``), which is what makes copy
    upcycling exactly function-preserving.
    """

    num_experts: int
    topk: int = 2
    aux_loss_coeff: float = 1e-3
    # "all", "every_other" (layers 0, 2, 4, ...), or explicit 0-based layer indices.
    layers: Literal["all", "every_other"] | list[int] = "all"
    # None: top-k-then-softmax for k >= 2 (exactly function-preserving upcycling);
    # softmax-then-top-k for k = 1, which Megatron requires because a softmax over
    # a single selected logit is constantly 1 and gives the router no gradient.
    # Consequence: a top-1 upcycled MoE scales each expert by its router
    # probability and is not exactly the dense function at step 0 (verify reports it).
    router_pre_softmax: bool | None = None
    # Granular experts: each expert has ffn_hidden_size / granularity neurons.
    granularity: int = 1
    # A shared, always-on expert of the dense MLP's width.
    shared_expert: bool = False

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ConfigError(f"moe: num_experts must be >= 1, got {self.num_experts}")
        if self.topk < 1:
            raise ConfigError(f"moe: topk must be >= 1, got {self.topk}")
        if self.topk > self.num_experts:
            raise ConfigError(f"moe: topk={self.topk} is larger than num_experts={self.num_experts}")
        if self.granularity < 1:
            raise ConfigError(f"moe: granularity must be >= 1, got {self.granularity}")
        if self.num_experts % self.granularity:
            raise ConfigError(
                f"moe: num_experts={self.num_experts} is not a multiple of granularity={self.granularity}"
            )
        if self.router_pre_softmax is None:
            self.router_pre_softmax = self.topk == 1
        if self.topk == 1 and not self.router_pre_softmax:
            raise ConfigError(
                "moe: topk=1 needs router_pre_softmax: true (a softmax over one selected logit has no gradient)"
            )
        if not self.aux_loss_coeff >= 0:  # written so that nan fails too
            raise ConfigError(f"moe: aux_loss_coeff must be >= 0, got {self.aux_loss_coeff}")

    def layer_pattern(self, num_layers: int) -> list[int]:
        """1 for an MoE layer, 0 for a dense one (Megatron's ``moe_layer_freq`` list)."""
        if self.layers == "all":
            return [1] * num_layers
        if self.layers == "every_other":
            return [1 if i % 2 == 0 else 0 for i in range(num_layers)]
        bad = [i for i in self.layers if not 0 <= i < num_layers]
        if bad:
            raise ConfigError(f"moe.layers: indices {bad} are outside 0..{num_layers - 1}")
        chosen = set(self.layers)
        return [1 if i in chosen else 0 for i in range(num_layers)]

    def expert_ffn_hidden_size(self, model: ModelConfig) -> int:
        assert model.ffn_hidden_size is not None
        if model.ffn_hidden_size % self.granularity:
            raise ConfigError(
                f"moe: granularity={self.granularity} does not divide ffn_hidden_size="
                f"{model.ffn_hidden_size} of model '{model.name}'"
            )
        return model.ffn_hidden_size // self.granularity
