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
from model.scan import cuda_scan_available, initial_state_contribution, selective_scan, selective_scan_cuda
from model.state import MixerState


class Mamba(nn.Module):
    def __init__(self, config: MemMambaConfig, dt_min=1e-3, dt_max=0.1, dt_init_floor=1e-4):
        super().__init__()
        D, E, N = config.d_model, config.d_inner, config.d_state
        self.d_inner, self.d_state, self.d_conv, self.dt_rank = E, N, config.d_conv, config.dt_rank_value
        self.in_proj = nn.Linear(D, 2 * E, bias=False)
        self.conv1d = nn.Conv1d(E, E, config.d_conv, groups=E, bias=True)
        self.x_proj = nn.Linear(E, self.dt_rank + 2 * N, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, E, bias=True)
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

    def forward(self, u: Tensor, state: MixerState, sp=None) -> tuple[Tensor, MixerState]:
        """u [B, T, D] -> (out [B, T, D], state after the last token).

        With `sp` (a model.sequence_parallel.SequenceParallel), `state` is ignored: the
        conv halo and the SSM initial state come from the earlier ranks of the group.
        """
        xz = self.in_proj(u).transpose(1, 2)                            # [B, 2E, T]
        x, z = xz.chunk(2, dim=1)
        conv_in = torch.cat([state.conv.to(x.dtype) if sp is None else sp.conv_halo(x, self.d_conv - 1), x], -1)
        x = F.silu(self.conv1d(conv_in))
        new_conv = conv_in[..., conv_in.shape[-1] - (self.d_conv - 1):]

        dt, B, C = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], -1)
        dt = F.softplus(self.dt_proj(dt).float()).transpose(1, 2)       # [B, E, T]
        B, C = B.transpose(1, 2), C.transpose(1, 2)                     # [B, N, T]
        A = -torch.exp(self.A_log.float())

        scan = selective_scan_cuda if self._use_cuda(x) else selective_scan
        if sp is None:
            y, h_last = scan(x, dt, A, B, C, h0=state.ssm)
        else:
            y, h_last = scan(x, dt, A, B, C)
            h0 = sp.ssm_initial_state(h_last, torch.exp(A * dt.float().sum(-1, keepdim=True)))
            y_h0, h_last_h0 = initial_state_contribution(dt, A, C, h0)
            y, h_last = y + y_h0, h_last + h_last_h0
        y = (y + self.D.float()[:, None] * x.float()) * F.silu(z.float())
        out = self.out_proj(y.transpose(1, 2).to(u.dtype))
        return out, MixerState(conv=new_conv, ssm=h_last)

    def step(self, u: Tensor, state: MixerState) -> tuple[Tensor, MixerState]:
        """One token: u [B, D] -> (out [B, D], new state). O(1) in the position."""
        x, z = self.in_proj(u).chunk(2, dim=-1)                         # [B, E]
        window = torch.cat([state.conv.to(x.dtype), x[:, :, None]], -1)  # [B, E, d_conv]
        x = F.silu((window * self.conv1d.weight[:, 0]).sum(-1) + self.conv1d.bias)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], -1)
        dt = F.softplus(self.dt_proj(dt).float())                       # [B, E]
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
