"""The study report (``upcycle sweep report``) from a real plan and a synthetic results table.

No training: the rows are the plan's own budgets with losses from the paper's published laws
(plus small noise), so the report must fit every law of the paper from them, solve D*, and
compare all three strategies; the paper presets get the same report.
"""
from __future__ import annotations

import csv

import numpy as np
import pytest

from megatron_upcycle.config.loading import from_dict, read_yaml
from megatron_upcycle.errors import ConfigError
from megatron_upcycle.resources import experiment_preset
from megatron_upcycle.scaling import FitOptions, published
from megatron_upcycle.sweep.collect import COLUMNS
from megatron_upcycle.sweep.experiment import Experiment, load_experiment
from megatron_upcycle.sweep.plan import build_plan
from megatron_upcycle.sweep.report import SECTIONS, plain, write_report


FAST = FitOptions(n_bootstrap=20)  # intervals exist; their precision is not what is tested


def synthetic_results(plan, path, noise=0.004, seed=0):
    """One row per planned budget, the loss from the paper's laws at the run's own D and N."""
    rng = np.random.default_rng(seed)
    n1_of = {r.model: r.active_params for r in plan.runs if r.kind == "dense"}
    rows = []
    for run in plan.runs:
        if run.stage != "branch":
            continue
        n1 = n1_of[run.model]
        row = {c: "" for c in COLUMNS}
        row.update(run_id=run.run_id, model=run.model, N1=n1, val_loss=0.0)
        if run.model_kind == "dense":
            row.update(kind="dense", D1=run.budget_tokens, tokens=run.budget_tokens,
                       val_loss=published.dense_loss(run.budget_tokens, n1))
        elif run.model_kind == "moe":
            row.update(kind="moe", D1=run.budget_tokens, tokens=run.budget_tokens, E=run.E, k=run.k,
                       N2=run.active_params, Ntotal=run.active_params * run.E / run.k,
                       val_loss=published.moe_loss(run.budget_tokens, n1))
        elif run.model_kind == "upcycle":
            row.update(kind="upcycled", D1=run.D1, D2=run.D2, tokens=run.D2, E=run.E, k=run.k,
                       N2=run.active_params, Ntotal=run.active_params * run.E / run.k,
                       val_loss=published.upcycled_loss(run.D1, run.D2, n1))
        else:  # dense CPT: the dense law at D1 + D2
            row.update(kind="cpt", D1=run.D1, D2=run.D2, tokens=run.D2,
                       val_loss=published.dense_loss(run.D1 + run.D2, n1))
        row["val_loss"] = float(row["val_loss"]) * float(np.exp(rng.normal(0, noise)))
        row["FLOPs"] = run.flops
        rows.append(row)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _advice_rows(text: str) -> list[list[str]]:
    section = text.split("## Advice", 1)[1].split("\n## ", 1)[0]
    return [line.split("|")[1:-1] for line in section.splitlines()
            if line.startswith("| ") and line.split("|")[3].strip() in ("upcycle", "moe_from_scratch", "dense_cpt")]


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    plan = build_plan(load_experiment(str(experiment_preset("cpu_demo"))), root)
    results = synthetic_results(plan, root / "results.csv")
    extra = lambda plan, rows, out_dir: ["## Plugged in", f"{len(rows)} rows seen"]  # noqa: E731
    path = write_report(plan, results, root / "report", sections=SECTIONS[:-1] + [plain(extra), SECTIONS[-1]],
                        fit_options=FAST)
    return plan, path, path.read_text()


def test_multi_size_report_fits_every_law_and_compares_all_strategies(demo_report):
    plan, path, text = demo_report
    laws = text.split("## Fitted laws", 1)[1].split("### All forms", 1)[0]
    for form in ("`chinchilla`", "`dense_moe_shared_E`", "`joint`", "`one_size`"):
        assert form in laws, form
    assert "E = " in laws and "(fixed)" in laws  # the joint law's E, fixed from the shared fit
    sizes = sorted({r.active_params for r in plan.runs if r.kind == "dense"})
    assert len(sizes) >= 2
    dstar = text.split("### From the fitted laws", 1)[1].split("\n## ", 1)[0]
    study_rows = [line for line in dstar.splitlines() if "(this study)" in line]
    assert len(study_rows) == len(sizes)
    for line in study_rows:
        cell = line.split("|")[2].strip()
        assert cell == "no crossing in range" or float(cell) > 0, line
    advice = _advice_rows(text)
    assert {r[2].strip() for r in advice} == {"upcycle", "moe_from_scratch", "dense_cpt"}
    assert len(advice) == 3 * len(sizes)
    assert all(float(r[3]) > 0 for r in advice), advice  # every strategy has a predicted loss
    assert "not compared" not in text.split("## Advice", 1)[1].split("\n## ", 1)[0]


def test_report_measures_noise_and_states_limits_from_the_study(demo_report):
    plan, path, text = demo_report
    noise = text.split("## Run-to-run noise", 1)[1].split("\n## ", 1)[0]
    assert "seed std" in noise and "LOO RMS" in noise
    repeats = [r for r in plan.runs if r.repeat_of and r.stage == "branch"]
    assert len(repeats) == 2 * plan.experiment.seeds.extra
    limits = text.split("## What a study of this size", 1)[1]
    assert f"{len(plan.experiment.dense_models)} dense size(s)" in limits
    assert "Tiny models" not in text and "2 layers, d=64" not in text
    assert "## Plugged in" in text and text.index("## Plugged in") < text.index("## What a study")
    for figure in ("fig1_loss_vs_d2.png", "fig4_dstar_vs_n1.png", "predicted_vs_observed.png"):
        assert (path.parent / figure).stat().st_size > 0
        assert f"({figure})" in text
    assert "No training metrics" in text  # no runs here: said, not drawn


def test_paper_preset_gets_a_report(tmp_path):
    plan = build_plan(load_experiment(str(experiment_preset("paper_d1d2_grid"))), tmp_path)
    results = synthetic_results(plan, tmp_path / "results.csv")
    text = write_report(plan, results, tmp_path / "report", fit_options=FAST).read_text()
    assert "One dense size" in text
    advice = _advice_rows(text)
    assert {r[2].strip() for r in advice} == {"upcycle", "moe_from_scratch", "dense_cpt"}
    assert all(float(r[3]) > 0 for r in advice)  # one-size laws stand in for Chinchilla
    assert "`one_size`" in text


def test_seeds_key_is_validated(tmp_path):
    data = read_yaml(str(experiment_preset("cpu_demo")))
    legacy = from_dict(Experiment, {**data, "seeds": [7, 8]})
    assert legacy.seeds.runs == [7, 8] and legacy.noise_seeds() == []
    for bad, message in (({"runs": [1], "extra": 2, "d1": 5}, "seeds.d1"),
                         ({"runs": [1], "extra": -1}, "seeds.extra"),
                         ({"runs": [1], "repeats": 2}, "unknown key 'repeats'"),
                         ({"runs": []}, "seeds is empty")):
        with pytest.raises(ConfigError, match=message):
            from_dict(Experiment, {**data, "seeds": bad})


def test_report_command_refuses_a_study_that_has_not_run(tmp_path):
    from conftest import run_cli

    out = run_cli("sweep", "report", str(experiment_preset("paper_joint")), "--root", str(tmp_path / "none"))
    assert out.returncode == 2, out.stderr[-2000:]
    assert "no runs under" in out.stderr and "Traceback" not in out.stderr
