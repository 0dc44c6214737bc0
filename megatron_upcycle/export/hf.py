"""Megatron-Core GPT state dict -> Hugging Face Llama / Mixtral / Qwen2-MoE tensors.

A pure function over tensors, written like nanoGPT's ``from_pretrained``: every
target tensor is named explicitly, every source tensor is shape-checked, every
source key must be used, and the result must match the key names and shapes of
the installed transformers class exactly (checked against a meta-device model).

Megatron layouts this relies on (megatron-core 0.16.1, read from its source):
- fused QKV rows are grouped per query group: for each of ng groups,
  [np/ng query heads, 1 key head, 1 value head], each head hn rows
  (attention.py ``get_query_key_value_tensors``);
- SwiGLU ``linear_fc1`` is [gate; up] along dim 0 (mlp.py ``glu``: first chunk
  goes through the activation), which is also the order of HF Mixtral's fused
  ``experts.gate_up_proj`` and of Llama's ``gate_proj``/``up_proj``;
- RoPE without interleaving uses rotate_half on cat(freqs, freqs) with
  inv_freq = base^(-2i/hn): HF Llama's default rope with rope_theta = base;
- routing: see formats.py (which target expresses which Megatron routing).
"""
from __future__ import annotations

import re

import torch

from megatron_upcycle.config.model import ModelConfig, MoEConfig
from megatron_upcycle.errors import CheckpointError, ConfigError, UserError
from megatron_upcycle.export.formats import choose_format, megatron_routing

# TransformerEngine specs fuse the pre-attention / pre-MLP norm into the next
# linear and store grouped experts as one module with weight0..weightE-1. These
# renamings are Megatron's own (post_training/modelopt/gpt/state_dict_hooks.py and
# TEGroupedMLP's sharded state dict in extensions/transformer_engine.py).
_TE_TO_LOCAL = [
    (re.compile(r"(decoder\.layers\.\d+\.)self_attention\.linear_qkv\.layer_norm_weight$"),
     r"\1input_layernorm.weight"),
    (re.compile(r"(decoder\.layers\.\d+\.)mlp\.linear_fc1\.layer_norm_weight$"), r"\1pre_mlp_layernorm.weight"),
    (re.compile(r"(decoder\.layers\.\d+\.mlp\.experts\.)(linear_fc[12])\.weight(\d+)$"),
     r"\1local_experts.\3.\2.weight"),
]


def local_spec_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict under Megatron's local-spec key names, without ``_extra_state`` entries."""
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith("_extra_state"):
            continue
        new_key = key
        for pattern, replacement in _TE_TO_LOCAL:
            new_key = pattern.sub(replacement, new_key)
        if new_key in renamed:
            raise CheckpointError(f"state dict holds both '{key}' and another tensor named '{new_key}'")
        renamed[new_key] = value
    return renamed


def check_exportable(
    model: ModelConfig, moe: MoEConfig | None, tokenizer_vocab_size: int | None = None, fmt: str = "auto"
) -> tuple[str, str]:
    """(format, why) the model exports to; a ConfigError for what the format cannot compute."""
    if tokenizer_vocab_size is not None and tokenizer_vocab_size > model.vocab_size:
        raise ConfigError(
            f"tokenizer has {tokenizer_vocab_size} tokens but model '{model.name}' has vocab_size "
            f"{model.vocab_size}: its ids would index past the embedding"
        )
    return choose_format(model, moe, fmt)


def hf_config(model: ModelConfig, moe: MoEConfig | None, fmt: str | None = None, dtype: torch.dtype = torch.float32):
    """The LlamaConfig / MixtralConfig / Qwen2MoeConfig computing the same function as the Megatron model.

    ``fmt`` None: the simplest exact format (``formats.choose_format``).
    """
    import transformers
    from transformers import LlamaConfig, MixtralConfig, Qwen2MoeConfig

    # The exporter writes transformers 5's module layout (fused experts) and lets its
    # save_pretrained write the Hub layout that transformers 4 reads too (compat.py).
    if int(transformers.__version__.split(".")[0]) < 5:
        raise UserError(f"export-hf needs transformers>=5 (found {transformers.__version__}): "
                        "pip install 'transformers>=5,<6'")
    if fmt is None:
        fmt, _ = choose_format(model, moe)

    head_dim = model.hidden_size // model.num_attention_heads
    common = dict(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_query_groups or model.num_attention_heads,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=model.seq_length,
        initializer_range=model.init_method_std,
        rms_norm_eps=model.norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(model.rotary_base)},
        tie_word_embeddings=False,
        attention_dropout=0.0,
        # Token ids are the tokenizer's business; the writer fills them in when it knows them.
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        dtype=dtype,
    )
    if fmt == "llama":
        return LlamaConfig(
            intermediate_size=model.ffn_hidden_size, attention_bias=False, mlp_bias=False, **common
        )
    assert moe is not None
    if fmt == "mixtral":
        return MixtralConfig(
            intermediate_size=moe.expert_ffn_hidden_size(model),
            num_local_experts=moe.num_experts,
            num_experts_per_tok=moe.topk,
            router_aux_loss_coef=moe.aux_loss_coeff,
            output_router_logits=False,
            router_jitter_noise=0.0,
            sliding_window=None,
            **common,
        )
    routing = megatron_routing(model, moe)
    return Qwen2MoeConfig(
        intermediate_size=model.ffn_hidden_size,  # the MLP of the layers that stay dense
        moe_intermediate_size=moe.expert_ffn_hidden_size(model),
        # No shared expert: one neuron wide, all weights zero, so it adds exactly 0.
        # Not zero-wide: transformers would load that, but vLLM then builds no shared
        # expert and fails on the (empty) weights in the files.
        shared_expert_intermediate_size=routing.shared_expert_size or 1,
        num_experts=moe.num_experts,
        num_experts_per_tok=moe.topk,
        # Top-k-then-softmax == softmax, top-k, renormalise; softmax-then-top-k: no renormalisation.
        norm_topk_prob=not routing.pre_softmax,
        decoder_sparse_step=1,
        mlp_only_layers=[i for i, flag in enumerate(routing.layer_pattern) if not flag],
        # Qwen2 attention has q/k/v biases (transformers before qkv_bias existed, and vLLM,
        # always build them): written as zeros, which add exactly nothing.
        qkv_bias=True,
        use_sliding_window=False,
        router_aux_loss_coef=moe.aux_loss_coeff,
        output_router_logits=False,
        **common,
    )


