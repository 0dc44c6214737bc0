"""Faults that used to lose work, each reproduced with a real process, signal or filesystem."""
import contextlib
import json
import os
import signal
import subprocess
import time

import pytest

from engine_runs import REPO, TEST_MODEL, TOKENS_PER_ITER, env, losses, metrics, train, train_cmd, write_config


@contextlib.contextmanager
def _tmpfs(path, size):
    """A real small filesystem for disk-full and read-only faults (needs root)."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _manifest(run_dir):
    return json.loads((run_dir / "checkpoints" / "manifest.json").read_text())["checkpoints"]


def test_signal_during_a_budget_save_keeps_that_budget(tmp_path):
    """SIGUSR1 while the budget checkpoint is being written: the budget survives retention and serves its branch."""
    budgets = [12 * TOKENS_PER_ITER, 20 * TOKENS_PER_ITER]
    run_dir = tmp_path / "stable"
    config = write_config(run_dir, kind="dense", model=TEST_MODEL,
                          schedule={"mode": "stable", "save_budgets": budgets, "safety_interval_iters": 1,
                                    "keep_safety": 1})
    proc = subprocess.Popen(train_cmd(config), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env())
    partial = run_dir / "checkpoints" / ".tmp-iter_0000011"  # budget 1 saves at iteration 11
    deadline = time.time() + 240
    while not partial.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    record = {c["iteration"]: c for c in _manifest(run_dir)}[11]
    assert record["budget_tokens"] == budgets[0]

    proc = train(config)  # resumes, saves safety checkpoints every iteration (keep 1), finishes
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [c["budget_tokens"] for c in _manifest(run_dir) if c["budget_tokens"]] == budgets
    branch = write_config(tmp_path / "branch", kind="branch", parent=str(run_dir),
                          schedule={"train_tokens": budgets[0]})
    proc = train(branch)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_no_checkpoint_with_non_finite_weights_is_committed(tmp_path):
    from megatron_upcycle.checkpoint import load_full_model_state

    run_dir = tmp_path / "nan"
    config = write_config(run_dir, kind="dense", model=TEST_MODEL,
                          optim={"lr": 1.0e30, "warmup_iters": 0, "clip_grad": 0.0},
                          schedule={"train_tokens": 20 * TOKENS_PER_ITER, "safety_interval_iters": 1,
                                    "keep_safety": 100})
    proc = train(config)
    assert proc.returncode == 3 and "last good checkpoint" in proc.stderr
    import torch

    for record in _manifest(run_dir):
        _, _, state, _ = load_full_model_state(run_dir / "checkpoints" / record["name"])
        assert all(bool(torch.isfinite(t).all()) for t in state.values()), record["name"]
    # The re-run resumes from a good checkpoint and fails the same way, not at once on NaN weights.
    again = train(config)
    assert again.returncode == 3 and "resumed from" in again.stdout


def test_kill_before_the_first_checkpoint_leaves_no_repeated_metrics(tmp_path):
    config = write_config(tmp_path / "run", kind="dense", model=TEST_MODEL,
                          schedule={"train_tokens": 16 * TOKENS_PER_ITER})
    from engine_runs import start_and_interrupt

    proc = start_and_interrupt(config, at_iteration=5, sig=signal.SIGKILL)
    proc.wait(timeout=60)
    stale = tmp_path / "run" / "checkpoints" / ".tmp-iter_0000003"
    stale.mkdir(parents=True)  # what a kill during a save leaves
    assert train(config).returncode == 0
    iterations = [m["iteration"] for m in metrics(tmp_path / "run") if "loss" in m]
    assert iterations == list(range(1, 17))
    assert not stale.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    with _tmpfs(tmp_path / "small", "1200k") as mount:
        run_dir = mount / "run"
        config = write_config(run_dir, kind="dense", model=TEST_MODEL,
                              schedule={"train_tokens": 40 * TOKENS_PER_ITER, "safety_interval_iters": 2,
                                        "keep_safety": 100})
        proc = train(config)
        assert proc.returncode == 74, proc.stderr[-2000:]
        lines = [line for line in proc.stderr.splitlines() if line.startswith("train:")]
        assert len(lines) == 1 and "no space left on device" in lines[0] and "Traceback" not in proc.stderr
        records = _manifest(run_dir)
        assert records, "at least one checkpoint fitted before the disk filled"
        assert not list((run_dir / "checkpoints").glob(".tmp-*"))
        assert losses(run_dir)


def test_sigterm_to_the_whole_process_group_still_saves(tmp_path):
    """Ctrl-C on the executor signals every process of the run: the save must still work."""
    run_dir = tmp_path / "run"
    config = write_config(run_dir, kind="dense", model=TEST_MODEL,
                          schedule={"train_tokens": 400 * TOKENS_PER_ITER, "safety_interval_iters": 3})
    proc = subprocess.Popen(train_cmd(config), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env(), start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (run_dir / "checkpoints" / "iter_0000006").exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    last = _manifest(run_dir)[-1]
    assert last["reason"] in ("signal", "safety") and last["iteration"] > 6
    assert "BrokenPipe" not in err and "Traceback" not in err


@pytest.fixture
def lock_holder(tmp_path):
    """A live process holding a run directory's lock, as a second trainer in it would."""
    import sys

    run_dir = tmp_path / "runs" / "held"
    run_dir.mkdir(parents=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from megatron_upcycle.rundir import RunDir\n"
         "with RunDir(sys.argv[1]).lock():\n    print('held', flush=True); time.sleep(120)", str(run_dir)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield run_dir, proc.pid
    proc.kill()
    proc.wait()


def _launch(config):
    return subprocess.run(["bash", str(REPO / "launch" / "train.sh"), "--config", str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=180, env=env())


def test_launcher_passes_the_engines_exit_code_through_torchrun(tmp_path, lock_holder):
    bad = write_config(tmp_path / "bad", kind="dense", model=TEST_MODEL, schedule={"train_tokens": 0})
    proc = _launch(bad)
    assert proc.returncode == 2, proc.stderr[-2000:]  # torchrun alone would say 1
    run_dir, pid = lock_holder
    busy = write_config(run_dir, kind="dense", model=TEST_MODEL, schedule={"train_tokens": 8 * TOKENS_PER_ITER})
    proc = _launch(busy)
    assert proc.returncode == 73, proc.stderr[-2000:]
    assert f"in use by pid {pid} on" in proc.stderr
    assert not (run_dir / "result.json").exists() and not (run_dir / "checkpoints").exists()


def test_executors_report_a_run_held_elsewhere_as_running(tmp_path, lock_holder):
    from megatron_upcycle.sweep.dag import RunDAG, RunNode
    from megatron_upcycle.sweep.local import LocalExecutor
    from megatron_upcycle.sweep.slurm import SlurmExecutor
    from megatron_upcycle.sweep.status import RunState

    run_dir, pid = lock_holder
    config = write_config(run_dir, kind="dense", model=TEST_MODEL, schedule={"train_tokens": 8 * TOKENS_PER_ITER})
    child_dir = tmp_path / "runs" / "child"
    child = write_config(child_dir, kind="dense", model=TEST_MODEL, schedule={"train_tokens": 8 * TOKENS_PER_ITER})
    launcher = ["bash", str(REPO / "launch" / "train.sh"), "--config"]
    dag = RunDAG([RunNode(run_id="held", kind="dense", run_dir=run_dir, command=launcher + [str(config)]),
                  RunNode(run_id="child", kind="branch", run_dir=child_dir, command=launcher + [str(child)],
                          depends_on=["held"])])
    executor = LocalExecutor(max_parallel=1, progress=None, workdir=REPO, env={"OMP_NUM_THREADS": "1"})
    report = executor.run(dag)
    assert not report.failed and not report.blocked
    assert list(report.elsewhere) == ["held"] and f"pid {pid}" in report.elsewhere["held"]
    assert report.not_started == ["child"] and not report.ok
    states = {s.run_id: (s.state, s.reason) for s in executor.status(dag)}
    assert states["held"][0] is RunState.RUNNING and f"pid {pid}" in states["held"][1]
    slurm = {s.run_id: s.state for s in SlurmExecutor(workdir=REPO, log_dir=tmp_path / "slurm",
                                                      progress=None).status(dag)}
    assert slurm == {"held": RunState.RUNNING, "child": RunState.NOT_SUBMITTED}


def _remount_read_only(mount, seconds: float = 30.0) -> None:
    """``mount -o remount,ro``, retried: the SIGKILLed trainer's checkpoint-writer child can
    hold a file open for a moment after its parent died ("mount point is busy")."""
    deadline = time.monotonic() + seconds
    while True:
        proc = subprocess.run(["mount", "-o", "remount,ro", str(mount)], capture_output=True, text=True)
        if proc.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"could not remount {mount} read-only: {proc.stderr.strip()}")
        time.sleep(0.5)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_read_only_disk_is_one_line_and_keeps_the_checkpoints(tmp_path):
    from engine_runs import start_and_interrupt

    with _tmpfs(tmp_path / "ro", "64m") as mount:
        run_dir = mount / "run"
        config = write_config(run_dir, kind="dense", model=TEST_MODEL,
                              schedule={"train_tokens": 400 * TOKENS_PER_ITER, "safety_interval_iters": 2})
        proc = start_and_interrupt(config, at_iteration=5, sig=signal.SIGKILL)
        proc.wait(timeout=60)
        before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
        _remount_read_only(mount)
        proc = train(config)
        assert proc.returncode == 74, proc.stderr[-2000:]
        lines = [line for line in proc.stderr.splitlines() if line.startswith("train:")]
        assert len(lines) == 1 and "read-only file system" in lines[0] and "Traceback" not in proc.stderr
        assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before
