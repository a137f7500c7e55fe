"""The selective scan h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t,  y_t = C_t . h_t.

`selective_scan` is the pure-PyTorch path (any device, differentiable by autograd);
`selective_scan_cuda` runs mamba_ssm's fused kernel (model/scan_kernel.py), which has no initial state of its
own: since the recurrence is linear in h, the state an input starts from only adds
C_t . (exp(A cumsum(dt))_t * h0) to the outputs (`initial_state_contribution`), the term
sequence parallelism uses as well.

Layouts and options follow mamba_ssm's `selective_scan_fn`: x, dt [B, E, T]; A [E, N];
B, C [B, N, T]; states [B, E, N]; with `dt_softplus` the step size is softplus(dt), and `D`
adds the skip connection D * x to y. The scan always computes in fp32.

Under torch.compile (`train.compile`) the kernel is one node of a layer's graph; the PyTorch scan runs as it
is, outside the compiled graphs: its loops would unroll into a graph of thousands of nodes that takes
minutes to compile.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from model.scan_kernel import selective_scan_kernel


def step_size(dt: Tensor, dt_softplus: bool) -> Tensor:
    """The step size, in fp32 or wider: softplus(dt) or dt."""
    dt = dt.to(torch.promote_types(dt.dtype, torch.float32))
    return F.softplus(dt) if dt_softplus else dt


@torch.compiler.disable
def selective_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   dt_softplus: bool = False, h0: Tensor | None = None, chunk_size: int | None = None
                   ) -> tuple[Tensor, Tensor]:
    """Chunked two-level scan. Returns (y [B, E, T], final state [B, E, N]), both fp32.

    The sequence is cut into chunks of L tokens, all scanned at once: a loop over the L
    positions finds where each chunk would end from a zero state, a loop over the chunks
    passes the true start states along (a chunk's decay is exp(A * sum(dt))), and a second
    loop over the positions produces the outputs from those start states. That is
    T/L + 2L Python steps instead of T, with L about sqrt(T).
    """
    batch, E, T = x.shape
    N = A.shape[1]
    L = chunk_size or min(128, max(16, 2 ** round(math.log2(math.sqrt(T)))))
    n_chunks = -(-T // L)

    # [B, n_chunks, L, ...], with channels contiguous: every step below is elementwise across channels, and
    # the inputs come with time contiguous (the kernels' layout). Padding with dt = 0 makes identity steps.
    # Per-step tensors come from unbind, not indexing: its backward is one stack, not L zero-filled copies.
    dtype = torch.promote_types(x.dtype, torch.float32)
    x_in, dt = x, step_size(dt, dt_softplus).to(dtype)
    x, A, B, C = (t.to(dtype) for t in (x, A, B, C))
    chunked = lambda t: F.pad(t, (0, n_chunks * L - T)).view(*t.shape[:-1], n_chunks, L).movedim(-3, -1).contiguous()
    dt, dtx, B, C = chunked(dt), chunked(dt * x), chunked(B), chunked(C)    # [B, n_chunks, L, E or N]
    a = torch.exp(dt[..., None] * A).unbind(2)                                # L x [B, n_chunks, E, N]
    bx = (dtx[..., None] * B[..., None, :]).unbind(2)

    h = torch.zeros_like(bx[0])
    for a_i, bx_i in zip(a, bx):
        h = a_i * h + bx_i
    end_from_zero = h.unbind(1)
    decay = torch.exp(dt.sum(2)[..., None] * A).unbind(1)

    h = x.new_zeros(batch, E, N) if h0 is None else h0.to(dtype)
    starts = []
    for decay_k, end_k in zip(decay, end_from_zero):
        starts.append(h)
        h = decay_k * h + end_k
    h_last = h

    h = torch.stack(starts, 1)                                       # [B, n_chunks, E, N]
    ys = []
    for a_i, bx_i, c_i in zip(a, bx, C.unbind(2)):
        h = a_i * h + bx_i
        ys.append((h * c_i[:, :, None]).sum(-1))
    y = torch.stack(ys, 2).flatten(1, 2)[:, :T].transpose(1, 2)     # [B, E, T]
    if D is not None:
        y = y + D.to(dtype)[:, None] * x_in.to(dtype)
    return y, h_last


def initial_state_contribution(dt: Tensor, A: Tensor, C: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
    """What starting from h0 instead of zero adds: (to y [B, E, T], to the final state).

    y_t gains sum_n C_t[n] exp(A[e, n] * cumsum(dt)_t[e]) h0[e, n]; the final state gains
    exp(A * sum(dt)) * h0.
    """
    # The decay is [B, E, T, N] in fp32, N times the layer's widest activation, and autograd would keep it and
    # its product with h0 for the backward: 1.5 GiB a layer for 4,000 tokens at 200m. Recomputing them there
    # costs a few elementwise passes and keeps only the inputs.
    return checkpoint(_initial_state_contribution, dt, A, C, h0, use_reentrant=False)


def _initial_state_contribution(dt: Tensor, A: Tensor, C: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
    dtype = torch.promote_types(dt.dtype, torch.float32)
    dt, A, C, h0 = (t.to(dtype) for t in (dt, A, C, h0))
    decay = torch.exp(dt.cumsum(-1)[..., None] * A[:, None, :])      # [B, E, T, N]
    y = torch.einsum("betn,ben,bnt->bet", decay, h0, C)
    return y, decay[:, :, -1] * h0


def selective_scan_cuda(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                        dt_softplus: bool = False, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """mamba_ssm's fused kernel with the contract of `selective_scan`; y comes in x's dtype.

    The kernel returns its final state without a gradient, yet chunked training and sequence
    parallelism backpropagate through it. So the state is also read out through the kernel's
    differentiable output: N more steps that leave h as it is (step size 0, which softplus
    gives for -1e4) with C the unit vectors make y at those steps the rows of h. The value is
    the kernel's fp32 state; the gradient flows through the read-out.
    """
    batch, _, T = x.shape
    N = A.shape[1]
    dt, B, C = (t.to(x.dtype) for t in (dt, B, C))
    no_step = -1e4 if dt_softplus else 0.0
    unit_vectors = torch.eye(N, dtype=x.dtype, device=x.device).expand(batch, N, N)
    D = A.new_zeros(A.shape[0]) if D is None else D.float()
    y, h_last = selective_scan_kernel(
        F.pad(x, (0, N)), F.pad(dt, (0, N), value=no_step), A.float(), F.pad(B, (0, N)),
        torch.cat([C, unit_vectors], -1), D, delta_softplus=dt_softplus)
    y, h_read = y[..., :T], y[..., T:].float()
    h_last = h_last + (h_read - h_read.detach())
    if h0 is not None:
        y_h0, h_last_h0 = initial_state_contribution(step_size(dt, dt_softplus), A, C, h0)
        y, h_last = y.float() + y_h0, h_last + h_last_h0
    return y, h_last


def selective_scan_gated_cuda(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor
                              ) -> Tensor:
    """(scan from the zero state + D x) * silu(z) with softplus step sizes, in one kernel; no state out.

    What a training forward over whole sequences needs, as fused as mamba_ssm's own Mamba.
    """
    dt, B, C, z = (t.to(x.dtype) for t in (dt, B, C, z))
    return selective_scan_kernel(x, dt, A.float(), B, C, D.float(), z, delta_softplus=True)[0]

