"""The study's inference measurement and report section, on a study-shaped directory of tiny real checkpoints."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from megatron_upcycle.config.model import MoEConfig
from megatron_upcycle.inference.report import (QUALITY_PNG, final_models, inference_section,
                                               measure_study_inference, study_inference_dir)
from megatron_upcycle.inference.workloads import preset_with
from megatron_upcycle.rundir import RunDir
from inference_helpers import save_tiny_checkpoint, tiny_model

pytest.importorskip("transformers")

MOE = MoEConfig(num_experts=4, topk=2)


def _run(run_id, model_kind, stage="branch", budget=None, d1=None, d2=None, e=None, k=None):
    return SimpleNamespace(run_id=run_id, model_kind=model_kind, stage=stage, budget_tokens=budget, D1=d1, D2=d2,
                           E=e, k=k, resolved=SimpleNamespace(stop_iter=1), model="tiny", repeat_of=None)


@pytest.fixture(scope="module")
def study(megatron_cpu, tmp_path_factory):
    """A plan-shaped object: two dense budgets, two upcycled budgets, and their final checkpoints."""
    root = tmp_path_factory.mktemp("study")
    runs = [_run("dense-d_1K", "dense", budget=1000), _run("dense-d_2K", "dense", budget=2000),
            _run("dense-stable", "dense", stage="stable"),
            _run("upcycle-d1_2K-d2_1K", "upcycle", d1=2000, d2=1000, e=4, k=2),
            _run("upcycle-d1_2K-d2_2K", "upcycle", d1=2000, d2=2000, e=4, k=2)]
    model = tiny_model("cpu-tiny")
    save_tiny_checkpoint(megatron_cpu, root / "runs" / "dense-d_2K", model, None)
    save_tiny_checkpoint(megatron_cpu, root / "runs" / "upcycle-d1_2K-d2_2K", model, MOE, seed=1)
    return SimpleNamespace(root=root, runs=runs, experiment=SimpleNamespace(name="tiny", dense_models=["tiny"]),
                           run_dir=lambda run: RunDir(root / "runs" / (run if isinstance(run, str) else run.run_id)))


def test_final_models_are_one_size_before_and_after_upcycling():
    """Several sizes: the largest dense size's final dense model and its upcycled models, first seed."""
    def run(run_id, kind, model, repeat_of=None, **budgets):
        return SimpleNamespace(**{**vars(_run(run_id, kind, **budgets)), "model": model, "repeat_of": repeat_of})

    runs = [run("dense-small-d_4K", "dense", "small", budget=4000), run("dense-big-d_2K", "dense", "big", budget=2000),
            run("dense-big-s2-d_2K", "dense", "big", repeat_of="dense-big-d_2K", budget=3000),
            run("upcycle-small", "upcycle", "small", d1=4000, d2=4000, e=4, k=2),
            run("upcycle-big", "upcycle", "big", d1=2000, d2=2000, e=4, k=2)]
    plan = SimpleNamespace(runs=runs, experiment=SimpleNamespace(name="sizes", dense_models=["small", "big"]))
    finals = final_models(plan)
    assert finals["dense"].run_id == "dense-big-d_2K"
    assert [r.run_id for r in finals["upcycled"]] == ["upcycle-big"]


def test_final_models_are_the_largest_budgets(study):
    finals = final_models(study)
    assert finals["dense"].run_id == "dense-d_2K"
    assert [r.run_id for r in finals["upcycled"]] == ["upcycle-d1_2K-d2_2K"]


def test_measure_then_report(study, tmp_path):
    preset = preset_with("cpu", input_tokens=8, output_tokens=2, offline_batches=(1, 2), decode_tokens=3,
                         rates=(50.0,), requests_per_rate=2, repeats=1, online_repeats=1)
    import torch

    lines = []
    threads = torch.get_num_threads()
    results = measure_study_inference(study, preset=preset, emit=lines.append)
    assert torch.get_num_threads() == threads  # the study's own setting is restored
    assert (study_inference_dir(study) / "results.json").exists()
    assert [m["label"] for m in results["models"]] == ["dense-d_2K", "upcycle-d1_2K-d2_2K"]
    assert results["engine"]["threads"] == 1 and any("ETA" in line for line in lines)
    # A second call reuses the finished result (a re-run study continues).
    again = measure_study_inference(study, preset=preset, emit=lines.append)
    assert again["wall_seconds"] == results["wall_seconds"]

    rows = [{"run_id": "dense-d_2K", "kind": "dense", "model": "cpu-tiny", "E": "", "k": "", "val_loss": "5.0"},
            {"run_id": "cpt-x", "kind": "cpt", "model": "cpu-tiny", "E": "", "k": "", "val_loss": "4.8"},
            {"run_id": "upcycle-d1_2K-d2_2K", "kind": "upcycled", "model": "cpu-tiny", "E": "4", "k": "2",
             "val_loss": "4.6"}]
    chunks = inference_section(study, rows, tmp_path / "report")
    text = "\n\n".join(chunks)
    assert chunks[0] == "## Inference cost"
    assert "transformers" in text and "upcycle-d1_2K-d2_2K / dense, offline max throughput" in text
    assert "H100 SXM 80GB: 80 GB, 3.35 TB/s memory bandwidth, 989 TFLOP/s" in text
    assert "| 1B | 8x top-1 |" in text
    for name in (QUALITY_PNG, "inference_latency_vs_throughput.png", "inference_max_throughput.png"):
        assert (tmp_path / "report" / name).read_bytes()[:4] == b"\x89PNG"
        assert f"({name})" in text


def test_report_without_a_measurement_predicts(tmp_path):
    plan = SimpleNamespace(root=tmp_path, runs=[])
    rows = [{"run_id": "d", "kind": "dense", "model": "cpu-tiny", "E": "", "k": "", "val_loss": "5.0"},
            {"run_id": "u", "kind": "upcycled", "model": "cpu-tiny", "E": "8", "k": "2", "val_loss": "4.6"}]
    text = "\n\n".join(inference_section(plan, rows, tmp_path / "report"))
    assert "Not measured for this study" in text and "predicted decode tokens/s" in text
    assert (tmp_path / "report" / QUALITY_PNG).exists()
