"""Checkpoints a stock Megatron-Core GPTModel loads, and both key layouts on the way in.

A converted all-MoE checkpoint is loaded by a GPTModel built only from Megatron-Core
(its own default local spec, default ``moe_layer_freq=1``: what Megatron-LM's
pretrain_gpt.py builds) with ``dist_checkpointing.load`` into its own sharded state
dict, and must reproduce the logits the converter verified. The engine, export and
the converter accept dense and MoE checkpoints in both layouts (stacked
``decoder.layers.<key>`` and per-layer ``decoder.layers.<i>.<key>``); resuming from
either is bit-exact. fp32, CPU, gloo, one process.
"""
import pytest
import torch
import torch.nn.functional as F

from megatron_upcycle.checkpoint.layer_layout import PER_LAYER, STACKED, checkpoint_layout, layout_of_keys
from megatron_upcycle.config import ModelConfig, MoEConfig

MODEL = ModelConfig(name="stock-2L", num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                    vocab_size=128, seq_length=16, init_method_std=0.1)
MOE = MoEConfig(4, 2)


@pytest.fixture(scope="module")
def groups():
    from megatron_upcycle.parallel import single_process_groups

    with single_process_groups():
        yield


@pytest.fixture(scope="module")
def converted(groups, tmp_path_factory):
    from megatron_upcycle.upcycle import convert_dense_to_moe
    from megatron_upcycle.upcycle.synthetic import write_synthetic_dense

    root = tmp_path_factory.mktemp("stock")
    write_synthetic_dense(root / "dense", MODEL, dtype=torch.float32)
    result = convert_dense_to_moe(root / "dense", root / "moe", MOE)
    assert result.status == "ok" and result.report.require_exact
    return root / "dense", root / "moe", result.report


