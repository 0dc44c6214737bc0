"""Text -> tokenizer + Megatron indexed datasets, in one output directory.

Layout of a prepared directory::

    tokenizer.json          the tokenizer (trained here, or a copy of the given one)
    train.bin, train.idx    Megatron indexed dataset, one document per sequence + end-of-document
    valid.bin, valid.idx    (absent with valid_fraction 0)
    manifest.json           written last: its presence means "finished"

The manifest records the inputs' fingerprint (see corpus.fingerprint), the
tokenizer and token counts per split; a second identical prepare finds it and
reuses the output. Preparing holds a file lock on the directory, so concurrent
prepares of the same directory (two runs starting at once) do the work once.
Everything is written in a hidden staging directory and moved into place at
the end, manifest last, so an interrupted prepare leaves nothing that looks
finished.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_upcycle.atomic import write_json_atomic
from megatron_upcycle.data import corpus as corpus_mod
from megatron_upcycle.data import tokenizer as tok_mod
from megatron_upcycle.data.config import DEFAULT_EMBEDDED_MAX_BYTES, MIN_BPE_VOCAB
from megatron_upcycle.data.indexed import IndexedWriter
from megatron_upcycle.errors import ConfigError

MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
FORMAT_VERSION = 1
SPLITS = ("train", "valid")
# Documents are encoded in batches of about this many characters (encode_batch runs them in parallel).
ENCODE_BATCH_CHARS = 4_000_000
EMBEDDED_VALID_FRACTION = 0.05


@dataclass(frozen=True)
class Prepared:
    out_dir: Path
    manifest: dict
    reused: bool

    def prefix(self, split: str) -> str | None:
        entry = self.manifest["splits"].get(split)
        return str(self.out_dir / entry["prefix"]) if entry else None

    @property
    def tokenizer_path(self) -> Path:
        return self.out_dir / self.manifest["tokenizer"]["file"]


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
    """The manifest of a finished prepare in ``out_dir``, or None."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT_VERSION else None


def prepare(
    inputs: list[str],
    out_dir: str | os.PathLike,
    *,
    tokenizer: str | None = None,
    vocab_size: int | None = None,
    text_key: str = "text",
    valid_fraction: float = 0.05,
    eod_token: str | None = None,
    overwrite: bool = False,
) -> Prepared:
    """Tokenize files/globs/JSONL into ``out_dir`` (see the module docstring).

    Exactly one of ``tokenizer`` (a tokenizer.json) and ``vocab_size`` (train a
    byte-level BPE of that size on the training documents).
    """
    sources = corpus_mod.expand_inputs(inputs)
    return prepare_sources(
        sources, out_dir, tokenizer=tokenizer, vocab_size=vocab_size, text_key=text_key,
        valid_fraction=valid_fraction, eod_token=eod_token, overwrite=overwrite,
    )


def embedded_dir(cache_dir: str | os.PathLike, vocab_size: int, max_bytes: int | None) -> Path:
    python = corpus_mod.stdlib_description()["python"]
    size = "all" if max_bytes is None else f"{max_bytes}B"
    return Path(cache_dir) / "embedded" / f"stdlib-py{python}-bpe{vocab_size}-{size}"


def prepare_embedded(
    cache_dir: str | os.PathLike, vocab_size: int = 4096, max_bytes: int | None = DEFAULT_EMBEDDED_MAX_BYTES
) -> Prepared:
    """The embedded corpus: this interpreter's stdlib sources, split by file, with a BPE
    of ``vocab_size`` trained on its training files. Reused when already prepared."""
    sources = corpus_mod.stdlib_sources(max_bytes)
    return prepare_sources(
        sources, embedded_dir(cache_dir, vocab_size, max_bytes), vocab_size=vocab_size,
        valid_fraction=EMBEDDED_VALID_FRACTION, overwrite=True,  # a cache: a changed stdlib is re-prepared
        extra_settings={"embedded": corpus_mod.stdlib_description(), "max_bytes": max_bytes},
    )


