"""Eval runs in a sweep: planned after every final model, rendered like a conversion, idempotent,
and their eval.json merged into results.csv."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from megatron_upcycle.resources import experiment_preset
from megatron_upcycle.rundir import RunDir


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    from megatron_upcycle.sweep.experiment import load_experiment
    from megatron_upcycle.sweep.plan import build_plan

    return build_plan(load_experiment(str(experiment_preset("cpu_demo"))), tmp_path_factory.mktemp("root"))


def test_every_final_model_gets_an_eval_run(plan):
    # cpu_demo evaluates its largest size only (eval.models); every final model of it gets one.
    assert plan.experiment.eval.models == ["cpu-demo"]
    finals = [r for r in plan.runs if r.stage == "branch" and r.model == "cpu-demo"]
    evals = {r.run_id: r for r in plan.runs if r.kind == "eval"}
    assert {r.model_kind for r in finals} == {"dense", "upcycle", "moe", "cpt"}
    assert len(evals) == len(finals)
    for run in finals:
        node = evals[f"eval-{run.run_id}"]
        assert node.depends_on == [run.run_id] and node.tokens == 0
        assert node.config.checkpoint == str(plan.run_dir(run).checkpoint(run.resolved.stop_iter))
        assert node.config.target == run.run_id and node.config.limit == plan.experiment.eval.limit
        assert node.config.tasks == ["code_next_line", "code_identifier", "code_closure"]


def test_eval_models_default_to_every_size_and_are_checked(tmp_path):
    from megatron_upcycle.errors import ConfigError
    from megatron_upcycle.sweep.experiment import load_experiment
    from megatron_upcycle.sweep.plan import build_plan

    text = Path(experiment_preset("cpu_demo")).read_text()
    everything = tmp_path / "all.yaml"
    everything.write_text(text.replace(", models: [cpu-demo]}", "}"))
    plan = build_plan(load_experiment(str(everything)), tmp_path / "root")
    finals = [r for r in plan.runs if r.stage == "branch"]
    assert len([r for r in plan.runs if r.kind == "eval"]) == len(finals)
    typo = tmp_path / "typo.yaml"
    typo.write_text(text.replace("models: [cpu-demo]", "models: [cpu-dem]"))
    with pytest.raises(ConfigError, match="eval.models"):
        load_experiment(str(typo))


def test_an_eval_run_renders_like_a_conversion(plan):
    from megatron_upcycle.sweep.materialize import to_dag
    from megatron_upcycle.sweep.slurm_render import SlurmOptions, render_sbatch

    dag = to_dag(plan)
    node = dag[next(r.run_id for r in plan.runs if r.kind == "eval")]
    assert node.command[1:3] == ["-m", "megatron_upcycle.evaluation.run"] and node.nodes == 1
    script = render_sbatch(SlurmOptions(), [node], workdir="/w", log_dir="/w/logs")
    assert '\n"${CMD[@]}" &\n' in script and "srun --export" not in script  # one process, no srun
    assert "a conversion or an evaluation: one process on one node." in script


def test_eval_run_is_idempotent_and_collected(tmp_path):
    from megatron_upcycle.evaluation.run import main
    from megatron_upcycle.sweep.collect import write_results_csv

    runs = tmp_path / "runs"
    branch = RunDir(runs / "dense-x-d_1K")
    branch.write_result({"run_id": branch.name, "phase": "complete", "model_kind": "dense", "tokens": 1000,
                         "val_loss": 3.2, "N1": 10})
    ev = RunDir(runs / "eval-dense-x-d_1K")
    ev.path.mkdir(parents=True)
    ev.config.write_text(f"checkpoint: {tmp_path / 'not-there'}\ntarget: {branch.name}\ntasks: [code_closure]\n")
    summary = {"rows": [{"task": "code_closure", "metric": "acc", "value": 0.5, "stderr": 0.1, "n": 4},
                        {"task": "core_average", "metric": "acc_above_chance", "value": 1 / 3, "stderr": None,
                         "n": 1}], "core_average": 1 / 3}
    ev.eval_result.write_text(json.dumps(summary))
    # eval.json exists: the run finishes without evaluating (its checkpoint does not even exist)
    assert main(["--config", str(ev.config)]) == 0
    assert ev.read_result()["phase"] == "eval" and ev.read_result()["target"] == branch.name
    assert main(["--config", str(ev.config)]) == 0
    path, count = write_results_csv(tmp_path)
    (row,) = list(csv.DictReader(Path(path).open()))
    assert count == 1 and row["run_id"] == branch.name
    assert float(row["eval_code_closure_acc"]) == 0.5 and float(row["eval_core_average"]) == pytest.approx(1 / 3)


def test_eval_options_are_checked(tmp_path):
    from megatron_upcycle.errors import ConfigError
    from megatron_upcycle.sweep.experiment import EvalOptions

    with pytest.raises(ConfigError, match="eval.tasks is empty"):
        EvalOptions(tasks=[])
    with pytest.raises(ConfigError, match="limit >= 1"):
        EvalOptions(limit=0)


def test_downstream_section_tables_and_plots(plan, tmp_path):
    from megatron_upcycle.evaluation.report import downstream_section, matched_pairs

    def row(kind, d1, d2, flops, loss, core):
        return {"run_id": f"{kind}-{d1}-{d2}", "kind": kind, "D1": str(d1), "D2": str(d2 or ""), "FLOPs": str(flops),
                "val_loss": str(loss), "eval_code_closure_acc": str(0.25 + core), "eval_core_average": str(core),
                "eval_core_average_stderr": "0.05"}

    rows = [row("dense", 1000, None, 6e9, 4.0, 0.10), row("upcycled", 1000, 2000, 2e10, 3.5, 0.30),
            row("cpt", 1000, 6000, 2.02e10, 3.7, 0.20), row("moe", 3000, None, 2e10, 3.9, 0.15)]
    assert [p[:4] for p in matched_pairs(rows)] == [(1000.0, 2000.0, 0.30, 0.20)]
    chunks = downstream_section(plan, rows, tmp_path)
    text = "\n".join(chunks)
    assert chunks[0] == "## Downstream quality" and "| upcycled | 1,000 | 2,000 | 3.5000 | 0.550 | 0.300 |" in text
    assert "code_closure 0.25" in text and "±0.050" in text and "not measured for the evaluated models" in text
    assert (tmp_path / "downstream_vs_loss.png").stat().st_size > 0
    assert (tmp_path / "downstream_upcycled_vs_cpt.png").stat().st_size > 0
    assert "No run has been evaluated" in downstream_section(plan, [], tmp_path)[1]


def test_core_average_and_its_standard_error():
    from megatron_upcycle.evaluation.aggregate import eval_summary, result_columns

    results = {"results": {"code_next_line": {"alias": "x", "acc,none": 0.5, "acc_stderr,none": 0.1,
                                              "acc_norm,none": 0.6, "acc_norm_stderr,none": 0.1},
                           "code_identifier": {"acc,none": 0.2, "acc_stderr,none": 0.04},
                           "mystery": {"acc,none": 0.9, "acc_stderr,none": 0.01}},
               "n-samples": {"code_next_line": {"effective": 10}, "code_identifier": {"effective": 10}}}
    summary = eval_summary(results)
    assert summary["core_average"] == pytest.approx(((0.5 - 0.25) / 0.75 + 0.2) / 2)
    assert summary["core_left_out"] == ["mystery"] and summary["core_tasks"] == ["code_next_line", "code_identifier"]
    core = summary["rows"][-1]
    assert core["stderr"] == pytest.approx(((0.1 / 0.75) ** 2 + 0.04 ** 2) ** 0.5 / 2)
    columns = result_columns(summary)
    assert columns["eval_code_next_line_acc_norm"] == 0.6 and columns["eval_core_average"] == summary["core_average"]
