"""The harness's results -> flat rows (task, metric, value, stderr, n) and the core average.

Core average (Gauntlet-style, as in Doubov et al.): the mean over tasks of
(accuracy - chance) / (1 - chance), so 0 is random guessing and 1 is perfect
whatever the number of choices. Tasks whose chance level is not known here are
reported but left out of the average (eval.json names them).
"""
from __future__ import annotations

import math

from megatron_upcycle.evaluation.task_files import SHIPPED_TASKS

CORE_AVERAGE = "core_average"
# task -> (metric, random-chance baseline); the standard tasks of Liew et al.'s Table 7 and friends.
CHANCE: dict[str, tuple[str, float]] = {
    **{name: (task.metrics[0], task.chance) for name, task in SHIPPED_TASKS.items()},
    "arc_easy": ("acc", 0.25), "arc_challenge": ("acc", 0.25), "piqa": ("acc", 0.5), "sciq": ("acc", 0.25),
    "winogrande": ("acc", 0.5), "lambada_openai": ("acc", 0.0), "lambada_standard": ("acc", 0.0),
    "logiqa": ("acc", 0.25), "hellaswag": ("acc_norm", 0.25), "openbookqa": ("acc_norm", 0.25),
    "boolq": ("acc", 0.5), "copa": ("acc", 0.5), "mmlu": ("acc", 0.25),
}


def _number(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def flat_rows(results: dict) -> list[dict]:
    """One row per (task, metric) of ``simple_evaluate``'s answer ('acc,none' -> metric 'acc')."""
    rows = []
    samples = results.get("n-samples", {})
    for task, metrics in results.get("results", {}).items():
        n = (samples.get(task) or {}).get("effective")
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if metric in ("alias", "sample_len") or metric.endswith("_stderr") or _number(value) is None:
                continue
            name = metric if filter_name in ("", "none") else f"{metric}_{filter_name}"
            stderr = _number(metrics.get(f"{metric}_stderr,{filter_name}" if filter_name else f"{metric}_stderr"))
            rows.append({"task": task, "metric": name, "value": float(value), "stderr": stderr, "n": n})
    return rows


def core_average(rows: list[dict]) -> tuple[float | None, float | None, list[str], list[str]]:
    """(core average, its standard error, tasks in it, tasks left out for want of a chance level).

    The standard error treats tasks as independent: sqrt(sum (se_t / (1 - chance_t))^2) / T.
    """
    by_key = {(r["task"], r["metric"]): r["value"] for r in rows}
    normalised, used, left_out = [], [], []
    errors = {(r["task"], r["metric"]): r["stderr"] for r in rows}
    scaled: list[float | None] = []
    for task in dict.fromkeys(r["task"] for r in rows):
        metric, chance = CHANCE.get(task, (None, None))
        if metric is None or (task, metric) not in by_key:
            left_out.append(task)
            continue
        normalised.append((by_key[(task, metric)] - chance) / (1 - chance))
        used.append(task)
        stderr = errors.get((task, metric))
        scaled.append(None if stderr is None else stderr / (1 - chance))
    if not normalised:
        return None, None, used, left_out
    stderr = None if None in scaled else math.sqrt(sum(e * e for e in scaled)) / len(scaled)
    return sum(normalised) / len(normalised), stderr, used, left_out


def eval_summary(results: dict) -> dict:
    """eval.json's body: the flat rows, the core-average row last."""
    rows = flat_rows(results)
    average, stderr, used, left_out = core_average(rows)
    if average is not None:
        rows.append({"task": CORE_AVERAGE, "metric": "acc_above_chance", "value": average, "stderr": stderr,
                     "n": len(used)})
    return {"rows": rows, "core_average": average, "core_tasks": used, "core_left_out": left_out,
            "chance": {t: CHANCE[t][1] for t in used}}


def result_columns(summary: dict) -> dict[str, float]:
    """results.csv columns of one eval.json: eval_<task>_<metric> and eval_core_average."""
    columns = {}
    for row in summary.get("rows", []):
        name = "eval_core_average" if row["task"] == CORE_AVERAGE else f"eval_{row['task']}_{row['metric']}"
        columns[name] = row["value"]
        if row["task"] == CORE_AVERAGE and row.get("stderr") is not None:
            columns["eval_core_average_stderr"] = row["stderr"]
    return columns
