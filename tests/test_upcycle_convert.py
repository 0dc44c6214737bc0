"""The streaming converter end to end on a tiny model: every init variant, verified.

Each conversion writes a real torch_dist MoE checkpoint, reads it back (tensors
and through ``load_checkpoint`` into a Megatron GPTModel) and runs the dense and
the MoE model on the same batch.
"""
import math
from pathlib import Path

import pytest
import torch

from megatron_upcycle.config import ModelConfig, MoEConfig
from megatron_upcycle.errors import CheckpointError
from megatron_upcycle.upcycle import UpcycleOptions, convert_dense_to_moe, load_carried_moments

MODEL = ModelConfig(name="test-3L", num_layers=3, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                    vocab_size=256, seq_length=32, init_method_std=0.1)
FFN, D = 64, 32


@pytest.fixture(scope="module")
def groups():
    from megatron_upcycle.backend import select_backend
    from megatron_upcycle.parallel import ParallelConfig, destroy_distributed, init_distributed

    init_distributed(select_backend(force_cpu=True), ParallelConfig(), seed=0)
    yield
    destroy_distributed()


def _train_steps(ddp, opt, steps=2):
    toks = torch.randint(0, MODEL.vocab_size, (2, MODEL.seq_length), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(MODEL.seq_length).expand(2, MODEL.seq_length)
    for _ in range(steps):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        ddp(toks, pos, None, labels=toks).mean().backward()
        ddp.finish_grad_sync()
        opt.step()


def _megatron_model_and_optimizer(moe):
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_upcycle.backend import select_backend
    from megatron_upcycle.models import build_gpt_model

    model = build_gpt_model(MODEL, moe, select_backend(force_cpu=True))
    ddp = DDP(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    config = OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.1, params_dtype=torch.float32)
    return ddp, get_megatron_optimizer(config, [ddp])


@pytest.fixture(scope="module")
def dense(groups, tmp_path_factory):
    """An engine checkpoint (stacked keys, fp32) with Megatron optimizer state after 3 steps."""
    from megatron_upcycle.checkpoint import CheckpointMeta, CheckpointRecord, save_checkpoint

    ddp, opt = _megatron_model_and_optimizer(None)
    _train_steps(ddp, opt, 3)
    root = tmp_path_factory.mktemp("dense")
    meta = CheckpointMeta(MODEL, None, iteration=3, tokens=192, run_kind="dense", tokenizer="gpt2")
    path = save_checkpoint(root, CheckpointRecord("iter_0000003", 3, 192, 1e-3, "stable", "safety"),
                           ddp, opt, None, {"iteration": 3}, meta)
    return path, opt, ddp


def tensors(path) -> dict:
    """Every tensor of a checkpoint; stacked layer tensors (decoder.layers.<key>, the stock layout)
    are also given per layer (decoder.layers.<i>.<key>), so one assertion serves both layouts."""
    import re

    from megatron.core import dist_checkpointing

    plain = {k: v for k, v in dist_checkpointing.load_plain_tensors(str(path)).items() if torch.is_tensor(v)}
    stacked = re.compile(r"^((?:.*\.)?decoder\.layers\.)(?!\d+\.)(.*)$")
    for key, value in list(plain.items()):
        if m := stacked.match(key):
            plain.update({f"{m.group(1)}{i}.{m.group(2)}": value[i] for i in range(value.shape[0])})
    return plain


def dense_mlp(dense_tensors, layer):
    fc1 = dense_tensors["decoder.layers.mlp.linear_fc1.weight"][layer]
    return fc1[:FFN], fc1[FFN:], dense_tensors["decoder.layers.mlp.linear_fc2.weight"][layer]


def experts(moe_tensors, layer):
    fc1 = moe_tensors[f"decoder.layers.{layer}.mlp.experts.experts.linear_fc1.weight"]
    fc2 = moe_tensors[f"decoder.layers.{layer}.mlp.experts.experts.linear_fc2.weight"]
    half = fc1.shape[1] // 2
    return [(fc1[e, :half], fc1[e, half:], fc2[e]) for e in range(fc1.shape[0])]


def convert(dense_path, out, moe, **options):
    extra = {k: options.pop(k) for k in ("require_exact", "verify", "model") if k in options}
    return convert_dense_to_moe(dense_path, out, moe, UpcycleOptions(**options), **extra)


def test_copy_preserves_the_function_and_records_provenance(dense, tmp_path):
    from megatron.core import dist_checkpointing

    from megatron_upcycle.checkpoint import read_meta

    result = convert(dense[0], tmp_path / "moe", MoEConfig(4, 2))
    assert result.status == "ok" and result.out == tmp_path / "moe"
    assert result.report.require_exact and result.report.logit_max_abs <= 1e-5
    assert result.report.top1_agreement == 1.0 and len(result.report.layer_max_abs) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]  # no temporary left
    meta = read_meta(tmp_path / "moe")
    assert meta.run_kind == "convert" and not meta.has_optimizer and meta.moe.num_experts == 4
    assert meta.tokenizer == "gpt2"
    prov = meta.provenance
    assert prov["source"] == str(Path(dense[0]).resolve()) and prov["source_tokens"] == 192
    assert prov["seed"] == 1234 and prov["options"]["init"] == "copy" and "converter_version" in prov
    assert prov["verification"]["passed"] is True
    common = dist_checkpointing.load_common_state_dict(str(tmp_path / "moe"))["common"]
    assert common["has_rng"] is False and common["world_size"] == 1
    d, m = tensors(dense[0]), tensors(tmp_path / "moe")
    # every layer MoE: the stock (stacked) layout, experts along a second axis
    assert m["decoder.layers.mlp.experts.experts.linear_fc1.weight"].shape == (3, 4, 2 * FFN, D)
    for layer in range(3):
        gate, up, down = dense_mlp(d, layer)
        for eg, eu, ed in experts(m, layer):
            assert torch.equal(eg, gate) and torch.equal(eu, up) and torch.equal(ed, down)
        assert torch.equal(m[f"decoder.layers.{layer}.self_attention.linear_qkv.weight"],
                           d["decoder.layers.self_attention.linear_qkv.weight"][layer])
    assert torch.equal(m["embedding.word_embeddings.weight"], d["embedding.word_embeddings.weight"])
    assert torch.equal(m["output_layer.weight"], d["output_layer.weight"])


