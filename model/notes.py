"""Note taking and note reading: the memory of a MemMamba layer.

Semantics (../shared/docs/memmamba-design.md): a token t is kept if I_token(t) > tau1;
window j (absolute positions [jW, (j+1)W)) becomes one note, the max (or mean) of
I_token * N(u) over its kept tokens, and makes no note if nothing was kept. pool(t) holds
the notes of the windows complete at t, at most K of them: the newest (FIFO) or the most
important (priority, by max I_token rounded to 3 decimals; ties go to the newer). Tokens
read pool(t) through attention.

The parallel form never loops over tokens. The candidates of a chunk are the carried pool
plus the notes of the windows that close inside the chunk; since pool(t) only changes when
a window closes, membership is computed once per "epoch" (number of complete windows) and
expanded to tokens. `step` is the streaming form: insert one note, evict one note.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import MemMambaConfig
from model.state import NoteState


@dataclass
class PoolView:
    """What the tokens of one chunk can read from one layer's memory.

    Tokens are grouped by epoch (tokens of one epoch share a pool): in a layout of
    n_epochs * width slots, token t of the chunk sits at slot lead + t.
    """
    notes: Tensor     # [B, M, S] candidate notes
    members: Tensor   # [B, n_epochs, K] long, the candidates in each epoch's pool
    valid: Tensor     # [B, n_epochs, K] bool, False for empty pool slots
    lead: int
    width: int


class NoteBlock(nn.Module):
    """Takes a layer's notes from each token's importance I_token and note vector N^l u (the layer projects u).

    No parameters of its own: it selects and pools.
    """

    def __init__(self, config: MemMambaConfig):
        super().__init__()
        self.window, self.pool_size, self.summary_dim = config.note_window, config.pool_size, config.summary_dim
        self.tau1, self.policy, self.pooling = config.tau1, config.pool_policy, config.pooling
        self.empty_acc = float("-inf") if config.pooling == "max" else 0.0

    def forward(self, importance: Tensor, note: Tensor, state: NoteState | None, position: int, sp=None,
                final_state: bool = True) -> tuple[PoolView, NoteState | None]:
        """importance [B, T], note [B, T, S] of tokens at absolute positions position..
        -> (view for these tokens, state after them).

        `state` None is the empty memory of a sequence's start; without `final_state` no state is returned.
        """
        T, W, K = note.shape[1], self.window, self.pool_size
        value, kept = importance[..., None] * note, importance.detach() > self.tau1

        # Aggregate the windows this chunk touches: pad to whole windows and reduce.
        first = position // W
        lead = position - first * W
        n_windows = -(-(lead + T) // W)
        pad = (lead, n_windows * W - lead - T)
        acc = _windows(torch.where(kept[..., None], value, self.empty_acc), pad, W, self.empty_acc)
        acc = acc.amax(2) if self.pooling == "max" else acc.sum(2)          # [B, n_windows, S]
        count = _windows(kept, pad, W, False).sum(2)                        # [B, n_windows] long
        imp = _windows(torch.where(kept, rank_key(importance), 0.0), pad, W, 0.0).amax(2)

        if sp is not None:  # the state at this rank's start, from the earlier ranks' windows
            state = sp.note_state(self, acc, count, imp, T)
        if state is not None:  # the first window continues the carried open window (empty when lead == 0)
            acc = torch.cat([self._combine(state.open_acc, acc[:, 0])[:, None], acc[:, 1:]], 1)
            count = torch.cat([(state.open_count + count[:, 0])[:, None], count[:, 1:]], 1)
            imp = torch.cat([torch.maximum(state.open_importance, imp[:, 0])[:, None], imp[:, 1:]], 1)

        # The candidates: the carried pool, then the notes of the windows that close in this chunk.
        n_closed = (position + T) // W - first
        cand_notes, made = self._finish(acc[:, :n_closed], count[:, :n_closed])
        cand_notes = cand_notes.to(note.dtype)                                              # [B, M, S]
        cand_window = torch.where(made, torch.arange(first, first + n_closed, device=note.device), -1)  # [B, M]
        cand_imp = imp[:, :n_closed]
        if state is not None:
            cand_notes = torch.cat([state.notes.to(note.dtype), cand_notes], 1)
            cand_window = torch.cat([state.window, cand_window], 1)
            cand_imp = torch.cat([state.importance, cand_imp], 1)

        # Pool membership per epoch e (= number of complete windows at a token).
        first_epoch = (position + 1) // W
        epochs = torch.arange(first_epoch, (position + T) // W + 1, device=note.device)
        in_pool = pool_membership(cand_window, cand_imp, epochs, K, self.policy)      # [B, n_epochs, M]
        # each epoch's members first, in no particular order: attention reads the pool as a set
        members = torch.topk(in_pool.to(torch.int8), min(K, in_pool.shape[-1]), dim=-1).indices
        view = PoolView(cand_notes, members, in_pool.gather(-1, members), lead=(position + 1) % W, width=W)
        if not final_state:
            return view, None

        if n_closed < n_windows:
            open_window = (acc[:, -1], count[:, -1], imp[:, -1])
        else:
            open_window = self._empty_open(note.shape[0], acc)
        return view, _compact(cand_notes, cand_window, cand_imp, in_pool[:, -1], K, *open_window)

    def step(self, importance: Tensor, note: Tensor, state: NoteState, position: int) -> tuple[PoolView, NoteState]:
        """One token's importance [B] and note [B, S] at `position`: update the open window, insert a note
        when it closes."""
        value, kept = importance[:, None] * note, importance.detach() > self.tau1
        acc = self._combine(state.open_acc, torch.where(kept[:, None], value, self.empty_acc))
        count = state.open_count + kept.long()
        imp = torch.maximum(state.open_importance, torch.where(kept, rank_key(importance), 0.0))
        if (position + 1) % self.window:
            new_state = NoteState(state.notes, state.window, state.importance, acc, count, imp)
        else:
            finished, made = self._finish(acc, count)
            window = torch.where(made, position // self.window, -1)
            new_state = self._insert(state, finished.to(state.notes.dtype), window, imp)
        slots = torch.arange(self.pool_size, device=note.device).expand(note.shape[0], 1, -1)
        return PoolView(new_state.notes, slots, new_state.valid[:, None, :], lead=0, width=1), new_state

    def allocate_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> NoteState:
        K, S = self.pool_size, self.summary_dim
        return NoteState(
            notes=torch.zeros(batch_size, K, S, device=device, dtype=dtype),
            window=torch.full((batch_size, K), -1, device=device, dtype=torch.long),
            importance=torch.zeros(batch_size, K, device=device),
            open_acc=torch.full((batch_size, S), self.empty_acc, device=device, dtype=dtype),
            open_count=torch.zeros(batch_size, device=device, dtype=torch.long),
            open_importance=torch.zeros(batch_size, device=device))

    def _combine(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.maximum(a, b) if self.pooling == "max" else a + b

    def _finish(self, acc: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
        """Window aggregates -> (notes, made). A window with no kept token makes no note."""
        made = count > 0
        if self.pooling == "mean":
            acc = acc / count.clamp(min=1)[..., None]
        return torch.where(made[..., None], acc, 0.0), made

    def _empty_open(self, batch_size: int, like: Tensor):
        return (like.new_full((batch_size, like.shape[-1]), self.empty_acc),
                torch.zeros(batch_size, dtype=torch.long, device=like.device),
                torch.zeros(batch_size, device=like.device))

    def _insert(self, state: NoteState, note: Tensor, window: Tensor, imp: Tensor) -> NoteState:
        """Streaming insertion: add the note (if made), evict the lowest-ranked one if over K."""
        notes = torch.cat([state.notes, note[:, None]], 1)
        windows = torch.cat([state.window, window[:, None]], 1)
        importance = torch.cat([state.importance, imp[:, None]], 1)
        valid = windows >= 0
        big = torch.iinfo(torch.long).max
        if self.policy == "fifo":
            victim = torch.where(valid, windows, big).argmin(1)
        else:  # lowest importance, and among equals the oldest
            lowest = torch.where(valid, importance, float("inf")).amin(1, keepdim=True)
            victim = torch.where(valid & (importance == lowest), windows, big).argmin(1)
        evict = (valid.sum(1) > self.pool_size)[:, None] & (torch.arange(windows.shape[1], device=windows.device) == victim[:, None])
        keep = valid & ~evict
        empty = self._empty_open(notes.shape[0], notes[:, 0])
        return _compact(notes, windows, importance, keep, self.pool_size, *empty)


# Priority pools compare importances rounded to 3 decimals. The same token's importance differs in its last bits
# between a whole forward, a chunk and a single step (products of different shapes), and exact ties are common
# (at layer 0 a token's importance depends on its id alone): rounded, they stay ties, which the newer note wins in
# every form.
def rank_key(importance: Tensor) -> Tensor:
    """The importance that priority pools rank by."""
    return torch.round(importance.detach(), decimals=3)


def pool_membership(window: Tensor, importance: Tensor, epochs: Tensor, K: int, policy: str) -> Tensor:
    """in_pool[b, e, m]: candidate m is in the pool once epochs[e] windows are complete.

    A candidate is present at epoch e if it is valid (window >= 0) and its window is
    complete (window < e); it is in the pool if fewer than K present candidates rank above
    it: newer ones (FIFO), or more important ones, the newer among equals (priority).
    Sorting the candidates by rank once makes that a cumulative count.
    """
    order = torch.argsort(window, dim=-1, descending=True, stable=True)        # newest first
    if policy == "priority":
        by_importance = torch.argsort(importance.gather(-1, order), dim=-1, descending=True, stable=True)
        order = order.gather(-1, by_importance)
    ranked_window = window.gather(-1, order)[:, None, :]                       # [B, 1, M]
    present = (ranked_window >= 0) & (ranked_window < epochs[None, :, None])   # [B, E, M]
    in_pool_ranked = present & (present.cumsum(-1) <= K)    # K or fewer present up to here: fewer than K ahead
    return torch.empty_like(in_pool_ranked).scatter_(-1, order[:, None, :].expand_as(present), in_pool_ranked)


def _compact(notes, window, importance, keep, K, open_acc, open_count, open_importance) -> NoteState:
    """The K-slot pool of the kept candidates, oldest first, empty slots last."""
    missing = K - keep.shape[1]
    if missing > 0:   # fewer candidates than slots (a chunk that starts a sequence)
        notes, keep = F.pad(notes, (0, 0, 0, missing)), F.pad(keep, (0, missing))
        window, importance = F.pad(window, (0, missing), value=-1), F.pad(importance, (0, missing))
    order = torch.argsort(keep.to(torch.int8), dim=1, descending=True, stable=True)[:, :K]
    keep = keep.gather(1, order)
    return NoteState(
        notes=torch.where(keep[..., None], notes.gather(1, order[..., None].expand(-1, -1, notes.shape[-1])), 0.0),
        window=torch.where(keep, window.gather(1, order), -1),
        importance=torch.where(keep, importance.gather(1, order), 0.0),
        open_acc=open_acc, open_count=open_count, open_importance=open_importance)


def _windows(t: Tensor, pad: tuple[int, int], W: int, fill) -> Tensor:
    """[B, T, ...] -> [B, n_windows, W, ...], padding `pad` tokens before and after with `fill`."""
    if any(pad):
        t = F.pad(t, (*[0, 0] * (t.dim() - 2), *pad), value=fill)
    return t.view(t.shape[0], -1, W, *t.shape[2:])


class MemoryAttention(nn.Module):
    """Multi-head attention from tokens' queries (width A) to the notes of one or more pools (width S)."""

    def __init__(self, summary_dim: int, attn_dim: int, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.kv_proj = nn.Linear(summary_dim, 2 * attn_dim, bias=False)
        self.out_proj = ResidualLinear(attn_dim, d_model)

    def forward(self, q: Tensor, views: list[PoolView], residual: Tensor, scale: Tensor | None = None) -> Tensor:
        """q [B, T, A] -> residual [B, T, D] + the attention's output, times `scale` ([B, T, 1] or a scalar) if
        given. Each token attends over its epoch's pool in every view (the union of pools); it adds 0 where they
        are all empty. Cost O(T K), not O(T M).
        """
        B, T, A = q.shape
        lead, width, n_epochs = views[0].lead, views[0].width, views[0].members.shape[1]
        H = self.heads
        # keys and values of every epoch's pool members: [B, n_epochs, sum K, 2A]
        kv = _cat([self.kv_proj(v.notes.to(q.dtype)).gather(
            1, v.members.flatten(1)[..., None].expand(-1, -1, 2 * A)).view(B, n_epochs, -1, 2 * A)
            for v in views], 2)
        valid = _cat([v.valid for v in views], -1)                              # [B, n_epochs, sum K]
        k, v = kv.view(B * n_epochs, -1, 2, H, A // H).permute(2, 0, 3, 1, 4)
        # queries laid out by epoch: [B * n_epochs, H, width, A / H]
        q = F.pad(q, (0, 0, lead, n_epochs * width - lead - T))
        q = q.view(B * n_epochs, width, H, A // H).transpose(1, 2)
        anything = valid.any(-1, keepdim=True)
        # An epoch with an empty pool attends everywhere (finite, no NaN) and is zeroed after.
        mask = torch.where(anything, valid, True).view(B * n_epochs, 1, 1, -1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = (out * anything.view(B * n_epochs, 1, 1, 1)).transpose(1, 2).reshape(B, n_epochs * width, A)
        out = out[:, lead:lead + T]
        # The projection is linear: scaling its A-wide input costs less than scaling its D-wide output.
        return self.out_proj(out if scale is None else out * scale, residual)


class ResidualLinear(nn.Linear):
    """residual + W x as one product (addmm): it writes one [..., out] tensor where a linear layer and an addition
    write two. A module of its own so that ZeRO-3 gathers its weight. Parameters as nn.Linear's, without bias."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        out = torch.addmm(residual.reshape(-1, residual.shape[-1]), x.reshape(-1, x.shape[-1]), self.weight.t())
        return out.view(residual.shape)


def _cat(tensors: list[Tensor], dim: int) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)
