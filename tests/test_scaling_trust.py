"""Fits a user can trust on tables they did not make (issue 16): another tool's layout
is read as the contract says, what the runs cannot identify is flagged wherever it is
used, one outlier's hold on the model choice is named, and D* says where it finds none."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from megatron_upcycle.cli import main
from megatron_upcycle.errors import UserError
from megatron_upcycle.scaling import AnalysisOptions, FitOptions, advise_from_result, analyze
from megatron_upcycle.scaling.datasets import FitData, moe_data
from megatron_upcycle.scaling.derived import dstar_report, paper_predictors
from megatron_upcycle.scaling.fitting import LawFitter
from megatron_upcycle.scaling.identification import design_flags, numeric_flags
from megatron_upcycle.scaling.io import COLUMNS, read_results
from megatron_upcycle.scaling.laws import LAWS, predict
from megatron_upcycle.scaling.synthetic import SyntheticSpec, synthetic_rows, write_results_csv

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "results_example.csv"
THEIR_NAMES = {"run_id": "name", "val_loss": "loss", "N1": "params"}  # contract -> another tool's header
MAPPING = ",".join(f"{theirs}={ours}" for ours, theirs in THEIR_NAMES.items())


def other_tools_table(path: Path) -> Path:
    """The shipped example as another tool writes it: its own column names, tokens in
    billions, E = 0 and k = 0 on dense rows, and the engine's kind spelling ``upcycle``."""
    with EXAMPLE.open() as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for col in ("D1", "D2", "tokens"):
            if row[col]:
                row[col] = f"{float(row[col]) / 1e9:g}"
        if row["kind"] == "dense":
            row["E"], row["k"] = "0", "0"
        if row["kind"] == "upcycled":
            row["kind"] = "upcycle"
    header = [THEIR_NAMES.get(c, c) for c in COLUMNS]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in rows:
            writer.writerow([row[c] for c in COLUMNS])
    return path


def test_another_tools_table_reads_as_the_contract(tmp_path):
    ours = read_results(EXAMPLE)
    assert set(ours.kind) == {"dense", "moe", "upcycled"} and not ours.notes
    theirs_path = other_tools_table(tmp_path / "theirs.csv")
    with pytest.raises(UserError, match="missing column"):  # without the mapping: refused, with a hint
        read_results(theirs_path)
    theirs = read_results(theirs_path, columns={v: k for k, v in THEIR_NAMES.items()}, tokens_unit="billions")
    assert theirs.kind == ours.kind and theirs.run_id == ours.run_id
    for col in ("E", "k", "N1", "D1", "D2", "tokens", "val_loss"):
        np.testing.assert_allclose(theirs.col(col), ours.col(col), rtol=1e-12, equal_nan=True, err_msg=col)
    notes = " | ".join(theirs.notes)
    assert "kind 'upcycle' read as 'upcycled' on 9 row(s) (lines 8-16)" in notes
    assert "converted to tokens (x 1e+09)" in notes and "loss -> val_loss" in notes


def test_fit_cli_reads_another_tools_table_and_says_how(tmp_path, capsys):
    theirs = other_tools_table(tmp_path / "theirs.csv")
    out = tmp_path / "fits"
    assert main(["fit", str(theirs), "--out", str(out), "--columns", MAPPING, "--tokens-unit", "billions",
                 "--bootstrap", "0", "--no-plots", "--forms", "d1d2_mult"]) == 0
    text = capsys.readouterr().out.splitlines()
    read = [line for line in text if line.startswith("read: ")]
    assert len(read) == 3 and any("'upcycle' read as 'upcycled'" in line for line in read)
    assert any("billions of tokens and converted to tokens" in line for line in read)
    # Tokens really were converted: the D1-D2 law is fitted in tokens, not in billions.
    assert main(["advise", "--fits", str(out), "--n1", "98323840", "--d1", "4", "--tokens", "4",
                 "--tokens-unit", "billions"]) == 0
    assert "converted to tokens (x 1e+09)" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--columns", "loss"], "--columns: 'loss' is not OLD=NEW"),
    (["--columns", "loss=value_loss"], "'value_loss' (for 'loss') is not a results-table column"),
    (["--columns", "loss=val_loss,cost=val_loss"], "two columns are mapped to 'val_loss'"),
    (["--columns", "name=run_id,lost=val_loss"], "has no column 'lost'"),
    (["--columns", "loss=E"], "already has a column 'E'"),
    (["--tokens-unit", "furlongs"], "--tokens-unit must be one of tokens, thousands, millions, billions"),
])
def test_bad_mappings_and_units_are_one_line_exit_2(tmp_path, capsys, args, message):
    theirs = other_tools_table(tmp_path / "theirs.csv")
    assert main(["fit", str(theirs), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out" / "fits.json").exists()


def test_moe_rows_still_need_experts_and_their_label_says_where_d_came_from(tmp_path):
    path = tmp_path / "r.csv"
    lines = EXAMPLE.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[4].replace(",8,2,", ",0,2,")]) + "\n")
    with pytest.raises(UserError, match="E = 0 must be a positive finite number"):
        read_results(path)
    # MoE rows that carry D in `tokens` (D1 empty): the subset label must not claim D1.
    rows = [line.split(",") for line in lines[1:]]
    d1 = COLUMNS.index("D1")
    for row in rows:
        if row[1] == "moe":
            row[d1] = ""
    path.write_text("\n".join([lines[0]] + [",".join(r) for r in rows]) + "\n")
    label = moe_data(read_results(path)).subset
    assert "D1" not in label and "D = tokens" in label


