"""One meaning of a run: the planner's accounting is the engine's resolution, and the
run-directory layout, kinds, exit codes and removed keys are each defined once."""
import os
import signal
from dataclasses import replace
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# `upcycle sweep plan` totals before the resolver refactor (runs, tokens, FLOPs, independent
# tokens, independent FLOPs): the plan must keep describing exactly what runs.
PINNED = {
    # cpu_demo: 89 training and conversion runs (3 sizes + noise probe, issue 15) + 18 eval runs
    # (the largest size's final models, issue 14; 0 tokens each)
    "cpu_demo": (107, 7_797_760, 5_107_898_548_224, 12_282_880, 8_202_857_054_208),
    "paper_d1d2_grid": (225, 606_171_299_840, 450_652_870_876_436_889_600, 1_201_345_758_720,
                        873_543_591_390_383_308_800),
    "paper_joint": (92, 187_999_846_400, 175_995_568_046_034_911_232, 260_000_000_000,
                    243_399_044_928_000_000_000),
    "paper_model_config": (152, 119_602_675_712, 134_611_355_231_676_530_688, 119_600_000_000,
                           134_608_343_750_400_000_000),
}


def _plan(name, root):
    from megatron_upcycle.sweep.experiment import load_experiment
    from megatron_upcycle.sweep.plan import build_plan

    return build_plan(load_experiment(str(REPO / "yaml" / "experiments" / f"{name}.yaml")), root)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_preset_plan_totals_are_pinned(name, tmp_path):
    plan = _plan(name, tmp_path)
    runs, tokens, flops, ind_tokens, ind_flops = PINNED[name]
    assert (len(plan.runs), plan.total_tokens, plan.total_flops) == (runs, tokens, flops)
    assert (plan.independent_tokens, plan.independent_flops) == (ind_tokens, ind_flops)


