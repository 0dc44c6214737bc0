"""Issue #12: no value from an experiment can run as a command in a rendered sbatch script.

Every field that reaches the script gets hostile values (a newline followed by a
command, $(...), backticks, quotes, spaces). Each is either refused with a
ConfigError before anything is rendered or written, or rendered quoted; the
rendered scripts are checked by ``bash -n`` and then really run by bash, with
stand-in ``srun`` (runs its command) and ``scontrol`` on PATH, and no hostile
value may create the sentinel file PWNED.
"""
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
from megatron_upcycle.sweep.dag import RunNode
from megatron_upcycle.sweep.experiment import load_experiment
from megatron_upcycle.sweep.slurm_render import SlurmOptions, render_sbatch

HOSTILE = [
    "x\ntouch PWNED\n#",
    "x\rtouch PWNED",
    "$(touch PWNED)",
    "`touch PWNED`",
    "'; touch PWNED; '",
    '"; touch PWNED; "',
    "a b; touch PWNED",
]
# Path-like values may hold anything but control characters: these must render quoted and stay inert.
HOSTILE_PATH_PARTS = [h for h in HOSTILE if "\n" not in h and "\r" not in h] + ["with space"]
# Writes argv[2] to argv[1]: proves the arguments arrive verbatim.
WRITE_ARG = "import pathlib, sys; pathlib.Path(sys.argv[1]).write_text(sys.argv[2])"


def _node(run_dir: Path, kind="dense", arg="plain", run_id="r1", array_group=None) -> RunNode:
    return RunNode(run_id, kind, run_dir, [sys.executable, "-c", WRITE_ARG, str(run_dir / "ran"), arg],
                   array_group=array_group)


