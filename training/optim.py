"""AdamW with weight decay only where it belongs, and a constant learning rate after a linear warm-up."""
from __future__ import annotations

import torch
from torch import nn

from training.config import OptimizerConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: not norms, biases, fusion scalars (ndim < 2), nor A_log, D and the dt bias.

    The SSM parameters carry `_no_weight_decay` (model/mixer.py): decaying A_log towards zero would pull
    every channel's decay rate towards the same value.
    """
    decay, no_decay = [], []
    for p in model.parameters():  # tied weights appear once
        if p.requires_grad:
            (no_decay if p.ndim < 2 or getattr(p, "_no_weight_decay", False) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class AdamW(torch.optim.AdamW):
    """torch's AdamW, which leaves everything alone when a gradient is not finite.

    Under ZeRO, DeepSpeed's optimizer checks the gradient norm and skips the step itself. Without ZeRO (stage 0)
    DeepSpeed calls this optimizer directly, then reads `overflow` to count the step as skipped (its clipping
    turns a non-finite norm into NaN gradients, so the check here sees it).
    """
    overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        self.overflow = bool(grads) and not torch.isfinite(torch.nn.utils.get_total_norm(grads))
        return None if self.overflow else super().step(closure)


def build_optimizer(model: nn.Module, config: OptimizerConfig, device: torch.device
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = AdamW(param_groups(model, config.weight_decay), lr=config.lr,
                                  betas=tuple(config.betas), eps=config.eps, fused=device.type == "cuda")
    warmup = config.warmup_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
    return optimizer, schedule
