"""``upcycle model info NAME [--experts E --topk K]`` and ``upcycle model list``."""
from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("model", help="model family: sizes, parameter and FLOP counts")
    sub = parser.add_subparsers(dest="model_command", metavar="ACTION")
    sub.required = True
    info = sub.add_parser("info", help="N1, N2, Ntotal, embedding params, FLOPs/token, memory")
    info.add_argument("name", help="a preset in yaml/models/ (e.g. 0.1B, cpu-tiny) or a model YAML path")
    info.add_argument("--experts", type=int, default=None, help="number of experts E (MoE counts)")
    info.add_argument("--topk", type=int, default=None, help="experts per token k (default 2, or E if E < 2)")
    info.add_argument("--granularity", type=int, default=1, help="expert granularity g")
    info.add_argument("--moe-layers", default="all", help="'all', 'every_other' or comma-separated indices")
    info.add_argument("--shared-expert", action="store_true", help="add an always-on shared expert")
    info.add_argument("--context", type=int, default=None,
                      help="serving context length in tokens for the inference cost (default: the model's seq_length)")
    info.add_argument("--gpu-memory-gb", type=float, default=80.0,
                      help="GPU memory for the inference cost's max batch (default 80, an H100)")
    info.add_argument("--decode-batches", default="1,8,32,128",
                      help="batch sizes at which the decode step is costed (default 1,8,32,128)")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(run=run_info)
    names = sub.add_parser("list", help="the model presets")
    names.set_defaults(run=run_list)


def parse_moe_layers(text: str):
    from megatron_upcycle.errors import ConfigError

    if text in ("all", "every_other"):
        return text
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--moe-layers: expected 'all', 'every_other' or indices like 0,2,4; got '{text}'") from None


def moe_from_args(args):
    """A MoEConfig from --experts/--topk/... (None when --experts is not given)."""
    from megatron_upcycle.config import MoEConfig
    from megatron_upcycle.errors import ConfigError

    if args.experts is None:
        if args.topk is not None:
            raise ConfigError("--topk needs --experts")
        return None
    topk = args.topk if args.topk is not None else min(2, max(args.experts, 1))
    return MoEConfig(
        num_experts=args.experts,
        topk=topk,
        granularity=args.granularity,
        layers=parse_moe_layers(args.moe_layers),
        shared_expert=args.shared_expert,
    )


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"


