"""Router statistics for MoE runs: aux loss, per-expert load, router entropy.

Forward hooks on Megatron's TopKRouter modules capture routing decisions only
on logged steps (``active``), so the other steps pay nothing.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class RouterStats:
    def __init__(self, model, num_experts: int, topk: int) -> None:
        from megatron.core.transformer.moe.router import TopKRouter

        self.num_experts = num_experts
        self.topk = topk
        self.active = False
        self._reset()
        self.routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
        for router in self.routers:
            router.register_forward_hook(self._hook)

    def _reset(self) -> None:
        self.counts = torch.zeros(self.num_experts, dtype=torch.float64)
        self.entropy_sum = 0.0
        self.tokens = 0

    @torch.no_grad()
    def _hook(self, module, inputs, outputs) -> None:
        if not self.active:
            return
        hidden = inputs[0]
        _probs, routing_map = outputs
        self.counts += routing_map.reshape(-1, self.num_experts).sum(0).double().cpu()
        logits = torch.nn.functional.linear(hidden.reshape(-1, hidden.shape[-1]).float(), module.weight.float())
        p = torch.softmax(logits, dim=-1)
        self.entropy_sum += float(-(p * torch.log(p.clamp_min(1e-30))).sum(-1).sum())
        self.tokens += logits.shape[0]

    def collect(self) -> dict[str, float]:
        """Load per expert relative to uniform (1.0 = balanced) and mean router entropy (nats)."""
        from megatron_upcycle.mcore_compat import moe_metric_values, zero_moe_metrics

        stats = {}
        values = moe_metric_values("load_balancing_loss")
        if values is not None:
            values = values.detach().float().cpu()
            moe_layers = max(len(self.routers), 1)
            # Summed over micro-batches and layers; the trainer divides by micro-batches.
            stats["aux_loss_sum"] = float(values.sum()) / moe_layers
        zero_moe_metrics()
        if self.tokens:
            counts = self.counts.clone()
            meta = torch.tensor([self.entropy_sum, float(self.tokens)], dtype=torch.float64)
            if dist.is_initialized() and dist.get_world_size() > 1 and dist.get_backend() == "gloo":
                dist.all_reduce(counts)
                dist.all_reduce(meta)
            load = counts / counts.sum() * self.num_experts
            stats.update(
                expert_load_max=float(load.max()),
                expert_load_min=float(load.min()),
                expert_load=[round(float(x), 4) for x in load],
                router_entropy=float(meta[0] / meta[1]),
            )
        self._reset()
        return stats
