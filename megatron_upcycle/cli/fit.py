"""``upcycle fit RESULTS.csv --out DIR`` and ``upcycle advise ...``.

fit: every scaling-law form, leave-one-out selection, bootstrap intervals, D*,
plots and Markdown reports from a results table. advise: upcycle, train an MoE
from scratch, or continue the dense model? From fitted laws (fits.json) or the
paper's published ones. numpy/scipy/matplotlib are imported inside ``run``;
torch never is.
"""
from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    fit = subparsers.add_parser(
        "fit", help="fit the scaling laws to a results table (D in tokens, N in parameters, loss in nats)",
        description="Fit every scaling-law form to RESULTS.csv, choose forms by leave-one-out RMS, bootstrap "
                    "intervals, solve D*; write DIR/fits.json, loo.md, dstar.md and plots/*.png.")
    fit.add_argument("results", help="results.csv from `upcycle sweep` (run_id, kind, model, E, k, N1, N2, "
                                     "Ntotal, D1, D2, tokens, FLOPs, val_loss)")
    fit.add_argument("--out", required=True, help="output directory")
    fit.add_argument("--forms", default=None,
                     help="comma-separated forms to fit (default: all that the table supports); a named form "
                          "the table cannot support is an error")
    fit.add_argument("--bootstrap", default="100", help="bootstrap resamples per fit (0: none; default 100)")
    fit.add_argument("--seed", default="0", help="bootstrap seed (default 0)")
    fit.add_argument("--workers", default=None, help="processes for independent fits (default: up to 2)")
    fit.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    fit.add_argument("--columns", default=None, metavar="OLD=NEW,...",
                     help="rename the table's columns to the contract's on read (docs/results-table.md), "
                          "e.g. --columns loss=val_loss,params=N1")
    fit.add_argument("--tokens-unit", default="tokens", metavar="UNIT",
                     help="unit of the table's D1, D2 and tokens columns: tokens (default), thousands, millions "
                          "or billions (the paper's tables); converted to tokens on read")
    fit.set_defaults(run=run_fit)

    adv = subparsers.add_parser(
        "advise", help="upcycle, MoE from scratch or dense CPT? predicted losses from fitted or published laws",
        description="Given a dense model (N1 parameters, trained on D1 tokens) and a budget of extra tokens or "
                    "FLOPs, predict the loss of upcycling, of an MoE trained from scratch and of continued "
                    "dense pretraining, and recommend one.")
    adv.add_argument("--n1", required=True, help="dense non-embedding parameters, e.g. 1e9")
    adv.add_argument("--d1", required=True, help="tokens the dense model was trained on (sunk), e.g. 2e10")
    budget = adv.add_mutually_exclusive_group(required=True)
    budget.add_argument("--tokens", help="extra training tokens for each option")
    budget.add_argument("--flops", help="extra training FLOPs (6 N D) for each option")
    source = adv.add_mutually_exclusive_group(required=True)
    source.add_argument("--fits", help="fits.json (or the directory holding it) from `upcycle fit`")
    source.add_argument("--paper", action="store_true", help="use the paper's published joint-law parameters")
    adv.add_argument("--n2-over-n1", default=None, help="active-to-dense parameter ratio (default: from the fits; "
                                                        "1.75 for 8 experts top-2 with --paper)")
    adv.add_argument("--tokens-unit", default="tokens", metavar="UNIT",
                     help="unit of --d1 and --tokens: tokens (default), thousands, millions or billions")
    adv.add_argument("--json", action="store_true", help="print the Advice record as JSON")
    add_serving_arguments(adv)
    adv.set_defaults(run=run_advise)


def add_serving_arguments(adv) -> None:
    """The serving term (megatron_upcycle.inference.serving): training + serving cost of T tokens."""
    serve = adv.add_argument_group("serving cost (upcycling vs dense CPT at equal training + serving cost)")
    serve.add_argument("--serve-tokens", default=None, help="tokens the model will serve, e.g. 1e12")
    serve.add_argument("--serve-estimate", default=None, choices=("compute", "memory", "measured"),
                       help="MoE/dense serving cost per token: compute-bound (N2/N1), memory-bound (weight bytes "
                            "per decode step) or measured (--serve-ratio-from); default measured when a file is "
                            "given, else memory")
    serve.add_argument("--serve-ratio-from", default=None, metavar="RESULTS_JSON",
                       help="results.json of `upcycle bench-inference`: its measured MoE/dense throughput ratio")
    serve.add_argument("--serve-model", default=None, help="which MoE of that file (default: the first)")
    serve.add_argument("--experts", default="8", help="experts E for the memory-bound estimate (default 8)")
    serve.add_argument("--serve-batch", default="8", help="decode batch for the memory-bound estimate (default 8)")


def _number(name: str, text: str | None, integer: bool = False, minimum: float = 0.0, allow_equal=False):
    from megatron_upcycle.errors import UserError

    if text is None:
        return None
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise UserError(f"{name} must be {kind}, got '{text}'") from None
    if value != value or value < minimum or (value == minimum and not allow_equal):
        raise UserError(f"{name} must be {'>=' if allow_equal else '>'} {minimum:g}, got {text}")
    return value


