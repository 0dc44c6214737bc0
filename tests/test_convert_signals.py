"""A conversion run stopped by a real signal: exit 75, its partial output removed,
no traceback; the next attempt converts and writes result.json. A SIGKILLed
attempt's temporary output is removed by the next run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from megatron_upcycle.config import ModelConfig, to_dict

# Big enough that writing and verifying take a while (the signal lands mid-way), small
# enough for a few seconds per conversion on two cores.
MODEL = ModelConfig(name="sig-4L", num_layers=4, hidden_size=128, num_attention_heads=4, ffn_hidden_size=512,
                    vocab_size=256, seq_length=32, init_method_std=0.02)
WRITE_DENSE = """
import sys, torch
from megatron_upcycle.config import ModelConfig
from megatron_upcycle.upcycle.synthetic import write_synthetic_dense
write_synthetic_dense(sys.argv[1], ModelConfig(**eval(sys.argv[2])), dtype=torch.float32)
"""


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dense") / "dense"
    proc = subprocess.run([sys.executable, "-c", WRITE_DENSE, str(path), repr(to_dict(MODEL))], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return path


def _run_dir(tmp_path: Path, dense: Path) -> Path:
    run_dir = tmp_path / "convert-run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(
        {"dense": str(dense), "moe": {"num_experts": 8, "topk": 2}, "options": {}}))
    return run_dir


def _start(run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "megatron_upcycle.sweep.convert_run",
                             "--config", str(run_dir / "config.yaml")], env=_env(), cwd=run_dir.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _temp_dirs(run_dir: Path) -> list[Path]:
    return list(run_dir.glob(".tmp-*"))


def _signal_once_writing(proc: subprocess.Popen, run_dir: Path, sig: int) -> tuple[int, str]:
    deadline = time.monotonic() + 240
    while not _temp_dirs(run_dir):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the conversion never started writing"
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=240)
    return proc.returncode, err


def _rerun_succeeds(run_dir: Path) -> None:
    proc = _start(run_dir)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    assert (run_dir / "result.json").exists() and (run_dir / "moe_checkpoint").is_dir()
    assert not _temp_dirs(run_dir)
    assert not list((run_dir / "moe_checkpoint").glob(".owner"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_stops_the_conversion_cleanly_and_a_rerun_converts(tmp_path, dense, sig):
    run_dir = _run_dir(tmp_path, dense)
    code, err = _signal_once_writing(_start(run_dir), run_dir, sig)
    assert code == 75, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3, err
    assert f"stopped by {sig.name}: partial output removed; re-run to convert again" in err
    assert not _temp_dirs(run_dir)
    assert not (run_dir / "moe_checkpoint").exists() and not (run_dir / "result.json").exists()
    _rerun_succeeds(run_dir)


def test_a_killed_attempts_temporary_output_is_removed_by_the_next_run(tmp_path, dense):
    run_dir = _run_dir(tmp_path, dense)
    proc = _start(run_dir)
    code, _ = _signal_once_writing(proc, run_dir, signal.SIGKILL)
    assert code == -signal.SIGKILL
    (stale,) = _temp_dirs(run_dir)
    assert str(proc.pid) in stale.name
    _rerun_succeeds(run_dir)


def test_a_user_mistake_is_one_line_and_exit_2(tmp_path):
    run_dir = tmp_path / "bad"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(
        {"dense": str(tmp_path / "missing"), "moe": {"num_experts": 8, "topk": 2}}))
    proc = _start(run_dir)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("convert: error: ")


def test_the_previous_handlers_come_back_after_the_conversion():
    from megatron_upcycle.upcycle.stopping import STOP_SIGNALS, stop_on_signals

    def mine(*_):
        pass

    before = {sig: signal.signal(sig, mine) for sig in STOP_SIGNALS}
    try:
        with stop_on_signals() as stop:
            assert all(signal.getsignal(sig) is not mine for sig in STOP_SIGNALS)
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.01)
            assert stop.name == "SIGUSR1"
        assert all(signal.getsignal(sig) is mine for sig in STOP_SIGNALS)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