def _bytes(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (the tiny presets are KiB-sized)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"


def format_report(report: dict) -> str:
    rows = [
        ("model", report["model"]),
        ("N1 (dense non-embedding params)", f"{report['N1']:,}"),
        ("embedding params (input + output)", f"{report['embedding_params']:,}"),
        ("dense training FLOPs/token (6N)", f"{report['dense_flops_per_token']['six_n']:,}"),
        ("dense training FLOPs/token (+attn, logits)", f"{report['dense_flops_per_token']['full']:,}"),
        ("dense train memory, 1 device, mbs 1 (est.)", _gib(report["dense_memory_bytes"]["total"])),
    ]
    if "experts" in report:
        rows += [
            ("experts E / top-k", f"{report['experts']} / {report['topk']}"),
            ("N2 (MoE active non-embedding params)", f"{report['N2']:,}"),
            ("Ntotal (MoE total non-embedding params)", f"{report['Ntotal']:,}"),
            ("router params", f"{report['router_params']:,}"),
            ("MoE training FLOPs/token (6 N2)", f"{report['moe_flops_per_token']['six_n']:,}"),
            ("MoE training FLOPs/token (+attn, logits)", f"{report['moe_flops_per_token']['full']:,}"),
            ("MoE train memory, 1 device, mbs 1 (est.)", _gib(report["moe_memory_bytes"]["total"])),
        ]
    for role, cost in report.get("inference", {}).items():
        rows += inference_rows(role, cost)
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    if "inference" in report:
        lines.append(f"(inference: bf16 weights and KV cache; roofline on {report['inference_hardware']}: an upper "
                     "bound on tokens/s, no kernel-launch or scheduling overhead)")
    return "\n".join(lines)


def inference_rows(role: str, cost: dict) -> list[tuple[str, str]]:
    rows = [
        (f"{role} forward FLOPs/token (context {cost['context_tokens']:,})", f"{cost['forward_flops_per_token']:,}"),
        (f"{role} weight bytes (bf16)", _bytes(cost["weight_bytes"])),
        (f"{role} KV-cache bytes/token", f"{cost['kv_cache_bytes_per_token']:,}"),
        (f"{role} max batch at context {cost['context_tokens']:,}", f"{cost['max_batch']:,}"),
    ]
    for step in cost["decode"]:
        experts = (f", {step['distinct_experts_per_moe_layer']:.2f} experts/MoE layer"
                   if cost["experts"] else "")
        fits = "" if step["fits_memory"] else " (does not fit)"
        rows.append((f"{role} decode step at batch {step['batch']}",
                     f"{_bytes(step['weight_bytes_read'])} weights + {_bytes(step['kv_bytes_read'])} KV read{experts}; "
                     f"{step['tokens_per_second']:,.0f} tokens/s ({step['bound']}-bound){fits}"))
    return rows


def inference_report(model, moe, context: int | None, gpu_memory_gb: float, batches: tuple[int, ...]) -> dict:
    """The analytic serving cost of the dense model and its MoE variant (megatron_upcycle.inference.cost)."""
    from dataclasses import replace

    from megatron_upcycle.inference.cost import H100_SXM, ModelShape, inference_cost

    hardware = replace(H100_SXM, name=f"{gpu_memory_gb:g} GB GPU with H100 SXM bandwidth and peak",
                       memory_bytes=gpu_memory_gb * 1e9) if gpu_memory_gb != 80.0 else H100_SXM
    context = context or model.seq_length
    costs = {"dense": inference_cost(ModelShape.from_config(model, None), context, hardware, batches)}
    if moe is not None:
        costs["MoE"] = inference_cost(ModelShape.from_config(model, moe), context, hardware, batches)
    return costs


def parse_batches(text: str) -> tuple[int, ...]:
    from megatron_upcycle.errors import UserError

    try:
        batches = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        batches = ()
    if not batches or min(batches) < 1:
        raise UserError(f"--decode-batches: expected positive integers like 1,8,32; got '{text}'")
    return batches


def run_info(args) -> int:
    from megatron_upcycle.cli.args import check_at_least
    from megatron_upcycle.config import load_model_config

    model = load_model_config(args.name)
    moe = moe_from_args(args)
    check_at_least("--context", args.context, 1)
    check_at_least("--gpu-memory-gb", args.gpu_memory_gb, 1e-9)
    batches = parse_batches(args.decode_batches)
    report = _report_in_process(model, moe)
    report["inference"] = inference_report(model, moe, args.context, args.gpu_memory_gb, batches)
    report["inference_hardware"] = next(iter(report["inference"].values()))["hardware"]
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _report_in_process(model, moe) -> dict:
    from megatron_upcycle.backend import select_backend
    from megatron_upcycle.counts import counts_report
    from megatron_upcycle.logging_setup import quiet_megatron
    from megatron_upcycle.parallel import single_process_groups

    quiet_megatron()
    backend = select_backend(force_cpu=True) if not _cuda() else select_backend()
    with single_process_groups(backend):
        return counts_report(model, moe, backend)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_list(args) -> int:
    from megatron_upcycle.config import load_model_config, model_names

    for name in model_names():
        cfg = load_model_config(name)
        print(f"{name:<10} layers={cfg.num_layers:<3} d_model={cfg.hidden_size:<5} heads={cfg.num_attention_heads:<3} "
              f"vocab={cfg.vocab_size} seq={cfg.seq_length}")
    return 0