def split_qkv(qkv: torch.Tensor, num_heads: int, num_groups: int, head_dim: int):
    """Megatron's fused QKV weight -> (q, k, v) weights in head order.

    Rows are [ng, (np/ng + 2), hn]: per group its query heads, then its key head,
    then its value head. Query heads come out in global order g * (np/ng) + j,
    which is the order Megatron's attention reshapes them into.
    """
    per_group = num_heads // num_groups
    grouped = qkv.reshape(num_groups, per_group + 2, head_dim, qkv.shape[-1])
    q = grouped[:, :per_group].reshape(num_heads * head_dim, -1)
    k = grouped[:, per_group].reshape(num_groups * head_dim, -1)
    v = grouped[:, per_group + 1].reshape(num_groups * head_dim, -1)
    return q, k, v


class _Source:
    """Hands out source tensors by name with a shape check, and remembers which were used."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        self.tensors = local_spec_names(state_dict)
        self.used: set[str] = set()

    def take(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in self.tensors:
            raise CheckpointError(f"state dict has no '{key}' (is it a full TP=EP=1 GPTModel state dict?)")
        tensor = self.tensors[key]
        if tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(f"'{key}' has shape {tuple(tensor.shape)}, the model config expects {tuple(shape)}")
        self.used.add(key)
        return tensor

    def check_all_used(self) -> None:
        unused = sorted(set(self.tensors) - self.used)
        if unused:
            shown = ", ".join(unused[:5]) + (f" and {len(unused) - 5} more" if len(unused) > 5 else "")
            raise CheckpointError(f"state dict has tensors the export does not map: {shown}")


def megatron_to_hf(
    state_dict: dict[str, torch.Tensor],
    model: ModelConfig,
    moe: MoEConfig | None,
    tokenizer_vocab_size: int | None = None,
    fmt: str = "auto",
):
    """(HF config, HF state dict) for a full Megatron GPTModel state dict; ``config.model_type`` is the format.

    The state dict keys are exactly those of the installed transformers'
    LlamaForCausalLM / MixtralForCausalLM / Qwen2MoeForCausalLM (transformers 5 stores
    experts fused: ``mlp.experts.gate_up_proj`` [E, 2I, d] and ``mlp.experts.down_proj``
    [E, d, I]). Tensors keep the source dtype and own their storage.
    """
    fmt, _ = check_exportable(model, moe, tokenizer_vocab_size, fmt)
    config = hf_config(model, moe, fmt)
    src = _Source(state_dict)
    d, V = model.hidden_size, model.vocab_size
    heads = model.num_attention_heads
    groups = model.num_query_groups or heads
    hd = d // heads
    pattern = moe.layer_pattern(model.num_layers) if moe is not None else [0] * model.num_layers
    shared_size = megatron_routing(model, moe).shared_expert_size if fmt == "qwen2_moe" else None
    out: dict[str, torch.Tensor] = {}

    out["model.embed_tokens.weight"] = src.take("embedding.word_embeddings.weight", (V, d))
    for i in range(model.num_layers):
        s, t = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[t + "input_layernorm.weight"] = src.take(s + "input_layernorm.weight", (d,))
        qkv = src.take(s + "self_attention.linear_qkv.weight", ((heads + 2 * groups) * hd, d))
        q, k, v = split_qkv(qkv, heads, groups, hd)
        out[t + "self_attn.q_proj.weight"] = q
        out[t + "self_attn.k_proj.weight"] = k
        out[t + "self_attn.v_proj.weight"] = v
        if fmt == "qwen2_moe":
            for name, rows in (("q_proj", heads * hd), ("k_proj", groups * hd), ("v_proj", groups * hd)):
                out[f"{t}self_attn.{name}.bias"] = q.new_zeros(rows)
        out[t + "self_attn.o_proj.weight"] = src.take(s + "self_attention.linear_proj.weight", (d, heads * hd))
        out[t + "post_attention_layernorm.weight"] = src.take(s + "pre_mlp_layernorm.weight", (d,))
        if not pattern[i]:
            ffn = model.ffn_hidden_size
            gate, up = src.take(s + "mlp.linear_fc1.weight", (2 * ffn, d)).chunk(2, dim=0)
            out[t + "mlp.gate_proj.weight"] = gate
            out[t + "mlp.up_proj.weight"] = up
            out[t + "mlp.down_proj.weight"] = src.take(s + "mlp.linear_fc2.weight", (d, ffn))
            continue
        E, ffn = moe.num_experts, moe.expert_ffn_hidden_size(model)
        out[t + "mlp.gate.weight"] = src.take(s + "mlp.router.weight", (E, d))
        experts = s + "mlp.experts.local_experts."
        # Megatron's fc1 is already [gate; up], the row order of gate_up_proj.
        out[t + "mlp.experts.gate_up_proj"] = torch.stack(
            [src.take(f"{experts}{e}.linear_fc1.weight", (2 * ffn, d)) for e in range(E)]
        )
        out[t + "mlp.experts.down_proj"] = torch.stack(
            [src.take(f"{experts}{e}.linear_fc2.weight", (d, ffn)) for e in range(E)]
        )
        if fmt == "qwen2_moe":
            out.update(_qwen2_shared_expert(src, s, t, d, config.shared_expert_intermediate_size, shared_size))
    out["model.norm.weight"] = src.take("decoder.final_layernorm.weight", (d,))
    out["lm_head.weight"] = src.take("output_layer.weight", (V, d))
    src.check_all_used()

    # Slices (q/k/v, gate/up) would share storage; safetensors writers treat that as tying.
    out = {key: tensor.detach().clone().contiguous() for key, tensor in out.items()}
    check_matches_hf_class(config, out)
    return config, out


def _qwen2_shared_expert(src: "_Source", s: str, t: str, d: int, size: int,
                         shared_size: int | None) -> dict[str, torch.Tensor]:
    """Qwen2-MoE computes sigmoid(shared_expert_gate . x) * shared_expert(x); Megatron adds shared(x).

    With the gate's weight zero the gate is sigmoid(0) = 1/2 exactly for every token, so
    the down projection is doubled: 1/2 * ((2 W) h) == W h bit for bit (scaling by a power
    of two is exact in binary floating point, in fp32, bf16 and fp16 alike). Without a
    shared expert (``shared_size`` None) it is one neuron of zeros:
    down(silu(0) * 0) = 0 exactly.
    """
    if shared_size is None:
        zeros = src.tensors[s + "mlp.router.weight"].new_zeros
        return {t + "mlp.shared_expert.gate_proj.weight": zeros(size, d),
                t + "mlp.shared_expert.up_proj.weight": zeros(size, d),
                t + "mlp.shared_expert.down_proj.weight": zeros(d, size),
                t + "mlp.shared_expert_gate.weight": zeros(1, d)}
    fc1 = src.take(s + "mlp.shared_experts.linear_fc1.weight", (2 * size, d))
    fc2 = src.take(s + "mlp.shared_experts.linear_fc2.weight", (d, size))
    gate, up = fc1.chunk(2, dim=0)
    return {t + "mlp.shared_expert.gate_proj.weight": gate, t + "mlp.shared_expert.up_proj.weight": up,
            t + "mlp.shared_expert.down_proj.weight": fc2 * 2,
            t + "mlp.shared_expert_gate.weight": fc2.new_zeros(1, d)}


def hf_model_class(config):
    from transformers import LlamaForCausalLM, MixtralForCausalLM, Qwen2MoeForCausalLM

    return {"llama": LlamaForCausalLM, "mixtral": MixtralForCausalLM,
            "qwen2_moe": Qwen2MoeForCausalLM}[config.model_type]


def check_matches_hf_class(config, hf_state: dict[str, torch.Tensor]) -> None:
    """Names and shapes equal those of the installed transformers class (built on the meta device)."""
    cls = hf_model_class(config)
    with torch.device("meta"):
        reference = {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in hf_state.items()}
    missing, extra = sorted(set(reference) - set(ours)), sorted(set(ours) - set(reference))
    wrong = sorted(k for k in set(reference) & set(ours) if reference[k] != ours[k])
    if missing or extra or wrong:
        import transformers

        raise CheckpointError(
            f"export does not match {cls.__name__} of transformers {transformers.__version__}: "
            f"missing {missing[:3]}, unexpected {extra[:3]}, wrong shapes "
            f"{[(k, ours[k], reference[k]) for k in wrong[:3]]} (this exporter targets transformers 5)"
        )