def test_router_std_paper_given_and_zero(dense, tmp_path):
    for name, router, expected in [("paper", "paper", math.sqrt(2 / (5 * D))), ("given", "0.3", 0.3),
                                   ("zero", "zero", 0.0)]:
        result = convert(dense[0], tmp_path / name, MoEConfig(8, 2), router_init=router)
        assert result.report.passed and result.report.logit_max_abs <= 1e-5
        routers = torch.cat([tensors(tmp_path / name)[f"decoder.layers.{i}.mlp.router.weight"].flatten()
                             for i in range(3)])
        assert routers.numel() == 3 * 8 * D
        if expected == 0.0:
            assert torch.count_nonzero(routers) == 0
        else:
            assert abs(routers.std().item() / expected - 1) < 0.1 and abs(routers.mean().item()) < 0.2 * expected


def test_noise_reports_drift_and_is_seed_deterministic(dense, tmp_path):
    a = convert(dense[0], tmp_path / "a", MoEConfig(4, 2), init="noise", noise_scale=0.05, seed=7)
    b = convert(dense[0], tmp_path / "b", MoEConfig(4, 2), init="noise", noise_scale=0.05, seed=7)
    c = convert(dense[0], tmp_path / "c", MoEConfig(4, 2), init="noise", noise_scale=0.05, seed=8)
    assert a.status == "ok" and not a.report.require_exact
    assert 1e-5 < a.report.logit_max_abs < 1.0 and a.report.kl_mean > 0
    ta, tb, tc = tensors(tmp_path / "a"), tensors(tmp_path / "b"), tensors(tmp_path / "c")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not torch.equal(ta["decoder.layers.0.mlp.experts.experts.linear_fc1.weight"],
                           tc["decoder.layers.0.mlp.experts.experts.linear_fc1.weight"])
    gate, _, _ = dense_mlp(tensors(dense[0]), 0)
    noisy = [e[0] for e in experts(ta, 0)]
    assert not torch.equal(noisy[0], noisy[1])
    assert abs((noisy[0] - gate).std().item() / gate.std().item() - 0.05) < 0.01


