"""Bad input, tried as a new user would (issue #12): every subcommand and every config-file kind.

Each row runs the real command in a subprocess and must give exit 2, at most 3
lines on stderr, no traceback anywhere, nothing at the output name, and every
file that was there before unchanged. The rows stop before anything trains, so
the whole table stays within a few minutes on 2 cores.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
HEADER = "run_id,kind,model,E,k,N1,N2,Ntotal,D1,D2,tokens,FLOPs,val_loss"
GOOD_ROW = "d1,dense,0.1B,,,98323840,,,1e9,,1e9,5.9e17,3.1"
FITS_SCHEMA = '"schema": "megatron-upcycle/scaling-fits/v1"'

# Root ignores file permissions; without the capabilities that let it, it is refused
# like any user. Rows that need a refused read or write use this prefix then.
_NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def _unprivileged_prefix() -> list[str] | None:
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        return None
    probe = subprocess.run([*_NO_DAC, "true"], capture_output=True)
    return _NO_DAC if probe.returncode == 0 else None


UNPRIVILEGED = _unprivileged_prefix()


def model_yaml(**fields) -> str:
    data = {"name": "bad", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 512,
            "seq_length": 64, **fields}
    return "".join(f"{k}: {v}\n" for k, v in data.items())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Small input files, shared by every row (rows must leave them unchanged)."""
    root = tmp_path_factory.mktemp("inputs")
    binary = bytes(range(256)) * 20
    (root / "binary.dat").write_bytes(binary)
    (root / "binary.yaml").write_bytes(binary)
    (root / "latin1.txt").write_bytes("caf\xe9 au lait, a Latin-1 text\n".encode("latin-1"))
    (root / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    for i in range(3):
        (root / f"doc{i}.txt").write_text(f"document {i}: sparse upcycling copies the dense MLP. " * 20)
    (root / "afile").write_text("an existing file, not a directory\n")
    (root / "gqa0.yaml").write_text(model_yaml(num_query_groups=0))
    (root / "gqa3.yaml").write_text(model_yaml(num_query_groups=3))
    (root / "huge.yaml").write_text(model_yaml(hidden_size=2**40))
    (root / "run.yaml").write_text("kind: dense\nmodel: cpu-tiny\nschedule: {train_tokens: 100000}\n")
    (root / "run_typo.yaml").write_text("kind: dense\nmodel: cpu-tiny\noptim: {lrr: 0.001}\n")
    (root / "exp_typo.yaml").write_text("name: bad\ndense_modles: [cpu-tiny]\n")
    (root / "ragged.csv").write_text(f"{HEADER}\n{GOOD_ROW},extra,cells\n")
    (root / "good.csv").write_text(f"{HEADER}\n{GOOD_ROW}\n")
    (root / "not_fits.json").write_text("[1, 2]\n")
    (root / "fits_bad_records.json").write_text("{" + FITS_SCHEMA + ', "fits": [{"form": "x"}]}\n')
    (root / "fits_broken.json").write_text("{" + FITS_SCHEMA + ', "fits": [\n')
    (root / "empty_ckpt").mkdir()
    (root / "unreadable.csv").write_text(f"{HEADER}\n{GOOD_ROW}\n")
    (root / "unreadable.yaml").write_text(model_yaml())
    (root / "readonly").mkdir()
    # A real prepared directory (an output that must survive a failed re-prepare) and a
    # copy whose train.bin lost its second half.
    proc = run("upcycle", ["data", "prepare", str(root / "doc*.txt"), "--out", str(root / "prepared"),
                           "--vocab-size", "300", "--valid-fraction", "0"])
    assert proc.returncode == 0, proc.stderr
    shutil.copytree(root / "prepared", root / "truncated")
    bin_file = root / "truncated" / "train.bin"
    os.truncate(bin_file, bin_file.stat().st_size // 2)
    for name in ("unreadable.csv", "unreadable.yaml"):
        (root / name).chmod(0)
    (root / "readonly").chmod(0o555)
    yield root
    (root / "readonly").chmod(0o755)


def run(entry: str, args: list[str], prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    module = "megatron_upcycle.cli" if entry == "upcycle" else "megatron_upcycle.train"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([*(prefix or []), PYTHON, "-m", module, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=180, env=env)


# id: (entry, args, words the one stderr line must hold, needs an unprivileged user).
# {in} is the shared inputs folder, {out} a fresh path (not created) that must still not exist after.
TABLE = {
    # advise / fit: numbers, fits JSON, results CSV
    "advise negative n1": ("upcycle", ["advise", "--n1", "-1e9", "--d1", "1e10", "--tokens", "1e9", "--paper"],
                           "--n1 must be > 0", False),
    "advise fits not a record": ("upcycle", ["advise", "--n1", "1e9", "--d1", "1e10", "--tokens", "1e9",
                                             "--fits", "{in}/not_fits.json"], "not a fits.json", False),
    "advise fits bad records": ("upcycle", ["advise", "--n1", "1e9", "--d1", "1e10", "--tokens", "1e9",
                                            "--fits", "{in}/fits_bad_records.json"], "malformed", False),
    "advise fits truncated": ("upcycle", ["advise", "--n1", "1e9", "--d1", "1e10", "--tokens", "1e9",
                                          "--fits", "{in}/fits_broken.json"], "not valid JSON", False),
    "advise fits binary": ("upcycle", ["advise", "--n1", "1e9", "--d1", "1e10", "--tokens", "1e9",
                                       "--fits", "{in}/binary.dat"], "not a text file", False),
    "fit ragged row": ("upcycle", ["fit", "{in}/ragged.csv", "--out", "{out}"], "the header has 13", False),
    "fit binary table": ("upcycle", ["fit", "{in}/binary.dat", "--out", "{out}"], "not a text file", False),
    "fit out is a file": ("upcycle", ["fit", "{in}/good.csv", "--out", "{in}/afile"], "existing file", False),
    "fit unreadable table": ("upcycle", ["fit", "{in}/unreadable.csv", "--out", "{out}"], "permission denied",
                             True),
    # model: model YAML
    "model query groups 0": ("upcycle", ["model", "info", "{in}/gqa0.yaml"], "num_query_groups must be >= 1",
                             False),
    "model query groups do not divide": ("upcycle", ["model", "info", "{in}/gqa3.yaml"], "does not divide", False),
    "model too large to build": ("upcycle", ["model", "info", "{in}/huge.yaml"], "cannot be built", False),
    "model yaml binary": ("upcycle", ["model", "info", "{in}/binary.yaml"], "not a text file", False),
    "model yaml latin-1": ("upcycle", ["model", "info", "{in}/latin1.yaml"], "not UTF-8", False),
    "model yaml unreadable": ("upcycle", ["model", "info", "{in}/unreadable.yaml"], "permission denied", True),
    "model list extra argument": ("upcycle", ["model", "list", "extra"], "unrecognized arguments", False),
    # data
    "prepare out is a file": ("upcycle", ["data", "prepare", "{in}/doc0.txt", "--out", "{in}/afile"],
                              "existing file", False),
    "prepare binary input": ("upcycle", ["data", "prepare", "{in}/binary.dat", "{in}/doc0.txt", "--out", "{out}"],
                             "binary.dat: not a text file", False),
    "prepare latin-1 input": ("upcycle", ["data", "prepare", "{in}/latin1.txt", "{in}/doc0.txt", "--out", "{out}"],
                              "latin1.txt: not UTF-8", False),
    "prepare binary over a prepared dir": ("upcycle", ["data", "prepare", "{in}/binary.dat", "{in}/doc1.txt",
                                                       "--out", "{in}/prepared", "--overwrite"],
                                           "not a text file", False),
    "prepare unwritable parent": ("upcycle", ["data", "prepare", "{in}/doc0.txt", "{in}/doc1.txt",
                                              "--out", "{in}/readonly/out"], "permission denied", True),
    "info truncated bin": ("upcycle", ["data", "info", "{in}/truncated"], "train.bin' is truncated", False),
    # checkpoints
    "convert out under a file": ("upcycle", ["convert", "--dense", "{in}/empty_ckpt", "--out", "{in}/afile/moe",
                                             "--experts", "4"], "afile is a file", False),
    "convert verify batch 0": ("upcycle", ["convert", "--dense", "{in}/empty_ckpt", "--out", "{out}",
                                           "--experts", "4", "--verify-batch-size", "0"],
                               "--verify-batch-size must be >= 1", False),
    "verify batch 0": ("upcycle", ["verify", "--dense", "{in}/empty_ckpt", "--moe", "{in}/empty_ckpt",
                                   "--batch-size", "0"], "--batch-size must be >= 1", False),
    "inspect not a checkpoint": ("upcycle", ["inspect", "{in}/empty_ckpt"], "not a (finished) torch_dist", False),
    "export shard size banana": ("upcycle", ["export-hf", "{in}/empty_ckpt", "{out}", "--max-shard-size", "banana"],
                                 "--max-shard-size 'banana' is not a size", False),
    "bench-inference not an export": ("upcycle", ["bench-inference", "{in}/empty_ckpt", "{in}/empty_ckpt", "--out",
                                                  "{out}", "--engine", "transformers"],
                                      "neither a Hugging Face export", False),
    # eval: a model path; selftest: its output directory
    "eval not a model": ("upcycle", ["eval", "{in}/binary.dat", "--tasks", "code_next_line", "--out", "{out}"],
                         "neither a Hugging Face model directory", False),
    "selftest out is a file": ("upcycle", ["selftest", "--cpu", "--quick", "--out", "{in}/binary.dat"],
                               "is an existing file, not a directory", False),
    # sweep: experiment YAML
    "sweep plan unknown key": ("upcycle", ["sweep", "plan", "{in}/exp_typo.yaml", "--root", "{out}"],
                               "did you mean 'dense_models'", False),
    "sweep run binary experiment": ("upcycle", ["sweep", "run", "{in}/binary.yaml", "--root", "{out}"],
                                    "not a text file", False),
    # the train module: run YAML (failures before the Trainer is built)
    "train config binary": ("train", ["--config", "{in}/binary.dat", "--run-dir", "{out}"], "not a text file",
                            False),
    "train unknown key": ("train", ["--config", "{in}/run_typo.yaml", "--run-dir", "{out}"], "did you mean 'lr'",
                          False),
    "train override not yaml": ("train", ["--config", "{in}/run.yaml", "--run-dir", "{out}", "optim.lr=[1"],
                                "not valid YAML", False),
    "train override nan": ("train", ["--config", "{in}/run.yaml", "--run-dir", "{out}", "optim.lr=nan"],
                           "optim.lr must be a finite number", False),
}


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file under ``folders`` -> a hash of its bytes (its mode and size where unreadable)."""
    state = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                try:
                    state[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
                except PermissionError:
                    stat = path.stat()
                    state[str(path)] = f"unreadable {stat.st_mode:o} {stat.st_size}"
            elif path.is_dir():
                state[str(path)] = "dir"
    return state


@pytest.mark.parametrize("case", list(TABLE))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, inputs, tmp_path):
    entry, args, words, unprivileged = TABLE[case]
    if unprivileged and UNPRIVILEGED is None:
        pytest.skip("needs a non-root user or setpriv to be refused a file")
    out = tmp_path / "out"
    args = [a.replace("{in}", str(inputs)).replace("{out}", str(out)) for a in args]
    before = snapshot(inputs, tmp_path)
    proc = run(entry, args, UNPRIVILEGED if unprivileged else None)
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert 1 <= len(err) <= 3, proc.stderr
    assert words in err[-1], err
    assert not out.exists(), f"{out} was left behind"
    assert snapshot(inputs, tmp_path) == before


def test_every_subcommand_and_config_kind_has_a_row():
    from megatron_upcycle.cli import build_parser

    action = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    covered = {args[0] for entry, args, _, _ in TABLE.values() if entry == "upcycle"}
    assert covered == set(action.choices)
    rows = " ".join(" ".join(args) for _, args, _, _ in TABLE.values())
    for kind in (".yaml", ".csv", ".json", "--config"):  # model/experiment/run YAML, results CSV, fits JSON
        assert kind in rows


def test_counting_refuses_what_memory_cannot_hold():
    """The memory estimate is made before building; on this machine the int64 check
    usually comes first, so the estimate is tested with a stated amount of memory."""
    from megatron_upcycle.config import ModelConfig
    from megatron_upcycle.counts import check_countable
    from megatron_upcycle.errors import ConfigError

    wide_heads = ModelConfig(name="wide", num_layers=1, hidden_size=2**26, num_attention_heads=1,
                             ffn_hidden_size=8, vocab_size=8)
    with pytest.raises(ConfigError, match=r"needs about 0\.2 GiB .* more than the 0\.1 GiB available"):
        check_countable(wide_heads, None, available_bytes=2**27)
    check_countable(wide_heads, None, available_bytes=2**31)  # enough: no error


def test_os_errors_on_a_named_path_are_user_errors(capsys):
    import errno

    from megatron_upcycle.exit_codes import EXIT_DISK, EXIT_USER_ERROR, report

    denied = PermissionError(errno.EACCES, "Permission denied", "/data/corpus.txt")
    assert report("upcycle", denied) == EXIT_USER_ERROR
    assert capsys.readouterr().err == (
        "upcycle: error: /data/corpus.txt: permission denied; check its permissions or choose another path\n")
    full = OSError(errno.ENOSPC, "No space left on device", "/data/out")
    assert report("upcycle", full) == EXIT_DISK  # the disk-full mapping is unchanged
    assert "no space left on device" in capsys.readouterr().err
