"""The study report's "Inference cost" section, and the measurement a study (the demo) runs for it.

- ``measure_study_inference(plan)`` benchmarks the study's final dense model against
  its final upcycled model(s) (largest D1, then largest D2, per (E, k)) with the cpu
  preset and writes ``<study root>/inference/results.json`` (``study_inference_dir``).
  Dense CPT has the dense architecture, so it serves at the dense model's speed.
- ``inference_section(plan, rows, out_dir)`` returns Markdown chunks: the measured
  MoE / dense ratios when that file exists, the analytic prediction for the paper's
  sizes on an H100, and validation loss against serving throughput (dense, CPT,
  upcycled, MoE from scratch) as a PNG in ``out_dir``.
"""
from __future__ import annotations

from pathlib import Path

from megatron_upcycle.config.model import MoEConfig
from megatron_upcycle.inference.cost import H100_SXM, ModelShape, decode_step, forward_flops_per_token, max_batch
from megatron_upcycle.plotting import figure, save_png

STUDY_INFERENCE_DIR = "inference"
PAPER_SIZES = ("15M", "44M", "0.1B", "0.2B", "0.5B", "1B")
PAPER_CONTEXT = 3500 + 300  # Doubov et al.'s request: 3500 input + 300 output tokens
PREDICTION_BATCH = 32
QUALITY_PNG = "inference_quality_vs_throughput.png"
LATENCY_PNG = "inference_latency_vs_throughput.png"
BARS_PNG = "inference_max_throughput.png"
# The study models are tiny and the machine may be shared: one thread, no contention between
# threads, and the process CPU time recorded beside the wall time.
STUDY_THREADS = 1


def study_inference_dir(plan) -> Path:
    return Path(plan.root) / STUDY_INFERENCE_DIR


def _final(runs, key):
    return max(runs, key=key) if runs else None


def final_models(plan) -> dict:
    """{'dense': run, 'upcycled': [run per (E, k)]}: the study's final (decayed) models of its
    largest dense size (the last of ``dense_models`` with branches), first seed only: the
    dense and MoE compared are one model before and after upcycling."""
    branches = [r for r in plan.runs if r.stage == "branch" and r.repeat_of is None]
    sizes = [m for m in plan.experiment.dense_models if any(r.model == m for r in branches)]
    if sizes:
        branches = [r for r in branches if r.model == sizes[-1]]
    dense = _final([r for r in branches if r.model_kind == "dense"], lambda r: r.budget_tokens or 0)
    upcycled = []
    for ek in sorted({(r.E, r.k) for r in branches if r.model_kind == "upcycle"}):
        runs = [r for r in branches if r.model_kind == "upcycle" and (r.E, r.k) == ek]
        upcycled.append(_final(runs, lambda r: (r.D1 or 0, r.D2 or 0)))
    return {"dense": dense, "upcycled": upcycled}


def _checkpoint(plan, run) -> Path:
    from megatron_upcycle.errors import UserError

    path = plan.run_dir(run).checkpoint(run.resolved.stop_iter)
    if not path.is_dir():
        raise UserError(f"run {run.run_id} has no final checkpoint {path}: finish the study first")
    return path


def measure_study_inference(plan, out_dir: Path | None = None, preset=None, force: bool = False,
                            emit=print) -> dict:
    """Benchmark the study's final dense and upcycled models (cpu preset); returns the results.

    Writes ``out_dir`` (default ``<study root>/inference``); a finished result there is
    reused unless ``force`` (a re-run study continues where it stopped).
    """
    from megatron_upcycle.errors import UserError
    from megatron_upcycle.inference.bench import run_benchmark
    from megatron_upcycle.inference.results import RESULTS_FILE, read_results
    from megatron_upcycle.inference.workloads import preset_with

    out_dir = Path(out_dir) if out_dir is not None else study_inference_dir(plan)
    if (out_dir / RESULTS_FILE).exists() and not force:
        return read_results(out_dir / RESULTS_FILE)
    finals = final_models(plan)
    if finals["dense"] is None or not finals["upcycled"]:
        raise UserError(f"study {plan.experiment.name} has no dense and upcycled branch runs to benchmark")
    dense = _checkpoint(plan, finals["dense"])
    moes = [_checkpoint(plan, r) for r in finals["upcycled"]]
    return run_benchmark(str(dense), [str(m) for m in moes], out_dir, preset or preset_with("cpu"),
                         engine_choice="transformers", threads=STUDY_THREADS, emit=emit)


