"""The training engine on real Megatron-Core: resume, requeue, branches, CPT, NaN, MoE metrics."""
import json
import signal

import pytest

from engine_runs import (
    TEST_MODEL,
    TOKENS_PER_ITER,
    losses,
    metrics,
    result,
    start_and_interrupt,
    train,
    write_config,
)

FULL = {"kind": "dense", "model": TEST_MODEL, "micro_batch_size": 4,
        "schedule": {"train_tokens": 30 * TOKENS_PER_ITER, "safety_interval_iters": 4, "keep_safety": 2}}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 30-iteration dense run (two micro-batches per step)."""
    run_dir = tmp_path_factory.mktemp("reference")
    proc = train(write_config(run_dir, **FULL))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_full_run_writes_result_and_checkpoints(reference):
    res = result(reference)
    assert res["phase"] == "complete" and res["iterations"] == 30 and res["tokens"] == 30 * TOKENS_PER_ITER
    assert res["D1"] == res["tokens"] and res["FLOPs"] == 6 * res["N1"] * res["tokens"]
    assert res["val_loss"] < 6.0  # well under log(512) = 6.24 after 15k tokens
    log = losses(reference)
    assert sorted(log) == list(range(1, 31))
    manifest = json.loads((reference / "checkpoints" / "manifest.json").read_text())["checkpoints"]
    # Two newest safety checkpoints kept, plus the final one.
    assert [(c["iteration"], c["reason"]) for c in manifest] == [(24, "safety"), (28, "safety"), (30, "final")]
    meta = json.loads((reference / "checkpoints" / "iter_0000030" / "upcycle_meta.json").read_text())
    assert meta["provenance"]["run_config"]["schedule"]["train_tokens"] == 30 * TOKENS_PER_ITER
    assert meta["tokens"] == 30 * TOKENS_PER_ITER and meta["iteration"] == 30
    lrs = [m["lr"] for m in metrics(reference) if "lr" in m]
    assert lrs[3] == pytest.approx(3e-3) and lrs[-1] == pytest.approx(3e-4)  # warmup 4, decay to 10%


def test_kill_9_then_rerun_gives_identical_losses(reference, tmp_path):
    config = write_config(tmp_path / "run", **FULL)
    proc = start_and_interrupt(config, at_iteration=14, sig=signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "result.json").exists()
    resumed = train(config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from iter_" in resumed.stdout
    assert losses(tmp_path / "run") == losses(reference)  # exactly, every iteration
    assert result(tmp_path / "run")["val_loss"] == result(reference)["val_loss"]


def test_sigusr1_saves_and_exits_for_requeue(reference, tmp_path):
    from megatron_upcycle.exit_codes import EXIT_REQUEUE

    config = write_config(tmp_path / "run", **FULL)
    proc = start_and_interrupt(config, at_iteration=6, sig=signal.SIGUSR1)
    proc.wait(timeout=120)
    assert proc.returncode == EXIT_REQUEUE
    manifest = json.loads((tmp_path / "run" / "checkpoints" / "manifest.json").read_text())["checkpoints"]
    assert manifest[-1]["reason"] == "signal"
    again = train(config)
    assert again.returncode == 0, again.stderr[-3000:]
    assert losses(tmp_path / "run") == losses(reference)
    # A finished run exits 0 at once.
    assert train(config).stdout.strip().endswith("already done (result.json exists)")


def test_branch_equals_an_independent_full_run(tmp_path):
    """One stable run + a decay branch reproduces the full WSD run to that budget exactly."""
    budgets = [12 * TOKENS_PER_ITER, 20 * TOKENS_PER_ITER]
    stable = write_config(tmp_path / "stable", kind="dense", model=TEST_MODEL,
                          schedule={"mode": "stable", "save_budgets": budgets})
    proc = train(stable)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "stable" / "checkpoints" / "manifest.json").read_text())["checkpoints"]
    assert [(c["iteration"], c["budget_tokens"], c["phase"]) for c in manifest] == [
        (11, budgets[0], "stable"), (18, budgets[1], "stable")]
    assert result(tmp_path / "stable")["phase"] == "stable"
    before = sorted(p.name for p in (tmp_path / "stable").rglob("*"))

    branch = write_config(tmp_path / "branch", kind="branch", parent=str(tmp_path / "stable"),
                          schedule={"train_tokens": budgets[0]})
    proc = train(branch)
    assert proc.returncode == 0, proc.stderr[-3000:]
    full = write_config(tmp_path / "full", kind="dense", model=TEST_MODEL, schedule={"train_tokens": budgets[0]})
    assert train(full).returncode == 0
    branch_losses, full_losses = losses(tmp_path / "branch"), losses(tmp_path / "full")
    assert sorted(branch_losses) == [12]  # iteration 11 -> 12: only the decay ran
    assert branch_losses[12] == full_losses[12]
    assert result(tmp_path / "branch")["val_loss"] == result(tmp_path / "full")["val_loss"]
    assert result(tmp_path / "branch")["D1"] == budgets[0]
    assert sorted(p.name for p in (tmp_path / "stable").rglob("*")) == before  # parent untouched

    missing = write_config(tmp_path / "bad", kind="branch", parent=str(tmp_path / "stable"),
                           schedule={"train_tokens": 16 * TOKENS_PER_ITER})
    proc = train(missing)
    assert proc.returncode == 2 and "has no checkpoint for a budget of 8,192 tokens" in proc.stderr


def test_cpt_starts_from_dense_weights(reference, tmp_path):
    source = reference / "checkpoints" / "iter_0000030"
    config = write_config(tmp_path / "cpt", kind="cpt", init_from=str(source),
                          schedule={"train_tokens": 8 * TOKENS_PER_ITER})
    proc = train(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = result(tmp_path / "cpt")
    assert res["D1"] == 30 * TOKENS_PER_ITER and res["D2"] == 8 * TOKENS_PER_ITER
    first = losses(tmp_path / "cpt")[1]
    assert first < losses(reference)[2]  # starts trained, not from scratch


def test_non_finite_loss_stops_with_clear_message(tmp_path):
    config = write_config(tmp_path / "nan", kind="dense", model=TEST_MODEL,
                          optim={"lr": 1.0e30, "warmup_iters": 0, "clip_grad": 0.0},
                          schedule={"train_tokens": 20 * TOKENS_PER_ITER, "safety_interval_iters": 1})
    proc = train(config)
    assert proc.returncode == 3, proc.stderr[-2000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("train: error:")]
    assert len(error) == 1 and "loss is" in error[0] and "last good checkpoint" in error[0]
    assert not (tmp_path / "nan" / "result.json").exists()


def test_moe_run_logs_router_metrics(tmp_path):
    config = write_config(tmp_path / "moe", kind="moe", model=TEST_MODEL, moe={"num_experts": 4, "topk": 2},
                          schedule={"train_tokens": 8 * TOKENS_PER_ITER})
    proc = train(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = [m for m in metrics(tmp_path / "moe") if "loss" in m]
    assert all("aux_loss" in m and len(m["expert_load"]) == 4 for m in logged)
    assert 0 < logged[-1]["router_entropy"] <= 1.3863 + 1e-6  # at most log(4)
    assert sum(logged[-1]["expert_load"]) == pytest.approx(4.0)
    res = result(tmp_path / "moe")
    assert res["E"] == 4 and res["k"] == 2 and res["N2"] < res["Ntotal"] and res["N1"] < res["N2"]
    assert "aux" in proc.stderr and "tok/s" in proc.stderr and "ETA" in proc.stderr


def test_bad_run_config_is_one_line(tmp_path):
    config = write_config(tmp_path / "bad", kind="dense", model=TEST_MODEL, schedule={"train_tokns": 5})
    proc = train(config)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("train: error:")
    assert "did you mean 'train_tokens'" in proc.stderr


def test_data_parallel_two_ranks_matches_single_process(reference, tmp_path):
    """Two data-parallel ranks split each global batch; the loss curve matches the
    single-process run up to floating-point reduction order."""
    from conftest import torchrun

    config = write_config(tmp_path / "dp2", **dict(FULL, schedule={"train_tokens": 10 * TOKENS_PER_ITER}))
    single = write_config(tmp_path / "dp1", **dict(FULL, schedule={"train_tokens": 10 * TOKENS_PER_ITER}))
    proc = torchrun(2, ["-m", "megatron_upcycle.train", "--config", str(config)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert train(single).returncode == 0
    assert result(tmp_path / "dp2")["world_size"] == 2
    two, one = losses(tmp_path / "dp2"), losses(tmp_path / "dp1")
    assert sorted(two) == sorted(one)
    assert all(abs(two[i] - one[i]) < 1e-4 for i in one)


def test_upcycle_run_uses_carried_adam_moments(reference, tmp_path):
    """A conversion with carried moments starts the upcycled run's Adam state from the dense one."""
    from megatron_upcycle.config import MoEConfig
    from megatron_upcycle.upcycle import UpcycleOptions, convert_dense_to_moe

    source = reference / "checkpoints" / "iter_0000030"
    converted = convert_dense_to_moe(source, tmp_path / "moe", MoEConfig(num_experts=4, topk=2),
                                     UpcycleOptions(carry_moments=True))
    assert converted.status == "ok"
    config = write_config(tmp_path / "upc", kind="upcycle", init_from=str(tmp_path / "moe"),
                          schedule={"train_tokens": 6 * TOKENS_PER_ITER})
    proc = train(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "carried Adam moments from the dense optimizer (step 30)" in proc.stdout
    res = result(tmp_path / "upc")
    assert res["D1"] == 30 * TOKENS_PER_ITER and res["D2"] == 6 * TOKENS_PER_ITER


def test_a_run_directory_belongs_to_the_run_that_created_it(tmp_path):
    """A branch pointed at its parent's directory, or a changed model, is refused; the parent is untouched."""
    budgets = [12 * TOKENS_PER_ITER]
    stable_dir = tmp_path / "stable"
    stable = write_config(stable_dir, kind="dense", model=TEST_MODEL,
                          schedule={"mode": "stable", "save_budgets": budgets})
    assert train(stable).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in stable_dir.rglob("*")}

    branch = write_config(tmp_path / "branch", kind="branch", parent=str(stable_dir),
                          schedule={"train_tokens": budgets[0]})
    proc = train(branch, "--run-dir", str(stable_dir))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"run directory {stable_dir} belongs to another run (kind: 'dense' there, 'branch' here" in proc.stderr
    other_model = write_config(tmp_path / "resized", kind="dense", model="cpu-tiny",
                               schedule={"mode": "stable", "save_budgets": budgets})
    proc = train(other_model, "--run-dir", str(stable_dir))
    assert proc.returncode == 2 and "model: " in proc.stderr and "Traceback" not in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in stable_dir.rglob("*")} == before
