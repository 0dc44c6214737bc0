"""Megatron indexed datasets (.bin/.idx) through megatron.core.datasets.indexed_dataset.

One document per sequence, each ending with the end-of-document token, as
Megatron-LM's preprocess_data.py writes them with --append-eod.
"""
from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from megatron_upcycle.errors import ConfigError


@dataclass(frozen=True)
class IndexedCounts:
    documents: int
    tokens: int
    dtype: str


def token_dtype(vocab: int):
    """The smallest dtype for token ids below ``vocab`` (Megatron's own choice: uint16 or int32)."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab)


class IndexedWriter:
    """Writes ``prefix``.bin/.idx one document (token ids, end-of-document included) at a time.

    Both files are written under temporary names and renamed by ``commit``, .idx
    last; leaving the ``with`` block without committing (an error, Ctrl-C)
    deletes them, so no reader ever sees a pair from an unfinished write.
    """

    def __init__(self, prefix: str | os.PathLike, vocab: int) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = Path(prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.prefix.parent / f".{self.prefix.name}.tmp-{os.getpid()}"
        self.dtype = token_dtype(vocab)
        self._builder = IndexedDatasetBuilder(f"{self._tmp}.bin", dtype=self.dtype)
        self.documents = 0
        self.tokens = 0
        self._committed = False

    def add_document(self, ids) -> None:
        import numpy
        import torch

        array = numpy.asarray(ids, dtype=self.dtype)
        if array.size == 0:
            return
        self._builder.add_document(torch.from_numpy(array), [array.size])
        self.documents += 1
        self.tokens += int(array.size)

    def commit(self) -> IndexedCounts:
        import numpy

        self._builder.finalize(f"{self._tmp}.idx")
        os.replace(f"{self._tmp}.bin", f"{self.prefix}.bin")
        os.replace(f"{self._tmp}.idx", f"{self.prefix}.idx")
        self._committed = True
        return IndexedCounts(documents=self.documents, tokens=self.tokens, dtype=numpy.dtype(self.dtype).name)

    def __enter__(self) -> "IndexedWriter":
        return self

    def __exit__(self, *exc) -> None:
        if not self._committed:
            self._builder.data_file.close()
            for suffix in (".bin", ".idx"):
                Path(f"{self._tmp}{suffix}").unlink(missing_ok=True)


def write_indexed(prefix: str | os.PathLike, documents: Iterable[Iterable[int]], vocab: int) -> IndexedCounts:
    """Write a whole indexed dataset from token-id documents (see IndexedWriter)."""
    with IndexedWriter(prefix, vocab) as writer:
        for ids in documents:
            writer.add_document(ids)
        return writer.commit()


def check_prefix(prefix: str | os.PathLike, what: str = "data prefix") -> str:
    """``prefix`` as a string if its .bin and .idx exist; otherwise one clear ConfigError."""
    prefix = str(prefix)
    missing = [s for s in (".bin", ".idx") if not os.path.isfile(prefix + s)]
    if not missing:
        return prefix
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix) and os.path.isfile(prefix):
            raise ConfigError(f"{what} '{prefix}': give the prefix without '{suffix}' ('{prefix[:-len(suffix)]}')")
    raise ConfigError(f"{what} '{prefix}' has no {' or '.join(prefix + s for s in missing)}")


def read_counts(prefix: str | os.PathLike) -> IndexedCounts:
    """Documents and tokens in an existing indexed dataset.

    Reads only the .idx, then checks that the .bin holds exactly the bytes the
    index points into: a truncated .bin otherwise passes here and fails deep in
    training ("offset must be non-negative and no greater than buffer length").
    Every run that names prefixes opens them through this (resolve_data).
    """
    prefix = check_prefix(prefix)
    from megatron.core.datasets.indexed_dataset import _IndexReader

    for suffix in (".idx", ".bin"):
        open(prefix + suffix, "rb").close()  # unreadable: a PermissionError naming the file (exit 2)
    try:
        # The index reader alone, not IndexedDataset: that also maps the .bin, which is what is checked
        # below, and it prints an "Exception ignored" traceback when its constructor fails.
        index = _IndexReader(prefix + ".idx", multimodal=False)
    except (AssertionError, ValueError, OSError, struct.error) as exc:
        raise ConfigError(f"'{prefix}.idx' is not a Megatron index file ({exc or type(exc).__name__})") from None
    lengths = index.sequence_lengths
    expected = 0
    if len(lengths):
        expected = int(index.sequence_pointers[-1]) + int(lengths[-1]) * index.dtype_size
    actual = os.path.getsize(prefix + ".bin")
    if actual != expected:
        state = "truncated" if actual < expected else "longer than its index says"
        raise ConfigError(
            f"'{prefix}.bin' is {state}: {actual:,} bytes, its .idx describes {expected:,}; "
            "prepare the data again (upcycle data prepare)"
        )
    return IndexedCounts(
        documents=int(len(index.document_indices) - 1),
        tokens=int(lengths.sum(dtype="int64")),
        dtype=index.dtype.__name__,
    )
