"""The analytic inference cost against hand computations, and its parameter groups against the Megatron model."""
from __future__ import annotations

import json

import pytest

from megatron_upcycle.config.model import ModelConfig, MoEConfig
from megatron_upcycle.inference.cost import (H100_SXM, Hardware, ModelShape, decode_step, expected_distinct_experts,
                                             forward_flops_per_token, inference_cost, kv_cache_bytes_per_token,
                                             max_batch, weight_bytes)

# d = 8, 2 layers, 2 heads of 4, 1 query group, f = 32, V = 10.
SMALL = ModelConfig(name="hand", num_layers=2, hidden_size=8, num_attention_heads=2, num_query_groups=1,
                    ffn_hidden_size=32, vocab_size=10, seq_length=16)
# 1 TB/s makes seconds easy to read off bytes; a 1 PFLOP/s peak keeps these tiny models memory-bound.
UNIT = Hardware("unit", memory_bytes=1e6, bandwidth_bytes_per_s=1e12, peak_flops_per_s=1e15)


def test_dense_counts_by_hand():
    s = ModelShape.from_config(SMALL, None)
    attention = 8 * (2 + 2 * 1) * 4 + 2 * 4 * 8  # qkv 8 x 16 + proj 8 x 8 = 192
    mlp = 3 * 8 * 32  # 768
    norms = 2 * 2 * 8 + 8  # 40
    assert s.non_embedding == 2 * (attention + mlp) + norms == 1960
    assert s.total == 1960 + 2 * 10 * 8
    assert weight_bytes(s) == 2 * 2120
    assert kv_cache_bytes_per_token(s) == 2 * 2 * 4 * 2  # K and V, 2 layers, 1 group of 4, bf16
    # 2 per active weight (non-embedding + output layer) + 4 L context d attention.
    assert forward_flops_per_token(s, context_tokens=5) == 2 * (1960 + 80) + 4 * 2 * 5 * 8


def test_moe_counts_by_hand():
    moe = MoEConfig(num_experts=4, topk=2, granularity=2, shared_expert=True, layers=[1])
    s = ModelShape.from_config(SMALL, moe)
    expert = 3 * 8 * 16  # f / g = 16 neurons
    always = 2 * 192 + 40 + 768 + (768 + 4 * 8)  # attention, norms, layer 0 dense MLP, layer 1 shared + router
    assert s.expert_params == expert and s.moe_layers == 1 and s.dense_layers == 1
    assert s.non_embedding == always + 4 * expert
    assert s.active_non_embedding == always + 2 * expert


def test_expected_distinct_experts():
    assert expected_distinct_experts(8, 2, 1) == pytest.approx(2)
    assert expected_distinct_experts(8, 2, 2) == pytest.approx(8 * (1 - 0.75 ** 2))  # 3.5
    assert expected_distinct_experts(8, 1, 1000) == pytest.approx(8)
    assert expected_distinct_experts(0, 0, 5) == 0


def test_decode_step_reads_the_touched_experts_only():
    moe = MoEConfig(num_experts=4, topk=1)
    s = ModelShape.from_config(SMALL, moe)
    expert = 3 * 8 * 32
    always = 2 * 192 + 40 + 2 * 4 * 8  # attention, norms, routers
    step = decode_step(s, batch=2, context_tokens=3, hardware=UNIT)
    distinct = 4 * (1 - 0.75 ** 2)
    weights = always + 2 * distinct * expert + 80 + 2 * 8  # + output layer + 2 embedding rows
    assert step.weight_bytes == pytest.approx(2 * weights)
    assert step.kv_bytes == 2 * 3 * kv_cache_bytes_per_token(s)
    assert step.flops == 2 * forward_flops_per_token(s, 3)
    assert step.memory_seconds == pytest.approx((2 * weights + step.kv_bytes) / 1e12)
    assert step.bound == "memory" and step.tokens_per_second == pytest.approx(2 / step.memory_seconds)
    # Batch 1 reads exactly one expert per layer: the same bytes as the dense model with an extra router.
    one = decode_step(s, 1, 3, UNIT)
    dense = decode_step(ModelShape.from_config(SMALL, None), 1, 3, UNIT)
    assert one.weight_bytes - dense.weight_bytes == pytest.approx(2 * 2 * 4 * 8)


def test_max_batch_by_hand():
    s = ModelShape.from_config(SMALL, None)
    per_sequence = 16 * kv_cache_bytes_per_token(s)  # 16 tokens of context, 32 bytes each
    assert max_batch(s, memory_bytes=weight_bytes(s) + 10 * per_sequence + 1, context_tokens=16) == 10
    assert max_batch(s, memory_bytes=weight_bytes(s) - 1, context_tokens=16) == 0


def test_report_marks_batches_that_do_not_fit():
    s = ModelShape.from_config(SMALL, None)
    report = inference_cost(s, 16, Hardware("tiny", weight_bytes(s) + 4 * 16 * 32, 1e12, 1e12), batches=(1, 4, 5))
    assert report["max_batch"] == 4
    assert [d["fits_memory"] for d in report["decode"]] == [True, True, False]


@pytest.mark.parametrize("moe", [None, MoEConfig(num_experts=4, topk=2),
                                 MoEConfig(num_experts=4, topk=2, granularity=2, shared_expert=True, layers=[1])])
def test_parameter_groups_equal_the_megatron_count(megatron_cpu, moe):
    from megatron_upcycle.counts import count_params

    model = ModelConfig(name="count", num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                        vocab_size=512)
    counted = count_params(model, moe, megatron_cpu)
    shape = ModelShape.from_config(model, moe)
    assert shape.non_embedding == counted.non_embedding
    assert shape.active_non_embedding == counted.active_non_embedding
    assert shape.total == counted.total


def test_paper_1b_on_h100():
    from megatron_upcycle.config import load_model_config

    model = load_model_config("1B")
    dense, moe = ModelShape.from_config(model, None), ModelShape.from_config(model, MoEConfig(8, 1))
    assert moe.non_embedding == 6_786_500_704  # Table 3
    d1, m1 = decode_step(dense, 1, 1024), decode_step(moe, 1, 1024)
    assert m1.tokens_per_second / d1.tokens_per_second == pytest.approx(1.0, abs=1e-3)  # top-1 reads one expert
    d64, m64 = decode_step(dense, 64, 1024), decode_step(moe, 64, 1024)
    assert m64.distinct_experts_per_moe_layer == pytest.approx(8 * (1 - (7 / 8) ** 64))
    assert m64.weight_bytes / d64.weight_bytes > 4  # every expert is read at batch 64
    assert H100_SXM.bandwidth_bytes_per_s == 3.35e12


def test_model_info_prints_the_inference_cost():
    from conftest import run_cli

    result = run_cli("model", "info", "15M", "--experts", "8", "--topk", "2", "--context", "512", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    moe = report["inference"]["MoE"]
    assert moe["context_tokens"] == 512 and moe["experts"] == 8
    assert moe["weight_bytes"] == 2 * (report["Ntotal"] + report["embedding_params"])
    assert [d["batch"] for d in moe["decode"]] == [1, 8, 32, 128]
    text = run_cli("model", "info", "15M", "--experts", "8", "--decode-batches", "0")
    assert text.returncode == 2 and "--decode-batches" in text.stderr
