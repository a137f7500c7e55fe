"""Slow, obviously-correct references that the fast paths are tested against."""
import torch


def selective_scan_sequential(x, dt, A, B, C, D=None, dt_softplus=False, h0=None):
    """One token at a time: h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t,  y_t = C_t . h_t + D x_t."""
    batch, E, T = x.shape
    if dt_softplus:
        dt = torch.log1p(torch.exp(dt))
    h = torch.zeros(batch, E, A.shape[1], dtype=x.dtype) if h0 is None else h0
    ys = []
    for t in range(T):
        h = torch.exp(dt[:, :, t, None] * A) * h + dt[:, :, t, None] * B[:, None, :, t] * x[:, :, t, None]
        y = (h * C[:, None, :, t]).sum(-1)
        ys.append(y if D is None else y + D * x[:, :, t])
    return torch.stack(ys, -1), h


def rms_norm(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def mamba_mixer_reference(u, w):
    """Mamba-1 mixer from raw weights (mamba_ssm names), one token at a time. u [B, T, D]."""
    import torch.nn.functional as F
    x, z = (u @ w["in_proj.weight"].T).chunk(2, -1)                 # [B, T, E]
    K = w["conv1d.weight"].shape[-1]
    padded = F.pad(x, (0, 0, K - 1, 0))
    x = sum(padded[:, k:k + x.shape[1]] * w["conv1d.weight"][:, 0, k] for k in range(K)) + w["conv1d.bias"]
    x = F.silu(x)
    dt_rank = w["dt_proj.weight"].shape[1]
    N = w["A_log"].shape[1]
    dt, B, C = (x @ w["x_proj.weight"].T).split([dt_rank, N, N], -1)
    dt = F.softplus(dt @ w["dt_proj.weight"].T + w["dt_proj.bias"])
    A = -torch.exp(w["A_log"])
    y, _ = selective_scan_sequential(x.transpose(1, 2), dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2))
    y = (y.transpose(1, 2) + w["D"] * x) * F.silu(z)
    return y @ w["out_proj.weight"].T


def mamba_lm_reference(sd, input_ids, n_layer):
    """Logits of a mamba_ssm-format MambaLMHeadModel state dict, written from its equations."""
    x = sd["backbone.embedding.weight"][input_ids]
    for i in range(n_layer):
        prefix = f"backbone.layers.{i}."
        mixer = {k.removeprefix(prefix + "mixer."): v for k, v in sd.items() if k.startswith(prefix + "mixer.")}
        x = x + mamba_mixer_reference(rms_norm(x, sd[prefix + "norm.weight"]), mixer)
    x = rms_norm(x, sd["backbone.norm_f.weight"])
    return x @ sd.get("lm_head.weight", sd["backbone.embedding.weight"]).T