# ---- the section ---------------------------------------------------------------------


def _measured_table(results: dict) -> list[str]:
    lines = ["| model | role | offline max throughput (tokens/s) | online max throughput (tokens/s) "
             "| batch-1 decode (tokens/s) |", "|---|---|---:|---:|---:|"]

    def cell(s):
        return "-" if s is None else f"{s['median']:,.0f} ({s['min']:,.0f}-{s['max']:,.0f})"

    for m in results["models"]:
        s = results["summary"][m["label"]]
        role = "dense" if m["role"] == "dense" else f"MoE {m.get('experts')}x top-{m.get('topk')}"
        lines.append(f"| {m['label']} | {role} | {cell(s.get('offline', {}).get('max_throughput'))} | "
                     f"{cell(s.get('online', {}).get('max_throughput'))} | "
                     f"{cell(s.get('decode', {}).get('tokens_per_s'))} |")
    return lines


def measured_chunks(results: dict, out_dir: Path) -> list[str]:
    from megatron_upcycle.inference.plots import plot_latency_vs_throughput, plot_max_throughput
    from megatron_upcycle.inference.results import format_ratios

    e = results["engine"]
    engine = f"{e['name']} {e.get('version', '')} on {e.get('device', '?')} ({e.get('dtype', '?')}, " \
             f"{e.get('threads', '?')} thread(s))"
    p = results["preset"]
    chunks = [
        "### Measured: the study's models",
        f"Measured with `upcycle bench-inference` on **{engine}**, {p['input_tokens']} input + {p['output_tokens']} "
        f"output tokens per request, {p['repeats']} repeats ({p['online_repeats']} online; median and min-max). "
        "These are the study's tiny CPU models: their speed is dominated by per-step overhead, so the ratios "
        "say how this engine treats the MoE layer, not what a GPU serving system would see.",
        "\n".join(_measured_table(results)),
        "MoE / dense (throughput ratios; < 1: the MoE serves slower):\n\n"
        + "\n".join(f"- {line}" for line in format_ratios(results)),
        f"Wall time {results['wall_seconds']:.1f} s, process CPU time {results['process_cpu_seconds']:.1f} s.",
    ]
    latency = plot_latency_vs_throughput(results, out_dir / LATENCY_PNG)
    bars = plot_max_throughput(results, out_dir / BARS_PNG)
    chunks += [f"![{alt}]({png.name})" for alt, png in (("latency vs throughput", latency),
                                                         ("max throughput", bars)) if png is not None]
    return chunks


