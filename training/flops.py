"""Model FLOPs per token, peak FLOP/s per device, and MFU.

Counts are of the model's arithmetic, not of what an implementation happens to run: a multiply-add is 2 FLOPs,
a training token costs 3x its forward FLOPs (the backward pass is twice the forward), and recomputation for
activation checkpointing is not counted (the PaLM convention for MFU). Attention counts the keys a token may
see: the causal half of the sequence in the Transformer, at most K notes (g x K across layers) in MemMamba.
Elementwise work other than the selective scan (norms, activations, gating) is left out.
"""
from __future__ import annotations

import re
import time

import torch

from model import MemMambaConfig, TransformerConfig

# 9 FLOPs per (channel, state) and token: exp(dt A), dt B x, the update of h, and C . h (the Mamba paper's count).
SCAN_FLOPS = 9

# Dense bf16 tensor-core peak per device, from the vendors' datasheets (no sparsity). Longer names are matched
# first, so "H100 PCIe" wins over "H100"; a name followed by a digit is another GPU ("A100" is not the RTX A1000).
PEAK_BF16_FLOPS = {
    "RTX 4090": 165.2e12,
    "A100": 312e12,
    "A800": 312e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "H800 PCIe": 756e12,
    "H800": 989e12,
    "H200": 989e12,
}


def forward_flops_per_token(config: MemMambaConfig | TransformerConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of a sequence of seq_len tokens: {"dense", "scan", "attention"}.

    "dense" is every weight matmul (the depthwise conv and the LM head included), the part a FLOP counter
    sees as matmuls and convolutions.
    """
    D, V = config.d_model, config.vocab_size
    if isinstance(config, TransformerConfig):
        F = config.mlp_ratio * D
        dense = config.n_layer * 2 * (3 * D * D + D * D + 2 * D * F)
        attention = config.n_layer * 2 * 2 * D * (seq_len + 1) / 2      # q.k and p.v over the causal half
        return {"dense": dense + 2 * D * V, "scan": 0.0, "attention": attention}

    E, N, R = config.d_inner, config.d_state, config.dt_rank_value
    mixer = 2 * (D * 2 * E + E * config.d_conv + E * (R + 2 * N) + R * E + E * D)
    dense, attention = config.n_layer * mixer, 0.0
    if config.notes:
        A, S, K = config.attn_dim, config.summary_dim, config.pool_size
        notes_per_token = 1 / config.note_window            # each note's keys and values are made once
        note_taking = 2 * (D + D * S)                       # I_token and N^l
        read = 2 * (D + 2 * D * A + 2 * S * A * notes_per_token)   # I_state, q/out projections, k/v of notes
        for layer in range(config.n_layer):
            dense += note_taking + read
            attention += 2 * 2 * A * K
            if config.has_cross_layer(layer):
                g = config.cross_layer_span
                dense += 2 * (2 * D * A + 2 * S * A * g * notes_per_token)
                attention += 2 * 2 * A * g * K
    scan = config.n_layer * SCAN_FLOPS * E * N
    return {"dense": dense + 2 * D * V, "scan": scan, "attention": attention}


def train_flops_per_token(config: MemMambaConfig | TransformerConfig, seq_len: int) -> float:
    return 3 * sum(forward_flops_per_token(config, seq_len).values())


def peak_flops(device: torch.device) -> float | None:
    """The datasheet bf16 peak of a known GPU, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if re.search(re.escape(key) + r"(?!\d)", name):
            return PEAK_BF16_FLOPS[key]
    return None


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048,
                       seconds: float = 0.5) -> float:
    """FLOP/s of a large square matmul: the peak to take MFU against on a device with no datasheet entry."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    _synchronize(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        _synchronize(device)
    return 2 * size ** 3 * count / (time.perf_counter() - start)


def mfu(tokens_per_second: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilisation of one device, in [0, 1]."""
    return tokens_per_second * flops_per_token / peak


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
