"""Benchmark measurements -> summaries, MoE/dense ratios, results.json and results.csv.

Every measurement is one row (workload, model, batch size or request rate, repeat);
summaries are the median over repeats with the min and max as the spread; a ratio
is MoE / dense of those medians (throughput ratios: < 1 means the MoE serves
slower), with the range [MoE min / dense max, MoE max / dense min].
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from statistics import median

from megatron_upcycle.atomic import write_json_atomic, write_text_atomic
from megatron_upcycle.errors import UserError

RESULTS_FILE = "results.json"
CSV_FILE = "results.csv"
FORMAT = "megatron-upcycle bench-inference 1"
CSV_COLUMNS = ["workload", "model", "role", "batch_size", "request_rate", "repeat", "tokens_per_s",
               "latency_p50_s", "latency_p90_s", "tokens", "wall_s", "cpu_s"]


def spread(values: list[float]) -> dict:
    return {"median": median(values), "min": min(values), "max": max(values), "n": len(values)}


def _ratio(moe: dict, dense: dict) -> dict:
    return {"ratio": moe["median"] / dense["median"], "low": moe["min"] / dense["max"],
            "high": moe["max"] / dense["min"]}


def summarize_model(rows: list[dict], label: str) -> dict:
    mine = [r for r in rows if r["model"] == label]
    out: dict = {}
    offline = [r for r in mine if r["workload"] == "offline"]
    if offline:
        per_batch = {b: spread([r["tokens_per_s"] for r in offline if r["batch_size"] == b])
                     for b in sorted({r["batch_size"] for r in offline})}
        best = max(per_batch, key=lambda b: per_batch[b]["median"])
        per_cpu = [r["tokens"] / max(r["cpu_s"], 1e-9) for r in offline if r["batch_size"] == best]
        out["offline"] = {"per_batch": per_batch, "max_throughput": per_batch[best] | {"batch_size": best},
                          "max_throughput_per_cpu_second": spread(per_cpu)}
    decode = [r for r in mine if r["workload"] == "decode"]
    if decode:
        out["decode"] = {"tokens_per_s": spread([r["tokens_per_s"] for r in decode]),
                         "tokens_per_cpu_second": spread([r["tokens"] / max(r["cpu_s"], 1e-9) for r in decode])}
    online = [r for r in mine if r["workload"] == "online"]
    if online:
        per_rate = {}
        for rate in sorted({r["request_rate"] for r in online}):
            at = [r for r in online if r["request_rate"] == rate]
            per_rate[rate] = {"throughput_tokens_per_s": spread([r["tokens_per_s"] for r in at]),
                              "latency_p50_s": spread([r["latency_p50_s"] for r in at]),
                              "latency_p90_s": spread([r["latency_p90_s"] for r in at])}
        best = max(per_rate, key=lambda q: per_rate[q]["throughput_tokens_per_s"]["median"])
        out["online"] = {"per_rate": per_rate,
                         "max_throughput": per_rate[best]["throughput_tokens_per_s"] | {"request_rate": best}}
    return out


def ratios(summary: dict[str, dict], dense_label: str) -> dict[str, dict]:
    """MoE / dense per workload for every MoE model."""
    dense = summary[dense_label]
    out = {}
    for label, s in summary.items():
        if label == dense_label:
            continue
        r: dict = {}
        if "offline" in s and "offline" in dense:
            r["offline_max_throughput"] = _ratio(s["offline"]["max_throughput"], dense["offline"]["max_throughput"])
            r["offline_max_throughput_per_cpu_second"] = _ratio(
                s["offline"]["max_throughput_per_cpu_second"], dense["offline"]["max_throughput_per_cpu_second"])
        if "decode" in s and "decode" in dense:
            r["decode_batch1"] = _ratio(s["decode"]["tokens_per_s"], dense["decode"]["tokens_per_s"])
            r["decode_batch1_per_cpu_second"] = _ratio(s["decode"]["tokens_per_cpu_second"],
                                                       dense["decode"]["tokens_per_cpu_second"])
        if "online" in s and "online" in dense:
            r["online_max_throughput"] = _ratio(s["online"]["max_throughput"], dense["online"]["max_throughput"])
            r["online_latency_p50_by_rate"] = {
                rate: _ratio(v["latency_p50_s"], dense["online"]["per_rate"][rate]["latency_p50_s"])["ratio"]
                for rate, v in s["online"]["per_rate"].items() if rate in dense["online"]["per_rate"]}
        out[label] = r
    return out


def build_results(meta: dict, models: list[dict], rows: list[dict]) -> dict:
    dense = next(m["label"] for m in models if m["role"] == "dense")
    summary = {m["label"]: summarize_model(rows, m["label"]) for m in models}
    return {"format": FORMAT, **meta, "models": models, "measurements": rows, "summary": summary,
            "ratios": ratios(summary, dense)}


def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})
    return buffer.getvalue()


def write_results(results: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / CSV_FILE
    write_text_atomic(csv_path, to_csv(results["measurements"]))
    json_path = out_dir / RESULTS_FILE
    write_json_atomic(json_path, results)  # last: its presence means the benchmark finished
    return json_path, csv_path


def read_results(path: str | Path) -> dict:
    """A results.json (or the directory holding one), checked to be a bench-inference result."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable bench-inference results file ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path}: not a bench-inference results file (no format '{FORMAT}')")
    # JSON object keys are strings; request rates and batch sizes are numbers again.
    for s in data["summary"].values():
        if "offline" in s:
            s["offline"]["per_batch"] = {int(k): v for k, v in s["offline"]["per_batch"].items()}
        if "online" in s:
            s["online"]["per_rate"] = {float(k): v for k, v in s["online"]["per_rate"].items()}
    for r in data["ratios"].values():
        if "online_latency_p50_by_rate" in r:
            r["online_latency_p50_by_rate"] = {float(k): v for k, v in r["online_latency_p50_by_rate"].items()}
    return data


def format_ratios(results: dict) -> list[str]:
    """One line per MoE model and workload: the ratio and its range."""
    names = {"offline_max_throughput": "offline max throughput", "decode_batch1": "batch-1 decode",
             "online_max_throughput": "online max throughput",
             "offline_max_throughput_per_cpu_second": "offline tokens per CPU-second",
             "decode_batch1_per_cpu_second": "decode tokens per CPU-second"}
    lines = []
    for label, r in results["ratios"].items():
        for key, name in names.items():
            if key in r:
                v = r[key]
                lines.append(f"{label} / dense, {name}: {v['ratio']:.3f} (range {v['low']:.3f}-{v['high']:.3f})")
    return lines
