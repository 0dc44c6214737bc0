"""A non-editable install works on its own: build the wheel, install it into a
fresh virtualenv outside the checkout, and run the CLI from another directory.

The fresh venv sees the development venv's site-packages only for the
dependencies (torch, megatron-core, ...): a .pth line adds that folder to
sys.path, and .pth files inside it (the editable install's finder among them)
are not processed, so megatron_upcycle can come only from the wheel.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(argv, cwd, timeout=120):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "MEGATRON_UPCYCLE_YAML")}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_wheel_alone_has_presets_templates_and_launcher(tmp_path):
    # Build from a copy of the sources, so the checkout gets no build/ or egg-info.
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(REPO / "setup.py", src)
    shutil.copytree(REPO / "megatron_upcycle", src / "megatron_upcycle",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = tmp_path / "wheels"
    built = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                  "-w", str(wheels), str(src)], cwd=tmp_path, timeout=180)
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("megatron_upcycle-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("megatron_upcycle/resources/yaml/models/1B.yaml",
                 "megatron_upcycle/resources/yaml/experiments/cpu_demo.yaml",
                 "megatron_upcycle/resources/slurm/run.sbatch",
                 "megatron_upcycle/resources/launch/train.sh"):
        assert name in names, f"{name} missing from the wheel"

    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path).returncode == 0
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     cwd=tmp_path).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    installed = _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                      "--no-index", str(wheel)], cwd=tmp_path, timeout=180)
    assert installed.returncode == 0, installed.stderr

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([str(python), "-c", "import megatron_upcycle; print(megatron_upcycle.__file__)"], cwd=elsewhere)
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout + where.stderr

    upcycle = venv / "bin" / "upcycle"
    info = _run([str(upcycle), "model", "info", "1B"], cwd=elsewhere)
    assert info.returncode == 0, info.stderr
    assert "1,085,859,424" in info.stdout

    preset = site / "megatron_upcycle" / "resources" / "yaml" / "experiments" / "cpu_demo.yaml"
    plan = _run([str(upcycle), "sweep", "plan", str(preset)], cwd=elsewhere)
    assert plan.returncode == 0, plan.stderr
    assert "tokens_saving_vs_independent:" in plan.stdout
    # The launcher runs from the installed package (bash only checks its syntax here).
    assert _run(["bash", "-n", str(site / "megatron_upcycle" / "resources" / "launch" / "train.sh")],
                cwd=elsewhere).returncode == 0
