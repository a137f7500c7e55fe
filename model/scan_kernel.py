"""mamba_ssm's selective-scan CUDA kernel as PyTorch operators, so that torch.compile traces through it.

mamba_ssm calls its extension from a torch.autograd.Function. The compiler cannot look inside an extension
call, so there every scan ends a compiled graph and starts another (a graph break), and nothing on either
side of the scan fuses across it. Registered as operators with their output shapes (`register_fake`) and
their backward (`register_autograd`), the forward and backward kernels are single nodes of the layer's
graphs, as a matmul is.

The extension is called as mamba_ssm's `selective_scan_fn` calls it, without a dt bias (the mixer adds it
in dt_proj's product). Inputs with time not contiguous are copied first, as there; the compiler hands custom
operators their inputs in the strides they were traced with.
"""
from typing import List, Optional   # the spelling of types that every torch.library version reads in a signature

import torch
from torch import Tensor

try:  # optional fast path, CUDA only: the extension that mamba_ssm builds
    import selective_scan_cuda as extension
except ImportError:
    extension = None

KERNEL_CHUNK = 2048   # the kernel keeps the state at the end of every 2048 steps for its backward


def selective_scan_kernel(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
                          z: Optional[Tensor] = None, delta_softplus: bool = False) -> tuple[Tensor, Tensor]:
    """The kernel on u, delta, z [B, E, T]; A [E, N] fp32; B, C [B, N, T]; D [E] fp32.

    Returns (y, final state [B, E, N] in fp32, without gradient); y = scan + D u, times silu(z) if z is given.
    """
    u, delta, B, C, z = (t if t is None or t.stride(-1) == 1 else t.contiguous() for t in (u, delta, B, C, z))
    out, chunk_states, *gated = torch.ops.memmamba.selective_scan_fwd(
        u, delta, A, B[:, None], C[:, None], D, z, delta_softplus)    # B, C: one group
    # the kernel keeps pairs along the last axis, the state second (where mamba_ssm reads its last state)
    return (gated[0] if gated else out), chunk_states[:, :, -1, 1::2].detach()


@torch.library.custom_op("memmamba::selective_scan_fwd", mutates_args=(), device_types="cuda")
def _forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Optional[Tensor],
             delta_softplus: bool) -> List[Tensor]:
    """-> [out, chunk states, out * silu(z) if z is given]"""
    return extension.fwd(u, delta, A, B, C, D, z, None, delta_softplus)


@_forward.register_fake
def _(u, delta, A, B, C, D, z, delta_softplus):
    n_chunks = -(-u.shape[-1] // KERNEL_CHUNK)
    chunk_states = u.new_empty(*u.shape[:2], n_chunks, 2 * A.shape[1], dtype=A.dtype)
    return [torch.empty_like(delta), chunk_states] + ([] if z is None else [torch.empty_like(z)])


@torch.library.custom_op("memmamba::selective_scan_bwd", mutates_args=(), device_types="cuda")
def _backward_kernel(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Optional[Tensor],
                     dout: Tensor, chunk_states: Tensor, out: Optional[Tensor], delta_softplus: bool) -> List[Tensor]:
    """-> [du, ddelta, dA, dB, dC, dD, dz if z is given]"""
    du, ddelta, dA, dB, dC, dD, _, *dz = extension.bwd(
        u, delta, A, B, C, D, z, None, dout, chunk_states, out, None, delta_softplus, False)
    return [du, ddelta, dA, dB, dC, dD, *dz]


@_backward_kernel.register_fake
def _(u, delta, A, B, C, D, z, dout, chunk_states, out, delta_softplus):
    return [torch.empty_like(t) for t in (u, delta, A, B, C, D)] + ([] if z is None else [torch.empty_like(z)])


def _save(ctx, inputs, output):
    u, delta, A, B, C, D, z, ctx.delta_softplus = inputs
    # with z, the backward needs the ungated output as well
    ctx.save_for_backward(u, delta, A, B, C, D, z, output[1], None if z is None else output[0])


def _backward(ctx, grads):
    u, delta, A, B, C, D, z, chunk_states, out = ctx.saved_tensors
    dout = grads[0] if z is None else grads[2]
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    du, ddelta, dA, dB, dC, dD, *dz = torch.ops.memmamba.selective_scan_bwd(
        u, delta, A, B, C, D, z, dout, chunk_states, out, ctx.delta_softplus)
    return du, ddelta, dA, dB, dC, dD, (dz[0] if dz else None), None


_forward.register_autograd(_backward, setup_context=_save)


def cuda_scan_available() -> bool:
    return extension is not None and torch.cuda.is_available()
