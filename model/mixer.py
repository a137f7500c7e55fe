"""The selective SSM mixer in the Mamba-1 layout, with an initial state in and a final state out.

Parameter names and initialisation follow mamba_ssm's `Mamba` so that public checkpoints
load as they are (see model/mamba_import.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ConfigError, MemMambaConfig
from model.scan import (initial_state_contribution, selective_scan, selective_scan_cuda, selective_scan_gated_cuda,
                        step_size)
from model.scan_kernel import cuda_scan_available
from model.state import MixerState

try:  # optional fast path, CUDA only
    from causal_conv1d import causal_conv1d_fn
except ImportError:
    causal_conv1d_fn = None


class Mamba(nn.Module):
    def __init__(self, config: MemMambaConfig, dt_min=1e-3, dt_max=0.1, dt_init_floor=1e-4):
        super().__init__()
        D, E, N = config.d_model, config.d_inner, config.d_state
        self.d_inner, self.d_state, self.d_conv, self.dt_rank = E, N, config.d_conv, config.dt_rank_value
        self.in_proj = ChannelsFirstLinear(D, 2 * E, bias=False)
        self.conv1d = CausalConv1d(E, E, config.d_conv, groups=E, bias=True)
        self.x_proj = ChannelsFirstLinear(E, self.dt_rank + 2 * N, bias=False)
        self.dt_proj = ChannelsFirstLinear(self.dt_rank, E, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1))
        self.D = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, D, bias=False)

        # dt starts log-uniform in [dt_min, dt_max]: the bias is softplus^-1 of it
        with torch.no_grad():
            nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
            dt = torch.exp(torch.rand(E) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_init_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # SSM dynamics are not regularised towards zero
        for p in (self.A_log, self.D, self.dt_proj.bias):
            p._no_weight_decay = True
        self.dt_proj.bias._no_reinit = True

        if config.backend == "cuda" and not cuda_scan_available():
            raise ConfigError("model.backend='cuda' needs a CUDA GPU and the mamba_ssm package "
                              "(pip install -r requirements-cuda.txt); use 'auto' or 'torch'")
        self.backend = config.backend

    def forward(self, u: Tensor, state: MixerState | None, sp=None, final_state: bool = True
                ) -> tuple[Tensor, MixerState | None]:
        """u [B, T, D] -> (out [B, T, D], state after the last token, or None without `final_state`).

        `state` None starts from zero, which spares the kernel path the initial-state term; with
        neither a state in nor one out, the kernel fuses the gate as well.
        With `sp` (a model.sequence_parallel.SequenceParallel), `state` is ignored: the
        conv halo and the SSM initial state come from the earlier ranks of the group.
        """
        x, z = self.in_proj(u.transpose(1, 2)).chunk(2, dim=1)          # [B, E, T] each
        if sp is not None:
            halo = sp.conv_halo(x, self.d_conv - 1)
        else:
            halo = None if state is None else state.conv.to(x.dtype)
        use_cuda = self._use_cuda(x)
        if final_state:
            # the last d_conv - 1 inputs, copied out: a view would keep all of x alive in the carried state
            k, T = self.d_conv - 1, x.shape[-1]
            before = x.new_zeros(*x.shape[:-1], k) if halo is None else halo
            tail = torch.cat([before, x[..., max(T - k, 0):]], -1)
            new_conv = tail[..., tail.shape[-1] - k:].contiguous()
        x = self.conv1d(x, halo, use_cuda)

        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], 1)   # B, C: [B, N, T]
        dt = self.dt_proj(dt)                                           # [B, E, T]; softplus in the scan
        A = -torch.exp(self.A_log.float())

        h0 = None if state is None or sp is not None else state.ssm
        if use_cuda and h0 is None and sp is None and not final_state:
            y = selective_scan_gated_cuda(x, dt, A, B, C, self.D, z)
            return self.out_proj(y.transpose(1, 2).to(u.dtype)), None
        scan = selective_scan_cuda if use_cuda else selective_scan
        y, h_last = scan(x, dt, A, B, C, D=self.D, dt_softplus=True, h0=h0)
        if sp is not None:
            step = step_size(dt, dt_softplus=True)
            h0 = sp.ssm_initial_state(h_last, torch.exp(A * step.sum(-1, keepdim=True)))
            y_h0, h_last_h0 = initial_state_contribution(step, A, C, h0)
            y, h_last = y.float() + y_h0, h_last + h_last_h0
        y = y * F.silu(z.to(y.dtype))
        out = self.out_proj(y.transpose(1, 2).to(u.dtype))
        return out, MixerState(conv=new_conv, ssm=h_last) if final_state else None

    def step(self, u: Tensor, state: MixerState) -> tuple[Tensor, MixerState]:
        """One token: u [B, D] -> (out [B, D], new state). O(1) in the position."""
        x, z = self.in_proj(u[:, :, None])[..., 0].chunk(2, dim=-1)     # [B, E]: a sequence of one token
        window = torch.cat([state.conv.to(x.dtype), x[:, :, None]], -1)  # [B, E, d_conv]
        x = F.silu((window * self.conv1d.weight[:, 0]).sum(-1) + self.conv1d.bias)
        dt, B, C = self.x_proj(x[:, :, None])[..., 0].split([self.dt_rank, self.d_state, self.d_state], -1)
        dt = F.softplus(self.dt_proj(dt[:, :, None])[..., 0].float())   # [B, E]
        A = -torch.exp(self.A_log.float())
        h = torch.exp(dt[:, :, None] * A) * state.ssm + (dt * x.float())[:, :, None] * B.float()[:, None, :]
        y = (h * C.float()[:, None, :]).sum(-1) + self.D.float() * x.float()
        y = y * F.silu(z.float())
        return self.out_proj(y.to(u.dtype)), MixerState(conv=window[:, :, 1:], ssm=h)

    def allocate_state(self, batch_size: int, device=None, dtype=None) -> MixerState:
        # sizes from the config, not from parameter shapes, which ZeRO-3 partitions
        device = device or self.D.device
        return MixerState(
            conv=torch.zeros(batch_size, self.d_inner, self.d_conv - 1, device=device,
                             dtype=dtype or self.in_proj.weight.dtype),
            ssm=torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=torch.float32))

    def _use_cuda(self, x: Tensor) -> bool:
        return self.backend != "torch" and x.is_cuda and cuda_scan_available()


class ChannelsFirstLinear(nn.Linear):
    """A linear layer across the channels of x [B, in, T] -> [B, out, T], the layout of the conv and the scan.

    One product W x over all B * T tokens, so that time is the output's contiguous axis and the kernels read it
    as it is; nn.Linear's [B, T, out] would be copied into their layout by their wrappers (mamba_ssm's Mamba
    computes in_proj as W x for the same reason). x is read where it lies, without a copy, when B == 1 or its
    tokens are evenly spaced in memory: a [B, T, in] tensor transposed, or this layer's own output. Parameters
    as nn.Linear's.
    """

    def forward(self, x: Tensor) -> Tensor:
        batch, _, T = x.shape
        tokens = x.transpose(0, 1).reshape(x.shape[1], batch * T)       # [in, B * T]
        out = self.weight @ tokens if self.bias is None else torch.addmm(self.bias[:, None], self.weight, tokens)
        return out.view(-1, batch, T).transpose(0, 1)


class CausalConv1d(nn.Conv1d):
    """Causal depthwise conv + SiLU of x [B, E, T] after `halo`, the d_conv - 1 inputs before it (None: zeros).

    A module of its own so that ZeRO-3 gathers its weights for the causal_conv1d kernel as well.
    """

    def forward(self, x: Tensor, halo: Tensor | None, use_kernel: bool = False) -> Tensor:
        if use_kernel and causal_conv1d_fn is not None:
            return self._kernel(x, halo)
        x = F.pad(x, (self.kernel_size[0] - 1, 0)) if halo is None else torch.cat([halo, x], -1)
        return F.silu(super().forward(x))

    def _kernel(self, x: Tensor, halo: Tensor | None) -> Tensor:
        if halo is None:
            return causal_conv1d_fn(x, self.weight[:, 0], self.bias, activation="silu")
        # The halo leads the input, so the kernel needs no initial state of its own; its outputs are
        # dropped, and the rest copied so that the scan kernel's vector loads find aligned rows.
        out = causal_conv1d_fn(torch.cat([halo, x], -1), self.weight[:, 0], self.bias, activation="silu")
        return out[..., halo.shape[-1]:].contiguous()
