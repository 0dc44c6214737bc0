"""End to end: analyze() and `upcycle fit` on a demo-sized table (one model, a 3 x 3
D1 x D2 grid plus baselines) and on a multi-model table; fits.json round-trips."""
from __future__ import annotations

import dataclasses
import json

import pytest

from megatron_upcycle.cli import main
from megatron_upcycle.scaling import AnalysisOptions, FitOptions, analyze, read_fits_json
from megatron_upcycle.scaling.io import to_jsonable
from megatron_upcycle.scaling.laws import LAWS
from megatron_upcycle.scaling.synthetic import MODEL_N1, SyntheticSpec, synthetic_rows, write_results_csv

FAST = FitOptions(n_bootstrap=20)


def demo_table(path):
    spec = SyntheticSpec(noise=0.002, models=("0.1B",), scratch_tokens=(1e9, 4e9, 1.6e10),
                         upcycle_models=("0.1B",), d1_grid=(1e9, 4e9, 1.6e10), d2_grid=(1e9, 4e9, 1.6e10),
                         config_models=())
    write_results_csv(path, synthetic_rows(spec))
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    csv = demo_table(tmp / "results.csv")
    return csv, tmp / "out", analyze(csv, tmp / "out", AnalysisOptions(fit=FAST, workers=1))


