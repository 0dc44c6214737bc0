"""Inference cost of upcycling, measured and predicted (Doubov et al. 2024's question).

Modules, one job each: ``cost`` (analytic: FLOPs, weight / KV bytes, experts read per
decode step, max batch; ``upcycle model info``), ``inputs`` (exports or checkpoints
exported on the fly, one vocabulary), ``engines`` (vLLM / transformers behind one
``generate``), ``workloads`` (offline, online Poisson, batch-1 decode; presets),
``bench`` (``run_benchmark``: interleaved repeats, progress), ``results`` (summaries,
MoE / dense ratios, results.json / results.csv), ``plots`` (Figures 2-3 style),
``serving`` (the advisor's serving term), ``report`` (the study report's section and
the study's measurement). torch and transformers are imported only where a model runs.
"""
