"""Text sources: files, globs, JSONL with a text field, and the embedded stdlib corpus.

A corpus is an ordered list of ``Source`` files; each yields documents (a whole
text file, or one JSONL line's text field). Every document has a stable key
(its path relative to the corpus root, plus the line for JSONL) from which the
train/validation split is drawn, so the split does not depend on input order,
machine or run.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from megatron_upcycle.errors import ConfigError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
# Directories of the standard library that are not library code (or are
# machine-generated tables that would distort a small BPE).
STDLIB_SKIP_PARTS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                               "encodings"})


@dataclass(frozen=True)
class Source:
    path: Path
    key: str  # path relative to the corpus root, '/'-separated
    # User inputs must be UTF-8 text: a binary or mis-encoded file is refused by
    # name instead of being tokenized as replacement characters. The embedded
    # stdlib corpus is read leniently (a foreign Python's stdlib must not stop a demo).
    strict: bool = True

    @property
    def is_jsonl(self) -> bool:
        return self.path.suffix.lower() in JSONL_SUFFIXES


@dataclass(frozen=True)
class Document:
    key: str
    text: str


def expand_inputs(inputs: list[str]) -> list[Source]:
    """Files and globs -> unique existing files, in the given order (each glob sorted)."""
    if not inputs:
        raise ConfigError("no input given: name text files, globs or JSONL files")
    paths: list[Path] = []
    for item in inputs:
        if glob.has_magic(item):
            matches = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not matches:
                raise ConfigError(f"no files match '{item}'")
            paths += [Path(p) for p in matches]
            continue
        path = Path(item)
        if path.is_dir():
            raise ConfigError(f"input '{item}' is a directory; give files or a glob such as '{item}/**/*.txt'")
        if not path.is_file():
            raise ConfigError(f"input file not found: {item}")
        paths.append(path)
    unique: dict[Path, Path] = {}
    for path in paths:
        unique.setdefault(path.resolve(), path)
    resolved = list(unique)
    root = Path(os.path.commonpath([p.parent for p in resolved]))
    return [Source(path=p, key=p.relative_to(root).as_posix()) for p in resolved]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(max_bytes: int | None = None) -> list[Source]:
    """This interpreter's standard-library .py files, sorted by relative path.

    Tests, site-packages and codec tables are skipped. With ``max_bytes`` the
    files are taken in a stable pseudo-random order (by a hash of their path, so
    the cap draws from every package rather than the alphabetically first ones)
    until the cap, then returned sorted.
    """
    root = stdlib_root()
    if not root.is_dir():
        raise ConfigError(f"the Python standard library was not found at {root} (sysconfig 'stdlib')")
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in STDLIB_SKIP_PARTS]  # prune: never walk site-packages
        for name in names:
            path = Path(directory) / name
            if name.endswith(".py") and path.is_file():
                files.append(Source(path=path, key=path.relative_to(root).as_posix(), strict=False))
    files.sort(key=lambda s: s.key)
    if max_bytes is not None:
        chosen, total = [], 0
        # Salted: the split hash must stay independent of which files the cap keeps.
        for source in sorted(files, key=lambda s: stable_unit("max_bytes:" + s.key)):
            size = source.path.stat().st_size
            if total + size > max_bytes and chosen:
                continue
            chosen.append(source)
            total += size
        files = sorted(chosen, key=lambda s: s.key)
    if not files:
        raise ConfigError(f"no standard-library .py files under {root}")
    return files


def stdlib_description() -> dict:
    return {"python": sys.version.split()[0], "stdlib": str(stdlib_root())}


def stable_unit(key: str) -> float:
    """A number in [0, 1) fixed by ``key`` alone (not by Python's salted hash())."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_valid_document(key: str, valid_fraction: float) -> bool:
    return stable_unit(key) < valid_fraction


def iter_documents(sources: list[Source], text_key: str = "text") -> Iterator[Document]:
    """Documents in corpus order. Bad JSONL raises ConfigError naming file and line."""
    for source in sources:
        if source.is_jsonl:
            yield from _jsonl_documents(source, text_key)
        else:
            text = _read_text(source.path, source.strict)
            if text.strip():
                yield Document(key=source.key, text=text)


def _read_text(path: Path, strict: bool = True) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    return _decode(data, str(path)) if strict else data.decode("utf-8", errors="replace")


def _decode(data: bytes, where: str) -> str:
    """UTF-8 text, or a ConfigError naming ``where`` (a binary file or another encoding)."""
    if b"\0" in data:
        raise ConfigError(f"{where}: not a text file (it holds NUL bytes); give text or JSONL files only")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{where}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "convert it to UTF-8 (e.g. iconv -t utf-8) or leave it out"
        ) from None


def _jsonl_documents(source: Source, text_key: str) -> Iterator[Document]:
    with open(source.path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{source.path}:{number}"
            line = _decode(raw, where) if source.strict else raw.decode("utf-8", errors="replace")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or text_key not in record:
                keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
                raise ConfigError(f"{where}: no '{text_key}' field (found: {keys}); choose the field with --text-key")
            text = record[text_key]
            if not isinstance(text, str):
                raise ConfigError(f"{where}: field '{text_key}' is {type(text).__name__}, not a string")
            if text.strip():
                yield Document(key=f"{source.key}:{number}", text=text)


def fingerprint(sources: list[Source], settings: dict) -> str:
    """Identifies a prepare's inputs: each file's key, size and mtime, plus the settings.

    Size and mtime (as make does) rather than a content hash, so checking a
    finished multi-gigabyte corpus costs a stat per file.
    """
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for source in sources:
        stat = source.path.stat()
        h.update(f"{source.key}\0{source.path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()