def _run_script(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """The script under bash as a Slurm node would start it, with stand-in srun/scontrol."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text("#!/bin/bash\nexit 0\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_ID="77", SLURM_JOB_NUM_NODES="1",
               SLURM_JOB_NODELIST="localhost", SLURM_RESTART_COUNT="0")
    return subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def _assert_inert(script: str, tmp_path: Path) -> None:
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    # The header is comments only: no value may start a line of its own.
    header = script.split("set -uo pipefail")[0].splitlines()
    assert all(line.startswith("#") for line in header), header
    proc = _run_script(script, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not list(tmp_path.rglob("PWNED")), "a hostile value ran as a command"


@pytest.mark.parametrize("kind", ["dense", "convert"])
@pytest.mark.parametrize("part", HOSTILE_PATH_PARTS)
def test_hostile_paths_and_arguments_are_quoted_and_inert(tmp_path, kind, part):
    run_dir = tmp_path / "out" / part / "runs" / "r1"
    workdir, log_dir = tmp_path / f"wd {part}", tmp_path / f"logs {part}"
    # Slurm option words may hold shell characters (a constraint is an expression): quoted, inert.
    options = SlurmOptions(extra_sbatch=[f"--comment={part}"], account="$(touch${IFS}PWNED)",
                           partition="`touch${IFS}PWNED`", constraint="a100|h100&x;touch${IFS}PWNED",
                           qos="'q'", mem='"0"')
    for arg in HOSTILE + ["line1\nline2"]:
        script = render_sbatch(options, [_node(run_dir, kind, arg)], workdir=workdir, log_dir=log_dir)
        _assert_inert(script, tmp_path)
        assert (run_dir / "ran").read_bytes().decode() == arg  # the argument arrived verbatim
        assert list((run_dir / "logs").glob("slurm-77.out"))  # the run's own log, in the odd path
        (run_dir / "ran").unlink()


def test_a_path_with_a_space_still_works_and_done_runs_are_skipped(tmp_path):
    run_dir = tmp_path / "my runs" / "r1"
    script = render_sbatch(SlurmOptions(), [_node(run_dir)], workdir=tmp_path / "work dir", log_dir=tmp_path / "l s")
    assert f"--chdir='{tmp_path / 'work dir'}'" in script
    _assert_inert(script, tmp_path)
    assert (run_dir / "ran").read_text() == "plain"
    (run_dir / "ran").unlink()
    (run_dir / "result.json").write_text("{}")
    _assert_inert(script, tmp_path)
    assert not (run_dir / "ran").exists()  # already done: the command did not run again


@pytest.mark.parametrize("value", HOSTILE + ["", "x\x00"])
def test_hostile_names_and_options_are_refused(tmp_path, value):
    run_dir = tmp_path / "r1"
    for field in ("account", "partition", "qos", "constraint", "mem", "job_name_prefix"):
        with pytest.raises(ConfigError, match=field):
            SlurmOptions(**{field: value})
    with pytest.raises(ConfigError, match="run id"):
        render_sbatch(SlurmOptions(), [_node(run_dir, run_id=value or "x\n")], workdir=tmp_path, log_dir=tmp_path)
    with pytest.raises(ConfigError, match="array group"):
        render_sbatch(SlurmOptions(), [_node(run_dir, array_group=value)], workdir=tmp_path, log_dir=tmp_path)
    if value:  # an empty job name means the default one
        with pytest.raises(ConfigError, match="job name"):
            render_sbatch(SlurmOptions(), [_node(run_dir)], workdir=tmp_path, log_dir=tmp_path, job_name=value)
    with pytest.raises(ConfigError, match="dependency"):
        render_sbatch(SlurmOptions(), [_node(run_dir)], workdir=tmp_path, log_dir=tmp_path, dependencies=[value])


@pytest.mark.parametrize("bad", ["x\ntouch PWNED", "x\rtouch PWNED", "x\x00"])
def test_control_characters_in_paths_and_options_are_refused(tmp_path, bad):
    ok = tmp_path / "r1"
    with pytest.raises(ConfigError, match="run directory"):
        render_sbatch(SlurmOptions(), [_node(tmp_path / bad)], workdir=tmp_path, log_dir=tmp_path)
    with pytest.raises(ConfigError, match="working directory"):
        render_sbatch(SlurmOptions(), [_node(ok)], workdir=tmp_path / bad, log_dir=tmp_path)
    with pytest.raises(ConfigError, match="log directory"):
        render_sbatch(SlurmOptions(), [_node(ok)], workdir=tmp_path, log_dir=tmp_path / bad)
    with pytest.raises(ConfigError, match="extra_sbatch"):
        SlurmOptions(extra_sbatch=[f"--comment={bad}"])
    options = SlurmOptions()
    options.extra_sbatch.append(f"--comment={bad}")  # mutated after construction: render checks again
    with pytest.raises(ConfigError, match="extra_sbatch"):
        render_sbatch(options, [_node(ok)], workdir=tmp_path, log_dir=tmp_path)


def test_setup_lines_stay_verbatim_shell_but_not_nul(tmp_path):
    script = render_sbatch(SlurmOptions(setup=["export A='$(x)'", "module load cuda"]), [_node(tmp_path / "r")],
                           workdir=tmp_path, log_dir=tmp_path)
    assert "\nexport A='$(x)'\nmodule load cuda\n" in script
    with pytest.raises(ConfigError, match="setup contains a NUL"):
        SlurmOptions(setup=["echo a\x00b"])


def _experiment(tmp_path: Path, **changes) -> Path:
    data = {"name": "ok", "dense_models": [TEST_MODEL], "moe": [{"experts": 4, "topk": 2}],
            "d1": {"tokens": [6144]}, "d2": {"tokens": [4096]}, "data": {"embedded_vocab_size": 512},
            "resources": {"default": {"gpus_per_node": 0, "time_minutes": 10}}, **changes}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("name", HOSTILE + ["a/b"])
def test_a_bad_experiment_name_is_refused_at_load(tmp_path, name):
    with pytest.raises(ConfigError, match="experiment: name must be"):
        load_experiment(str(_experiment(tmp_path, name=name)))


def test_an_output_root_with_a_newline_is_refused_at_load(tmp_path):
    with pytest.raises(ConfigError, match="output_root"):
        load_experiment(str(_experiment(tmp_path, output_root=str(tmp_path / "o\ntouch PWNED\n#"))))


def _upcycle(*args, cwd):
    return subprocess.run([sys.executable, "-m", "megatron_upcycle.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_cli_bad_name_is_one_line_and_dry_run_checks_before_writing(tmp_path):
    proc = _upcycle("sweep", "plan", str(_experiment(tmp_path, name="x\ntouch PWNED\n#")), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "experiment: name must be" in proc.stderr

    # An output root with a newline given on the command line: refused before plan.json or any run dir.
    root = tmp_path / "out\ntouch PWNED\n#"
    proc = _upcycle("sweep", "run", str(_experiment(tmp_path)), "--root", str(root), "--executor", "slurm",
                    "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "control characters" in proc.stderr
    assert not (tmp_path / "out").exists() and not root.exists()

    # And a good one still renders, quoted (and, a dry run, writes nothing: issue 17).
    proc = _upcycle("sweep", "run", str(_experiment(tmp_path)), "--root", str(tmp_path / "o k"),
                    "--executor", "slurm", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"--output='{tmp_path / 'o k' / 'slurm'}/%x-%j.out'" in proc.stdout
    assert not (tmp_path / "o k").exists()
    assert not list(tmp_path.rglob("PWNED"))
