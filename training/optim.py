"""AdamW with weight decay only where it belongs, and a constant learning rate after a linear warm-up."""
from __future__ import annotations

import torch
from torch import Tensor, nn

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
    """torch's fused AdamW, which clips the gradients to `max_grad_norm` (0: no clipping) and leaves everything
    alone when their norm is not finite.

    Without ZeRO (stage 0) DeepSpeed steps this optimizer directly, and would clip parameter by parameter: two
    small kernels per tensor, hundreds per step, launched one by one. Here the norm is one foreach reduction
    and the clipping one foreach product. A non-finite norm reaches the fused kernel as `found_inf`, which skips
    the update on the device, so a step launches everything before anything waits for the GPU: only DeepSpeed
    reading `overflow` afterwards (to count the step as skipped) does. Under ZeRO DeepSpeed's own optimizer
    wraps this one, clips the flat partitions it hands it and skips non-finite steps itself; there
    `max_grad_norm` is 0.
    """

    def __init__(self, params, max_grad_norm: float, **kwargs):
        super().__init__(params, fused=True, **kwargs)
        self.max_grad_norm = max_grad_norm
        self.grad_norm: Tensor | None = None   # of the last step's gradients, before clipping
        self.found_inf: Tensor | None = None   # read by torch's fused step: 1.0 skips the update

    @property
    def overflow(self) -> bool:
        return self.found_inf is not None and bool(self.found_inf)

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            self.grad_norm = self.found_inf = None
            return None
        self.grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.max_grad_norm, self.grad_norm, foreach=True)
        self.found_inf = (~torch.isfinite(self.grad_norm)).float()
        return super().step(closure)


def build_optimizer(model: nn.Module, config: OptimizerConfig, max_grad_norm: float
                    ) -> tuple[AdamW, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = AdamW(param_groups(model, config.weight_decay), max_grad_norm, lr=config.lr,
                      betas=tuple(config.betas), eps=config.eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_factor(step, config.warmup_steps))
    return optimizer, schedule


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The learning rate of optimizer step `step` (from 0) relative to optimizer.lr: linear, then constant."""
    return min(1.0, (step + 1) / (warmup_steps + 1))


def apply_settings(optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LambdaLR,
                   config: OptimizerConfig) -> None:
    """Give a resumed optimizer the config's settings. Loading a checkpoint brings back the ones it was saved
    with, along with the moments; a run resumed with another optimizer.lr must train with that one."""
    for group, weight_decay in zip(optimizer.param_groups, (config.weight_decay, 0.0)):   # as param_groups
        group.update(lr=config.lr * warmup_factor(schedule.last_epoch, config.warmup_steps), initial_lr=config.lr,
                     betas=tuple(config.betas), eps=config.eps, weight_decay=weight_decay)
    schedule.base_lrs = [config.lr] * len(optimizer.param_groups)
