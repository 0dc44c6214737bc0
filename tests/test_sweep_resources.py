"""Per-model, per-kind and per-run resources in the experiment YAML: precedence,
strict validation, and what reaches the sbatch scripts."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from engine_runs import TEST_MODEL
from megatron_upcycle.errors import ConfigError
from megatron_upcycle.sweep.run_resources import ResourceTable

MODELS = ["15M", "1B"]


def table(data: dict) -> ResourceTable:
    return ResourceTable.parse(data, MODELS)


def test_precedence_field_by_field():
    t = table({
        "default": {"nodes": 2, "gpus_per_node": 8, "time_minutes": 600, "micro_batch_size": 4},
        "1B": {"nodes": 4, "tensor_parallel": 2},
        "by_kind": {"branch": {"nodes": 1, "time_minutes": 120}, "convert": {"cpus_per_task": 32}},
        "by_run": {"upcycle-1B-*": {"time_minutes": 2880}, "upcycle-1B-*-d2_*": {"time_minutes": 60}},
    })
    # 2 default < 3 model (only the fields it names): 1B keeps default's micro batch and time.
    one_b = t.for_run("dense-1B-stable", "dense", "1B")
    assert (one_b.nodes, one_b.tensor_parallel, one_b.micro_batch_size, one_b.time_minutes) == (4, 2, 4, 600)
    assert t.for_model("15M").nodes == 2 and t.for_model("15M").tensor_parallel == 1
    # 5 by_kind over the model: branches smaller and shorter than their stable run.
    branch = t.for_run("dense-1B-d_1B", "branch", "1B")
    assert (branch.nodes, branch.gpus_per_node, branch.time_minutes, branch.tensor_parallel) == (1, 8, 120, 2)
    # 4 conversions: one node, no GPU, unless by_kind says otherwise.
    convert = t.for_run("convert-1B-d1_1B-e8k2", "convert", "1B")
    assert (convert.nodes, convert.gpus_per_node, convert.cpus_per_task) == (1, 0, 32)
    # 6 by_run over by_kind, every matching glob in file order (the later wins).
    assert t.for_run("upcycle-1B-d1_1B-e8k2-stable", "upcycle", "1B").time_minutes == 2880
    assert t.for_run("upcycle-1B-d1_1B-e8k2-d2_5B", "branch", "1B").time_minutes == 60
    assert t.for_run("upcycle-15M-x-stable", "upcycle", "15M").time_minutes == 600


@pytest.mark.parametrize("data, message", [
    ({"defualt": {}}, r"unknown key 'defualt' \(did you mean 'default'\?\): keys are default, by_kind, by_run "
                      r"or a model of dense_models \(15M, 1B\)"),
    ({"2B": {}}, "unknown key '2B'"),
    ({"by_kind": {"brnch": {}}}, r"unknown run kind 'brnch' \(did you mean 'branch'\?\); kinds: dense, moe"),
    ({"by_kind": {"branch": {"tensor_parallel": 2}}}, "'tensor_parallel' is the model's parallel layout"),
    ({"by_run": {"x": {"time_minute": 5}}}, r"by_run.x: unknown key 'time_minute' \(did you mean 'time_minutes'\?\)"),
    ({"by_kind": {"dense": {"nodes": 0}}}, "nodes must be >= 1"),
    ({"by_kind": {"convert": {"nodes": 2}}}, "by_kind.convert: nodes must be 1"),
    ({"default": {"nodez": 1}}, "unknown key 'nodez'"),
])
def test_strict_validation(data, message):
    with pytest.raises(ConfigError, match=message):
        table(data)


def test_a_glob_matching_no_run_is_refused():
    t = table({"by_run": {"dense-15M-stable": {"time_minutes": 5}, "upcycle-2B-*": {"time_minutes": 5}}})
    with pytest.raises(ConfigError, match=r"'upcycle-2B-\*' matches no run of this experiment"):
        t.check_runs(["dense-15M-stable", "dense-15M-d_1B"])
    table({"by_run": {"dense-15M-*": {"nodes": 1}}}).check_runs(["dense-15M-stable"])


def _experiment(tmp_path, resources) -> str:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({
        "name": "res", "dense_models": [TEST_MODEL], "moe": [{"experts": 4, "topk": 2}],
        "d1": {"tokens": [6144]}, "d2": {"tokens": [4096]}, "data": {"embedded_vocab_size": 512},
        "baselines": {"moe_scratch": False, "cpt": False}, "resources": resources,
        "output_root": str(tmp_path / "out"),
    }))
    return str(path)


def _upcycle(*args, cwd):
    return subprocess.run([sys.executable, "-m", "megatron_upcycle.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_resources_reach_the_rendered_scripts_and_a_bad_glob_is_one_line(tmp_path, monkeypatch):
    import tempfile

    from megatron_upcycle import parallel
    from megatron_upcycle.sweep.experiment import load_experiment
    from megatron_upcycle.sweep.materialize import to_dag
    from megatron_upcycle.sweep.plan import build_plan
    from megatron_upcycle.sweep.slurm import SlurmExecutor

    resources = {
        "default": {"gpus_per_node": 4, "time_minutes": 100},
        "by_kind": {"convert": {"cpus_per_task": 8, "time_minutes": 30}, "branch": {"time_minutes": 20}},
        "by_run": {"upcycle-*-stable": {"nodes": 2, "time_minutes": 600}},
    }
    experiment = load_experiment(_experiment(tmp_path, resources))
    created = []  # planning leaves no process-group rendezvous file behind (a dry run writes nothing)
    real = tempfile.NamedTemporaryFile
    monkeypatch.setattr(parallel.tempfile, "NamedTemporaryFile", lambda **kw: created.append(real(**kw)) or created[-1])
    plan = build_plan(experiment, tmp_path / "out")
    assert created and not any(Path(f.name).exists() for f in created)
    subs = SlurmExecutor(experiment.slurm_options(), workdir=tmp_path, log_dir=tmp_path / "slurm",
                         progress=None).render(to_dag(plan)).submissions
    scripts = {sub.runs[0].run_id.split("-")[0] + "-" + sub.runs[0].run_id.split("-")[-1]: sub.script
               for sub in subs}
    header = {key: [line for line in s.splitlines() if line.startswith("#SBATCH --")
                    and line[8:].split("=")[0] in ("--nodes", "--gpus-per-node", "--cpus-per-task", "--time")]
              for key, s in scripts.items()}
    assert header["dense-stable"] == ["#SBATCH --nodes=1", "#SBATCH --gpus-per-node=4", "#SBATCH --time=0-01:40:00"]
    assert header["dense-d_6.14K"] == ["#SBATCH --nodes=1", "#SBATCH --gpus-per-node=4", "#SBATCH --time=0-00:20:00"]
    assert header["convert-e4k2"] == ["#SBATCH --nodes=1", "#SBATCH --cpus-per-task=8", "#SBATCH --time=0-00:30:00"]
    assert header["upcycle-stable"] == ["#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4",
                                        "#SBATCH --time=0-10:00:00"]

    bad = _experiment(tmp_path, {"by_run": {"upcycle-*-stabel": {"nodes": 2}}})
    proc = _upcycle("sweep", "plan", bad, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "'upcycle-*-stabel' matches no run of this experiment" in proc.stderr