def test_drop_reinitialises_fraction_r_with_one_index_set_per_expert(dense, tmp_path):
    result = convert(dense[0], tmp_path / "drop", MoEConfig(4, 2), init="drop", drop_fraction=0.25)
    assert result.status == "ok" and not result.report.require_exact and result.report.logit_max_abs > 1e-5
    d, m = tensors(dense[0]), tensors(tmp_path / "drop")
    for layer in range(3):
        gate, up, down = dense_mlp(d, layer)
        seen = set()
        for eg, eu, ed in experts(m, layer):
            rows_g = set((eg != gate).any(1).nonzero().flatten().tolist())
            rows_u = set((eu != up).any(1).nonzero().flatten().tolist())
            cols_d = set((ed != down).any(0).nonzero().flatten().tolist())
            assert rows_g == rows_u == cols_d and len(rows_g) == FFN // 4
            seen.add(tuple(sorted(rows_g)))
        assert len(seen) == 4  # a different index set for every expert


def test_granular_experts_exact_when_k_is_a_multiple_of_g_else_drift(dense, tmp_path):
    exact = convert(dense[0], tmp_path / "g2k2", MoEConfig(4, 2, granularity=2))
    assert exact.report.require_exact and exact.report.logit_max_abs <= 1e-5
    d, m = tensors(dense[0]), tensors(tmp_path / "g2k2")
    gate, up, down = dense_mlp(d, 1)
    for e, (eg, eu, ed) in enumerate(experts(m, 1)):
        rows = slice((e % 2) * 32, (e % 2 + 1) * 32)
        assert eg.shape == (32, D) and torch.equal(eg, gate[rows]) and torch.equal(eu, up[rows])
        torch.testing.assert_close(ed, down[:, rows] * 2)  # g x: each segment gets 1/g of a copy's weight
    router = m["decoder.layers.1.mlp.router.weight"]
    assert torch.equal(router[0], router[1]) and torch.equal(router[2], router[3])
    split = convert(dense[0], tmp_path / "g2k3", MoEConfig(4, 3, granularity=2))
    assert split.status == "ok" and not split.report.require_exact and split.report.logit_max_abs > 1e-5


def test_top1_softmax_then_topk_is_exact_with_a_zero_router_only(dense, tmp_path):
    zero = convert(dense[0], tmp_path / "zero", MoEConfig(4, 1), router_init="zero")
    assert zero.meta.moe.router_pre_softmax and zero.report.require_exact
    assert zero.report.logit_max_abs <= 1e-5
    fc2 = tensors(tmp_path / "zero")["decoder.layers.0.mlp.experts.experts.linear_fc2.weight"]
    torch.testing.assert_close(fc2[0], dense_mlp(tensors(dense[0]), 0)[2] * 4)  # E / k
    paper = convert(dense[0], tmp_path / "paper", MoEConfig(4, 1))
    assert not paper.report.require_exact and paper.report.logit_max_abs > 1e-5


def test_shared_expert_and_mixed_layers_are_exact(dense, tmp_path):
    moe = MoEConfig(4, 2, layers="every_other", shared_expert=True)
    result = convert(dense[0], tmp_path / "mixed", moe, shared_expert_weight=0.25)
    assert result.report.require_exact and result.report.logit_max_abs <= 1e-5
    d, m = tensors(dense[0]), tensors(tmp_path / "mixed")
    assert not any(k.startswith("decoder.layers.mlp.") for k in m)  # mixed layers: per-layer keys only
    # layer 1 stays dense: its MLP is the dense one, under the dense key layout
    assert torch.equal(m["decoder.layers.1.mlp.linear_fc1.weight"], d["decoder.layers.mlp.linear_fc1.weight"][1])
    assert "decoder.layers.1.mlp.router.weight" not in m
    gate, up, down = dense_mlp(d, 2)
    shared_fc2 = m["decoder.layers.2.mlp.shared_experts.linear_fc2.weight"]
    torch.testing.assert_close(shared_fc2, down * 0.25)
    torch.testing.assert_close(experts(m, 2)[0][2], down * 0.75)
    assert torch.equal(m["decoder.layers.2.mlp.shared_experts.linear_fc1.weight"], torch.cat([gate, up]))


def test_layer_list(dense, tmp_path):
    result = convert(dense[0], tmp_path / "one", MoEConfig(2, 2, layers=[1]))
    assert result.report.logit_max_abs <= 1e-5
    m = tensors(tmp_path / "one")
    assert "decoder.layers.1.mlp.router.weight" in m and "decoder.layers.0.mlp.router.weight" not in m