@pytest.fixture(scope="module")
def two_budgets(tmp_path_factory):
    """Dense and MoE-from-scratch runs at only 2 token budgets (paper Table 2 laws)."""
    tmp = tmp_path_factory.mktemp("two_budgets")
    spec = SyntheticSpec(noise=0.002, scratch_tokens=(1e9, 1e10), models=("0.1B", "0.5B", "1B"),
                         upcycle_models=("0.1B", "1B"), d1_grid=(1e9, 4e9, 1.6e10), d2_grid=(1e9, 4e9, 1.6e10),
                         config_models=())
    write_results_csv(tmp / "results.csv", synthetic_rows(spec))
    result = analyze(tmp / "results.csv", tmp / "out",
                     AnalysisOptions(fit=FitOptions(n_bootstrap=0), plots=False, workers=1,
                                     forms=("chinchilla", "joint")))
    return tmp / "out", result


def test_two_token_budgets_flag_chinchilla_and_everything_built_on_its_e(two_budgets):
    out, result = two_budgets
    dense = result.fit("chinchilla", "dense")
    assert {"A", "a", "E"} <= set(dense.unidentified())
    assert any(f.source == "design" and "D has 2 distinct values" in f.detail for f in dense.identification)
    assert not dense.param("E").identified and dense.param("B").identified  # N has 3 sizes
    shared = result.fit("dense_moe_shared_E")
    assert "E" in shared.unidentified()
    joint = result.fit("joint")
    assert joint.param("E").fixed and not joint.param("E").identified
    said = "E is fixed from `dense_moe_shared_E`, where it is not identified"
    assert said in result.dstar_fitted.summary and result.dstar_fitted.warnings
    advice = advise_from_result(result, n1=1e9, d1=2e10, tokens=1e10)
    assert said in advice.reason and advice.warnings
    assert any(said in c.note for c in result.compute_optimal if c.laws == "fitted joint")
    loo = (out / "loo.md").read_text()
    assert "## Parameters the runs do not identify" in loo and "| E | " in loo and "**no**" in loo
    assert "**Caution**" in (out / "dstar.md").read_text()


def test_a_well_designed_table_is_not_flagged():
    d, n = (x.ravel() for x in np.meshgrid([1e9, 3e9, 1e10, 3e10, 1e11], [1e8, 2.3e8, 5.2e8, 1.1e9], indexing="ij"))
    truth = {"A": 8.83, "a": 0.088, "B": 12.3, "b": 0.116, "E": 0.165}
    data = FitData("s", {"D": d, "N": n}, predict(LAWS["chinchilla"], truth, {"D": d, "N": n}),
                   tuple(f"r{i}" for i in range(d.size)))
    fitter = LawFitter(LAWS["chinchilla"], data, FitOptions())
    assert design_flags(fitter.law, data) == [] and numeric_flags(fitter, fitter.fit()) == []
    two = FitData("s", {"D": np.minimum(d, 3e9), "N": n}, data.loss, data.run_ids)
    assert {f.param for f in design_flags(LAWS["chinchilla"], two)} == {"A", "a", "E"}