def test_paper_grid_saving_line():
    out = subprocess.run([sys.executable, "-m", "megatron_upcycle.cli", "sweep", "plan",
                          "yaml/experiments/paper_d1d2_grid.yaml", "--root", "/tmp/unused-root"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[-1] == "tokens_saving_vs_independent: 1.982"
    assert "planned:     606,171,299,840 tokens, 4.507e+20 FLOPs, 313.0 GPU-hours" in out.stdout


def test_planned_configs_resolve_as_the_engine_resolves_them(tmp_path):
    """Each run's config.yaml, read back as the engine reads it, resolves to what the plan counted."""
    from megatron_upcycle.checkpoint.meta import CheckpointMeta
    from megatron_upcycle.config.loading import from_dict
    from megatron_upcycle.config.presets import load_model_config
    from megatron_upcycle.config.run import RunConfig
    from megatron_upcycle.resolve import resolve_run
    from megatron_upcycle.run_kinds import SINGLE_PROCESS_KINDS
    from megatron_upcycle.sweep.materialize import config_text

    plan = _plan("cpu_demo", tmp_path)
    trained = [r for r in plan.runs if r.kind not in SINGLE_PROCESS_KINDS]  # conversions and evals do not train
    read = {r.run_id: from_dict(RunConfig, yaml.safe_load(config_text(r))) for r in trained}
    for run in trained:
        cfg = read[run.run_id]
        parent = read[run.depends_on[0]] if cfg.kind == "branch" else None
        base = parent or cfg
        init = None
        if base.kind in ("upcycle", "cpt"):
            init = CheckpointMeta(model=load_model_config(run.model), moe=run.resolved.moe)
        resolved = resolve_run(cfg, parent, init)
        # Everything but the start checkpoint's provenance, which only the converter writes.
        assert replace(resolved, init_meta=None) == replace(run.resolved, init_meta=None), run.run_id
        assert resolved.train_tokens == run.tokens
        assert run.flops == 6 * run.active_params * run.tokens


def test_plan_tears_down_its_process_groups():
    code = ("import torch.distributed as dist, sys; sys.path.insert(0, 'tests');"
            "from test_run_resolver import _plan; import tempfile; _plan('cpu_demo', tempfile.mkdtemp());"
            "print('initialized', dist.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "initialized False" in out.stdout


@pytest.mark.parametrize("cls_path, data, key", [
    ("megatron_upcycle.config.run:RunConfig", {"kind": "dense", "model": "cpu-tiny", "max_restarts_on_nan": 2,
                                               "schedule": {"train_tokens": 100000}}, "max_restarts_on_nan"),
    ("megatron_upcycle.sweep.experiment:Baselines", {"dense_scratch": True}, "dense_scratch"),
])
def test_removed_keys_are_named_with_the_reason(cls_path, data, key):
    import importlib

    from megatron_upcycle.config.loading import from_dict
    from megatron_upcycle.errors import ConfigError

    module, name = cls_path.split(":")
    with pytest.raises(ConfigError, match=f"key '{key}' was removed .*delete it"):
        from_dict(getattr(importlib.import_module(module), name), data)


def test_run_dir_names_every_file_once():
    from megatron_upcycle.rundir import RunDir

    run = RunDir("/x/runs/r1")
    assert run.checkpoint(120) == Path("/x/runs/r1/checkpoints/iter_0000120")
    assert run.result.name == "result.json" and run.metrics.name == "metrics.jsonl"
    assert run.moe_checkpoint.name == "moe_checkpoint" and run.logs == Path("/x/runs/r1/logs")
    offenders = []
    for path in (REPO / "megatron_upcycle").rglob("*.py"):
        if path.name == "rundir.py":
            continue
        text = path.read_text()
        for literal in ('"result.json"', '"metrics.jsonl"', '"moe_checkpoint"', "iter_{", '"config.resolved.yaml"'):
            if literal in text:
                offenders.append(f"{path.relative_to(REPO)}: {literal}")
    assert not offenders


def test_lock_refuses_a_second_writer_and_dies_with_its_holder(tmp_path):
    from megatron_upcycle.exit_codes import RunBusy
    from megatron_upcycle.rundir import RunDir

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from megatron_upcycle.rundir import RunDir\n"
         "with RunDir(sys.argv[1]).lock():\n    print('held', flush=True); time.sleep(60)", str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        run = RunDir(tmp_path)
        assert run.holder() == f"pid {holder.pid} on {os.uname().nodename}"
        with pytest.raises(RunBusy, match=f"in use by pid {holder.pid} on"):
            with run.lock():
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel released the lock with the process: no stale lock to clean up.
    assert RunDir(tmp_path).holder() is None
    with RunDir(tmp_path).lock():
        pass


def test_run_entry_maps_errors_to_one_line(tmp_path, capsys):
    from megatron_upcycle.errors import ConfigError
    from megatron_upcycle.exit_codes import EXIT_INTERNAL, EXIT_USER_ERROR, RequeueRequested, run_entry

    def bad_input():
        raise ConfigError("optim.lr must be > 0, got -1")

    def bug():
        return {}["missing"]

    assert run_entry("upcycle x", bad_input) == EXIT_USER_ERROR
    assert capsys.readouterr().err == "upcycle x: error: optim.lr must be > 0, got -1\n"
    assert run_entry("upcycle x", lambda: (_ for _ in ()).throw(RequeueRequested())) == 75
    assert run_entry("upcycle x", bug, log_dir=tmp_path) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "KeyError" in err
    log = next(tmp_path.glob("upcycle-x-error-*.log"))
    assert f"traceback in {log}" in err and "Traceback" in log.read_text()


def test_disk_full_is_its_own_exit_code(capsys):
    import errno

    from megatron_upcycle.exit_codes import EXIT_DISK, run_entry

    def full():
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/scratch/run/checkpoints")
        except OSError as exc:
            raise RuntimeError("unexpected pos 704 vs 598") from exc

    assert run_entry("train", full) == EXIT_DISK
    assert capsys.readouterr().err == "train: error: /scratch/run/checkpoints: no space left on device\n"


@pytest.mark.parametrize("schedule, needle", [
    ({"mode": "full", "train_tokens": 100000, "save_budgets": [50000]}, "only used with schedule.mode stable"),
    ({"mode": "stable", "train_tokens": 1000, "save_budgets": [50000]}, "is not used with schedule.mode stable"),
    ({"train_tokens": 100000, "log_interval_iters": 0}, "log_interval_iters must be >= 1"),
])
def test_contradictory_schedules_are_refused(schedule, needle):
    from megatron_upcycle.config.loading import from_dict
    from megatron_upcycle.config.run import RunConfig
    from megatron_upcycle.errors import ConfigError

    with pytest.raises(ConfigError, match=needle):
        from_dict(RunConfig, {"kind": "dense", "model": "cpu-tiny", "schedule": schedule})
