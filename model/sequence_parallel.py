"""Sequence parallelism: P ranks split each sequence into P contiguous pieces.

Rank r holds tokens [r T/P, (r+1) T/P). Per layer it runs its piece as if from an empty
state, and three small exchanges recover the exact state its piece starts from:

- notes: every rank shares its windows' aggregates (max or sum, count, importance);
  windows cut by a rank boundary merge (max and sum are associative), and the pool at
  rank r's start is selected from the complete windows before it, as the policy says;
- conv: the last d_conv - 1 conv inputs of the previous rank (the halo);
- SSM: h is linear in its start state, so each rank scans from zero, shares (final state,
  total decay), folds the earlier ranks' pairs into its true start state h0, and adds
  C_t . (exp(A cumsum dt)_t h0) to its outputs (model/scan.py).

Per layer that is O(P B E N) floats for the SSM, O(P B E d_conv) for the conv and
O(B T S / W) for the window aggregates: states and summaries, never activations.
Every exchange is an all-gather whose backward all-reduces the gradients, so the backward
pass is exact as well. Each rank uses every gathered entry (times zero or masked where it
does not apply) so that all ranks take part in every backward all-reduce.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from model.notes import _compact, pool_membership
from model.state import NoteState


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, x.contiguous(), group=group)
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)   # sum of every rank's use of each piece
        return grad[dist.get_rank(ctx.group)], None


class SequenceParallel:
    def __init__(self, group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def gather(self, x: Tensor) -> Tensor:
        """[...] on every rank -> [P, ...], differentiable."""
        return _AllGather.apply(x, self.group)

    def local(self, x: Tensor, dim: int = 1) -> Tensor:
        """This rank's piece of a whole sequence."""
        if x.shape[dim] % self.size:
            raise ValueError(f"sequence length {x.shape[dim]} is not divisible by the "
                             f"sequence-parallel size {self.size}")
        return x.chunk(self.size, dim)[self.rank]

    def start_position(self, local_len: int) -> int:
        return self.rank * local_len

    def conv_halo(self, x: Tensor, n: int) -> Tensor:
        """x [B, E, T_local] conv inputs -> the previous rank's last n; zeros on rank 0."""
        if x.shape[-1] < n:
            raise ValueError(f"each rank's piece ({x.shape[-1]} tokens) must be at least "
                             f"d_conv - 1 = {n} tokens long")
        tails = self.gather(x[..., x.shape[-1] - n:])
        return tails[self.rank - 1] * (self.rank > 0)

    def ssm_initial_state(self, h_last: Tensor, decay: Tensor) -> Tensor:
        """(state at the end of this piece from zero, its total decay) -> this piece's h0."""
        h_all, decay_all = self.gather(h_last), self.gather(decay)
        h0 = torch.zeros_like(h_last)
        for q in range(self.size):
            before = float(q < self.rank)
            h0 = before * (decay_all[q] * h0 + h_all[q]) + (1 - before) * h0
        return h0

    def note_state(self, block, acc: Tensor, count: Tensor, imp: Tensor, local_len: int) -> NoteState:
        """The note state at this rank's start, from every earlier rank's window aggregates.

        acc [B, n, S], count [B, n], imp [B, n] aggregate the windows this rank's piece of
        `local_len` tokens touches, the partial ones at its edges included.
        """
        W, B, S = block.window, acc.shape[0], acc.shape[-1]
        n_max = local_len // W + 2                      # the most windows a piece can touch
        pad = n_max - acc.shape[1]
        acc_all = self.gather(F.pad(acc, (0, 0, 0, pad), value=block.empty_acc))   # [P, B, n_max, S]
        count_all = self.gather(F.pad(count, (0, pad)))
        imp_all = self.gather(F.pad(imp, (0, pad)))

        # Merge all ranks' windows by absolute index, keeping only tokens before this rank.
        start = self.rank * local_len
        n_before = start // W + 1                       # the last of these may be open
        index = torch.cat([torch.arange(q * local_len // W, q * local_len // W + n_max) for q in range(self.size)])
        earlier = torch.arange(self.size).repeat_interleave(n_max) < self.rank
        use = (earlier & (index < n_before)).to(acc.device)
        slots = index.clamp(max=n_before - 1).to(acc.device).expand(B, -1)
        flat = lambda t: t.transpose(0, 1).flatten(1, 2)   # [P, B, n_max, ...] -> [B, P * n_max, ...]
        contribution = torch.where(use[None, :, None], flat(acc_all), block.empty_acc)
        merged_acc = acc.new_full((B, n_before, S), block.empty_acc).scatter_reduce(
            1, slots[..., None].expand(-1, -1, S), contribution, "amax" if block.pooling == "max" else "sum")
        merged_count = count.new_zeros(B, n_before).scatter_reduce(1, slots, flat(count_all) * use, "sum")
        merged_imp = imp.new_zeros(B, n_before).scatter_reduce(1, slots, flat(imp_all) * use, "amax")

        # Windows that ended before this rank's start are notes, selected into a pool as a
        # chunk that starts a sequence does; the last window may still be open.
        n_complete = start // W
        notes, made = block._finish(merged_acc[:, :n_complete], merged_count[:, :n_complete])
        window = torch.where(made, torch.arange(n_complete, device=acc.device), -1)
        importance = merged_imp[:, :n_complete]
        epoch = torch.tensor([n_complete], device=acc.device)
        in_pool = pool_membership(window, importance, epoch, block.pool_size, block.policy)
        if start % W:
            open_window = (merged_acc[:, -1], merged_count[:, -1], merged_imp[:, -1])
        else:
            open_window = block._empty_open(B, acc)
        return _compact(notes, window, importance, in_pool[:, 0], block.pool_size, *open_window)
