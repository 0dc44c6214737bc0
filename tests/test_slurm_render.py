"""render_sbatch and SlurmOptions, without a cluster."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from megatron_upcycle.errors import ConfigError
from megatron_upcycle.sweep.dag import RunDAG, RunNode
from megatron_upcycle.sweep.slurm import SlurmExecutor, SlurmNotFoundError
from megatron_upcycle.sweep.slurm_render import SlurmOptions, format_time, render_sbatch

DATA = Path(__file__).resolve().parent / "data"
ROOT = Path("/scratch/sweep/runs")


def decay_branches() -> list[RunNode]:
    return [RunNode(f"dense_15M_d1-{d}", "branch", ROOT / f"dense_15M_d1-{d}",
                    ["bash", "launch/train.sh", "--config", str(ROOT / f"dense_15M_d1-{d}" / "config.yaml")],
                    depends_on=["dense_15M_stable"], nodes=2, gpus_per_node=8, cpus_per_task=16,
                    time_minutes=1500, array_group="dense_15M_decays") for d in ("1e9", "4e9")]


def test_rendered_array_script_matches_the_recorded_file():
    options = SlurmOptions.from_dict({
        "account": "proj123", "partition": "gpu", "qos": "normal", "mem": "0", "array_throttle": 2,
        "extra_sbatch": ["#SBATCH --exclusive"], "setup": ["module load cuda/12.4", "source .venv/bin/activate"],
    })
    script = render_sbatch(options, decay_branches(), workdir="/home/me/megatron-upcycle",
                           log_dir="/scratch/sweep/slurm", dependencies=["4242"])
    recorded = DATA / "train_array.sbatch"
    if os.environ.get("UPDATE_RECORDED") == "1":
        recorded.write_text(script)
    assert script == recorded.read_text(), "rendering changed: check it, then re-record with UPDATE_RECORDED=1"
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_single_run_and_convert_template():
    convert = RunNode("convert_15M_e8", "convert", ROOT / "convert_15M_e8", ["upcycle", "convert", "--experts", "8"],
                      time_minutes=30)
    script = render_sbatch(SlurmOptions(requeue=False, signal_seconds=60), [convert],
                           workdir="/repo", log_dir="/logs")
    assert "#SBATCH --job-name=uC-" in script
    assert "#SBATCH --output=/logs/%x-%j.out" in script
    assert "#SBATCH --time=0-00:30:00" in script
    assert "#SBATCH --signal=B:USR1@60" in script and "#SBATCH --no-requeue" in script
    assert "--array" not in script and "--dependency" not in script and "--gpus-per-node" not in script
    assert "CMD=(upcycle convert --experts 8)" in script
    assert "srun" not in script  # a conversion is one process
    assert '[ "0" = 1 ]' in script  # requeue disabled in the body too
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_options_override_run_resources_and_quote_arguments():
    node = RunNode("a", "dense", Path("/r/a b"), ["python", "-c", "print('hi there')"], gpus_per_node=4)
    script = render_sbatch(SlurmOptions(gpus_per_node=0, nodes=3, time_minutes=90), [node],
                           workdir="/repo", log_dir="/logs")
    assert "--gpus-per-node" not in script and "#SBATCH --nodes=3" in script and "--time=0-01:30:00" in script
    assert "RUN_DIR='/r/a b'" in script and """CMD=(python -c 'print('"'"'hi there'"'"')')""" in script


def test_unknown_or_bad_options_fail_clearly():
    with pytest.raises(ConfigError, match=r"unknown slurm option 'acount' \(did you mean 'account'\?\); "
                                          r"valid options: account, partition, qos"):
        SlurmOptions.from_dict({"acount": "x"})
    with pytest.raises(ConfigError, match="valid options: .*signal_seconds.*requeue"):
        SlurmOptions.from_dict({"walltime": 5})
    with pytest.raises(ConfigError, match="slurm.time_minutes: expected an integer"):
        SlurmOptions.from_dict({"time_minutes": "soon"})
    with pytest.raises(ConfigError, match="not an sbatch option"):
        SlurmOptions(extra_sbatch=["exclusive"])
    with pytest.raises(ConfigError, match="signal_seconds must be >= 1"):
        SlurmOptions(signal_seconds=0)


def test_runs_that_differ_cannot_share_an_array():
    a, b = decay_branches()
    b.time_minutes = 10
    with pytest.raises(ValueError, match="cannot share one job array"):
        render_sbatch(SlurmOptions(), [a, b], workdir="/repo", log_dir="/logs")


def test_format_time():
    assert [format_time(m) for m in (1, 60, 61, 1440, 2999)] == [
        "0-00:01:00", "0-01:00:00", "0-01:01:00", "1-00:00:00", "2-01:59:00"]


def test_missing_sbatch_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    dag = RunDAG([RunNode("a", "dense", tmp_path / "a", ["true"])])
    with pytest.raises(SlurmNotFoundError, match=r"^sbatch not found on PATH: .*local executor\)$"):
        SlurmExecutor(progress=None).submit(dag)
    with pytest.raises(SlurmNotFoundError, match="^squeue not found"):
        (tmp_path / "a").mkdir()
        (tmp_path / "a" / "slurm_job.json").write_text('{"job_id": "7"}')
        SlurmExecutor(progress=None).status(dag)


def _sweep(tmp_path) -> RunDAG:
    """A dense stable run, its two branches (an array), a conversion, an upcycled stable run."""
    def node(run_id, kind, deps=(), **kw):
        return RunNode(run_id, kind, tmp_path / "runs" / run_id, ["true", run_id], depends_on=list(deps), **kw)
    return RunDAG([
        node("dense-a-stable", "dense"),
        *[node(f"dense-a-d_{d}", "branch", ["dense-a-stable"], array_group="dense-a-stable-branches")
          for d in ("1M", "2M")],
        node("convert-a", "convert", ["dense-a-d_1M"]),
        node("upcycle-a-stable", "upcycle", ["convert-a"]),
    ])


def _snapshot(root: Path) -> list:
    return sorted((str(p), p.stat().st_mtime_ns) for p in [root, *root.rglob("*")])


def test_render_is_the_submission_order_with_placeholder_dependencies(tmp_path):
    dag = _sweep(tmp_path)
    ex = SlurmExecutor(SlurmOptions(array_throttle=1), workdir=tmp_path, log_dir=tmp_path / "slurm", progress=None)
    before = _snapshot(tmp_path)
    plan = ex.render(dag)
    text = ex.dry_run(dag)
    assert _snapshot(tmp_path) == before  # nothing written: no run directory, no log directory
    subs = plan.submissions
    assert [[n.run_id for n in s.runs] for s in subs] == [
        ["dense-a-stable"], ["dense-a-d_1M", "dense-a-d_2M"], ["convert-a"], ["upcycle-a-stable"]]
    assert [s.dependencies for s in subs] == [[], ["{job1}"], ["{job2}_0"], ["{job3}"]]
    assert "#SBATCH --array=0-1%1" in subs[1].script
    assert "#SBATCH --dependency=afterok:{job2}_0\n#SBATCH --kill-on-invalid-dep=yes" in subs[2].script
    # Names: kind first, the stable run and its branches apart within squeue's 8 characters.
    names = [s.job_name for s in subs]
    assert [n[:3] for n in names] == ["dS-", "dB-", "uC-", "uS-"] and all(len(n) <= 8 for n in names)
    assert len(set(names)) == 4
    # The dry run prints exactly these scripts, in this order.
    from megatron_upcycle.sweep.slurm import SUBMISSION_MARK
    printed = [part.split("\n", 1)[1] for part in text.split("\n" + SUBMISSION_MARK)[1:]]
    assert printed == [s.script for s in subs]
    assert all(subprocess.run(["bash", "-n"], input=s.script, text=True).returncode == 0 for s in subs)
    # The real path substitutes the ids sbatch returned in the dependency line only.
    assert "afterok:77_0\n" in subs[2].script_with_ids({"{job2}": "77"})


def test_job_names_stay_unique_when_hashes_collide(tmp_path, monkeypatch):
    from megatron_upcycle.sweep import slurm_render

    real = slurm_render.hashlib.sha1
    monkeypatch.setattr(slurm_render.hashlib, "sha1", lambda data: real(data[:1]))  # every run id collides
    dag = RunDAG([RunNode(f"dense-{i}", "dense", tmp_path / str(i), ["true"]) for i in range(3)])
    ex = SlurmExecutor(workdir=tmp_path, log_dir=tmp_path / "slurm", progress=None)
    names = [s.job_name for s in ex.render(dag).submissions]
    assert len(set(names)) == 3 and [len(n) for n in names] == [7, 8, 9]


def test_job_name_prefix_is_optional_and_not_doubled(tmp_path):
    dag = RunDAG([RunNode("upcycle-x-stable", "upcycle", tmp_path / "u", ["true"])])
    name = SlurmExecutor(SlurmOptions(job_name_prefix="grid"), workdir=tmp_path, log_dir=tmp_path,
                         progress=None).render(dag).submissions[0].job_name
    assert name.startswith("grid-uS-") and "upcycle" not in name
