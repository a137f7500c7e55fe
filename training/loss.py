"""The training objective: mean next-token cross-entropy over a window of tokens.

The LM head takes the loss from the hidden states a slice at a time, with its gradient, and
never holds more than one slice of logits (model/lm_head.py). With `chunk_len`, the
sequence itself runs chunk by chunk, carrying the model state, with activations
checkpointed per chunk: peak memory is that of one chunk plus the carried states, and the
loss and gradients equal those of the unchunked run.

With sequence parallelism (`sp`, a model.sequence_parallel.SequenceParallel), each rank of
the group takes its piece of the window and returns P * (its summed loss) / (the sequence's
target count): the mean of that over the group is the sequence's mean loss, so DeepSpeed's
usual averaging of gradients over all ranks yields exactly the gradient of the mean loss.
"""
from __future__ import annotations

from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from model.lm_head import IGNORE


def lm_loss(model: nn.Module, window: Tensor, chunk_len: int | None = None,
            loss_mask: Tensor | None = None, sp=None) -> Tensor:
    """window [B, T + 1] token ids -> mean cross-entropy of predicting window[:, 1:].

    `loss_mask` [B, T] (bool) restricts the mean to some targets, e.g. a passkey's answer.
    """
    inputs, targets = window[:, :-1], window[:, 1:]
    count = targets.numel()
    if loss_mask is not None:
        targets = targets.masked_fill(~loss_mask, IGNORE)
        count = loss_mask.sum().clamp(min=1)
    if sp is not None:
        if chunk_len:
            raise ValueError("chunked training and sequence parallelism cannot be combined: "
                             "set train.chunk_len to null or parallel.sequence_parallel_size to 1")
        hidden, _ = model.hidden_states(sp.local(inputs), sp=sp)
        return model.lm_head(hidden, sp.local(targets)) * sp.size / count
    T = inputs.shape[1]
    if not chunk_len or chunk_len >= T:
        hidden, _ = model.hidden_states(inputs, final_state=False)
        return model.lm_head(hidden, targets) / count
    state, total = None, 0.0
    for start in range(0, T, chunk_len):
        end = min(start + chunk_len, T)
        loss_sum, state = checkpoint(_chunk_loss, model, inputs[:, start:end], targets[:, start:end], state,
                                     use_reentrant=False)
        total = total + loss_sum
    return total / count


def _chunk_loss(model: nn.Module, inputs: Tensor, targets: Tensor, state):
    hidden, state = model.hidden_states(inputs, state)
    return model.lm_head(hidden, targets), state


class LanguageModelObjective(nn.Module):
    """The language model and its loss as one module: what the DeepSpeed engine wraps.

    DeepSpeed scales gradients for accumulation, and ZeRO-3 does its per-micro-step
    bookkeeping, from hooks on the output of the engine's forward: the loss must be that
    output, not something computed from the module's parts. In checkpoints the model's
    parameters therefore carry the prefix `model.`.
    """

    def __init__(self, model: nn.Module, chunk_len: int | None = None):
        super().__init__()
        self.model, self.chunk_len = model, chunk_len

    def forward(self, window: Tensor, loss_mask: Tensor | None = None, sp=None) -> Tensor:
        return lm_loss(self.model, window, self.chunk_len, loss_mask, sp)
