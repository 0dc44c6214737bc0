"""SlurmExecutor against a real, private Slurm cluster started on this machine.

The cluster (tests/slurm_cluster.py) has two slurmd on loopback; Debian's
Slurm and munge are installed when missing. Runs are tests/fake_run.py (the
engine's contract: result.json last, checkpoint + exit 75 on SIGUSR1) and, for
the two-node case, tests/dist_check.py under launch/train.sh's torchrun.
"""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_upcycle.sweep.dag import RunDAG, RunNode
from megatron_upcycle.sweep.slurm import SlurmExecutor, SlurmRunFailedError, log_path, read_record
from megatron_upcycle.sweep.slurm_render import SlurmOptions
from megatron_upcycle.sweep.status import RunState, format_status_table

from slurm_cluster import HOSTS_FILE, SlurmCluster, cluster_fixture, pid_alive, reap_stale_clusters

pytestmark = pytest.mark.slurm

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
FAKE_RUN = TESTS / "fake_run.py"


@pytest.fixture(scope="module")
def cluster():
    yield from cluster_fixture(nodes=2)


def fake(root: Path, run_id: str, deps=(), *args, **kw) -> RunNode:
    run_dir = root / "runs" / run_id
    requires = [a for d in deps for a in ("--require", str(root / "runs" / d / "result.json"))]
    return RunNode(run_id=run_id, kind=kw.pop("kind", "dense"), run_dir=run_dir,
                   command=[sys.executable, str(FAKE_RUN), "--run-dir", str(run_dir), *requires, *args],
                   depends_on=list(deps), **kw)


def executor(root: Path, **options) -> SlurmExecutor:
    return SlurmExecutor(SlurmOptions(**options), workdir=REPO, log_dir=root / "slurm", progress=None)


def states(ex: SlurmExecutor, dag: RunDAG) -> dict[str, RunState]:
    return {s.run_id: s.state for s in ex.status(dag)}


def wait(ex: SlurmExecutor, dag: RunDAG, cluster: SlurmCluster, **kw):
    try:
        return ex.wait(dag, timeout_s=120, poll_s=0.5, **kw)
    except Exception as exc:
        raise AssertionError(f"{exc}\n{cluster.log_tail(15)}") from exc


def test_array_dependencies_and_idempotent_resubmission(cluster, tmp_path):
    nodes = [fake(tmp_path, "stable", (), "--steps", "2")]
    nodes += [fake(tmp_path, f"decay{i}", ["stable"], "--steps", "2", kind="branch", array_group="decays")
              for i in range(3)]
    nodes.append(fake(tmp_path, "convert", ["decay0", "decay1", "decay2"], kind="convert"))
    dag = RunDAG(nodes)
    ex = executor(tmp_path, array_throttle=2)

    first = ex.submit(dag)
    assert list(first.submitted) == ["stable", "decay0", "decay1", "decay2", "convert"]
    ids = first.submitted
    array = ids["decay0"].split("_")[0]
    assert [ids[f"decay{i}"] for i in range(3)] == [f"{array}_{i}" for i in range(3)]
    convert_script = Path(read_record(dag["convert"]).script).read_text()
    assert f"--dependency=afterok:{array}_0:{array}_1:{array}_2" in convert_script
    assert f"--dependency=afterok:{ids['stable']}" in Path(read_record(dag["decay1"]).script).read_text()
    assert "#SBATCH --array=0-2%2" in Path(read_record(dag["decay1"]).script).read_text()

    # Submitting again while the jobs are queued or running submits nothing.
    again = ex.submit(dag)
    assert again.submitted == {} and again.queued == ids

    final = wait(ex, dag, cluster)
    assert all(s.state is RunState.DONE for s in final), format_status_table(final)
    for node in nodes:  # --require fails a run that starts before its dependencies' result.json
        result = json.loads(node.result_path.read_text())
        assert result["steps"] >= 2 and result["starts"] == 1
        assert "fake run" in log_path(node, ids[node.run_id], "out").read_text()
    assert json.loads(dag["decay2"].result_path.read_text())["slurm_job_id"] is not None

    # Everything done: nothing to submit.
    done = ex.submit(dag)
    assert done.submitted == {} and sorted(done.done) == sorted(ids)

    # A run whose job ended without result.json counts as failed and is the only one resubmitted.
    dag["decay1"].result_path.unlink()
    assert states(ex, dag)["decay1"] is RunState.FAILED
    redo = ex.submit(dag)
    assert list(redo.submitted) == ["decay1"] and redo.resubmitted == ["decay1"]
    assert read_record(dag["decay1"]).previous_job_ids == [ids["decay1"]]
    wait(ex, dag, cluster)
    assert json.loads(dag["decay1"].result_path.read_text())["starts"] == 2


