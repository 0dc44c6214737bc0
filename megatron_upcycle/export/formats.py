"""Which Hugging Face architecture can compute a given Megatron model, exactly.

Megatron's MoE layer (megatron-core 0.16.1, ``moe_utils.topk_routing_with_score_function``
with ``score_function="softmax"``) routes a token by
- top-k then softmax (``moe_router_pre_softmax=False``): softmax over the k largest
  logits. That is softmax over all E, top-k, renormalised to sum 1: Mixtral's
  routing, and Qwen2-MoE's with ``norm_topk_prob: true``;
- softmax then top-k (``moe_router_pre_softmax=True``, what top-1 needs): the k chosen
  probabilities of the softmax over all E, not renormalised: Qwen2-MoE's routing with
  ``norm_topk_prob: false``. Mixtral always renormalises, so it cannot express it.
A shared expert (always on, added to the routed output) exists in Qwen2-MoE only, and
so do dense layers among MoE ones (``mlp_only_layers``).

The routing is read from the TransformerConfig this project builds for the model
(``models.transformer_config``), not re-derived from the MoEConfig, so an option
Megatron applies that no target can express (a sigmoid score, a top-k scaling
factor, group-limited routing, an expert bias, input jitter, a gated shared expert)
is refused instead of exported wrongly.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from megatron_upcycle.config.model import ModelConfig, MoEConfig
from megatron_upcycle.errors import ConfigError

FORMATS = ("llama", "mixtral", "qwen2_moe")
FORMAT_CHOICES = ("auto",) + FORMATS
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}


@dataclass(frozen=True)
class MegatronRouting:
    """What Megatron's MoE layers compute, as far as an export target must reproduce it."""

    num_experts: int
    topk: int
    pre_softmax: bool  # softmax over all experts, then top-k, no renormalisation
    score_function: str
    topk_scaling_factor: float | None
    group_topk: int | None
    expert_bias: bool
    input_jitter_eps: float | None
    shared_expert_size: int | None  # ffn neurons of the shared expert; None: no shared expert
    shared_expert_gate: bool
    layer_pattern: tuple[int, ...]  # 1: MoE layer, 0: dense layer

    @property
    def mixed_layers(self) -> bool:
        return 0 in self.layer_pattern

    def to_dict(self) -> dict:
        return asdict(self)


def megatron_routing(model: ModelConfig, moe: MoEConfig) -> MegatronRouting:
    """The routing of the Megatron model built for (model, moe)."""
    from megatron_upcycle.backend import select_backend
    from megatron_upcycle.logging_setup import quiet_megatron
    from megatron_upcycle.models import transformer_config

    quiet_megatron()  # importing megatron.core warns that TE/Apex are absent
    config = transformer_config(model, moe, select_backend(force_cpu=True))
    freq = config.moe_layer_freq
    pattern = tuple(freq) if isinstance(freq, list) else tuple(
        1 if i % freq == 0 else 0 for i in range(model.num_layers))
    return MegatronRouting(
        num_experts=config.num_moe_experts,
        topk=config.moe_router_topk,
        pre_softmax=bool(config.moe_router_pre_softmax),
        score_function=config.moe_router_score_function,
        topk_scaling_factor=config.moe_router_topk_scaling_factor,
        group_topk=config.moe_router_group_topk,
        expert_bias=bool(config.moe_router_enable_expert_bias),
        input_jitter_eps=config.moe_input_jitter_eps,
        shared_expert_size=config.moe_shared_expert_intermediate_size,
        shared_expert_gate=bool(config.moe_shared_expert_gate),
        layer_pattern=pattern,
    )


def _inexpressible(routing: MegatronRouting) -> str | None:
    """Why no target at all computes this routing (None when Qwen2-MoE does)."""
    if routing.score_function != "softmax":
        return f"the router's score function is {routing.score_function!r}; the targets route by softmax"
    if routing.topk_scaling_factor not in (None, 1.0):
        return f"the router scales the top-k weights by {routing.topk_scaling_factor}"
    if routing.group_topk:
        return "the router uses group-limited top-k"
    if routing.expert_bias:
        return "the router adds a per-expert bias"
    if routing.input_jitter_eps:
        return "the router applies input jitter"
    if routing.shared_expert_gate:
        return "the shared expert has Megatron's learned sigmoid gate"
    return None


def why_not(fmt: str, model: ModelConfig, moe: MoEConfig | None, routing: MegatronRouting | None = None) -> str | None:
    """Why ``fmt`` cannot compute the Megatron model (model, moe); None when it can, exactly."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMAT_CHOICES)}; got '{fmt}'")
    if moe is None:
        return None if fmt == "llama" else "the checkpoint is dense; a dense model exports as llama"
    if fmt == "llama":
        return "the checkpoint is an MoE; LlamaForCausalLM has no experts"
    routing = routing or megatron_routing(model, moe)
    reason = _inexpressible(routing)
    if reason is not None:
        return reason
    if fmt == "mixtral":
        if routing.pre_softmax:
            why = " (the MoE config's rule for topk=1)" if routing.topk == 1 else ""
            return (f"router_pre_softmax=true{why} weights each chosen expert by its probability over all "
                    "experts, while Mixtral renormalises the top-k probabilities to sum to 1")
        if routing.shared_expert_size:
            return "Mixtral has no shared expert (moe.shared_expert=true)"
        if routing.mixed_layers:
            return f"moe.layers={moe.layers!r} mixes dense and MoE layers; Mixtral makes every layer MoE"
    return None


def choose_format(model: ModelConfig, moe: MoEConfig | None, requested: str = "auto") -> tuple[str, str]:
    """(format, why): the requested format if it is exact, or for "auto" the simplest exact one.

    Simplest first: llama (dense), mixtral, qwen2_moe. Raises ConfigError when the
    requested format cannot compute the model.
    """
    if requested not in FORMAT_CHOICES:
        raise ConfigError(f"--format must be one of {', '.join(FORMAT_CHOICES)}; got '{requested}'")
    routing = megatron_routing(model, moe) if moe is not None else None
    if requested != "auto":
        reason = why_not(requested, model, moe, routing)
        if reason is not None:
            raise ConfigError(f"cannot export to {ARCHITECTURES[requested]} (--format {requested}): {reason}")
        return requested, "requested"
    if moe is None:
        return "llama", "dense"
    reason = _inexpressible(routing)
    if reason is not None:
        raise ConfigError(f"cannot export this MoE to Hugging Face: {reason}")
    mixtral_reason = why_not("mixtral", model, moe, routing)
    if mixtral_reason is None:
        return "mixtral", "all layers MoE, top-k-then-softmax routing, no shared expert"
    return "qwen2_moe", f"not mixtral: {mixtral_reason}"
