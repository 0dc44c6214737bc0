"""Which rows of the results table each form is fitted to.

- chinchilla: dense runs (D = D1, else tokens; N = N1); MoE-from-scratch runs
  (D = tokens, else D1; N = N1 of the dense model the MoE is built from, as the paper's
  Table 2 does "for comparison convenience"; N2 when N1 is not recorded).
- one_size: the dense runs, and the MoE-from-scratch runs, of one model size each;
  one_size_shared_E: both of one size together (MoE N = N1 when recorded).
- dense_moe_shared_E: both together, one irreducible loss E.
- d1d2: upcycled runs of one model (one N1) in the main expert configuration.
- config: upcycled runs at one (D1, D2) that vary the configuration (P, N2).
- joint: upcycled runs of the main configuration across model sizes.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from megatron_upcycle.scaling.io import ResultsTable


@dataclass(frozen=True)
class FitData:
    """Rows for one fit: raw-unit columns (tokens, parameters), loss in nats."""

    subset: str
    columns: dict[str, np.ndarray]
    loss: np.ndarray
    run_ids: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.loss)

    def distinct(self, column: str) -> int:
        return len(np.unique(self.columns[column]))


def _take(table: ResultsTable, mask: np.ndarray, subset: str, columns: dict[str, np.ndarray]) -> FitData:
    idx = np.flatnonzero(mask)
    return FitData(
        subset=subset,
        columns={k: np.asarray(v, dtype=float)[idx] for k, v in columns.items()},
        loss=table.col("val_loss")[idx],
        run_ids=tuple(table.run_id[i] for i in idx),
    )


def _tokens(table: ResultsTable) -> np.ndarray:
    """D of a from-scratch run, per row: dense rows D1 (their budget), else tokens; MoE rows
    tokens (what they carry: they have no dense budget), else D1."""
    d1, tokens = table.col("D1"), table.col("tokens")
    dense_first = np.where(np.isnan(d1), tokens, d1)
    moe_first = np.where(np.isnan(tokens), d1, tokens)
    return np.where(table.rows("moe"), moe_first, dense_first)


def _d_label(table: ResultsTable, mask: np.ndarray) -> str:
    """Which column D came from on these rows, for the subset's label."""
    d1, tokens = table.col("D1")[mask], table.col("tokens")[mask]
    moe = table.rows("moe")[mask]
    from_tokens = np.where(moe, ~np.isnan(tokens), np.isnan(d1))
    if from_tokens.all():
        return "D = tokens"
    if not from_tokens.any():
        return "D = D1 tokens"
    return "D = D1 or tokens"


def moe_n_column(table: ResultsTable) -> str:
    """N1 for the MoE-from-scratch law when every MoE run records it, else N2."""
    moe = table.rows("moe")
    return "N1" if moe.any() and not np.isnan(table.col("N1")[moe]).any() else "N2"


def dense_data(table: ResultsTable) -> FitData:
    mask = table.rows("dense")
    return _take(table, mask, f"dense runs ({_d_label(table, mask)}, N = N1)",
                 {"D": _tokens(table), "N": table.col("N1")})


def moe_data(table: ResultsTable) -> FitData:
    n = moe_n_column(table)
    mask = table.rows("moe")
    return _take(table, mask, f"MoE-from-scratch runs ({_d_label(table, mask)}, N = {n})",
                 {"D": _tokens(table), "N": table.col(n)})


def by_size(data: FitData) -> list[FitData]:
    """``data`` split by model size (distinct N), each part labelled with its N."""
    out = []
    for n in np.unique(data.columns["N"]):
        idx = np.flatnonzero(data.columns["N"] == n)
        out.append(FitData(subset=f"{data.subset}, one size N = {n:,.0f}",
                           columns={k: v[idx] for k, v in data.columns.items()}, loss=data.loss[idx],
                           run_ids=tuple(data.run_ids[i] for i in idx)))
    return out