def test_failure_cancels_dependents_then_fix_and_resubmit(cluster, tmp_path):
    dag = RunDAG([
        fake(tmp_path, "dense", (), "--exit-code", "3"),
        fake(tmp_path, "convert", ["dense"], kind="convert"),
        fake(tmp_path, "moe", ["convert"], kind="upcycle"),
        fake(tmp_path, "scratch", ()),
    ])
    ex = executor(tmp_path)
    ids = ex.submit(dag).submitted
    with pytest.raises(SlurmRunFailedError) as caught:
        ex.wait(dag, timeout_s=120, poll_s=0.5)
    error = caught.value
    assert (error.run_id, error.job_id, error.state) == ("dense", ids["dense"], "FAILED")
    assert error.log_path == tmp_path / "runs" / "dense" / "logs" / f"slurm-{ids['dense']}.err"
    assert "fake failure of dense (exit 3)" in error.stderr_tail
    assert error.others == ["convert", "moe"]
    status = {s.run_id: s for s in ex.status(dag)}
    assert status["scratch"].state is RunState.DONE
    for run_id in ("convert", "moe"):  # cancelled by --kill-on-invalid-dep, never started
        assert status[run_id].state is RunState.FAILED
        assert status[run_id].scheduler_state == "CANCELLED"
        assert status[run_id].reason == "a dependency failed (DependencyNeverSatisfied)"
        assert not (tmp_path / "runs" / run_id / "starts").exists()
    table = format_status_table(status.values())
    assert "a dependency failed" in table and "1 done, 0 running, 0 pending, 3 failed" in table

    # The user fixes the failing run: re-submitting runs it and its dependents only.
    dag["dense"].command.remove("--exit-code")
    dag["dense"].command.remove("3")
    redo = ex.submit(dag)
    assert list(redo.submitted) == ["dense", "convert", "moe"] == redo.resubmitted
    final = wait(ex, dag, cluster)
    assert all(s.state is RunState.DONE for s in final)


