"""results.csv: one row per finished run that emulates a budget (branches and
full runs; stable runs are intermediate and left out). Columns are the contract
with megatron_upcycle.scaling."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from megatron_upcycle.atomic import write_text_atomic
from megatron_upcycle.run_kinds import FIT_KIND
from megatron_upcycle.rundir import RESULT_FILE

COLUMNS = ["run_id", "kind", "model", "E", "k", "N1", "N2", "Ntotal", "D1", "D2", "tokens", "FLOPs", "val_loss"]


def collect_rows(root: str | Path) -> list[dict]:
    rows = []
    for path in sorted(Path(root, "runs").glob(f"*/{RESULT_FILE}")):
        result = json.loads(path.read_text())
        if result.get("phase") != "complete":
            continue
        row = {c: result.get(c) for c in COLUMNS}
        row["kind"] = FIT_KIND[result["model_kind"]]
        if row["kind"] in ("dense", "moe"):
            row["D1"], row["D2"] = result["tokens"], None
        rows.append(row)
    return rows


def write_results_csv(root: str | Path, out: str | Path | None = None) -> tuple[Path, int]:
    rows = collect_rows(root)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    out = Path(out) if out else Path(root) / "results.csv"
    write_text_atomic(out, buffer.getvalue())
    return out, len(rows)
