"""The output projection, which also computes the training loss without keeping any logits.

Full-vocabulary logits of a long sequence are large (8k tokens x 32k vocabulary is 1 GiB in fp32). Given
targets, `LMHead` returns the summed cross-entropy instead, computed LOSS_SLICE positions at a time together
with its gradient: softmax - onehot, multiplied out into the gradients of the hidden states and the weight
at once. The backward pass then only scales them, so no slice of logits outlives its step of the loop and
none is recomputed: three matrix products per slice, where recomputing the slice in the backward pass costs
four. (Chunked training runs each chunk's forward twice, so there it is six against five.) The loss is part
of the module's forward so that ZeRO-3 gathers the weight for it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOSS_SLICE = 2048   # positions of logits alive at once
IGNORE = -100       # targets that count for nothing, as cross_entropy's ignore_index


class LMHead(nn.Linear):
    def forward(self, hidden: Tensor, targets: Tensor | None = None) -> Tensor:
        """hidden [..., D] -> logits [..., V]; with targets [...] (ids, or IGNORE) the summed cross-entropy."""
        if targets is None:
            return super().forward(hidden)
        # Under no_grad (validation) a Function still sees its inputs' requires_grad: say whether to differentiate.
        return _SummedCrossEntropy.apply(hidden.flatten(0, -2), self.weight, targets.flatten(), torch.is_grad_enabled())


class _SummedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, differentiate: bool) -> Tensor:
        want_hidden, want_weight = (differentiate and needed for needed in ctx.needs_input_grad[:2])
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        for start in range(0, hidden.shape[0], LOSS_SLICE):
            h, t = hidden[start:start + LOSS_SLICE], targets[start:start + LOSS_SLICE]
            logits = F.linear(h, weight).float()          # autocast, where on, makes the product bf16
            counted = t != IGNORE
            t = t.masked_fill(~counted, 0)
            log_norm = logits.logsumexp(-1)
            total += ((log_norm - logits.gather(1, t[:, None])[:, 0]) * counted).sum()
            if want_hidden or want_weight:
                grad_logits = logits.sub_(log_norm[:, None]).exp_()   # softmax, in the logits' memory
                grad_logits[torch.arange(len(t), device=t.device), t] -= 1
                grad_logits *= counted[:, None]
                if want_hidden:   # (the casts matter for bf16 weights without autocast: grad_logits is fp32)
                    grad_hidden[start:start + LOSS_SLICE] = grad_logits @ weight.to(grad_logits.dtype)
                if want_weight:
                    grad_weight += grad_logits.T @ h.to(grad_logits.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_total,
                None if grad_weight is None else (grad_weight * grad_total).to(ctx.weight_dtype), None, None)