def test_usr1_checkpoints_requeues_and_resumes(cluster, tmp_path):
    run_dir = tmp_path / "runs" / "dense"
    node = RunNode("dense", "dense", run_dir,
                   ["bash", "launch/train.sh", "--run-dir", str(run_dir), "--steps", "40", "--step-seconds", "0.1"])
    dag = RunDAG([node])
    # The setup lines make launch/train.sh's torchrun start the stand-in engine.
    ex = executor(tmp_path, setup=[f"export UPCYCLE_TRAIN_ENTRY={FAKE_RUN}"])
    job = ex.submit(dag).submitted["dense"]
    deadline = time.monotonic() + 90
    while not (run_dir / "progress").exists():
        assert time.monotonic() < deadline, f"run never started\n{format_status_table(ex.status(dag))}"
        time.sleep(0.2)
    cluster.run(["scancel", "--batch", "--signal=USR1", job])
    # While requeued (pending until Slurm restarts it) the run is not submitted again.
    while not (run_dir / "checkpoint").exists():
        assert time.monotonic() < deadline, "no checkpoint after SIGUSR1"
        time.sleep(0.2)
    while (status := ex.status(dag)[0]).state is not RunState.PENDING:
        assert time.monotonic() < deadline and status.state is not RunState.DONE, format_status_table([status])
        time.sleep(0.2)
    again = ex.submit(dag)
    assert again.submitted == {} and again.queued == {"dense": job}
    final = wait(ex, dag, cluster)
    assert final[0].state is RunState.DONE
    result = json.loads((run_dir / "result.json").read_text())
    assert result["slurm_restart_count"] == 1 and result["starts"] == 2 and result["steps"] == 40
    assert result["resumed_from_step"] > 0 and result["slurm_job_id"] == job
    out = log_path(node, job, "out").read_text()
    assert "SIGUSR1" in out and f"requeueing job {job}" in out and "(restart 1)" in out
    err = log_path(node, job, "err").read_text()
    assert "exiting 75 to be requeued" in err
    # torchrun passed the signal on and said so in one line, not with its SignalException traceback.
    assert "SIGUSR1: passed to the workers" in err and "Traceback" not in err and "SignalException" not in err


def test_two_node_torchrun_over_gloo(cluster, tmp_path):
    run_dir = tmp_path / "runs" / "dense2n"
    node = RunNode("dense2n", "dense", run_dir, ["bash", "launch/train.sh", "--run-dir", str(run_dir)], nodes=2)
    ex = executor(tmp_path, setup=[f"export UPCYCLE_TRAIN_ENTRY={TESTS / 'dist_check.py'}"])
    dag = RunDAG([node])
    ex.submit(dag)
    assert wait(ex, dag, cluster)[0].state is RunState.DONE
    result = json.loads((run_dir / "result.json").read_text())
    assert result["world_size"] == 2 and result["all_reduce_sum"] == 3.0
    assert sorted(r["node"] for r in result["ranks"]) == sorted(cluster.node_names)
    assert {r["master_addr"] for r in result["ranks"]} == {cluster.node_names[0]}
    assert sorted(r["node_rank"] for r in result["ranks"]) == ["0", "1"]


def test_one_node_cluster_next_to_the_other_and_clean_stop(cluster, tmp_path):
    hosts_before = HOSTS_FILE.read_text()
    with SlurmCluster(nodes=1) as single:
        root, pids = single.root, [p.pid for p in single._procs.values()]
        assert len(pids) == 3  # munged, slurmctld, one slurmd
        dag = RunDAG([fake(tmp_path, "only", ())])
        ex = SlurmExecutor(workdir=REPO, log_dir=tmp_path / "slurm", env=single.env, progress=None)
        job = ex.submit(dag).submitted["only"]
        assert ex.wait(dag, timeout_s=60, poll_s=0.5)[0].state is RunState.DONE
        # The job ran on this cluster's node, not on the module's cluster.
        assert single.run(["squeue", "-h", "-t", "all", "-j", job, "-o", "%N"]).stdout.strip() == single.node_names[0]
    assert not root.exists()
    assert not any(pid_alive(pid) for pid in pids)
    assert HOSTS_FILE.read_text() == hosts_before


