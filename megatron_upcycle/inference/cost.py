"""Analytic inference cost of a dense model and its MoE variants (no model is built).

Per model: forward FLOPs per token, weight bytes, KV-cache bytes per token, and
the memory-bound cost of one decode step at batch B. Decoding reads every weight
a step needs once per step, whatever the batch; a dense MLP is read whole, an
MoE layer only for the experts some token of the batch was routed to. With k of
E experts per token, chosen uniformly (what the load-balancing loss aims at), an
expert is missed by one token with probability 1 - k/E, so the expected number
of distinct experts read per MoE layer is E (1 - (1 - k/E)^B): k at B = 1, E
for large B. Step time on a GPU is the roofline max(bytes / bandwidth,
FLOPs / peak); throughput is B / step time.

Parameter groups are derived from the config with the same layout as the
Megatron model (``megatron_upcycle.counts`` counts that model itself; a test
checks both agree). All counts are parameters, all sizes bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_upcycle.config.model import ModelConfig, MoEConfig


@dataclass(frozen=True)
class Hardware:
    """An accelerator for the roofline: memory, bandwidth and dense peak at the serving dtype."""

    name: str
    memory_bytes: float
    bandwidth_bytes_per_s: float
    peak_flops_per_s: float

    def describe(self) -> str:
        return (f"{self.name}: {self.memory_bytes / 1e9:g} GB, {self.bandwidth_bytes_per_s / 1e12:g} TB/s memory "
                f"bandwidth, {self.peak_flops_per_s / 1e12:g} TFLOP/s dense bf16 peak")


# NVIDIA's H100 SXM5 datasheet: 80 GB HBM3 at 3.35 TB/s; 989 TFLOP/s dense bf16
# tensor-core peak (1,979 is the 2:4-sparse figure).
H100_SXM = Hardware("H100 SXM 80GB", 80e9, 3.35e12, 989e12)

BF16_BYTES = 2


@dataclass(frozen=True)
class ModelShape:
    """Parameters of one model grouped by how a decode step reads them."""

    name: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    kv_channels: int  # key (= value) width per layer: query groups x head dim
    attention_per_layer: int  # QKV + output projection
    norms: int  # every RMSNorm weight (2 per layer + the final one)
    dense_mlp_per_layer: int  # SwiGLU MLP of a dense layer (3 d f)
    dense_layers: int  # layers with a dense MLP
    moe_layers: int
    num_experts: int = 0  # routed experts E (granular ones counted singly)
    topk: int = 0
    expert_params: int = 0  # one routed expert (3 d f/g)
    shared_expert_per_layer: int = 0  # the always-on shared expert (3 d f), 0 without
    router_per_layer: int = 0  # E d
    embedding: int = 0  # the input table V d (a step reads only B rows of it)
    output_layer: int = 0  # untied V d (read whole every step)

    @classmethod
    def from_config(cls, model: ModelConfig, moe: MoEConfig | None) -> "ModelShape":
        d, L, V = model.hidden_size, model.num_layers, model.vocab_size
        heads = model.num_attention_heads
        head_dim = d // heads
        groups = model.num_query_groups or heads
        attention = d * (heads + 2 * groups) * head_dim + heads * head_dim * d
        ffn = model.ffn_hidden_size
        common = dict(name=model.name, num_layers=L, hidden_size=d, vocab_size=V, kv_channels=groups * head_dim,
                      attention_per_layer=attention, norms=2 * L * d + d, dense_mlp_per_layer=3 * d * ffn,
                      embedding=V * d, output_layer=V * d)
        if moe is None:
            return cls(dense_layers=L, moe_layers=0, **common)
        moe_layers = sum(moe.layer_pattern(L))
        return cls(dense_layers=L - moe_layers, moe_layers=moe_layers, num_experts=moe.num_experts, topk=moe.topk,
                   expert_params=3 * d * moe.expert_ffn_hidden_size(model),
                   shared_expert_per_layer=3 * d * ffn if moe.shared_expert else 0,
                   router_per_layer=moe.num_experts * d, **common)

    # -- parameter counts ---------------------------------------------------------
    @property
    def always_read(self) -> int:
        """Non-embedding parameters every token passes through (all but the routed experts)."""
        return (self.num_layers * self.attention_per_layer + self.norms + self.dense_layers * self.dense_mlp_per_layer
                + self.moe_layers * (self.shared_expert_per_layer + self.router_per_layer))

    @property
    def non_embedding(self) -> int:
        """Ntotal for an MoE, N1 for a dense model."""
        return self.always_read + self.moe_layers * self.num_experts * self.expert_params

    @property
    def active_non_embedding(self) -> int:
        """N2 for an MoE (what one token passes through), N1 for a dense model."""
        return self.always_read + self.moe_layers * self.topk * self.expert_params

    @property
    def total(self) -> int:
        return self.non_embedding + self.embedding + self.output_layer


def expected_distinct_experts(num_experts: int, topk: int, batch: int) -> float:
    """E (1 - (1 - k/E)^B): experts of one MoE layer that B tokens touch, routing uniform."""
    if num_experts == 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - topk / num_experts) ** batch)


def forward_flops_per_token(shape: ModelShape, context_tokens: int) -> int:
    """2 per active weight (non-embedding and the output layer) plus causal attention at a context.

    Attention: QK^T and AV against ``context_tokens`` keys, 2 * 2 * context * (heads x head dim)
    per layer; heads x head dim = hidden size in this family.
    """
    weights = 2 * (shape.active_non_embedding + shape.output_layer)
    attention = 4 * shape.num_layers * context_tokens * shape.hidden_size
    return weights + attention


def weight_bytes(shape: ModelShape, bytes_per_param: int = BF16_BYTES) -> int:
    return shape.total * bytes_per_param


def kv_cache_bytes_per_token(shape: ModelShape, bytes_per_value: int = BF16_BYTES) -> int:
    """Keys and values of every layer: 2 L (query groups x head dim) values per token."""
    return 2 * shape.num_layers * shape.kv_channels * bytes_per_value


def decode_weight_params_per_step(shape: ModelShape, batch: int) -> float:
    """Parameters one decode step of ``batch`` sequences reads (expected; routing uniform)."""
    experts = shape.moe_layers * expected_distinct_experts(shape.num_experts, shape.topk, batch) * shape.expert_params
    embedding_rows = min(batch, shape.vocab_size) * shape.hidden_size
    return shape.always_read + experts + shape.output_layer + embedding_rows


@dataclass(frozen=True)
class DecodeStep:
    batch: int
    distinct_experts_per_moe_layer: float
    weight_bytes: float  # weights read in one step
    kv_bytes: float  # KV cache read in one step
    flops: float
    memory_seconds: float
    compute_seconds: float

    @property
    def seconds(self) -> float:
        return max(self.memory_seconds, self.compute_seconds)

    @property
    def bound(self) -> str:
        return "memory" if self.memory_seconds >= self.compute_seconds else "compute"

    @property
    def tokens_per_second(self) -> float:
        return self.batch / self.seconds


def decode_step(shape: ModelShape, batch: int, context_tokens: int, hardware: Hardware = H100_SXM,
                bytes_per_param: int = BF16_BYTES) -> DecodeStep:
    """One decode step of ``batch`` sequences, each ``context_tokens`` long so far, on ``hardware``."""
    weights = decode_weight_params_per_step(shape, batch) * bytes_per_param
    kv = batch * context_tokens * kv_cache_bytes_per_token(shape, bytes_per_param)
    flops = batch * forward_flops_per_token(shape, context_tokens)
    return DecodeStep(batch, expected_distinct_experts(shape.num_experts, shape.topk, batch), weights, kv, flops,
                      (weights + kv) / hardware.bandwidth_bytes_per_s, flops / hardware.peak_flops_per_s)


def max_batch(shape: ModelShape, memory_bytes: float, context_tokens: int, bytes_per_param: int = BF16_BYTES) -> int:
    """Sequences of ``context_tokens`` whose KV cache fits next to the weights (0: the weights alone do not)."""
    free = memory_bytes - weight_bytes(shape, bytes_per_param)
    if free <= 0:
        return 0
    return int(free // (context_tokens * kv_cache_bytes_per_token(shape, bytes_per_param)))


DEFAULT_BATCHES = (1, 8, 32, 128)


def inference_cost(shape: ModelShape, context_tokens: int, hardware: Hardware = H100_SXM,
                   batches: tuple[int, ...] = DEFAULT_BATCHES, bytes_per_param: int = BF16_BYTES) -> dict:
    """Everything about serving one model, as a plain dict (what ``upcycle model info`` prints)."""
    fit = max_batch(shape, hardware.memory_bytes, context_tokens, bytes_per_param)
    steps = []
    for b in batches:
        step = decode_step(shape, b, context_tokens, hardware, bytes_per_param)
        steps.append({"batch": b, "distinct_experts_per_moe_layer": step.distinct_experts_per_moe_layer,
                      "weight_bytes_read": step.weight_bytes, "kv_bytes_read": step.kv_bytes,
                      "step_seconds": step.seconds, "bound": step.bound, "tokens_per_second": step.tokens_per_second,
                      "fits_memory": b <= fit})
    return {
        "model": shape.name,
        "experts": shape.num_experts or None,
        "topk": shape.topk or None,
        "context_tokens": context_tokens,
        "bytes_per_param": bytes_per_param,
        "hardware": hardware.describe(),
        "forward_flops_per_token": forward_flops_per_token(shape, context_tokens),
        "weight_bytes": weight_bytes(shape, bytes_per_param),
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(shape, bytes_per_param),
        "max_batch": fit,
        "decode": steps,
    }


def moe_over_dense_decode_cost(dense: ModelShape, moe: ModelShape, batch: int, context_tokens: int,
                               hardware: Hardware = H100_SXM) -> dict[str, float]:
    """Serving cost of the MoE relative to the dense model (> 1: the MoE costs more per token).

    ``compute``: forward FLOPs per token; ``memory``: roofline step time at ``batch``
    (equal batches; memory-bound at small batch, so weight and KV bytes read).
    """
    d_step = decode_step(dense, batch, context_tokens, hardware)
    m_step = decode_step(moe, batch, context_tokens, hardware)
    return {"compute": forward_flops_per_token(moe, context_tokens) / forward_flops_per_token(dense, context_tokens),
            "memory": m_step.seconds / d_step.seconds}
