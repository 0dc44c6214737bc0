"""upcycle bench-inference on tiny real exports: a Llama export and a Mixtral checkpoint exported on the fly."""
from __future__ import annotations

import csv
import json

import pytest

from megatron_upcycle.config.model import MoEConfig
from conftest import run_cli
from inference_helpers import export_tiny, save_tiny_checkpoint, tiny_model, train_tokenizer

pytest.importorskip("transformers")

# Every workload once, at the smallest sizes that still exercise it.
TINY = ["--input-tokens", "8", "--output-tokens", "2", "--batches", "1,2", "--decode-tokens", "3", "--rates", "40,80",
        "--requests-per-rate", "2", "--repeats", "1", "--online-repeats", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def models(megatron_cpu, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    tok = train_tokenizer(root / "tokenizer.json")
    other_tok = train_tokenizer(root / "other.json", text="a different corpus gives different merges entirely")
    model = tiny_model()
    return {
        "dense": export_tiny(megatron_cpu, root / "dense", model, None, tokenizer=tok),
        "moe": export_tiny(megatron_cpu, root / "moe", model, MoEConfig(num_experts=4, topk=2), seed=1, tokenizer=tok),
        # top-1: exported on the fly as Qwen2-MoE (softmax-then-top-1 is what Mixtral cannot express)
        "moe_ckpt": save_tiny_checkpoint(megatron_cpu, root / "moe-run", model, MoEConfig(num_experts=4, topk=1),
                                         seed=2, tokenizer=tok),
        "other_vocab": export_tiny(megatron_cpu, root / "other-vocab",
                                   tiny_model().__class__(**{**tiny_model().__dict__, "vocab_size": 384}),
                                   MoEConfig(num_experts=4, topk=2)),
        "other_tokenizer": export_tiny(megatron_cpu, root / "other-tok", model, MoEConfig(num_experts=4, topk=2),
                                       tokenizer=other_tok),
        "root": root,
    }


def test_benchmark_writes_results_csv_plots_and_ratios(models, tmp_path):
    out = tmp_path / "bench"
    result = run_cli("bench-inference", str(models["dense"]), str(models["moe"]), str(models["moe_ckpt"]),
                     "--out", str(out), "--engine", "transformers", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exporting checkpoint" in result.stdout and "ETA" in result.stdout
    data = json.loads((out / "results.json").read_text())
    assert data["engine"]["name"] == "transformers"
    labels = [m["label"] for m in data["models"]]
    assert labels[0] == "dense" and len(labels) == 3
    assert [m["role"] for m in data["models"]] == ["dense", "moe", "moe"]
    assert data["models"][2]["exported_from_checkpoint"] and data["models"][2]["experts"] == 4
    assert data["models"][2]["topk"] == 1
    # Every workload, model, batch size and rate measured, with wall and CPU time.
    rows = data["measurements"]
    assert {(r["workload"], r["model"]) for r in rows} == {(w, m) for w in ("offline", "decode", "online")
                                                           for m in labels}
    assert {r["batch_size"] for r in rows if r["workload"] == "offline"} == {1, 2}
    assert {r["request_rate"] for r in rows if r["workload"] == "online"} == {40.0, 80.0}
    online = [r for r in rows if r["workload"] == "online"]
    assert all(r["latency_p90_s"] >= r["latency_p50_s"] > 0 and r["cpu_s"] >= 0 for r in online)
    offline = [r for r in rows if r["workload"] == "offline"]
    assert all(r["tokens"] == r["batch_size"] * (8 + 2) for r in offline)
    # Ratios are MoE / dense of the medians, for every MoE model and workload.
    for label in labels[1:]:
        ratio = data["ratios"][label]["decode_batch1"]["ratio"]
        expected = (data["summary"][label]["decode"]["tokens_per_s"]["median"]
                    / data["summary"]["dense"]["decode"]["tokens_per_s"]["median"])
        assert ratio == pytest.approx(expected)
        assert {"offline_max_throughput", "online_max_throughput"} <= set(data["ratios"][label])
    assert f"{labels[1]} / dense, batch-1 decode:" in result.stdout
    with (out / "results.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)
    for png in ("latency_vs_throughput.png", "max_throughput.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob(".bench-inference-exports-*"))  # the on-the-fly export is cleaned up


def _one_line_exit_2(result, needle: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines


def test_different_vocabulary_is_refused(models, tmp_path):
    result = run_cli("bench-inference", str(models["dense"]), str(models["other_vocab"]), "--out", str(tmp_path / "o"),
                     "--engine", "transformers", *TINY)
    _one_line_exit_2(result, "vocab_size 384")
    assert not (tmp_path / "o").exists()  # refused after exporting began: no output is left behind


def test_different_tokenizer_is_refused(models, tmp_path):
    result = run_cli("bench-inference", str(models["dense"]), str(models["other_tokenizer"]), "--out",
                     str(tmp_path / "o"), "--engine", "transformers", *TINY)
    _one_line_exit_2(result, "different tokenizers")


def test_a_directory_that_is_not_an_export_is_refused(models, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("bench-inference", str(models["dense"]), str(empty), "--out", str(tmp_path / "o"),
                     "--engine", "transformers", *TINY)
    _one_line_exit_2(result, "neither a Hugging Face export")
    assert not (tmp_path / "o").exists()
    swapped = run_cli("bench-inference", str(models["moe"]), str(models["dense"]), "--out", str(tmp_path / "o"),
                      "--engine", "transformers", *TINY)
    _one_line_exit_2(swapped, "the DENSE argument is an MoE")


def test_an_engine_that_is_not_installed_is_refused(models, tmp_path):
    from megatron_upcycle.inference.engines import vllm_installed

    if vllm_installed():
        pytest.skip("vLLM is installed here; the refusal is for machines without it")
    result = run_cli("bench-inference", str(models["dense"]), str(models["moe"]), "--out", str(tmp_path / "o"),
                     "--engine", "vllm")
    _one_line_exit_2(result, "vLLM is not installed")


class _Recorder:
    """An engine stand-in that records the batches the online server loop forms."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def generate(self, prompts, new_tokens):
        import time

        self.batches.append(len(prompts))
        time.sleep(0.05)


def test_online_loop_batches_what_has_arrived():
    from megatron_upcycle.inference.workloads import online

    runner = _Recorder()
    # Two requests at 0, one at 0.01 s: the first call serves the two, the third waits for the next call.
    result = online(runner, [[1, 2]] * 3, [0.0, 0.0, 0.01], output_tokens=1, max_batch=8)
    assert runner.batches == [2, 1]
    assert result["requests"] == 3 and result["tokens"] == 3 * 3
    assert result["latency_p90_s"] >= result["latency_p50_s"] > 0
    capped = _Recorder()
    online(capped, [[1]] * 3, [0.0, 0.0, 0.0], output_tokens=1, max_batch=2)
    assert capped.batches == [2, 1]


def test_online_uses_an_engine_that_serves_arrivals_itself():
    from megatron_upcycle.inference.workloads import online

    class Continuous:
        def serve(self, prompts, arrivals, new_tokens, start):
            return [a + 0.5 for a in arrivals]  # every request takes 0.5 s after its arrival

    result = online(Continuous(), [[1]] * 4, [0.0, 0.1, 0.2, 0.3], output_tokens=1, max_batch=8)
    assert result["latency_p50_s"] == pytest.approx(0.5) and result["latency_p90_s"] == pytest.approx(0.5)
    assert result["wall_s"] == pytest.approx(0.8)