def prepare_sources(
    sources: list[corpus_mod.Source],
    out_dir: str | os.PathLike,
    *,
    tokenizer: str | None = None,
    vocab_size: int | None = None,
    text_key: str = "text",
    valid_fraction: float = 0.05,
    eod_token: str | None = None,
    overwrite: bool = False,
    extra_settings: dict | None = None,
) -> Prepared:
    from filelock import FileLock

    if (tokenizer is None) == (vocab_size is None):
        raise ConfigError("give either a tokenizer.json (--tokenizer) or a vocabulary size to train a BPE (--vocab-size)")
    if vocab_size is not None and vocab_size < MIN_BPE_VOCAB:
        raise ConfigError(f"vocabulary size must be >= {MIN_BPE_VOCAB} (256 bytes + end-of-document), got {vocab_size}")
    if not 0.0 <= valid_fraction <= 0.5:
        raise ConfigError(f"validation fraction must be in [0, 0.5], got {valid_fraction}")
    if tokenizer is not None:
        given = tok_mod.load_tokenizer(tokenizer)  # fail early on a bad path or a missing end-of-document
        eod_id = tok_mod.find_eod_id(given, eod_token)
        if eod_id is None:
            raise ConfigError(
                f"tokenizer {tokenizer} has no end-of-document token (looked for "
                f"{', '.join(tok_mod.EOD_CANDIDATES)}); name one with --eod-token"
            )
        tokenizer_spec = {"given_sha256": tok_mod.file_sha256(_tokenizer_file(tokenizer)), "eod_token": eod_token}
    else:
        given, eod_id = None, None
        tokenizer_spec = {"bpe_vocab_size": vocab_size}
    settings = {
        "format": FORMAT_VERSION, "tokenizer": tokenizer_spec, "text_key": text_key,
        "valid_fraction": valid_fraction, **(extra_settings or {}),
    }
    fingerprint = corpus_mod.fingerprint(sources, settings)

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output {out_dir} is an existing file, not a directory; choose another --out")
    created = _first_missing(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(out_dir / ".prepare.lock")):
            existing = read_manifest(out_dir)
            same = existing is not None and existing.get("fingerprint") == fingerprint
            if same and _files_present(out_dir, existing):
                return Prepared(out_dir, existing, reused=True)
            if existing is not None and not overwrite:
                raise ConfigError(
                    f"{out_dir} already holds data prepared from other inputs or settings; "
                    "choose another --out or pass --overwrite"
                )
            # Read every document once before touching the directory: bad JSONL or an
            # empty corpus fails here and leaves an earlier finished prepare intact.
            keys = [doc.key for doc in corpus_mod.iter_documents(sources, text_key)]
            if not keys:
                names = ", ".join(s.key for s in sources[:3]) + (", ..." if len(sources) > 3 else "")
                raise ConfigError(f"empty corpus: the inputs ({names}) hold no text")
            valid_keys = _valid_keys(keys, valid_fraction)
            if valid_fraction > 0 and not valid_keys:
                raise ConfigError(
                    "cannot hold out validation documents from a single document; give several files or a JSONL "
                    "with one document per line, or a validation fraction of 0"
                )
            (out_dir / MANIFEST).unlink(missing_ok=True)  # from here on the directory is unfinished
            for stale in out_dir.glob(".staging-*"):
                shutil.rmtree(stale, ignore_errors=True)  # left by a killed prepare (we hold the lock)
            staging = out_dir / f".staging-{os.getpid()}"
            staging.mkdir()
            try:
                manifest = _prepare_into(staging, sources, keys, valid_keys, given, eod_id, tokenizer, vocab_size,
                                         text_key)
                manifest.update(fingerprint=fingerprint, settings=settings)
                for name in _output_files(manifest):
                    os.replace(staging / name, out_dir / name)
                for split in SPLITS:  # a valid split from an earlier prepare must not linger
                    if split not in manifest["splits"]:
                        for suffix in (".bin", ".idx"):
                            (out_dir / f"{split}{suffix}").unlink(missing_ok=True)
                write_json_atomic(out_dir / MANIFEST, manifest)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        # Bad input (or Ctrl-C) before anything was prepared: a directory this call
        # created must not stay behind at the output name.
        if created is not None:
            _remove_created(out_dir, created)
        raise
    return Prepared(out_dir, manifest, reused=False)


