"""Exact parameter, FLOP and memory counts, read off the Megatron model itself.

The model is built on the meta device, so the 8x1B MoE (6.8B parameters) is
counted without allocating a byte of weights. Conventions (DESIGN.md):
N1 = dense non-embedding parameters, N2 = MoE *active* non-embedding
parameters per token, Ntotal = MoE total non-embedding parameters. Embeddings
(input table and the untied output layer) are reported separately.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from megatron_upcycle.backend import Backend
from megatron_upcycle.config.model import ModelConfig, MoEConfig

# Bytes per parameter for weights + grads + optimizer state.
# GPU: bf16 weight (2) + fp32 grad (4) + fp32 main weight (4) + Adam m, v (8).
# CPU: fp32 weight (4) + fp32 grad (4) + Adam m, v (8).
BYTES_PER_PARAM = {"cuda": 18, "cpu": 16}


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of one model (dense when num_experts is None)."""

    name: str
    num_experts: int | None
    topk: int | None
    non_embedding: int  # every parameter but the embedding table and output layer
    active_non_embedding: int  # what one token passes through
    embedding: int  # input embedding + untied output layer
    expert: int  # routed-expert parameters, all layers
    router: int

    @property
    def total(self) -> int:
        return self.non_embedding + self.embedding


def count_module_params(gpt, topk: int | None, num_experts: int | None) -> tuple[int, int, int, int]:
    """(non_embedding, active_non_embedding, embedding, expert, router) from named parameters."""
    embedding = expert = router = other = 0
    for name, param in gpt.named_parameters():
        n = param.numel()
        if name.startswith("embedding.") or name.startswith("output_layer."):
            embedding += n
        elif ".mlp.experts." in name:
            expert += n
        elif ".mlp.router." in name:
            router += n
            other += n
        else:
            other += n
    # Every routed expert of a layer has the same size, so a token touches
    # topk / num_experts of the routed-expert parameters.
    active_expert = expert * topk // num_experts if num_experts else 0
    return other + expert, other + active_expert, embedding, expert, router


# A tensor's size in bytes must fit in int64, even on the meta device.
MAX_TENSOR_BYTES = 2**63 - 1


def check_countable(model: ModelConfig, moe: MoEConfig | None, available_bytes: int | None = None) -> None:
    """Refuse, before building, a model that cannot be built or counted here.

    The meta-device build allocates no weights, but a weight whose byte size
    overflows int64 cannot be created even there, and the rotary embedding's
    inverse frequencies (head_dim / 2 fp32 values) are allocated for real: a
    head dimension in the billions asks for hundreds of GiB and dies in the
    allocator.
    """
    from megatron_upcycle.errors import ConfigError

    h = model.hidden_size
    ffn = model.ffn_hidden_size or 4 * h
    experts = moe.num_experts if moe is not None else 1
    largest = {  # elements of the largest weights (fp32: 4 bytes each)
        "embedding (vocab_size x hidden_size)": model.vocab_size * h,
        "attention projection (hidden_size x 3 hidden_size)": 3 * h * h,
        "MLP fc1 (hidden_size x 2 ffn_hidden_size, all experts)": 2 * h * ffn * experts,
    }
    name, elements = max(largest.items(), key=lambda kv: kv[1])
    if elements * 4 > MAX_TENSOR_BYTES:
        raise ConfigError(
            f"model '{model.name}' cannot be built: its {name} weight would hold {elements:.3g} values, "
            f"more than one tensor can address; use a smaller hidden_size/vocab_size"
        )
    head_dim = h // model.num_attention_heads
    needed = (head_dim // 2) * 4 * 2  # inverse frequencies, plus a temporary of the same size
    if available_bytes is None:
        import psutil

        available_bytes = psutil.virtual_memory().available
    if needed > available_bytes // 2:
        raise ConfigError(
            f"model '{model.name}': counting it needs about {needed / 2**30:,.1f} GiB of memory for the rotary "
            f"tables of head dim {head_dim:,} (hidden_size / num_attention_heads), more than the "
            f"{available_bytes / 2**30:,.1f} GiB available allow; use more attention heads or a smaller hidden_size"
        )


def count_params(model: ModelConfig, moe: MoEConfig | None, backend: Backend) -> ParamCounts:
    """Build ``model`` (with ``moe``) on the meta device and count its parameters.

    Needs initialised process groups (world size 1 is enough).
    """
    from megatron_upcycle.models import build_gpt_model

    check_countable(model, moe)

    gpt = build_gpt_model(model, moe, backend, device="meta")
    topk = moe.topk if moe else None
    experts = moe.num_experts if moe else None
    non_emb, active, emb, expert, router = count_module_params(gpt, topk, experts)
    return ParamCounts(model.name, experts, topk, non_emb, active, emb, expert, router)


def training_flops_per_token(model: ModelConfig, active_non_embedding: int) -> dict[str, int]:
    """Forward + backward FLOPs per token.

    ``six_n`` is the paper's convention C = 6 N D (what the laws use). ``full`` adds
    the output-layer matmul (6 d V) and causal attention scores and values
    (forward 2 * 2 * s * d per layer, half of it masked, times 3 for backward).
    """
    six_n = 6 * active_non_embedding
    logits = 6 * model.hidden_size * model.vocab_size
    attention = 6 * model.num_layers * model.seq_length * model.hidden_size
    return {"six_n": six_n, "full": six_n + logits + attention}


def memory_estimate_bytes(
    model: ModelConfig, counts: ParamCounts, device: str, micro_batch_size: int = 1
) -> dict[str, int]:
    """A single-device training-memory estimate (no parallelism, no recompute).

    States: BYTES_PER_PARAM per parameter. Activations: Korthikanti et al. (2022)
    34 * s * b * h bytes per layer with flash attention (no s^2 term), plus fp32
    logits (s * b * V * 4 for the logits and again for their gradient).
    """
    states = counts.total * BYTES_PER_PARAM[device]
    s, b, h = model.seq_length, micro_batch_size, model.hidden_size
    activation_scale = 1 if device == "cuda" else 2  # fp32 activations on CPU
    activations = 34 * s * b * h * model.num_layers * activation_scale
    logits = 2 * s * b * model.vocab_size * 4
    return {"states": states, "activations": activations + logits, "total": states + activations + logits}


def counts_report(model: ModelConfig, moe: MoEConfig | None, backend: Backend) -> dict:
    """Everything ``upcycle model info`` prints, as a plain dict."""
    dense = count_params(model, None, backend)
    report = {
        "model": model.name,
        "N1": dense.non_embedding,
        "embedding_params": dense.embedding,
        "dense_flops_per_token": training_flops_per_token(model, dense.non_embedding),
        "dense_memory_bytes": memory_estimate_bytes(model, dense, backend.device),
    }
    if moe is not None:
        sparse = count_params(model, moe, backend)
        report.update(
            experts=moe.num_experts,
            topk=moe.topk,
            N2=sparse.active_non_embedding,
            Ntotal=sparse.non_embedding,
            router_params=sparse.router,
            moe_flops_per_token=training_flops_per_token(model, sparse.active_non_embedding),
            moe_memory_bytes=memory_estimate_bytes(model, sparse, backend.device),
        )
    return report


def as_dict(counts: ParamCounts) -> dict:
    return asdict(counts) | {"total": counts.total}