PR_SET_CHILD_SUBREAPER = 36
STARTER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from slurm_cluster import SlurmCluster
cluster = SlurmCluster(nodes=1).start()
print(cluster.root, flush=True)
time.sleep(600)
"""


def test_a_killed_session_is_reaped_by_the_next(cluster):
    # Orphans are re-parented to the nearest "subreaper": make that this test
    # process, so the daemons stopped below can be reaped instead of lingering
    # as zombies (this machine's PID 1 does not reap them).
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        _killed_session_is_reaped(cluster)
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _killed_session_is_reaped(cluster):
    proc = subprocess.Popen([sys.executable, "-c", STARTER, str(TESTS)], stdout=subprocess.PIPE, text=True)
    try:
        root = Path(proc.stdout.readline().strip())
        assert root.is_dir(), "the child session did not start its cluster"
        pids = [int(p.read_text()) for p in (root / "run").glob("*.pid") if not p.name.endswith(".daemon.pid")]
        assert len(pids) == 3 and str(root) in HOSTS_FILE.read_text()
    finally:
        proc.kill()  # no clean-up: daemons, directory and /etc/hosts line are left behind
        proc.wait()
    assert all(pid_alive(pid) for pid in pids)
    reap_stale_clusters()
    assert not root.exists() and str(root) not in HOSTS_FILE.read_text()
    assert not any(pid_alive(pid) for pid in pids)
    for pid in pids:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    # The module's own live cluster is untouched.
    assert cluster.root.is_dir() and cluster.run(["sinfo", "-h"]).returncode == 0


def test_queued_dependent_of_a_resubmitted_run_is_replaced(cluster, tmp_path):
    # Held jobs stay queued, so the state "child still pending behind a parent
    # that must be submitted again" is reached deterministically.
    dag = RunDAG([fake(tmp_path, "parent"), fake(tmp_path, "child", ["parent"])])
    ex = executor(tmp_path, extra_sbatch=["--hold"])
    old = ex.submit(dag).submitted
    cluster.run(["scancel", old["parent"]])
    deadline = time.monotonic() + 30
    while (status := {s.run_id: s for s in ex.status(dag)})["parent"].state is not RunState.FAILED:
        assert time.monotonic() < deadline, format_status_table(status.values())
        time.sleep(0.2)
    assert status["child"].state is RunState.PENDING, format_status_table(status.values())
    new = ex.submit(dag)
    assert list(new.submitted) == ["parent", "child"] == new.resubmitted
    assert f"--dependency=afterok:{new.submitted['parent']}" in Path(read_record(dag["child"]).script).read_text()
    assert cluster.run(["squeue", "-h", "-t", "all", "-j", old["child"], "-o", "%T"]).stdout.strip() == "CANCELLED"
    cluster.run(["scontrol", "release", new.submitted["parent"], new.submitted["child"]])
    assert all(s.state is RunState.DONE for s in wait(ex, dag, cluster))


def test_conversion_stopped_by_usr1_requeues_and_converts_in_paths_with_spaces(cluster, tmp_path):
    # The real converter under the one template's bare launch slot; every path holds a
    # space, so sbatch itself reads the quoted --chdir and --output.
    from test_convert_signals import MODEL, WRITE_DENSE
    from megatron_upcycle.config import to_dict

    root = tmp_path / "sweep root"
    dense = root / "dense ckpt"
    made = subprocess.run([sys.executable, "-c", WRITE_DENSE, str(dense), repr(to_dict(MODEL))],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert made.returncode == 0, made.stderr
    run_dir = root / "runs" / "convert"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(json.dumps({"dense": str(dense), "moe": {"num_experts": 8, "topk": 2}}))
    node = RunNode("convert", "convert", run_dir, [sys.executable, "-m", "megatron_upcycle.sweep.convert_run",
                                                   "--config", str(run_dir / "config.yaml")], time_minutes=10)
    dag = RunDAG([node])
    ex = SlurmExecutor(SlurmOptions(setup=[f"export PYTHONPATH={REPO}"]), workdir=tmp_path / "work dir",
                       log_dir=root / "slurm logs", progress=None)
    (tmp_path / "work dir").mkdir()
    job = ex.submit(dag).submitted["convert"]
    deadline = time.monotonic() + 120
    while not list(run_dir.glob(".tmp-*")):
        assert time.monotonic() < deadline, f"never started writing\n{format_status_table(ex.status(dag))}"
        time.sleep(0.05)
    cluster.run(["scancel", "--batch", "--signal=USR1", job])
    final = wait(ex, dag, cluster)
    assert final[0].state is RunState.DONE
    assert (run_dir / "result.json").exists() and not list(run_dir.glob(".tmp-*"))
    out, err = log_path(node, job, "out").read_text(), log_path(node, job, "err").read_text()
    assert "SIGUSR1" in out and f"requeueing job {job}" in out and "(restart 1)" in out
    assert "stopped by SIGUSR1: partial output removed" in err and "Traceback" not in err
    assert list((root / "slurm logs").glob("uC-*.out"))  # sbatch read the quoted --output


def _tree(root: Path) -> list:
    return sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in [root, *root.rglob("*")])


def test_dry_run_prints_what_the_real_submission_submits_and_writes_nothing(cluster, tmp_path):
    # A study through the CLI: dense stable -> branch -> conversion -> upcycled stable ->
    # a two-task branch array. --hold keeps every job queued: nothing needs to run.
    import yaml
    from engine_runs import TEST_MODEL
    from megatron_upcycle.sweep.slurm import SUBMISSION_MARK, substitute_ids

    work = tmp_path / "work"
    work.mkdir()
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({
        "name": "dry", "dense_models": [TEST_MODEL], "moe": [{"experts": 4, "topk": 2}],
        "d1": {"tokens": [6144]}, "d2": {"tokens": [4096, 8192]}, "data": {"embedded_vocab_size": 512},
        "baselines": {"moe_scratch": False, "cpt": False}, "output_root": str(tmp_path / "out"),
        "resources": {"default": {"gpus_per_node": 0, "time_minutes": 10}},
        "slurm": {"extra_sbatch": ["--hold"]},
    }))

    def upcycle(*args):
        proc = subprocess.run([sys.executable, "-m", "megatron_upcycle.cli", "sweep", *args, str(exp),
                               "--executor", "slurm"], cwd=work, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    before = _tree(tmp_path)
    dry = upcycle("run", "--dry-run")
    assert _tree(tmp_path) == before  # no run directory, plan.json, script or log
    parts = dry.split("\n" + SUBMISSION_MARK)[1:]
    runs = [part.split("runs: ", 1)[1].split("\n", 1)[0].split(", ") for part in parts]
    scripts = [part.split("\n", 1)[1] for part in parts]
    assert [len(r) for r in runs] == [1, 1, 1, 1, 2] and "#SBATCH --array=0-1" in scripts[4]
    assert "#SBATCH --dependency=afterok:{job4}\n#SBATCH --kill-on-invalid-dep=yes" in scripts[4]

    upcycle("run")
    root = tmp_path / "out" / "runs"
    records = [[read_record(RunNode(r, "dense", root / r, ["true"])) for r in group] for group in runs]
    bases = [group[0].base_id for group in records]
    try:
        # Submitted in the printed order (job ids increase), and each written script is
        # the printed one with the real ids in place of the placeholders.
        assert bases == sorted(bases, key=int) and len(set(bases)) == 5
        ids = {f"{{job{i}}}": base for i, base in enumerate(bases, start=1)}
        for group, script in zip(records, scripts):
            assert Path(group[0].script).read_text() == substitute_ids(script, ids)
            assert all(record.script == group[0].script for record in group)
        names = [group[0].job_name for group in records]
        assert [n[:3] for n in names] == ["dS-", "dB-", "uC-", "uS-", "uB-"]
        shown = cluster.run(["squeue", "-h", "-o", "%i %j"]).stdout  # squeue's own names
        assert all(name in shown for name in names)
        # Status shows each run's job id and name (what squeue shows) next to it.
        table = {line.split()[0]: line.split() for line in upcycle("status").splitlines()[1:-1]}
        for group_runs, group in zip(runs, records):
            for run_id, record in zip(group_runs, group):
                assert table[run_id][1:3] == [record.job_id, record.job_name]
        # Everything is queued: a dry run now has nothing to submit.
        assert "the 0 sbatch submissions" in upcycle("run", "--dry-run")
    finally:
        cluster.run(["scancel", *bases], check=False)