def _prepare_into(staging, sources, keys, valid_keys, given, eod_id, tokenizer_arg, vocab_size, text_key) -> dict:
    started = time.perf_counter()
    tokenizer_file = staging / TOKENIZER_FILE
    if given is None:
        train_texts = (d.text for d in corpus_mod.iter_documents(sources, text_key) if d.key not in valid_keys)
        tok = tok_mod.train_byte_level_bpe(train_texts, vocab_size, tokenizer_file)
        eod_id = tok.token_to_id(tok_mod.EOD_TOKEN)
    else:
        tok = given
        shutil.copyfile(_tokenizer_file(tokenizer_arg), tokenizer_file)
    vocab = tok_mod.vocab_size(tok)
    tokenizer_seconds = time.perf_counter() - started

    splits = ("train", "valid") if valid_keys else ("train",)
    counts = {}
    with IndexedWriter(staging / "train", vocab) as train, _maybe_writer(staging, "valid", vocab, valid_keys) as valid:
        started = time.perf_counter()
        batch, chars = [], 0

        def flush():
            for key, ids in zip([k for k, _ in batch], tok_mod.encode_documents(tok, [t for _, t in batch])):
                (valid if key in valid_keys else train).add_document(ids + [eod_id])
            batch.clear()

        for doc in corpus_mod.iter_documents(sources, text_key):
            batch.append((doc.key, doc.text))
            chars += len(doc.text)
            if chars >= ENCODE_BATCH_CHARS:
                flush()
                chars = 0
        flush()
        writers = {"train": train, "valid": valid}
        for split in splits:
            counts[split] = writers[split].commit()
    tokenize_seconds = time.perf_counter() - started

    return {
        "format": FORMAT_VERSION,
        "created_by": "upcycle data prepare",
        "inputs": {"files": len(sources), "bytes": sum(s.path.stat().st_size for s in sources), "documents": len(keys)},
        "tokenizer": {
            "file": TOKENIZER_FILE,
            "sha256": tok_mod.file_sha256(tokenizer_file),
            "vocab_size": vocab,
            "eod_id": eod_id,
            "eod_token": tok.id_to_token(eod_id),
            "trained_here": given is None,
        },
        "splits": {
            split: {"prefix": split, "documents": c.documents, "tokens": c.tokens, "dtype": c.dtype}
            for split, c in counts.items()
        },
        "seconds": {"tokenizer": round(tokenizer_seconds, 2), "tokenize": round(tokenize_seconds, 2)},
    }


class _NoWriter:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


def _maybe_writer(staging, split, vocab, wanted):
    return IndexedWriter(staging / split, vocab) if wanted else _NoWriter()


def _valid_keys(keys: list[str], valid_fraction: float) -> set[str]:
    """Documents whose stable hash falls below the fraction; at least one when there are two or more."""
    if valid_fraction <= 0 or len(keys) < 2:
        return set()
    chosen = {k for k in keys if corpus_mod.is_valid_document(k, valid_fraction)}
    if not chosen:
        chosen = {min(keys, key=corpus_mod.stable_unit)}
    if len(chosen) == len(set(keys)):  # keep at least one training document
        chosen.discard(max(keys, key=corpus_mod.stable_unit))
    return chosen


def _tokenizer_file(path: str) -> Path:
    path = Path(path)
    return path / TOKENIZER_FILE if path.is_dir() else path


def _output_files(manifest: dict) -> list[str]:
    names = [manifest["tokenizer"]["file"]]
    for entry in manifest["splits"].values():
        names += [entry["prefix"] + ".bin", entry["prefix"] + ".idx"]
    return names


def _first_missing(path: Path) -> Path | None:
    """The top-most folder of ``path`` that does not exist yet (what mkdir(parents=True) creates)."""
    missing = None
    for folder in [path, *path.parents]:
        if folder.exists():
            break
        missing = folder
    return missing


def _remove_created(out_dir: Path, created: Path) -> None:
    """Remove ``out_dir`` up to ``created`` if it holds only the lock file (else another prepare uses it)."""
    (out_dir / ".prepare.lock").unlink(missing_ok=True)
    for folder in [out_dir, *out_dir.parents]:
        try:
            folder.rmdir()
        except OSError:
            return
        if folder == created:
            return


def _files_present(out_dir: Path, manifest: dict) -> bool:
    try:
        return all((out_dir / name).is_file() for name in _output_files(manifest))
    except (KeyError, TypeError, AttributeError):
        return False
