"""results.csv in (validated, one clear line per mistake) and fit records out as JSON.

The results table is the contract with the sweep and with other tools (written
out in docs/results-table.md, with docs/examples/results_example.csv): columns
run_id, kind, model, E, k, N1, N2, Ntotal, D1, D2, tokens, FLOPs, val_loss;
empty cells mean "not applicable"; every D is tokens, every N parameters,
val_loss in nats. Tables from elsewhere are read as they are written: E and k
may be 0 on dense rows, kind ``upcycle`` (the engine's word) means ``upcycled``,
``columns`` renames a user's headers and ``tokens_unit`` converts D columns
given in thousands, millions or billions of tokens. Each such reading is said
in ``ResultsTable.notes``, one line each.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megatron_upcycle.errors import UserError
from megatron_upcycle.run_kinds import FIT_KIND

COLUMNS = ("run_id", "kind", "model", "E", "k", "N1", "N2", "Ntotal", "D1", "D2", "tokens", "FLOPs", "val_loss")
NUMERIC = ("E", "k", "N1", "N2", "Ntotal", "D1", "D2", "tokens", "FLOPs", "val_loss")
KINDS = ("dense", "moe", "upcycled", "cpt")

# Cells each kind of run must fill ("D1|tokens": either one).
REQUIRED = {
    "dense": ("D1|tokens", "N1", "val_loss"),
    "moe": ("D1|tokens", "N1|N2", "val_loss"),
    "upcycled": ("D1", "D2", "N1", "N2", "Ntotal", "val_loss"),
    "cpt": ("D1", "D2", "N1", "val_loss"),
}
# Columns that only apply to MoE rows: on dense-model rows "0" means "not applicable" too.
MOE_ONLY = ("E", "k")
DENSE_MODEL_KINDS = ("dense", "cpt")
# Token columns and the multipliers ``tokens_unit`` accepts (the paper's tables give billions).
TOKEN_COLUMNS = ("D1", "D2", "tokens")
TOKEN_UNITS = {"tokens": 1.0, "thousands": 1e3, "millions": 1e6, "billions": 1e9}
UNIT = {"E": "experts", "k": "experts per token", "N1": "parameters", "N2": "parameters",
        "Ntotal": "parameters", "D1": "tokens", "D2": "tokens", "tokens": "tokens", "FLOPs": "FLOPs",
        "val_loss": "nats"}


@dataclass(frozen=True)
class ResultsTable:
    """The validated table: one numpy array per numeric column (nan = empty cell)."""

    path: str
    run_id: tuple[str, ...]
    kind: tuple[str, ...]
    model: tuple[str, ...]
    values: dict[str, np.ndarray]
    notes: tuple[str, ...] = ()  # how the table was read: renamed columns, unit conversion, kind spellings

    def __len__(self) -> int:
        return len(self.run_id)

    def col(self, name: str) -> np.ndarray:
        return self.values[name]

    def rows(self, kind: str) -> np.ndarray:
        return np.array([k == kind for k in self.kind], dtype=bool)


def parse_column_map(text: str | None) -> dict[str, str]:
    """``"loss=val_loss,n_params=N1"`` -> {"loss": "val_loss", "n_params": "N1"}; a bad item is a UserError."""
    if not text:
        return {}
    mapping: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        old, sep, new = (part.strip() for part in item.partition("="))
        if not sep or not old or not new:
            raise UserError(f"--columns: '{item}' is not OLD=NEW (e.g. --columns loss=val_loss,params=N1)")
        if new not in COLUMNS:
            raise UserError(f"--columns: '{new}' (for '{old}') is not a results-table column; "
                            f"they are {', '.join(COLUMNS)}")
        if old in mapping:
            raise UserError(f"--columns: '{old}' is mapped twice")
        if new in mapping.values():
            raise UserError(f"--columns: two columns are mapped to '{new}'")
        mapping[old] = new
    return mapping


def tokens_multiplier(unit: str) -> float:
    """Tokens per unit of the D columns (``tokens_unit``); an unknown unit is a UserError."""
    if unit not in TOKEN_UNITS:
        raise UserError(f"--tokens-unit must be one of {', '.join(TOKEN_UNITS)}, got '{unit}'")
    return TOKEN_UNITS[unit]


def _rename_header(header: list[str], mapping: dict[str, str], path: Path) -> list[str]:
    absent = [old for old in mapping if old not in header]
    if absent:
        raise UserError(f"--columns: {path.name} has no column {', '.join(repr(a) for a in absent)} "
                        f"(its header: {', '.join(header)})")
    clash = [new for old, new in mapping.items() if new in header and new not in mapping]
    if clash:
        raise UserError(f"--columns: {path.name} already has a column {clash[0]!r}; map that one too or "
                        f"choose another target")
    return [mapping.get(h, h) for h in header]


def read_results(path: str | os.PathLike, columns: dict[str, str] | None = None,
                 tokens_unit: str = "tokens") -> ResultsTable:
    """Read and validate results.csv; any problem is a one-line UserError naming row and column.

    ``columns`` maps the table's own header names to the contract's (old -> new);
    ``tokens_unit`` ("thousands", "millions", "billions") says what one unit of the
    D1, D2 and tokens columns is: they are converted to tokens on read.
    """
    path = Path(path)
    mapping = dict(columns or {})
    scale = tokens_multiplier(tokens_unit)
    if not path.is_file():
        raise UserError(f"results table not found: {path}")
    text = _read_text(path, "results table")
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = [h.strip() for h in (reader.fieldnames or [])]
        if mapping:
            header = _rename_header(header, mapping, path)
            reader.fieldnames = header
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            hint = "" if mapping else "; map other names with --columns OLD=NEW,..."
            raise UserError(f"{path}: missing column(s) {', '.join(missing)}; "
                            f"a results table needs {', '.join(COLUMNS)}{hint}")
        raw_rows = []
        for row in reader:
            # DictReader puts the cells past the header under the key None (a list):
            # a ragged row is a mistake in the table, not something to strip.
            if None in row:
                raise UserError(f"{path.name} line {reader.line_num}: {len(header) + len(row[None])} cells, "
                                f"the header has {len(header)}; remove the extra cells (or quote cells with commas)")
            raw_rows.append({(k or "").strip(): (v or "").strip() for k, v in row.items()})
    except csv.Error as exc:
        raise UserError(f"{path} line {reader.line_num}: not a valid CSV table ({exc})") from None
    if not raw_rows:
        raise UserError(f"{path}: no runs (only a header)")

    run_ids, kinds, models = [], [], []
    values = {c: np.full(len(raw_rows), np.nan) for c in NUMERIC}
    seen: dict[str, int] = {}
    respelled: list[int] = []  # lines whose kind was the engine's spelling
    for i, row in enumerate(raw_rows):
        line = i + 2  # header is line 1
        run_id = row["run_id"] or f"row{line}"
        where = f"{path.name} line {line} (run {run_id})"
        if run_id in seen:
            raise UserError(f"{where}: run_id appears twice (first on line {seen[run_id]})")
        seen[run_id] = line
        kind = row["kind"]
        if kind not in KINDS and FIT_KIND.get(kind) in KINDS:
            kind = FIT_KIND[kind]  # "upcycle": the run kind's name; the table's is "upcycled"
            respelled.append(line)
        if kind not in KINDS:
            spellings = sorted(set(KINDS) | {k for k, v in FIT_KIND.items() if v != k})
            raise UserError(f"{where}: kind '{kind}' is not one of {', '.join(KINDS)} "
                            f"(accepted spellings: {', '.join(spellings)})")
        for col in NUMERIC:
            text = row[col]
            if text == "":
                continue
            try:
                value = float(text)
            except ValueError:
                raise UserError(f"{where}: {col} = '{text}' is not a number ({UNIT[col]})") from None
            if col in MOE_ONLY and kind in DENSE_MODEL_KINDS and value == 0:
                continue  # a dense model has no experts: 0 is "not applicable", as an empty cell
            if col in TOKEN_COLUMNS:
                value *= scale
            if not math.isfinite(value) or value <= 0:
                raise UserError(f"{where}: {col} = {text} must be a positive finite number ({UNIT[col]})")
            values[col][i] = value
        for need in REQUIRED[kind]:
            options = need.split("|")
            if all(math.isnan(values[c][i]) for c in options):
                what = " or ".join(options)
                raise UserError(f"{where}: {what} is empty; {kind} runs need "
                                f"{', '.join(n.replace('|', ' or ') for n in REQUIRED[kind])}")
        run_ids.append(run_id)
        kinds.append(kind)
        models.append(row["model"])
    notes = []
    if mapping:
        notes.append("columns renamed on read: " + ", ".join(f"{o} -> {n}" for o, n in mapping.items()))
    if scale != 1.0:
        notes.append(f"D1, D2 and tokens read in {tokens_unit} of tokens and converted to tokens (x {scale:g})")
    if respelled:
        notes.append(f"kind 'upcycle' read as 'upcycled' on {len(respelled)} row(s) ({_lines(respelled)})")
    return ResultsTable(path=str(path), run_id=tuple(run_ids), kind=tuple(kinds), model=tuple(models), values=values,
                        notes=tuple(notes))


def _lines(lines: list[int]) -> str:
    """[2, 3, 4, 7] -> "lines 2-4, 7"."""
    spans: list[list[int]] = []
    for n in lines:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    text = ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)
    return ("lines " if len(lines) > 1 else "line ") + text


def _read_text(path: Path, what: str) -> str:
    """The UTF-8 text of ``path``; a binary or mis-encoded file is a one-line UserError."""
    raw = path.read_bytes()
    if b"\0" in raw:
        raise UserError(f"{path}: not a text file (it holds NUL bytes); give the {what} `upcycle` wrote")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                        f"give the {what} `upcycle` wrote") from None


# ---- JSON ---------------------------------------------------------------------

def to_jsonable(obj: Any) -> Any:
    """Dataclasses, numpy scalars/arrays, tuples -> JSON types; nan/inf -> null."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [to_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def from_jsonable(cls, data: Any):
    """Rebuild a record dataclass (recursively) from ``to_jsonable`` output."""
    import typing

    if data is None:
        return None
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                kwargs[f.name] = _convert(hints[f.name], data[f.name])
        return cls(**kwargs)
    return data


