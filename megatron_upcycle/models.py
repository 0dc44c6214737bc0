"""The model family: ModelConfig (+ MoEConfig) -> Megatron-Core GPTModel.

Extends Megatron-Core through its own extension points: a TransformerConfig and
the stock GPT decoder block spec (TE or local, chosen by the backend), with
``moe_layer_freq`` for mixed dense/MoE stacks. No Megatron layer is subclassed.
Checkpoints of these models use the stock key layout (see ``moe_layer_freq``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_upcycle.backend import Backend, _has_module
from megatron_upcycle.config.model import ModelConfig, MoEConfig
from megatron_upcycle.parallel import ParallelConfig


def transformer_config(
    model: ModelConfig,
    moe: MoEConfig | None,
    backend: Backend,
    parallel: ParallelConfig | None = None,
):
    """The Megatron TransformerConfig for a Llama-style model (and its MoE variant)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    parallel = parallel or ParallelConfig()
    on_gpu = backend.device == "cuda"
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=model.hidden_size // model.num_attention_heads,
        # Llama-style: SwiGLU, RMSNorm, no biases, no dropout.
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        expert_model_parallel_size=parallel.expert_parallel,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=backend.params_dtype,
        bf16=backend.bf16,
        # Fused kernels exist only on GPU.
        bias_activation_fusion=on_gpu,
        # The local spec's fused softmax needs Megatron-LM's compiled scaled_masked_softmax_cuda,
        # which the megatron-core wheel lacks (importing it fails inside the first forward).
        masked_softmax_fusion=on_gpu and _has_module("scaled_masked_softmax_cuda"),
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        # Only Apex's FusedLayerNorm (LayerNorm, never RMSNorm) has a persistent kernel; the
        # torch RMSNorm of the local spec refuses the flag, and TENorm ignores it.
        persist_layer_norm=False,
        use_cpu_initialization=not on_gpu,
    )
    from megatron.core.transformer.enums import AttnBackend

    if not backend.use_transformer_engine:
        kwargs["attention_backend"] = AttnBackend.local
    else:
        kwargs["attention_backend"] = AttnBackend.flash if backend.attention_backend == "flash" else AttnBackend.auto
    if moe is not None:
        kwargs.update(
            num_moe_experts=moe.num_experts,
            moe_router_topk=moe.topk,
            moe_aux_loss_coeff=moe.aux_loss_coeff,
            moe_router_load_balancing_type="aux_loss",
            moe_router_pre_softmax=moe.router_pre_softmax,
            moe_ffn_hidden_size=moe.expert_ffn_hidden_size(model),
            moe_layer_freq=moe_layer_freq(moe, model.num_layers),
            moe_shared_expert_intermediate_size=model.ffn_hidden_size if moe.shared_expert else None,
            # Dropless token-choice routing: no capacity factor, no token dropping.
            moe_expert_capacity_factor=None,
            moe_token_dispatcher_type=backend.moe_token_dispatcher,
            moe_grouped_gemm=backend.moe_grouped_gemm,
            # Router logits in fp32 so top-k choices do not flip with bf16 rounding.
            moe_router_dtype="fp32",
            moe_permute_fusion=False,
        )
    return TransformerConfig(**kwargs)


def moe_layer_freq(moe: MoEConfig, num_layers: int) -> int | list[int]:
    """Megatron's ``moe_layer_freq``: 1 when every layer is MoE, else the 0/1 list.

    The same layers either way, but not the same checkpoint keys: a list makes
    TransformerBlock key every layer separately (decoder.layers.<i>.*), an int 1 keeps
    the stacked keys (decoder.layers.*) that a stock GPTModel, built by Megatron-LM's
    pretrain_gpt.py with the default moe_layer_freq=1, asks for.
    """
    pattern = moe.layer_pattern(num_layers)
    return 1 if all(pattern) else pattern


def layer_spec(config, backend: Backend):
    """The stock GPT decoder block spec (handles all-MoE, all-dense and mixed)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    return get_gpt_decoder_block_spec(
        config,
        use_transformer_engine=backend.use_transformer_engine,
        normalization="RMSNorm",
    )


def build_gpt_model(
    model: ModelConfig,
    moe: MoEConfig | None,
    backend: Backend,
    parallel: ParallelConfig | None = None,
    device: str | torch.device | None = None,
):
    """Build the GPTModel. Requires initialised process groups (``parallel.init_distributed``).

    ``device="meta"`` builds the module tree without allocating weights (used for
    exact parameter counts of the billion-parameter sizes).
    """
    from megatron.core.models.gpt import GPTModel

    from megatron_upcycle.mcore_compat import reset_moe_metrics

    # Megatron's aux-loss tracker is process-global and sized by the first MoE model
    # that logs into it; a deeper model built later in the same process would index
    # past its end. Each new model starts with an empty tracker.
    reset_moe_metrics()
    config = transformer_config(model, moe, backend, parallel)
    spec = layer_spec(config, backend)

    def build():
        return GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=model.vocab_size,
            max_sequence_length=model.seq_length,
            position_embedding_type="rope",
            rotary_base=model.rotary_base,
            share_embeddings_and_output_weights=False,
        )

    if device is not None:
        with torch.device(device):
            return build()
    gpt = build()
    if backend.device == "cuda":
        gpt = gpt.cuda()
    return gpt