def test_one_outlier_is_named_and_the_robust_criterion_keeps_the_generating_form(tmp_path):
    # A 5 x 5 grid from a known multiplicative law, 0.1% noise; the last run 5% too high.
    truth = {"A": 16.3, "a1": 0.043, "a2": 0.085, "a3": 7.98e-4, "E": 1.0}
    grid = (1e9, 3e9, 1e10, 3e10, 1e11)
    rows = synthetic_rows(SyntheticSpec(noise=0.001, seed=0, models=(), upcycle_models=("0.1B",), d1_grid=grid,
                                        d2_grid=grid, upcycled_form="d1d2_mult_int", upcycled_params=truth,
                                        config_models=()))
    bad = rows[-1]
    bad["val_loss"] *= 1.05
    write_results_csv(tmp_path / "results.csv", rows)
    result = analyze(tmp_path / "results.csv", tmp_path / "out",
                     AnalysisOptions(fit=FitOptions(n_bootstrap=0), plots=False, workers=1))
    (selection,) = result.selections
    assert selection.influential[0] == bad["run_id"]
    point = next(p for p in selection.points if p.run_id == bad["run_id"])
    assert point.influential and abs(point.loo_error[selection.chosen]) > 0.05
    assert selection.robust_chosen.startswith("d1d2_mult")
    if selection.chosen != selection.robust_chosen:
        assert "the criteria disagree" in selection.verdict
    assert len(selection.points) == 25 and all(set(p.loo_error) == set(selection.loo_rms) for p in selection.points)
    loo = (tmp_path / "out" / "loo.md").read_text()
    chosen_row = next(line for line in loo.splitlines() if f"`{selection.chosen}`" in line and "**yes**" in line)
    assert chosen_row.rstrip(" |").endswith(bad["run_id"])  # named in the LOO table's influential column
    assert "held-out Huber" in loo and "median abs LOO error" in loo and "### Leave-one-out error per run" in loo
    assert selection.loo_huber[selection.robust_chosen] == min(selection.loo_huber.values())
    assert f"influential runs: {bad['run_id']}" in result.influence_lines()[0]


def test_advise_paper_without_a_crossing_says_so(capsys):
    assert main(["advise", "--paper", "--n1", "1e8", "--d1", "1e10", "--tokens", "1e10"]) == 0
    from megatron_upcycle.scaling.derived import DSTAR_RANGE
    from megatron_upcycle.scaling.records import range_text

    assert f"D*(N1): no crossing in {range_text(DSTAR_RANGE)}" in capsys.readouterr().out
    assert main(["advise", "--paper", "--n1", "1e8", "--d1", "10", "--tokens", "10", "--tokens-unit", "parsecs"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tokens-unit must be one of" in err[0]


def test_dstar_plot_marks_n1_without_a_crossing_and_labels_are_whole():
    from megatron_upcycle.scaling.laws import Units
    from megatron_upcycle.scaling.plots import _label, dstar_figure
    from megatron_upcycle.scaling.records import AnalysisResult

    paper = dstar_report(paper_predictors())
    result = AnalysisResult(results_csv="-", out_dir="-", units=Units(), huber_delta=1e-3, fits=[], skipped=[],
                            selections=[], dstar_fitted=None, dstar_paper=paper, compute_optimal=[],
                            effective_exponents=[], n2_over_n1=1.75, files=[], n_bfgs_runs=0, n_bfgs_iterations=0,
                            seconds=0.0)
    texts = [t.get_text() for t in dstar_figure(result).axes[0].get_legend().get_texts()]
    from megatron_upcycle.scaling.derived import DSTAR_RANGE
    from megatron_upcycle.scaling.records import range_text

    assert any(f"no crossing in {range_text(DSTAR_RANGE)}" in t for t in texts), texts
    missing = [r.n1 for r in paper.rows if r.dstar is None]
    partial = [n for n in missing if any(s.n1 == n and s.dstar is not None for s in paper.sensitivity)]
    band = next(t for t in texts if "nudged" in t)
    assert ("nudges cross" in band) == bool(partial)
    long = "d1d2_mult_int (upcycled runs, model 8x0.1B (E=8 k=2), a label longer than forty characters)"
    assert _label(long).replace("\n", " ") == long
