"""The advisor's serving term: memory-bound ratio by hand, the crossover, and a measured ratio from a results file."""
from __future__ import annotations

import json

import pytest

from megatron_upcycle.atomic import write_json_atomic
from megatron_upcycle.inference.results import build_results
from megatron_upcycle.inference.serving import (ServingEstimate, crossover, measured_ratio, memory_bound_ratio,
                                                serving_advice)
from megatron_upcycle.scaling import paper_predictors
from conftest import run_cli

N1, D1, D2 = 1e9, 1e11, 5e10


def test_memory_bound_ratio_by_hand():
    assert memory_bound_ratio(8, 2, 1) == pytest.approx((4 + 12 * 2) / 16)  # = N2 / N1 at batch 1
    assert memory_bound_ratio(8, 1, 2) == pytest.approx((4 + 12 * 8 * (1 - (7 / 8) ** 2)) / 16)
    assert memory_bound_ratio(8, 2, 10_000) == pytest.approx(100 / 16)


def test_crossover_is_where_dense_cpt_reaches_the_upcycled_loss():
    pred = paper_predictors(1.75)
    ratio = 3.0
    t_star = crossover(pred, N1, D1, D2, ratio)
    assert t_star is not None and t_star > 0
    upcycled = float(pred.upcycled_loss(D1, D2, N1))
    cpt_tokens = (6 * 1.75 * N1 * D2 + 2 * N1 * t_star * (ratio - 1)) / (6 * N1)
    assert float(pred.dense_loss(D1 + cpt_tokens, N1)) == pytest.approx(upcycled, abs=1e-6)
    # Below the crossover upcycling wins, above it dense CPT does; a dearer MoE crosses earlier.
    fixed = ServingEstimate("measured", ratio, "a fixed ratio")
    below = serving_advice(pred, N1, D1, t_star / 2, tokens=D2, estimate="measured", measured=fixed)
    above = serving_advice(pred, N1, D1, t_star * 2, tokens=D2, estimate="measured", measured=fixed)
    assert (below.recommendation, above.recommendation) == ("upcycle", "dense_cpt")
    assert below.crossover_tokens == pytest.approx(t_star)
    assert crossover(pred, N1, D1, D2, 6.0) < t_star
    assert crossover(pred, N1, D1, D2, 1.0) is None  # no serving penalty: CPT never gets more tokens


def _results_file(path, dense_tps: float, moe_tps: float):
    rows = [{"workload": "offline", "model": m, "role": r, "batch_size": 4, "request_rate": None, "repeat": i,
             "tokens_per_s": tps * (1 + 0.01 * i), "tokens": 40, "wall_s": 1.0, "cpu_s": 1.0}
            for m, r, tps in (("dense", "dense", dense_tps), ("moe-8x", "moe", moe_tps)) for i in range(3)]
    models = [{"label": "dense", "role": "dense"}, {"label": "moe-8x", "role": "moe"}]
    results = build_results({"engine": {"name": "transformers", "device": "cpu"}}, models, rows)
    write_json_atomic(path, results)
    return path


def test_measured_ratio_is_dense_over_moe_throughput(tmp_path):
    est = measured_ratio(_results_file(tmp_path / "results.json", 100.0, 60.0))
    assert est.cost_ratio == pytest.approx(100 / 60)
    assert "moe-8x" in est.description and "transformers" in est.description


def test_advise_cli_states_the_estimate_and_the_crossover(tmp_path):
    path = _results_file(tmp_path / "results.json", 100.0, 50.0)
    result = run_cli("advise", "--n1", "1e9", "--d1", "1e11", "--tokens", "5e10", "--paper", "--serve-tokens", "1e12",
                     "--serve-ratio-from", str(path), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    serving = json.loads(result.stdout)["serving"]
    assert serving["estimate"]["name"] == "measured" and serving["estimate"]["cost_ratio"] == pytest.approx(2.0)
    assert set(serving["crossovers"]) == {"compute", "memory", "measured"}
    text = run_cli("advise", "--n1", "1e9", "--d1", "1e11", "--tokens", "5e10", "--paper", "--serve-tokens", "1e12")
    assert "estimate used: memory" in text.stdout and "dense CPT beats upcycling from" in text.stdout
    bad = run_cli("advise", "--n1", "1e9", "--d1", "1e11", "--tokens", "5e10", "--paper", "--serve-tokens", "1e12",
                  "--serve-estimate", "measured")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "upcycle: error: --serve-estimate measured needs --serve-ratio-from RESULTS.json"]
    not_results = tmp_path / "other.json"
    not_results.write_text("{}")
    wrong = run_cli("advise", "--n1", "1e9", "--d1", "1e11", "--tokens", "5e10", "--paper", "--serve-tokens", "1",
                    "--serve-ratio-from", str(not_results))
    assert wrong.returncode == 2 and "not a bench-inference results file" in wrong.stderr