def paper_prediction_table(sizes=PAPER_SIZES, context: int = PAPER_CONTEXT, batch: int = PREDICTION_BATCH,
                           hardware=H100_SXM) -> list[str]:
    from megatron_upcycle.config import load_model_config

    lines = [f"| size | model | weights (GB, bf16) | max batch at {context:,} tokens | FLOPs/token ratio | "
             f"decode tokens/s, batch 1 | decode tokens/s, batch {batch} | MoE / dense at batch {batch} |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for size in sizes:
        model = load_model_config(size)
        dense = ModelShape.from_config(model, None)
        d_flops = forward_flops_per_token(dense, context)
        d_b = decode_step(dense, batch, context, hardware).tokens_per_second
        for name, moe in (("dense", None), ("8x top-1", MoEConfig(8, 1)), ("8x top-2", MoEConfig(8, 2))):
            shape = ModelShape.from_config(model, moe)
            one = decode_step(shape, 1, context, hardware).tokens_per_second
            at_b = decode_step(shape, batch, context, hardware).tokens_per_second
            ratio = "1" if moe is None else f"{at_b / d_b:.2f}"
            lines.append(f"| {size} | {name} | {shape.total * 2 / 1e9:.2f} | "
                         f"{max_batch(shape, hardware.memory_bytes, context):,} | "
                         f"{forward_flops_per_token(shape, context) / d_flops:.2f} | {one:,.0f} | {at_b:,.0f} | "
                         f"{ratio} |")
    return lines


def _throughputs(plan, rows: list[dict], measured: dict | None) -> tuple[dict, str]:
    """Serving throughput per (kind, E, k) of the study's rows: measured when there is a result, else predicted."""
    from megatron_upcycle.config import load_model_config

    out = {}
    if measured is not None:
        dense = next(m for m in measured["models"] if m["role"] == "dense")
        speed = {m["label"]: measured["summary"][m["label"]]["offline"]["max_throughput"]["median"]
                 for m in measured["models"]}
        by_ek = {(m["experts"], m["topk"]): speed[m["label"]] for m in measured["models"] if m["role"] == "moe"}
        for r in rows:
            ek = (_int(r.get("E")), _int(r.get("k")))
            out[r["run_id"]] = speed[dense["label"]] if r["kind"] in ("dense", "cpt") else by_ek.get(ek)
        return out, "measured offline max throughput (input + output tokens/s, this machine)"
    for r in rows:
        model = load_model_config(r["model"])
        moe = None if r["kind"] in ("dense", "cpt") else MoEConfig(_int(r["E"]), _int(r["k"]))
        shape = ModelShape.from_config(model, moe)
        out[r["run_id"]] = decode_step(shape, PREDICTION_BATCH, model.seq_length).tokens_per_second
    return out, f"predicted decode tokens/s at batch {PREDICTION_BATCH} on an {H100_SXM.name} (analytic)"


def _int(value):
    return None if value in (None, "") else int(float(value))


def plot_quality_vs_throughput(plan, rows: list[dict], measured: dict | None, path: Path) -> tuple[Path | None, str]:
    speeds, source = _throughputs(plan, rows, measured)
    styles = {"dense": ("tab:blue", "o"), "cpt": ("tab:green", "s"), "upcycled": ("tab:orange", "^"),
              "moe": ("tab:red", "v")}
    fig = figure(6.4, 4.6)
    ax = fig.subplots()
    drawn = False
    for kind, (color, marker) in styles.items():
        points = [(speeds[r["run_id"]], float(r["val_loss"])) for r in rows
                  if r["kind"] == kind and speeds.get(r["run_id"]) is not None and r.get("val_loss") not in (None, "")]
        if points:
            ax.scatter([p[0] for p in points], [p[1] for p in points], color=color, marker=marker, label=kind,
                       alpha=0.8)
            drawn = True
    if not drawn:
        return None, source
    ax.set_xlabel(f"serving throughput: {source}", fontsize=8)
    ax.set_ylabel("validation loss (nats)")
    ax.set_title("Quality vs serving cost (lower right: better and cheaper to serve)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path), source


def inference_section(plan, rows: list[dict], out_dir: Path) -> list[str]:
    """Markdown chunks of the report's "Inference cost" section; PNGs are written into ``out_dir``."""
    from megatron_upcycle.inference.results import RESULTS_FILE, read_results

    out_dir = Path(out_dir)
    results_path = study_inference_dir(plan) / RESULTS_FILE
    measured = read_results(results_path) if results_path.exists() else None
    chunks = ["## Inference cost"]
    if measured is not None:
        chunks += measured_chunks(measured, out_dir)
    else:
        chunks.append(f"Not measured for this study: no `{results_path}`. Run `upcycle bench-inference DENSE_CKPT "
                      f"UPCYCLED_CKPT --out {results_path.parent}` (or `measure_study_inference(plan)`).")
    chunks += [
        "### Predicted: the paper's sizes on an H100",
        f"Analytic roofline (`megatron_upcycle.inference.cost`, `upcycle model info`): {H100_SXM.describe()}; bf16 "
        f"weights and KV cache; {PAPER_CONTEXT:,} tokens of context per sequence (3500 in + 300 out). A decode "
        "step reads every weight it needs once: the dense MLP whole, an MoE layer only the experts its tokens "
        f"were routed to, E (1 - (1 - k/E)^B) of them at batch B (uniform routing). At batch 1 a top-1 MoE reads "
        f"what the dense model reads; at batch {PREDICTION_BATCH} nearly every expert is read, and the MoE's "
        "weights also leave less memory for the KV cache (max batch).",
        "\n".join(paper_prediction_table()),
    ]
    png, source = plot_quality_vs_throughput(plan, rows, measured, out_dir / QUALITY_PNG)
    if png is not None:
        chunks += ["### Quality vs serving cost",
                   f"Validation loss against serving throughput ({source}) for every finished run. Dense CPT "
                   "serves at the dense model's speed (same architecture); upcycled and from-scratch MoEs at the "
                   "MoE's.", f"![quality vs serving throughput]({png.name})"]
    return chunks