def _convert(tp, value):
    import types
    import typing

    if value is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(args[0], value) if len(args) == 1 else value
    if dataclasses.is_dataclass(tp):
        return from_jsonable(tp, value)
    if origin is list:
        (inner,) = typing.get_args(tp)
        return [_convert(inner, v) for v in value]
    if origin is dict:
        _, inner = typing.get_args(tp)
        return {k: _convert(inner, v) for k, v in value.items()}
    if tp is float:
        return float(value)
    return value


FITS_SCHEMA = "megatron-upcycle/scaling-fits/v1"


def write_fits_json(path: str | os.PathLike, result) -> None:
    """fits.json: the AnalysisResult, with a schema tag and the units stated up front."""
    from megatron_upcycle.atomic import write_json_atomic

    payload = {"schema": FITS_SCHEMA, "units_text": result.units.describe()}
    payload.update(to_jsonable(result))
    write_json_atomic(path, payload)


def read_fits_json(path: str | os.PathLike):
    """Read fits.json back into an AnalysisResult (for ``upcycle advise --fits``)."""
    from megatron_upcycle.scaling.records import AnalysisResult

    path = Path(path)
    if path.is_dir():
        path = path / "fits.json"
    if not path.is_file():
        raise UserError(f"fits file not found: {path} (run `upcycle fit RESULTS.csv --out DIR` first)")
    try:
        data = json.loads(_read_text(path, "fits.json"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, dict) or data.get("schema") != FITS_SCHEMA:
        schema = data.get("schema") if isinstance(data, dict) else None
        raise UserError(f"{path}: not a fits.json written by `upcycle fit` (schema {schema!r})")
    data.pop("units_text", None)
    try:
        return from_jsonable(AnalysisResult, data)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        # Right schema tag, wrong contents (hand-edited or truncated by a tool): say so
        # rather than show a constructor's traceback.
        detail = " ".join(str(exc).split())[:200]
        raise UserError(f"{path}: a fits.json whose records are malformed ({detail}); "
                        "write it again with `upcycle fit`") from None