def test_demo_grid_writes_every_artifact_and_skips_what_it_cannot_fit(demo):
    csv, out, result = demo
    for name in ("fits.json", "loo.md", "dstar.md", "plots/loss_vs_d2.png", "plots/exponent_vs_lnd1.png",
                 "plots/predicted_vs_observed.png", "plots/dstar_vs_n1.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
        assert str(out / name) in result.files
    # One size: the D1-D2 forms and the one-size dense + MoE law (3 dense runs: too few on their own).
    assert {f.form for f in result.fits} == {"d1d2_mult_int", "d1d2_mult", "d1d2_add_int", "d1d2_add",
                                             "one_size_shared_E"}
    reasons = {s.form: s.reason for s in result.skipped}
    assert "needs at least 6 runs" in reasons["chinchilla"]  # 3 dense runs of one size
    assert "2 distinct N1" in reasons["joint"] or "needs E from" in reasons["joint"]
    assert "config_add" in reasons
    assert result.dstar_fitted is None and result.dstar_paper.rows
    (selection,) = result.selections
    assert selection.family == "d1d2" and selection.chosen in selection.loo_rms
    loo = (out / "loo.md").read_text()
    assert "D in tokens, N in parameters" in loo and "Skipped forms" in loo and "**yes**" in loo
    assert "grid points" in loo and "BFGS" in loo
    dstar = (out / "dstar.md").read_text()
    assert "closed form" in dstar and "Sensitivity" in dstar and "Not available" in dstar


def test_every_point_estimate_has_an_uncertainty(demo):
    # Trap 3: on small grids the exponents and E are poorly identified, so every
    # estimate carries an uncertainty: jackknife for all, bootstrap for the chosen form.
    _, _, result = demo
    chosen = result.selections[0].chosen
    for fit in result.fits:
        for p in fit.params:
            assert p.jackknife_se is not None and p.jackknife_se >= 0, (fit.form, p)
        if fit.form == chosen or fit.family == "one_size":  # the advisor's laws are bootstrapped
            assert fit.bootstrap.n_samples == 20
            assert all(p.ci_low is not None and p.ci_low <= p.ci_high for p in fit.params)
        else:
            assert fit.bootstrap is None and any("jackknife" in n for n in fit.notes)


def test_fits_json_round_trips_and_states_units(demo):
    _, out, result = demo
    payload = json.loads((out / "fits.json").read_text())
    assert payload["units_text"] == "D in tokens, N in parameters, L in nats (validation cross-entropy)"
    first = payload["fits"][0]
    assert first["params"][0]["name"] == LAWS[first["form"]].params[0]  # named, not positional
    back = read_fits_json(out)
    assert to_jsonable(back) == to_jsonable(result)


def test_analysis_is_deterministic_and_independent_of_workers(demo, tmp_path):
    csv, _, result = demo
    again = analyze(csv, tmp_path / "again", AnalysisOptions(fit=FAST, workers=2, plots=False))
    strip = lambda r: [dataclasses.replace(f) for f in r.fits]  # noqa: E731
    assert to_jsonable(strip(again)) == to_jsonable(strip(result))


def test_cli_fit_and_advise_on_the_demo_table(demo, tmp_path, capsys):
    csv, _, _ = demo
    out = tmp_path / "cli"
    assert main(["fit", str(csv), "--out", str(out), "--bootstrap", "10", "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert "d1d2" in text and "chose" in text and "skipped joint" in text and "BFGS runs" in text
    n1 = str(MODEL_N1["0.1B"])
    # No joint law here: the advisor uses the chosen D1-D2 law of this model and the one-size
    # dense + MoE law, so all three strategies are compared at this size.
    assert main(["advise", "--fits", str(out), "--n1", n1, "--d1", "4e9", "--tokens", "4e9"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("recommendation: upcycle") and "not compared" not in text
    assert "moe_from_scratch" in text and "dense_cpt" in text and "one_size_shared_E" in text
    assert main(["advise", "--fits", str(out), "--n1", "5e8", "--d1", "4e9", "--tokens", "4e9"]) == 2
    assert "no upcycled law for N1 = 5e+08" in capsys.readouterr().err


def test_multi_model_table_gives_joint_law_and_fitted_dstar(tmp_path):
    spec = SyntheticSpec(noise=0.001, models=("0.1B", "0.5B", "1B"), scratch_tokens=(1e9, 4e9, 1.6e10, 6.4e10),
                         upcycle_models=("0.1B", "1B"), d1_grid=(1e9, 4e9, 1.6e10), d2_grid=(1e9, 4e9, 1.6e10),
                         config_models=())
    csv = tmp_path / "results.csv"
    write_results_csv(csv, synthetic_rows(spec))
    result = analyze(csv, tmp_path / "out", AnalysisOptions(fit=FitOptions(n_bootstrap=10), plots=False,
                                                            forms=("joint", "d1d2_mult_int")))
    joint = result.fit("joint")
    assert joint is not None and joint.param("E").fixed
    assert joint.values["a2"] == pytest.approx(0.085, abs=0.02)
    assert result.dstar_fitted is not None and len(result.dstar_fitted.rows) == 7
    assert any(c.laws == "fitted joint" and c.n1 and c.n1_ci[0] <= c.n1_ci[1] for c in result.compute_optimal)


def test_cpt_runs_are_checked_against_the_dense_law(tmp_path):
    rows = synthetic_rows(SyntheticSpec(noise=0.0, models=("0.1B", "0.5B", "1B"), scratch_tokens=(1e9, 4e9, 1.6e10),
                                        upcycle_models=(), config_models=()))
    from megatron_upcycle.scaling import published

    for i, (d1, d2) in enumerate(((4e9, 4e9), (1.6e10, 8e9))):
        n1 = MODEL_N1["0.5B"]
        rows.append({"run_id": f"cpt{i}", "kind": "cpt", "model": "0.5B", "N1": n1, "D1": d1, "D2": d2,
                     "tokens": d1 + d2, "FLOPs": 6 * n1 * (d1 + d2),
                     "val_loss": float(published.dense_loss(d1 + d2, n1))})
    csv = tmp_path / "results.csv"
    write_results_csv(csv, rows)
    result = analyze(csv, tmp_path / "out", AnalysisOptions(fit=FitOptions(n_bootstrap=0), plots=False, workers=1))
    (note,) = [n for n in result.notes if "dense-CPT runs" in n]
    assert "2 dense-CPT runs" in note and "RMS error" in note
    rms = float(note.split("RMS error ")[1].split(" ")[0])
    assert rms < 1e-6  # noise-free CPT runs that follow the dense law exactly


def test_fit_cli_module_stays_light():
    # `upcycle fit/advise` parse without numpy, scipy, matplotlib or torch; they load inside run().
    import subprocess
    import sys

    code = ("import argparse, sys, megatron_upcycle.cli.fit as f; "
            "f.add_parser(argparse.ArgumentParser().add_subparsers()); "
            "print([m for m in ('torch', 'scipy', 'matplotlib', 'numpy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
