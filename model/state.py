"""The recurrent state that crosses chunk, rank and token boundaries.

One object serves chunked training, chunked evaluation of very long inputs, sequence
parallelism and generation: `forward(chunk_k, state_{k-1})` continues exactly where the
previous chunk stopped. All batch items share one absolute position.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable

import torch
from torch import Tensor


@dataclass
class MixerState:
    conv: Tensor   # [B, E, d_conv - 1]  the last conv inputs
    ssm: Tensor    # [B, E, N]           h, always fp32


@dataclass
class NoteState:
    """A layer's note pool and its open (not yet complete) window.

    Pool slots hold valid notes first, ordered by window index (oldest first), then empty
    slots with window index -1. The open window keeps a running aggregate: the elementwise
    max (pooling="max", empty = -inf) or sum (pooling="mean", empty = 0) of I_token * n_t
    over the tokens kept so far, their count, and their highest importance.
    """
    notes: Tensor            # [B, K, S]
    window: Tensor           # [B, K] long, absolute window index; -1 for an empty slot
    importance: Tensor       # [B, K] the note's max I_token, rounded (priority pools rank by it)
    open_acc: Tensor         # [B, S]
    open_count: Tensor       # [B] long
    open_importance: Tensor  # [B]

    @property
    def valid(self) -> Tensor:
        return self.window >= 0


@dataclass
class LayerState:
    mixer: MixerState
    notes: NoteState | None   # None when the model runs with notes off


@dataclass
class ModelState:
    layers: list[LayerState]
    position: int             # absolute position of the next token

    def map(self, fn: Callable[[Tensor], Tensor]) -> "ModelState":
        """Apply `fn` to every tensor, e.g. `state.map(Tensor.detach)` between chunks."""
        return ModelState([_map(layer, fn) for layer in self.layers], self.position)

    def select(self, batch_index: Tensor | list[int]) -> "ModelState":
        """The state of a subset of the batch (beam search, dropping finished rows): row indices, or a bool mask
        over the batch."""
        index = batch_rows(batch_index, self.layers[0].mixer.ssm.device)
        return self.map(lambda t: t.index_select(0, index))


def batch_rows(batch_index: Tensor | list, device: torch.device) -> Tensor:
    """The row indices that a state's `select` takes: given as indices, or as a bool mask over the batch."""
    index = torch.as_tensor(batch_index, device=device)
    if index.dtype == torch.bool:
        index = index.nonzero().flatten()
    if index.dim() != 1 or len(index) == 0 or index.is_floating_point():
        raise ValueError(f"select takes row indices or a bool mask over the batch, and at least one row; got "
                         f"{batch_index!r}")
    return index


def _map(obj, fn):
    if obj is None:
        return None
    if isinstance(obj, Tensor):
        return fn(obj)
    return replace(obj, **{f.name: _map(getattr(obj, f.name), fn) for f in fields(obj)})