def test_failed_verification_is_kept_under_a_failed_name(dense, tmp_path):
    result = convert(dense[0], tmp_path / "moe", MoEConfig(4, 2), init="noise", require_exact=True)
    assert result.status == "failed" and not result.report.passed
    assert not (tmp_path / "moe").exists()
    assert result.out == tmp_path / "moe.failed" and (result.out / "VERIFICATION_FAILED.json").is_file()
    from megatron_upcycle.checkpoint import read_meta

    assert read_meta(result.out).run_kind == "convert-failed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe.failed"]


def test_output_is_never_overwritten(dense, tmp_path):
    (tmp_path / "moe").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        convert(dense[0], tmp_path / "moe", MoEConfig(4, 2))


def test_carried_moments_load_into_a_fresh_megatron_optimizer_and_train(dense, tmp_path):
    from megatron_upcycle.checkpoint import load_checkpoint, read_meta

    dense_path, dense_opt, dense_ddp = dense
    moe = MoEConfig(4, 2, granularity=2)
    result = convert(dense_path, tmp_path / "moe", moe, carry_moments=True, init="drop", drop_fraction=0.5)
    assert result.status == "ok" and read_meta(tmp_path / "moe").has_optimizer
    ddp, opt = _megatron_model_and_optimizer(moe)
    load_checkpoint(tmp_path / "moe", ddp)
    assert load_carried_moments(tmp_path / "moe", ddp, opt) == 3
    dense_fc1 = dense_ddp.module.decoder.layers[2].mlp.linear_fc1.weight
    dense_m = dense_opt.optimizer.state[dense_fc1]["exp_avg"]
    m_tensors = tensors(tmp_path / "moe")
    for e in range(4):
        param = ddp.module.decoder.layers[2].mlp.experts.local_experts[e].linear_fc1.weight
        state = opt.optimizer.state[param]
        rows = slice((e % 2) * 32, (e % 2 + 1) * 32)
        expected = torch.cat([dense_m[:FFN][rows], dense_m[FFN:][rows]])
        kept = (state["exp_avg"] != 0).any(1)
        assert kept.sum() == 32  # half of each 32-neuron segment dropped: zero moments there
        assert torch.equal(state["exp_avg"][kept], expected[kept])
        assert torch.equal(m_tensors[f"optimizer.state.exp_avg.decoder.layers.2.mlp.experts.experts."
                                     f"linear_fc1.weight"][e], state["exp_avg"])
        assert state["step"].item() == 3
    router = ddp.module.decoder.layers[0].mlp.router.weight
    assert torch.count_nonzero(opt.optimizer.state[router]["exp_avg_sq"]) == 0
    _train_steps(ddp, opt, 1)  # the optimizer steps with the carried state

    plain = _megatron_model_and_optimizer(moe)[0].module
    load_checkpoint(tmp_path / "moe", plain)
    adamw = torch.optim.AdamW(plain.parameters())
    load_carried_moments(tmp_path / "moe", plain, adamw)
    p = plain.decoder.layers[2].mlp.experts.local_experts[1].linear_fc2.weight
    q = ddp.module.decoder.layers[2].mlp.experts.local_experts[1].linear_fc2.weight
    assert adamw.state[p]["step"].item() == 3 and torch.count_nonzero(adamw.state[p]["exp_avg_sq"]) > 0
    del q


def test_carry_moments_needs_optimizer_state(tmp_path, groups):
    from megatron_upcycle.upcycle.synthetic import write_synthetic_dense

    write_synthetic_dense(tmp_path / "dense", MODEL)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        convert(tmp_path / "dense", tmp_path / "moe", MoEConfig(4, 2), carry_moments=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]


def test_bf16_source_stays_bf16_and_is_exact(tmp_path, groups):
    from megatron_upcycle.upcycle.synthetic import write_synthetic_dense

    write_synthetic_dense(tmp_path / "dense", MODEL, dtype=torch.bfloat16)
    result = convert(tmp_path / "dense", tmp_path / "moe", MoEConfig(4, 2))
    assert result.report.logit_max_abs <= 1e-5
    assert {t.dtype for t in tensors(tmp_path / "moe").values()} == {torch.bfloat16}
