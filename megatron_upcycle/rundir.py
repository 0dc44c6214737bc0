"""One run's directory: the only place that names its files.

    <run_dir>/config.yaml            the run's config (written by the planner or the user)
             config.resolved.yaml    what actually runs (written by the engine at start)
             checkpoints/            torch_dist checkpoints + manifest.json (train runs)
             moe_checkpoint/         the converted checkpoint (convert runs)
             metrics.jsonl           one line per logged step
             tensorboard/
             logs/                   executors' stdout/stderr, tracebacks of internal errors
             .lock                   held (flock) by the one process working in the run
             eval.json               downstream results, flat (eval runs and `upcycle eval --out`)
             lm_eval_results.json    the harness's own results JSON beside it
             result.json             written last and atomically: its presence means "done"

A run directory belongs to one process at a time: ``RunDir.lock()`` takes an
exclusive kernel lock (``fcntl.flock``) that the kernel drops when the process
dies, so there is never a stale lock to clean up. A second process refuses
with the holder's PID and host.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from megatron_upcycle.atomic import write_json_atomic
from megatron_upcycle.errors import ConfigError
from megatron_upcycle.exit_codes import RunBusy

CONFIG_FILE = "config.yaml"
RESOLVED_CONFIG_FILE = "config.resolved.yaml"
CHECKPOINTS_DIR = "checkpoints"
MOE_CHECKPOINT_DIR = "moe_checkpoint"
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"
LOCK_FILE = ".lock"
IDENTITY_FILE = "run_identity.json"
EVAL_FILE = "eval.json"
HARNESS_RESULTS_FILE = "lm_eval_results.json"


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __init__(self, path: str | os.PathLike) -> None:
        object.__setattr__(self, "path", Path(path))

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    # -- files ------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def resolved_config(self) -> Path:
        return self.path / RESOLVED_CONFIG_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    def checkpoint(self, iteration: int) -> Path:
        return self.checkpoints / checkpoint_name(iteration)

    @property
    def moe_checkpoint(self) -> Path:
        return self.path / MOE_CHECKPOINT_DIR

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def result(self) -> Path:
        return self.path / RESULT_FILE

    @property
    def eval_result(self) -> Path:
        """eval.json: written last and atomically by an evaluation; its presence means evaluated."""
        return self.path / EVAL_FILE

    @property
    def harness_results(self) -> Path:
        return self.path / HARNESS_RESULTS_FILE

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK_FILE

    @property
    def identity_file(self) -> Path:
        return self.path / IDENTITY_FILE

    # -- state ------------------------------------------------------------------
    def is_done(self) -> bool:
        return self.result.exists()

    def started(self) -> bool:
        """Whether any work product exists (checkpoints, a converted checkpoint, a result)."""
        return self.checkpoints.exists() or self.moe_checkpoint.exists() or self.result.exists()

    def read_result(self) -> dict | None:
        try:
            return json.loads(self.result.read_text())
        except (OSError, ValueError):
            return None

    def write_result(self, result: dict) -> None:
        write_json_atomic(self.result, result)

    # -- ownership --------------------------------------------------------------
    def check_owner(self, identity: dict) -> None:
        """A run directory belongs to the run that created it: refuse another one.

        ``identity`` names what makes a run that run (kind, parent, start checkpoint,
        model); keys the directory's record lacks are not compared.
        """
        try:
            recorded = json.loads(self.identity_file.read_text())
        except (OSError, ValueError):
            return
        differs = {k: (recorded[k], v) for k, v in identity.items() if k in recorded and recorded[k] != v}
        if differs:
            what = "; ".join(f"{k}: {old!r} there, {new!r} here" for k, (old, new) in differs.items())
            raise ConfigError(f"run directory {self.path} belongs to another run ({what}): use a new run "
                              "directory, or delete that one")

    def claim(self, identity: dict) -> None:
        """Check ownership and record (or extend) the directory's identity."""
        self.check_owner(identity)
        try:
            recorded = json.loads(self.identity_file.read_text())
        except (OSError, ValueError):
            recorded = {}
        if any(k not in recorded for k in identity):
            write_json_atomic(self.identity_file, {**recorded, **identity})

    # -- the lock ---------------------------------------------------------------
    def holder(self) -> str | None:
        """'PID on HOST' of the process holding the lock, or None when it is free."""
        try:
            fd = os.open(self.lock_file, os.O_RDONLY)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return os.read(fd, 200).decode(errors="replace").strip() or "another process"
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def lock(self):
        """Hold the run's exclusive lock for the body; RunBusy if a live process holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                raise RunBusy(f"run {self.path} is in use by {holder}; not starting a second writer") from None
            except OSError as exc:  # e.g. a filesystem mounted without lock support
                raise RunBusy(f"run {self.path}: cannot lock {self.lock_file} ({exc.strerror}); this "
                              "filesystem does not support flock: mount it with locking enabled") from None
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
            os.fsync(fd)
            yield self
        finally:
            os.close(fd)  # closing the descriptor releases the lock