def run_fit(args) -> int:
    from megatron_upcycle.cli.args import check_output_dir
    from megatron_upcycle.scaling import AnalysisOptions, FitOptions, analyze
    from megatron_upcycle.scaling.io import parse_column_map, tokens_multiplier

    check_output_dir(args.out, "--out")  # before fitting, which can take minutes
    columns = parse_column_map(args.columns)
    tokens_multiplier(args.tokens_unit)  # an unknown unit: one line before any work

    forms = tuple(f.strip() for f in args.forms.split(",") if f.strip()) if args.forms else None
    options = AnalysisOptions(
        fit=FitOptions(n_bootstrap=_number("--bootstrap", args.bootstrap, integer=True, allow_equal=True),
                       seed=_number("--seed", args.seed, integer=True, allow_equal=True)),
        forms=forms, plots=not args.no_plots,
        workers=_number("--workers", args.workers, integer=True, minimum=1, allow_equal=True),
        columns=columns or None, tokens_unit=args.tokens_unit,
    )
    result = analyze(args.results, args.out, options)
    print(summary(result))
    return 0


def summary(result) -> str:
    lines = [f"read: {note}" for note in result.read_notes]
    lines.append(f"units: {result.units.describe()}")
    for s in result.selections:
        rms = ", ".join(f"{k} {v:.4g}" for k, v in sorted(s.loo_rms.items(), key=lambda kv: kv[1]))
        lines.append(f"{s.family} [{s.subset}]: chose {s.chosen} (LOO RMS nats: {rms})")
        if s.verdict:
            lines.append(f"  {s.verdict}")
    for f in result.fits:
        if f.family in ("chinchilla", "shared_E", "joint"):
            lines.append(f"{f.form} [{f.subset}]: LOO RMS {f.loo.rms:.4g} nats")
    for s in result.skipped:
        lines.append(f"skipped {s.form} [{s.subset}]: {s.reason}")
    for line in result.identification_notes():
        lines.append(f"not identified: {line}")
    if result.dstar_fitted is not None:
        lines.append(f"D* (fitted laws): {result.dstar_fitted.summary}")
    lines.append(f"D* (paper parameters): {result.dstar_paper.summary}")
    lines.append(f"{result.n_bfgs_runs} BFGS runs, {result.seconds:.1f} s; wrote {', '.join(result.files)}")
    return "\n".join(lines)


def run_advise(args) -> int:
    from megatron_upcycle.scaling import advise_from_result, read_fits_json
    from megatron_upcycle.scaling.io import to_jsonable, tokens_multiplier

    scale = tokens_multiplier(args.tokens_unit)
    n1 = _number("--n1", args.n1)
    d1 = _number("--d1", args.d1)
    tokens = _number("--tokens", args.tokens)
    if scale != 1.0:
        d1 = d1 * scale
        tokens = None if tokens is None else tokens * scale
        if not args.json:
            print(f"read: --d1 and --tokens in {args.tokens_unit} of tokens, converted to tokens (x {scale:g})")
    flops = _number("--flops", args.flops)
    ratio = _number("--n2-over-n1", args.n2_over_n1)
    result = None if args.paper else read_fits_json(args.fits)
    advice = advise_from_result(result, n1, d1, tokens=tokens, flops=flops, n2_over_n1=ratio)
    serving = _serving(args, result, n1, d1, tokens, flops, ratio)
    if args.json:
        data = to_jsonable(advice)
        if serving is not None:
            data["serving"] = to_jsonable(serving)
        print(json.dumps(data, indent=2))
        return 0
    print(f"recommendation: {advice.recommendation}")
    print(f"reason: {advice.reason}")
    print(f"budget: {advice.budget}; N1 = {advice.n1:.4g} parameters, D1 = {advice.d1:.4g} tokens")
    for o in advice.options:
        loss = "n/a" if o.predicted_loss is None else f"{o.predicted_loss:.4f} nats"
        ci = "" if o.ci_low is None else f" [{o.ci_low:.4f}, {o.ci_high:.4f}]"
        print(f"  {o.strategy:<17} {loss}{ci}  {o.note}")
    print(f"laws: {advice.laws}")
    for warning in advice.warnings:
        print(f"caution: {warning}")
    if serving is not None:
        from megatron_upcycle.inference.serving import format_serving

        print("\n".join(format_serving(serving)))
    return 0


def _serving(args, result, n1, d1, tokens, flops, ratio):
    """The serving comparison when --serve-tokens is given (None otherwise)."""
    from megatron_upcycle.errors import UserError

    if args.serve_tokens is None:
        if args.serve_ratio_from or args.serve_estimate:
            raise UserError("--serve-estimate / --serve-ratio-from need --serve-tokens T")
        return None
    from megatron_upcycle.inference.serving import measured_ratio, predictors_for, serving_advice

    serve_tokens = _number("--serve-tokens", args.serve_tokens, allow_equal=True)
    measured = measured_ratio(args.serve_ratio_from, args.serve_model) if args.serve_ratio_from else None
    estimate = args.serve_estimate or ("measured" if measured else "memory")
    return serving_advice(predictors_for(result, n1, ratio), n1, d1, serve_tokens, tokens=tokens, flops=flops,
                          estimate=estimate, num_experts=_number("--experts", args.experts, integer=True),
                          batch=_number("--serve-batch", args.serve_batch, integer=True), measured=measured)
