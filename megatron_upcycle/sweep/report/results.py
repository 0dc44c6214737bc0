"""The results table: every finished budget."""
from __future__ import annotations

from megatron_upcycle.sweep.report.context import ReportContext

KIND_ORDER = {"dense": 0, "upcycled": 1, "moe": 2, "cpt": 3}


def _num(row: dict, key: str) -> float:
    return float(row[key]) if row.get(key) not in (None, "") else 0.0


def results_table(rows: list[dict], repeats: dict[str, str] | None = None) -> str:
    """Markdown table; ``repeats`` maps a noise-probe run id to the run it repeats."""
    repeats = repeats or {}
    rows = sorted(rows, key=lambda r: (_num(r, "N1"), KIND_ORDER.get(r["kind"], 9), _num(r, "D1"), _num(r, "D2"),
                                       r["run_id"]))
    lines = ["| model | kind | D1 (tokens) | D2 (tokens) | N active (parameters) | FLOPs (6ND) | val loss (nats) | "
             "note |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        d2 = f"{int(_num(r, 'D2')):,}" if r.get("D2") else "-"
        n_active = int(_num(r, "N2") or _num(r, "N1"))
        note = f"seed repeat of `{repeats[r['run_id']]}`" if r["run_id"] in repeats else ""
        lines.append(f"| {r.get('model', '')} | {r['kind']} | {int(_num(r, 'D1')):,} | {d2} | {n_active:,} | "
                     f"{_num(r, 'FLOPs'):.3g} | {_num(r, 'val_loss'):.4f} | {note} |")
    return "\n".join(lines)


def results_section(ctx: ReportContext) -> list[str]:
    if not ctx.rows:
        return ["## Results", "No run has finished yet."]
    repeats = {r.run_id: r.repeat_of for r in ctx.plan.runs if r.repeat_of}
    return ["## Results", results_table(ctx.rows, repeats)]
