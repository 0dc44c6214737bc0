"""Atomic file writes: write under a temporary name in the same directory, then rename."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from megatron_upcycle.errors import UserError


def current_umask() -> int:
    """The process umask (reading it requires setting it; it is restored at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600; results on a shared cluster filesystem must be readable
        # like any other file the user writes.
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def unique_failed_name(out: str | os.PathLike) -> Path:
    """``OUT.failed`` (``OUT.failed2``, ... when taken): where a failed check leaves its output."""
    out = Path(out)
    candidate = out.with_name(out.name + ".failed")
    n = 1
    while candidate.exists():
        n += 1
        candidate = out.with_name(f"{out.name}.failed{n}")
    return candidate


@contextlib.contextmanager
def staged_directory(out: str | os.PathLike, exists_hint: str = "choose a new output directory"):
    """Yield a fresh directory beside ``out``; when the block succeeds it becomes ``out``
    (refused if ``out`` appeared meanwhile), otherwise it is removed: never a half-written
    directory under the name a user asked for."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        staging.chmod(0o777 & ~current_umask())  # mkdtemp creates 0700; an output is an ordinary directory
        yield staging
        if out.exists():
            raise UserError(f"{out} already exists; {exists_hint}")
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