def shared_data(table: ResultsTable) -> FitData:
    n = moe_n_column(table)
    is_moe = table.rows("moe").astype(float)
    mask = table.rows("dense") | table.rows("moe")
    n_col = np.where(is_moe == 1, table.col(n), table.col("N1"))
    return _take(table, mask, f"dense + MoE-from-scratch runs (MoE N = {n})",
                 {"D": _tokens(table), "N": n_col, "is_moe": is_moe})


def main_config(table: ResultsTable) -> tuple[float, float] | None:
    """The (E, k) most upcycled runs use: the configuration of the D1 x D2 grids."""
    up = table.rows("upcycled")
    if not up.any():
        return None
    pairs = Counter(zip(table.col("E")[up].tolist(), table.col("k")[up].tolist()))
    # Most common; ties go to the larger E for a stable, documented choice.
    return max(pairs.items(), key=lambda item: (item[1], _nan0(item[0][0]), _nan0(item[0][1])))[0]


def _nan0(x: float) -> float:
    return -1.0 if x != x else x


def _same(a: np.ndarray, b: float) -> np.ndarray:
    return (a == b) | (np.isnan(a) & (b != b))


def _upcycled_columns(table: ResultsTable) -> dict[str, np.ndarray]:
    return {"D1": table.col("D1"), "D2": table.col("D2"), "N1": table.col("N1"), "N2": table.col("N2"),
            "P": table.col("Ntotal") / table.col("N2")}


def _config_label(config: tuple[float, float]) -> str:
    e, k = config
    return f"E={e:g} k={k:g}" if e == e and k == k else "E, k not recorded"


def d1d2_data(table: ResultsTable) -> list[FitData]:
    """One subset per model size (distinct N1) in the main configuration."""
    config = main_config(table)
    if config is None:
        return []
    up = table.rows("upcycled") & _same(table.col("E"), config[0]) & _same(table.col("k"), config[1])
    out = []
    for n1 in np.unique(table.col("N1")[up]):
        mask = up & (table.col("N1") == n1)
        names = sorted({table.model[i] for i in np.flatnonzero(mask)})
        label = f"upcycled runs, model {'/'.join(n for n in names if n) or f'N1={n1:.4g}'} ({_config_label(config)})"
        out.append(_take(table, mask, label, _upcycled_columns(table)))
    return out


def joint_data(table: ResultsTable) -> FitData | None:
    config = main_config(table)
    if config is None:
        return None
    up = table.rows("upcycled") & _same(table.col("E"), config[0]) & _same(table.col("k"), config[1])
    return _take(table, up, f"upcycled runs, all model sizes ({_config_label(config)})", _upcycled_columns(table))


def config_data(table: ResultsTable) -> FitData | None:
    """The (D1, D2) cell with the most distinct configurations (P, N2)."""
    up = table.rows("upcycled")
    if not up.any():
        return None
    cols = _upcycled_columns(table)
    best, best_count = None, 0
    cells = sorted(set(zip(table.col("D1")[up].tolist(), table.col("D2")[up].tolist())))
    for d1, d2 in cells:
        mask = up & (table.col("D1") == d1) & (table.col("D2") == d2)
        count = len(set(zip(cols["P"][mask].tolist(), cols["N2"][mask].tolist())))
        if count > best_count:
            best, best_count = (d1, d2), count
    d1, d2 = best
    mask = up & (table.col("D1") == d1) & (table.col("D2") == d2)
    return _take(table, mask, f"upcycled runs at D1={d1:.4g}, D2={d2:.4g} tokens (varying P, N2)", cols)


def n2_over_n1(table: ResultsTable, default: float = 1.75) -> tuple[float, str]:
    """Active-to-dense parameter ratio of the main configuration (1.75 for 8 experts top-2)."""
    config = main_config(table)
    if config is not None:
        up = table.rows("upcycled") & _same(table.col("E"), config[0]) & _same(table.col("k"), config[1])
        ratio = table.col("N2")[up] / table.col("N1")[up]
        ratio = ratio[np.isfinite(ratio)]
        if ratio.size:
            return float(np.median(ratio)), f"median N2/N1 of the upcycled runs ({_config_label(config)})"
    return default, f"default {default} (8 experts, top-2: N2/N1 = (4 + 12*2)/16); no upcycled runs to read it from"
