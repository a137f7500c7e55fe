"""Forward+backward time and peak memory vs sequence length, on the CPU.

MemMamba, plain Mamba (the same config, notes off) and the Transformer baseline of matched
size, at T = 1k .. 32k, batch 1. Targets: MemMamba's time per token stays flat
(t(32k)/t(4k) <= 8 x 1.25), MemMamba costs at most 1.3x plain Mamba at 8k, memory grows
linearly.

    python bench/model_scaling.py [--sizes tiny mid] [--lengths 1024 2048 ...]
"""
from __future__ import annotations

import argparse

from harness import machine, measure

MID = {"d_model": 192, "n_layer": 6, "d_state": 16, "vocab_size": 1024, "summary_dim": 64,
       "pool_size": 50, "note_window": 64, "attn_dim": 256, "attn_heads": 4}
MID_TRANSFORMER = {"arch": "transformer", "d_model": 192, "n_layer": 5, "n_head": 6, "vocab_size": 1024}
MODELS = {
    "tiny": {"MemMamba": {"size": "tiny"}, "Mamba": {"size": "tiny", "notes": False},
             "Transformer": {"arch": "transformer", "size": "tiny"}},
    "mid": {"MemMamba": MID, "Mamba": {**MID, "notes": False}, "Transformer": MID_TRANSFORMER},
}


def train_step(section: dict, T: int, checkpointing: bool):
    import torch
    from model import build_model
    from training.loss import lm_loss
    torch.manual_seed(0)
    model = build_model(section)
    model.gradient_checkpointing = checkpointing
    window = torch.randint(0, model.config.vocab_size, (1, T + 1))

    def step():
        lm_loss(model, window).backward()
        model.zero_grad(set_to_none=True)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=list(MODELS))
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384, 32768])
    args = parser.parse_args()
    print(f"# model_scaling on {machine()}\n")
    for size in args.sizes:
        # the mid size keeps one layer's activations at a time, as a long training run would
        checkpointing = size == "mid"
        print(f"## {size} (batch 1, forward+backward{', activation checkpointing' if checkpointing else ''})\n")
        print("| model | params | T | seconds | us/token | peak MB |")
        print("|---|---|---|---|---|---|")
        results = {}
        for name, section in MODELS[size].items():
            from model import build_model
            params = sum(p.numel() for p in build_model(section).parameters())
            for T in args.lengths:
                r = measure(train_step, section=section, T=T, checkpointing=checkpointing)
                results[name, T] = r
                if "error" in r:
                    print(f"| {name} | {params / 1e6:.2f}M | {T} | {r['error']} | | |", flush=True)
                else:
                    print(f"| {name} | {params / 1e6:.2f}M | {T} | {r['seconds']:.2f} | "
                          f"{r['seconds'] / T * 1e6:.0f} | {r['peak_mb']:.0f} |", flush=True)
        _targets(results, args.lengths)


def _targets(results: dict, lengths: list[int]) -> None:
    def per_token(name, T):
        r = results.get((name, T), {})
        return r["seconds"] / T if "seconds" in r else None
    print()
    if 4096 in lengths and 32768 in lengths and per_token("MemMamba", 4096) and per_token("MemMamba", 32768):
        ratio = per_token("MemMamba", 32768) / per_token("MemMamba", 4096)
        print(f"- MemMamba time per token, 32k vs 4k: {ratio:.2f}x (target <= 1.25x)")
    if 8192 in lengths and per_token("MemMamba", 8192) and per_token("Mamba", 8192):
        print(f"- MemMamba / Mamba at 8k: {per_token('MemMamba', 8192) / per_token('Mamba', 8192):.2f}x (target <= 1.3x)")
    peaks = [(T, results[("MemMamba", T)]["peak_mb"] - results[("MemMamba", T)]["base_mb"])
             for T in lengths if "peak_mb" in results.get(("MemMamba", T), {})]
    if len(peaks) >= 2:
        (t0, m0), (t1, m1) = peaks[0], peaks[-1]
        print(f"- MemMamba activation memory {t0} -> {t1} tokens: {m0:.0f} -> {m1:.0f} MB "
              f"({m1 / max(m0, 1):.1f}x for {t1 / t0:.0f}x the tokens)")
    print()


if __name__ == "__main__":
    main()
