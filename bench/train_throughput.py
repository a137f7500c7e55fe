"""Training throughput of MemMamba, plain Mamba and the Transformer baseline of the same size, through the stack.

    python bench/train_throughput.py --data data/pg19-mini                      # tiny config, 8k tokens, CPU
    python bench/train_throughput.py --config configs/200m_8k.json --data data/pg19 --variants memmamba mamba

Every variant is set up by `training.train.setup` from the config plus `--set` overrides (printed): one rank,
micro-batch 1, no accumulation, a scratch output folder. Then the variants take turns, one optimizer step each
(`training.train.train_step`: forward, backward, DeepSpeed's step), so that a machine whose load changes slows
them alike. Tokens/s is the median over the measured steps; "vs Mamba" is the median of the per-turn ratios.
MFU is taken against the datasheet peak of a known GPU, or against a measured matmul peak (e.g. on a CPU).
The bar: MemMamba reaches at least 0.85x the tokens/s of plain Mamba.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.flops import train_flops_per_token  # noqa: E402
from training.train import setup, train_step  # noqa: E402

BAR = 0.85


def variant_overrides(name: str, model: dict) -> list[str]:
    """The config's model with notes, without, or the Transformer of its size name."""
    if name == "memmamba":
        return ["model.notes=true"]
    if name == "mamba":
        return ["model.notes=false"]
    transformer = {"arch": "transformer", "size": model.get("size", "tiny")}
    if "vocab_size" in model:
        transformer["vocab_size"] = model["vocab_size"]
    return [f"model={json.dumps(transformer)}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny_cpu.json")
    parser.add_argument("--data", required=True, help="a prepared data folder whose tokenizer fits the config")
    parser.add_argument("--seq-len", type=int, default=8000)
    parser.add_argument("--warmup", type=int, default=2, help="steps per variant before measuring")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per variant")
    parser.add_argument("--variants", nargs="+", default=["memmamba", "mamba", "transformer"],
                        choices=["memmamba", "mamba", "transformer"])
    args = parser.parse_args()

    model_section = json.loads(Path(args.config).read_text())["model"]
    runs, seconds = {}, {name: [] for name in args.variants}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            overrides = [f"data.path={args.data}", f"data.seq_len={args.seq_len}", "data.num_workers=0",
                         "train.micro_batch_size=1", "train.grad_accum=1", "train.global_batch_size=null",
                         "validation.windows=1", "logging.progress_bar=false", "checkpoint.resume=never",
                         f"output_dir={tmp}/{name}", *variant_overrides(name, model_section)]
            print(f"# {name}: --set {shlex.join(overrides)}", flush=True)
            runs[name] = setup(args.config, overrides)
        for step in range(args.warmup + args.steps):
            for name, run in runs.items():
                started = time.perf_counter()
                train_step(run)
                if step >= args.warmup:
                    seconds[name].append(time.perf_counter() - started)
        for run in runs.values():
            run.close()

    any_run = next(iter(runs.values()))
    peak = any_run.metrics.peak_flops
    print(f"\n{Path(args.config).name}, {args.seq_len} tokens per sequence, micro-batch 1, {args.steps} steps per "
          f"variant after {args.warmup} warm-up, taking turns; {any_run.place.device}, "
          f"{torch.get_num_threads()} threads, peak {peak / 1e12:.3f} TFLOP/s")
    print("| model | tokens/s | TFLOP/s | MFU | vs Mamba |")
    print("|---|---:|---:|---:|---:|")
    for name, run in runs.items():
        tps = args.seq_len / statistics.median(seconds[name])
        flops = tps * train_flops_per_token(run.cfg.model_config, args.seq_len)
        ratio = (f"{statistics.median(m / s for m, s in zip(seconds['mamba'], seconds[name])):.2f}x"
                 if "mamba" in seconds else "-")
        print(f"| {name} | {tps:,.0f} | {flops / 1e12:.4f} | {100 * flops / peak:.1f}% | {ratio} |")
    if "mamba" in seconds and "memmamba" in seconds:
        ratio = statistics.median(m / s for m, s in zip(seconds["mamba"], seconds["memmamba"]))
        print(f"\nbar: MemMamba >= {BAR}x Mamba tokens/s: {ratio:.2f}x, {'met' if ratio >= BAR else 'MISSED'}")


if __name__ == "__main__":
    main()