def stock_gpt_model(spec_kind: str):
    """A GPTModel from Megatron-Core alone: the TransformerConfig Megatron-LM's arguments give
    for this Llama-style model, Megatron's own default spec, no project code."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=MODEL.num_layers, hidden_size=MODEL.hidden_size, num_attention_heads=MODEL.num_attention_heads,
        ffn_hidden_size=MODEL.ffn_hidden_size, gated_linear_unit=True, activation_func=F.silu,
        normalization="RMSNorm", layernorm_epsilon=MODEL.norm_epsilon, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=MODEL.init_method_std,
        num_moe_experts=MOE.num_experts, moe_router_topk=MOE.topk, moe_ffn_hidden_size=MODEL.ffn_hidden_size,
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-3, moe_token_dispatcher_type="allgather",
        moe_router_dtype="fp32", use_cpu_initialization=True, bias_activation_fusion=False,
        masked_softmax_fusion=False, bias_dropout_fusion=False, persist_layer_norm=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, attention_backend=AttnBackend.local,
    )  # moe_layer_freq left at Megatron's default (1)
    if spec_kind == "layer_local_spec":
        spec = get_gpt_layer_local_spec(num_experts=MOE.num_experts, moe_grouped_gemm=False, normalization="RMSNorm")
    else:
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=MODEL.vocab_size,
                    max_sequence_length=MODEL.seq_length, position_embedding_type="rope",
                    rotary_base=MODEL.rotary_base, share_embeddings_and_output_weights=False)


def verify_batch():
    """The tokens ``verify_checkpoints`` fed both models (seed 0, batch 2)."""
    return torch.randint(0, MODEL.vocab_size, (2, MODEL.seq_length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("spec_kind", ["layer_local_spec", "decoder_block_spec"])
def test_stock_gptmodel_loads_a_converted_checkpoint_and_reproduces_its_verified_logits(converted, spec_kind):
    from megatron.core import dist_checkpointing

    from megatron_upcycle.checkpoint import load_model
    from megatron_upcycle.verify import compare_models, load_dense_model

    dense_dir, moe_dir, report = converted
    assert checkpoint_layout(moe_dir) == STACKED
    stock = stock_gpt_model(spec_kind)
    sharded = stock.sharded_state_dict()
    assert layout_of_keys(sh.key for sh in sharded.values()) == STACKED
    # as Megatron-LM's load_checkpoint does: {"model": sharded state dict}, then load_state_dict
    loaded = dist_checkpointing.load({"model": sharded}, str(moe_dir))
    stock.load_state_dict(loaded["model"], strict=True)

    dense_model, _ = load_dense_model(dense_dir)
    stats = compare_models(dense_model, stock, verify_batch())
    assert stats["logit_max_abs"] == report.logit_max_abs <= 1e-5 * max(1.0, stats["logit_scale"])
    assert stats["layer_max_abs"] == report.layer_max_abs and stats["top1_agreement"] == 1.0
    engine_model, _ = load_model(moe_dir)
    positions = torch.arange(MODEL.seq_length).expand(2, MODEL.seq_length)
    with torch.no_grad():
        assert torch.equal(stock(verify_batch(), positions, None), engine_model(verify_batch(), positions, None))


# ---------------------------------------------------------------- both layouts, engine side
def _model_and_optimizer(moe, seed):
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_upcycle.backend import select_backend
    from megatron_upcycle.models import build_gpt_model

    torch.manual_seed(seed)
    model = build_gpt_model(MODEL, moe, select_backend(force_cpu=True))
    ddp = DDP(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    config = OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.1, params_dtype=torch.float32)
    return ddp, get_megatron_optimizer(config, [ddp])


def _train(ddp, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    pos = torch.arange(MODEL.seq_length).expand(2, MODEL.seq_length)
    for _ in range(steps):
        toks = torch.randint(0, MODEL.vocab_size, (2, MODEL.seq_length), generator=gen)
        ddp.zero_grad_buffer()
        opt.zero_grad()
        ddp(toks, pos, None, labels=toks).mean().backward()
        ddp.finish_grad_sync()
        opt.step()


def _params(ddp) -> dict:
    return {k: v.detach().clone() for k, v in ddp.module.state_dict().items() if not k.endswith("_extra_state")}


@pytest.mark.parametrize("moe", [None, MOE, MoEConfig(4, 2, layers="every_other")], ids=["dense", "moe", "mixed"])
def test_engine_resumes_bit_exactly_and_export_reads_from_both_layouts(groups, tmp_path, moe):
    from megatron_upcycle.checkpoint import CheckpointMeta, CheckpointRecord, load_checkpoint, load_full_model_state
    from megatron_upcycle.checkpoint import save_checkpoint

    ddp, opt = _model_and_optimizer(moe, seed=1)
    _train(ddp, opt, 2, seed=5)
    meta = CheckpointMeta(MODEL, moe, iteration=2, tokens=64, run_kind="moe" if moe else "dense")
    record = CheckpointRecord("iter_0000002", 2, 64, 1e-3, "stable", "safety")
    paths = {}
    for layout in (None, PER_LAYER):
        paths[layout] = save_checkpoint(tmp_path / str(layout), record, ddp, opt, None, {"iteration": 2}, meta,
                                        layout=layout)
    mixed = moe is not None and moe.layers != "all"
    assert checkpoint_layout(paths[None]) == (PER_LAYER if mixed else STACKED)  # the stock layout
    assert checkpoint_layout(paths[PER_LAYER]) == PER_LAYER
    _train(ddp, opt, 2, seed=6)
    expected = _params(ddp)

    exported = []
    for path in paths.values():
        resumed, resumed_opt = _model_and_optimizer(moe, seed=99)  # other init: the load must overwrite it
        load_checkpoint(path, resumed, resumed_opt)
        _train(resumed, resumed_opt, 2, seed=6)
        got = _params(resumed)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected), path
        exported.append(load_full_model_state(path)[2])
    assert exported[0].keys() == exported[1].keys()
    assert all(torch.equal(exported[0][k], exported[1][k]) for k in exported[0])


def test_a_stacked_checkpoint_is_refused_by_a_mixed_model_in_one_line(converted):
    from megatron_upcycle.checkpoint import load_checkpoint
    from megatron_upcycle.errors import CheckpointError

    mixed, _ = _model_and_optimizer(MoEConfig(4, 2, layers="every_other"), seed=0)
    with pytest.raises(CheckpointError, match="stores decoder layers stacked.*mixes dense and MoE"):
        load_checkpoint(converted[1], mixed, load_rng=False)


def test_converter_and_verifier_read_a_per_layer_dense_checkpoint(converted, tmp_path):
    """The same dense weights saved per layer convert to the same MoE tensors."""
    from megatron.core import dist_checkpointing

    from megatron_upcycle.checkpoint import load_model, save_checkpoint
    from megatron_upcycle.checkpoint import CheckpointMeta, CheckpointRecord
    from megatron_upcycle.upcycle import convert_dense_to_moe
    from megatron_upcycle.verify import load_dense_model

    dense_dir, moe_dir, _ = converted
    dense_model, _ = load_dense_model(dense_dir)
    record = CheckpointRecord("iter_0000000", 0, 0, 0.0, "stable", "safety")
    per_layer = save_checkpoint(tmp_path / "ckpts", record, dense_model, None, None, {"iteration": 0},
                                CheckpointMeta(MODEL, None, run_kind="dense"), layout=PER_LAYER)
    assert checkpoint_layout(per_layer) == PER_LAYER
    reloaded, _ = load_model(per_layer)  # the engine's loader, per-layer dense
    assert all(torch.equal(a, b) for a, b in zip(reloaded.parameters(), dense_model.parameters()))
    result = convert_dense_to_moe(per_layer, tmp_path / "moe", MOE)
    assert result.status == "ok" and checkpoint_layout(tmp_path / "moe") == STACKED

    def plain(path):
        return {k: v for k, v in dist_checkpointing.load_plain_tensors(str(path)).items() if torch.is_tensor(v)}

    a, b = plain(moe_dir), plain(tmp_path / "moe")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
