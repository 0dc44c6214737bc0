"""The real training engine under a real Slurm: sbatch -> srun -> launch/train.sh ->
torchrun -> megatron_upcycle.train. USR1 saves, requeues and resumes with the same
losses as an uninterrupted run, on one node and on two (data parallel over gloo),
and the logs read as a requeue (no traceback)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from engine_runs import TEST_MODEL, TOKENS_PER_ITER, losses, result, train, write_config
from megatron_upcycle.sweep.dag import RunDAG, RunNode
from megatron_upcycle.sweep.slurm import SlurmExecutor, log_path
from megatron_upcycle.sweep.slurm_render import SlurmOptions
from megatron_upcycle.sweep.status import RunState, format_status_table
from conftest import torchrun
from slurm_cluster import cluster_fixture

pytestmark = pytest.mark.slurm

CONFIG = {"kind": "dense", "model": TEST_MODEL, "micro_batch_size": 4,
          "schedule": {"train_tokens": 60 * TOKENS_PER_ITER}}


@pytest.fixture(scope="module")
def cluster():
    yield from cluster_fixture(nodes=2)


def _executor(root):
    from conftest import REPO

    return SlurmExecutor(SlurmOptions(setup=["export OMP_NUM_THREADS=1"]), workdir=REPO, log_dir=root / "slurm",
                         progress=None)


def _wait(executor, dag, cluster, timeout=240):
    try:
        return executor.wait(dag, timeout_s=timeout, poll_s=0.5)
    except Exception as exc:
        raise AssertionError(f"{exc}\n{cluster.log_tail(20)}") from exc


def _requeue_mid_run(executor, dag, cluster, run_dir: Path, at_iteration: int) -> str:
    """Submit, send SIGUSR1 to the batch script once ``at_iteration`` is logged, wait until done."""
    job = executor.submit(dag).submitted[dag.topological_order()[0].run_id]
    deadline = time.monotonic() + 240
    while max(losses(run_dir), default=0) < at_iteration:
        assert time.monotonic() < deadline, format_status_table(executor.status(dag)) + cluster.log_tail(20)
        time.sleep(0.2)
    cluster.run(["scancel", "--batch", "--signal=USR1", job])
    assert _wait(executor, dag, cluster, timeout=360)[0].state is RunState.DONE
    return job


def _assert_quiet_requeue(node: RunNode, job: str, nodes: int) -> None:
    """A requeue reads as one: no traceback (torchrun's SignalException included), every
    node's launcher saying it saved, and the restart."""
    err, out = log_path(node, job, "err").read_text(), log_path(node, job, "out").read_text()
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
    assert err.count("checkpoint saved: exiting 75 to be requeued") == nodes, err[-3000:]
    assert "(restart 1)" in out and f"requeueing job {job}" in out


def test_real_engine_usr1_requeue_resumes_exactly(cluster, tmp_path):
    reference = write_config(tmp_path / "reference", **CONFIG)
    assert train(reference).returncode == 0
    config = write_config(tmp_path / "runs" / "dense", **CONFIG)
    node = RunNode("dense", "dense", config.parent, ["bash", "launch/train.sh", "--config", str(config)])
    dag = RunDAG([node])
    executor = _executor(tmp_path)
    job = _requeue_mid_run(executor, dag, cluster, config.parent, 10)
    manifest = json.loads((config.parent / "checkpoints" / "manifest.json").read_text())["checkpoints"]
    assert any(c["reason"] == "signal" for c in manifest)
    assert losses(config.parent) == losses(tmp_path / "reference")
    assert result(config.parent)["val_loss"] == result(tmp_path / "reference")["val_loss"]
    _assert_quiet_requeue(node, job, nodes=1)


def test_real_engine_two_nodes_usr1_requeue_resumes_exactly(cluster, tmp_path):
    # Two nodes, data parallel over gloo; SIGUSR1 mid-run. Both nodes save, agree that
    # every rank's save is complete, exit 75 and the job requeues; the resumed run's
    # losses equal an uninterrupted two-rank run's.
    two_node = dict(CONFIG, schedule={"train_tokens": 24 * TOKENS_PER_ITER})
    reference = write_config(tmp_path / "reference", **two_node)
    ref = torchrun(2, ["-m", "megatron_upcycle.train", "--config", str(reference)], timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    config = write_config(tmp_path / "runs" / "dense2n", **two_node)
    node = RunNode("dense2n", "dense", config.parent, ["bash", "launch/train.sh", "--config", str(config)], nodes=2)
    dag = RunDAG([node])
    executor = _executor(tmp_path)
    job = _requeue_mid_run(executor, dag, cluster, config.parent, 6)
    res = result(config.parent)
    assert res["world_size"] == 2 and res["iterations"] == 24
    manifest = json.loads((config.parent / "checkpoints" / "manifest.json").read_text())["checkpoints"]
    assert any(c["reason"] == "signal" for c in manifest)
    assert losses(config.parent) == losses(reference.parent)
    _assert_quiet_requeue(node, job, nodes=2)
