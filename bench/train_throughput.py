"""Training throughput of MemMamba, plain Mamba and the Transformer baseline of the same size, through the stack.

    python bench/train_throughput.py --data data/pg19-mini                      # tiny config, 8k tokens, CPU
    python bench/train_throughput.py --config configs/200m_8k.json --data data/pg19 --variants memmamba mamba

Every variant is set up by `training.train.setup` from the config plus `--set` overrides (printed): one rank,
`--micro-batch` sequences per step (1), no accumulation, a scratch output folder. Then the variants take turns,
one optimizer step each (`training.train.train_step`: forward, backward, DeepSpeed's step), so that a machine
whose load changes slows them alike. Tokens/s is the median over the measured steps; "vs Mamba" is the median
of the per-turn ratios.
MFU is taken against the datasheet peak of a known GPU, or against a measured matmul peak (e.g. on a CPU).
"first step" is the time of each variant's first step: for the compiled variants, mostly compiling.
Every step's times are printed as it ends; stopped by SIGTERM (a time limit) or Ctrl-C, the benchmark prints the
table of the steps measured so far and exits with 130. A variant whose step fails (out of memory, say) is dropped
with its error in its row, and the others go on (exit 1).

The variant `mamba_ssm` (CUDA, needs the mamba_ssm package) is mamba_ssm's own MambaLMHeadModel of the same
size, stepped the way the stack steps: fp32 weights, bf16 autocast, fused AdamW, clipping, no activation
checkpointing (its fused mixer keeps little). Compare it with `--set train.activation_checkpointing=false`.
The bars: MemMamba reaches at least 0.85x the tokens/s of plain Mamba; the stack's plain Mamba is within 10%
of mamba_ssm's. The variants `memmamba_compiled` and `mamba_compiled` are the same with `train.compile=true`;
they are compared with each other.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import importlib.util
import json
import shlex
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline import DataError  # noqa: E402
from training.config import ConfigError, load_config  # noqa: E402
from training.flops import train_flops_per_token  # noqa: E402
from training.train import mfu_peak_flops, setup, train_step  # noqa: E402

BAR = 0.85
REFERENCE_BAR = 0.9


class MambaSsmStep:
    """One optimizer step of mamba_ssm's MambaLMHeadModel at the size of `config` (a plain-Mamba config)."""

    def __init__(self, config, micro_batch: int, seq_len: int, device: torch.device):
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
        self.model_config = config
        ssm = {"layer": "Mamba1", "d_state": config.d_state, "d_conv": config.d_conv, "expand": config.expand}
        reference = MambaConfig(d_model=config.d_model, n_layer=config.n_layer, vocab_size=config.vocab_size,
                                ssm_cfg=ssm, rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
                                pad_vocab_size_multiple=8, tie_embeddings=config.tie_embeddings)
        self.model = MambaLMHeadModel(reference, device=device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
        self.window = torch.randint(0, config.vocab_size, (micro_batch, seq_len + 1), device=device)

    def step(self) -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = self.model(self.window[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), self.window[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


class DeviceMemory:
    """Each variant's peak of allocated GPU memory as if it ran alone. The variants stay set up side by side, so
    torch's peak counts the others' weights and optimizer states too; a variant's peak is taken as the peak of its
    step above what was allocated before it, plus what the variant itself holds (what its set-up and its earlier
    steps left allocated)."""

    def __init__(self):
        self.cuda = torch.cuda.is_available()
        self.held, self.peak = collections.Counter(), collections.Counter()   # bytes

    @contextlib.contextmanager
    def track(self, name: str):
        if not self.cuda:
            yield
            return
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield
        self.peak[name] = max(self.peak[name], self.held[name] + torch.cuda.max_memory_allocated() - before)
        self.held[name] += torch.cuda.memory_allocated() - before


def variant_overrides(name: str, model: dict) -> list[str]:
    """The config's model with notes, without, or the Transformer of its size name; compiled or not."""
    if name.endswith("_compiled"):
        return [*variant_overrides(name.removesuffix("_compiled"), model), "train.compile=true"]
    if name == "memmamba":
        return ["model.notes=true"]
    if name in ("mamba", "mamba_ssm"):
        return ["model.notes=false"]
    transformer = {"arch": "transformer", "size": model.get("size", "tiny")}
    if "vocab_size" in model:
        transformer["vocab_size"] = model["vocab_size"]
    return [f"model={json.dumps(transformer)}"]


def whole(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(text)


def positive(text: str) -> int:
    if whole(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny_cpu.json")
    parser.add_argument("--data", required=True, help="a prepared data folder whose tokenizer fits the config")
    parser.add_argument("--seq-len", type=positive, default=8000)
    parser.add_argument("--micro-batch", type=positive, default=1, help="sequences per step")
    parser.add_argument("--warmup", type=whole, default=2,
                        help="steps per variant before measuring (at least 1 for the compiled variants)")
    parser.add_argument("--steps", type=positive, default=10, help="measured steps per variant")
    parser.add_argument("--variants", nargs="+", default=["memmamba", "mamba", "transformer"],
                        choices=["memmamba", "mamba", "transformer", "mamba_ssm", "memmamba_compiled", "mamba_compiled"])
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides for every variant, e.g. model.n_layer=4")
    args = parser.parse_args(argv)
    if args.warmup == 0 and any(name.endswith("_compiled") for name in args.variants):
        parser.error("the compiled variants compile in their first step: --warmup must be at least 1")
    if "mamba_ssm" in args.variants and not mamba_ssm_available():
        print("error: the variant mamba_ssm needs a CUDA GPU and the mamba_ssm package "
              "(pip install -r requirements-cuda.txt --no-build-isolation)", file=sys.stderr)
        return 1
    try:
        return measure(args)
    except (OSError, ConfigError, DataError) as error:   # a missing config or data folder, a mistyped --set
        print(f"error: {error}", file=sys.stderr)
        return 1


def mamba_ssm_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("mamba_ssm") is not None


def measure(args: argparse.Namespace) -> int:
    config = load_config(args.config, [f"data.path={args.data}", *args.overrides])
    model_section = config.model
    # the device and peak FLOP/s the stack's runs take; with mamba_ssm alone, those the stack would take
    device, peak = torch.device("cuda"), None
    runs, seconds, memory = {}, {name: [] for name in args.variants}, DeviceMemory()
    first_step = {}   # seconds: compiling, for the compiled variants
    model_configs, failed, stopped = {}, {}, False
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as held:
        for name in args.variants:
            overrides = [f"data.path={args.data}", f"data.seq_len={args.seq_len}", "data.num_workers=0",
                         f"train.micro_batch_size={args.micro_batch}", "train.grad_accum=1",
                         "train.global_batch_size=null",
                         "validation.windows=1", "logging.progress_bar=false", "checkpoint.resume=never",
                         f"output_dir={tmp}/{name}", *args.overrides, *variant_overrides(name, model_section)]
            print(f"# {name}: --set {shlex.join(overrides)}", flush=True)
            with memory.track(name):
                if name != "mamba_ssm":
                    # stop signals end the benchmark (below), not the run after a checkpoint
                    runs[name] = setup(args.config, overrides, stop_signal=[], held=held)
                    device, peak = runs[name].place.device, runs[name].metrics.peak_flops
                    model_configs[name] = runs[name].cfg.model_config
                else:
                    model_configs[name] = load_config(args.config, overrides).model_config
                    runs[name] = MambaSsmStep(model_configs[name], args.micro_batch, args.seq_len, torch.device("cuda"))
        cuda = memory.cuda
        # Killed by a time limit (SIGTERM) or Ctrl-C, the benchmark prints the table of the steps measured so far.
        on_sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            for step in range(args.warmup + args.steps):
                turn = {}   # seconds of each variant's step
                for name in list(runs):
                    started = time.perf_counter()
                    try:
                        with memory.track(name):
                            runs[name].step() if name == "mamba_ssm" else train_step(runs[name])
                    except Exception as error:   # out of memory, say: the other variants go on without it
                        failed[name] = f"failed in step {step + 1}: {type(error).__name__}: {error}".splitlines()[0]
                    if name in failed:   # here, where the error's traceback no longer holds the step's tensors
                        print(f"# {name} {failed[name]}", flush=True)
                        seconds[name] = []
                        close(runs.pop(name))
                        continue
                    elapsed = turn[name] = time.perf_counter() - started
                    if step == 0:
                        first_step[name] = elapsed
                    if step >= args.warmup:
                        seconds[name].append(elapsed)
                kind = "warm-up" if step < args.warmup else "measured"
                print(f"step {step + 1} of {args.warmup + args.steps} ({kind}): "
                      + ", ".join(f"{name} {elapsed:.3f} s" for name, elapsed in turn.items()), flush=True)
        except KeyboardInterrupt:
            stopped = True
        finally:
            signal.signal(signal.SIGTERM, on_sigterm)
        measured = min((len(seconds[name]) for name in runs), default=0)
        if stopped:
            print(f"# stopped: the table has the {measured} steps measured so far", flush=True)
        for run in runs.values():
            close(run)

    peak = peak or mfu_peak_flops(config, device)
    print(f"\n{Path(args.config).name}, {args.seq_len} tokens per sequence, micro-batch {args.micro_batch}, "
          f"{measured} steps per "
          f"variant after {args.warmup} warm-up, taking turns; {device}, "
          f"{torch.get_num_threads()} threads, peak {peak / 1e12:.3f} TFLOP/s")
    print("| model | tokens/s | TFLOP/s | MFU | vs Mamba | first step |" + (" peak memory |" if cuda else ""))
    print("|---|---:|---:|---:|---:|---:|" + ("---:|" if cuda else ""))
    for name in args.variants:
        if name in failed:
            print(f"| {name} | {failed[name]} | | | | |" + (" |" if cuda else ""))
        if not seconds[name]:
            continue
        tps = args.micro_batch * args.seq_len / statistics.median(seconds[name])
        flops = tps * train_flops_per_token(model_configs[name], args.seq_len)
        base = "mamba_compiled" if name.endswith("_compiled") else "mamba"
        ratio = f"{speed_ratio(seconds, name, base):.2f}x" if seconds.get(base) else "-"
        print(f"| {name} | {tps:,.0f} | {flops / 1e12:.4f} | {100 * flops / peak:.1f}% | {ratio} "
              f"| {first_step[name]:.1f} s |"
              + (f" {memory.peak[name] / 2 ** 30:.1f} GiB |" if cuda else ""))
    bars = [("MemMamba", "memmamba", "Mamba", "mamba", BAR), ("Mamba", "mamba", "mamba_ssm", "mamba_ssm", REFERENCE_BAR),
            ("compiled MemMamba", "memmamba_compiled", "compiled Mamba", "mamba_compiled", BAR),
            ("compiled Mamba", "mamba_compiled", "mamba_ssm", "mamba_ssm", REFERENCE_BAR)]
    for label, name, base_label, base, bar in bars:
        if seconds.get(name) and seconds.get(base):
            ratio = speed_ratio(seconds, name, base)
            print(f"bar: {label} >= {bar}x {base_label} tokens/s: {ratio:.2f}x, {'met' if ratio >= bar else 'MISSED'}")
    return 130 if stopped else 1 if failed else 0


def close(run: object) -> None:
    """Ends a variant's run and frees what it holds on the device for the others."""
    if not isinstance(run, MambaSsmStep):
        run.close()
    del run   # this frame's reference, before the collection
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def speed_ratio(seconds: dict[str, list[float]], name: str, base: str) -> float:
    """Median over the turns of base's step time / name's: how many times as fast as `base` `name` is."""
    return statistics.median(b / s for b, s in zip(seconds[base], seconds[name]))


if __name__ == "__main__":
    sys.exit(main())
