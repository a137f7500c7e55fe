"""Slow, obviously-correct references that the fast paths are tested against."""
import math

import torch
import torch.nn.functional as F


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


def memmamba_lm_reference(weights, config, input_ids):
    """Logits of a MemMamba, written from ../shared/docs/memmamba-design.md one token at a time.

    `weights` holds plain tensors: "embedding", "norm_f", "lm_head" and per layer a dict with "norm",
    "mixer" (mamba_ssm names), "importance" and "state_gate" (weight [D], bias), "note" [S, D], the
    attentions "token" and "layer" (each with "q" [A, D], "k" and "v" [A, S], "out" [D, A]) and the
    fusion: "fusion_weight" [2], or "fusion_gate" (weight [2, D], bias [2]).
    """
    W, K, g = config.note_window, config.pool_size, config.cross_layer_span
    batch, T = input_ids.shape
    x = weights["embedding"][input_ids]
    pools_of_layers = []        # per layer, per batch item, per token t: the pool at t, a list of notes
    for l, w in enumerate(weights["layers"]):
        u = rms_norm(x, w["norm"], config.norm_eps)
        # notes of the complete windows, from their kept tokens; a window that keeps none makes none
        importance = torch.sigmoid(u @ w["importance"][0] + w["importance"][1])      # [B, T]
        value = importance[..., None] * (u @ w["note"].T)                           # [B, T, S]
        windows = []   # per batch item: (window index, note, max importance) of the complete windows
        for b in range(batch):
            made = []
            for j in range(T // W):
                kept = [t for t in range(j * W, (j + 1) * W) if importance[b, t] > config.tau1]
                if not kept:
                    continue
                values = torch.stack([value[b, t] for t in kept])
                note = values.max(0).values if config.pooling == "max" else values.mean(0)
                # priority ranks importances rounded to 3 decimals (model/notes.py: the forms' last bits differ)
                made.append((j, note, max(float(torch.round(importance[b, t].detach(), decimals=3)) for t in kept)))
            windows.append(made)
        pools = []
        for b in range(batch):
            per_token = []
            for t in range(T):
                complete = [n for n in windows[b] if (n[0] + 1) * W - 1 <= t]
                if config.pool_policy == "fifo":
                    chosen = complete[-K:]
                else:   # the K most important, ties to the newer
                    chosen = sorted(complete, key=lambda n: (n[2], n[0]))[-K:]
                per_token.append([n[1] for n in chosen])
            pools.append(per_token)
        pools_of_layers.append(pools)

        xbar = torch.empty_like(u)
        cross_layer = (l + 1) % config.cross_layer_every == 0
        for b in range(batch):
            for t in range(T):
                gate = torch.sigmoid(u[b, t] @ w["state_gate"][0] + w["state_gate"][1])
                pool = pools[b][t]
                c_tok = torch.zeros_like(u[b, t])
                if gate > config.tau2 and pool:
                    c_tok = gate * _attention(u[b, t], pool, w["token"], config.attn_heads)
                c_lay = torch.zeros_like(u[b, t])
                if cross_layer:
                    union = [n for pools_k in pools_of_layers[-g:] for n in pools_k[b][t]]
                    if union:
                        c_lay = _attention(u[b, t], union, w["layer"], config.attn_heads)
                if config.fusion == "weighted":
                    a_tok, a_lay = w["fusion_weight"]
                elif config.fusion == "gated":
                    a_tok, a_lay = torch.sigmoid(w["fusion_gate"][0] @ u[b, t] + w["fusion_gate"][1])
                else:
                    a_tok = a_lay = 1.0
                xbar[b, t] = u[b, t] + a_tok * c_tok + a_lay * c_lay
        x = x + mamba_mixer_reference(xbar, w["mixer"])
    return rms_norm(x, weights["norm_f"], config.norm_eps) @ weights["lm_head"].T


def _attention(u, notes, w, heads):
    """Multi-head attention of one token u [D] over notes (a list of [S])."""
    notes = torch.stack(notes)                                           # [n, S]
    q = (w["q"] @ u).view(heads, -1)                                     # [H, A/H]
    k, v = (notes @ w["k"].T).view(len(notes), heads, -1), (notes @ w["v"].T).view(len(notes), heads, -1)
    scores = torch.einsum("hd,nhd->hn", q, k) / q.shape[-1] ** 0.5
    out = torch.einsum("hn,nhd->hd", scores.softmax(-1), v).reshape(-1)
    return w["out"] @ out


def transformer_lm_reference(model, input_ids):
    """Logits of the Transformer baseline (model/transformer.py) from its equations: rotary positions as complex
    rotations, and each token's causal attention as an explicit softmax over the tokens up to it."""
    config = model.config
    H = config.n_head
    x = model.embedding.weight[input_ids]
    batch, T, D = x.shape
    d = D // H
    angles = torch.arange(T)[:, None] * config.rope_base ** (-torch.arange(0, d, 2) / d)     # [T, d/2]
    rotation = torch.polar(torch.ones_like(angles), angles)

    def rotate(t):   # [B, T, H, d], channels (2i, 2i + 1) as one complex number
        return torch.view_as_real(torch.view_as_complex(t.reshape(batch, T, H, d // 2, 2))
                                  * rotation[None, :, None]).reshape(batch, T, H, d)

    for block in model.layers:
        q, k, v = (rms_norm(x, block.norm1.weight, config.norm_eps) @ block.qkv.weight.T).split(D, -1)
        q, k, v = rotate(q.view(batch, T, H, d)), rotate(k.view(batch, T, H, d)), v.view(batch, T, H, d)
        out = torch.empty(batch, T, H, d)
        for t in range(T):
            scores = torch.einsum("bhd,bshd->bhs", q[:, t], k[:, :t + 1]) / math.sqrt(d)
            out[:, t] = torch.einsum("bhs,bshd->bhd", scores.softmax(-1), v[:, :t + 1])
        x = x + out.reshape(batch, T, D) @ block.proj.weight.T
        hidden = F.gelu(rms_norm(x, block.norm2.weight, config.norm_eps) @ block.fc.weight.T)
        x = x + hidden @ block.fc_out.weight.T
    return rms_norm(x, model.norm_f.weight, config.norm_eps) @ model.lm_head.weight.T
