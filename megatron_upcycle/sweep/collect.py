"""results.csv: one row per finished run that emulates a budget (branches and
full runs; stable runs are intermediate and left out). Columns are the contract
with megatron_upcycle.scaling; downstream results (an eval run's eval.json) join
a row as more columns, ``eval_<task>_<metric>`` and ``eval_core_average``."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from megatron_upcycle.atomic import write_text_atomic
from megatron_upcycle.run_kinds import FIT_KIND
from megatron_upcycle.sweep.jsonfile import read_json
from megatron_upcycle.rundir import RESULT_FILE, RunDir

COLUMNS = ["run_id", "kind", "model", "E", "k", "N1", "N2", "Ntotal", "D1", "D2", "tokens", "FLOPs", "val_loss"]


def eval_columns(root: str | Path) -> dict[str, dict[str, float]]:
    """{evaluated run id: its eval columns} from every finished eval run under ``root``."""
    from megatron_upcycle.evaluation.aggregate import result_columns

    columns = {}
    for path in sorted(Path(root, "runs").glob(f"*/{RESULT_FILE}")):
        result = json.loads(path.read_text())
        summary = read_json(RunDir(path.parent).eval_result) if result.get("phase") == "eval" else None
        if summary is not None:
            columns[result["target"]] = result_columns(summary)
    return columns


def collect_rows(root: str | Path) -> list[dict]:
    rows = []
    evals = eval_columns(root)
    for path in sorted(Path(root, "runs").glob(f"*/{RESULT_FILE}")):
        result = json.loads(path.read_text())
        if result.get("phase") != "complete":
            continue
        row = {c: result.get(c) for c in COLUMNS}
        row["kind"] = FIT_KIND[result["model_kind"]]
        if row["kind"] in ("dense", "moe"):
            row["D1"], row["D2"] = result["tokens"], None
        row.update(evals.get(result.get("run_id") or path.parent.name, {}))
        rows.append(row)
    return rows


def write_results_csv(root: str | Path, out: str | Path | None = None) -> tuple[Path, int]:
    rows = collect_rows(root)
    buffer = io.StringIO()
    extra = sorted({c for row in rows for c in row if c not in COLUMNS})
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS + extra)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in COLUMNS + extra})
    out = Path(out) if out else Path(root) / "results.csv"
    write_text_atomic(out, buffer.getvalue())
    return out, len(rows)
