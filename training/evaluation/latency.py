"""Latency (Sec. 5.2): end-to-end forward time by input length, and per-token generation
time by position, for MemMamba against a Transformer of matched size.

Forward: the model's chunked prefill (logits of every position, chunk by chunk) of L
random tokens, batch `--batch-size`, median of `--repeats` runs after a warm-up. Generation:
the model is prefilled (untimed) to position P, then `--gen-tokens` greedy steps are timed;
the figure is milliseconds per token. Weights do not change the time, so besides trained
checkpoints, `--model memmamba:200m` / `--model transformer:200m` build randomly
initialised models of the named sizes. The paper reports MemMamba at 0.52x the
Transformer's end-to-end latency; the table gives the ratio per length and its mean.
On CUDA, the peak memory of each forward is recorded as well.
"""
from __future__ import annotations

import statistics
import time

import torch

from training.evaluation.common import EvalError, Progress, check_kv_cache, chunked_hidden, parse_lengths
from training.evaluation.report import Outcome, PartialResults, length_label, table

NAME = "latency"
HELP = "forward and per-token generation latency (Sec. 5.2)"
PAPER_LENGTHS = ["1k", "2k", "4k", "10k", "20k", "30k", "40k", "50k", "60k"]
PAPER_POSITIONS = ["1k", "10k", "50k", "100k"]


def add_arguments(parser) -> None:
    parser.add_argument("--model", action="append", default=[], metavar="KIND:SIZE",
                        help="a randomly initialised model, e.g. memmamba:200m or transformer:200m (repeatable)")
    parser.add_argument("--lengths", nargs="+", default=PAPER_LENGTHS, help="forward input lengths")
    parser.add_argument("--positions", nargs="*", default=PAPER_POSITIONS,
                        help="positions at which to time generation (none: --positions with no value)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per length (the median counts)")
    parser.add_argument("--gen-tokens", type=int, default=32, help="greedy steps timed at each position")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per forward")
    parser.add_argument("--seed", type=int, default=0, help="of the random input ids")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def forward_seconds(model, ids, chunk_len: int, device) -> float:
    _sync(device)
    start = time.perf_counter()
    model.prefill(ids, chunk_len=chunk_len)
    _sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def step_seconds(model, ids, tokens: int, chunk_len: int, device) -> float:
    """Seconds per generated token after prefilling `ids`."""
    hidden, state = chunked_hidden(model, ids, chunk_len, keep=(ids.shape[1] - 1, ids.shape[1]))
    token = model.lm_head(hidden[:, -1]).argmax(-1)
    _sync(device)
    start = time.perf_counter()
    for _ in range(tokens):
        logits, state = model.step(token, state)
        token = logits.argmax(-1)
    _sync(device)
    return (time.perf_counter() - start) / tokens


def evaluate(checkpoint, lengths: list[int], positions: list[int], args) -> dict:
    model, device = checkpoint.model, args.device
    generator = torch.Generator().manual_seed(args.seed)
    random_ids = lambda n: torch.randint(0, model.config.vocab_size, (args.batch_size, n),  # noqa: E731
                                         generator=generator).to(device)
    # counted in tokens run through the model: a 60k forward costs 60 times a 1k one
    progress = Progress(sum(lengths) * args.repeats + sum(P + args.gen_tokens for P in positions),
                        f"latency {checkpoint.name}", "token")
    forward_seconds(model, random_ids(min(lengths + positions)), args.chunk_len, device)   # warm-up
    forward = []
    for L in lengths:
        ids = random_ids(L)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        runs = []
        for _ in range(args.repeats):
            runs.append(forward_seconds(model, ids, args.chunk_len, device))
            progress.update(L, f"forward {L} tokens")
        entry = {"length": L, "ms": 1000 * statistics.median(runs), "runs_ms": [1000 * r for r in runs],
                 "tokens_per_s": args.batch_size * L / statistics.median(runs)}
        if device.type == "cuda":
            entry["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        forward.append(entry)
    generation = []
    for P in positions:
        seconds = step_seconds(model, random_ids(P), args.gen_tokens, args.chunk_len, device)
        generation.append({"position": P, "ms_per_token": 1000 * seconds})
        progress.update(P + args.gen_tokens, f"generation at {P}")
    progress.close()
    return {"kind": checkpoint.kind, "forward": forward, "generation": generation}


def prepare(checkpoints, args):
    """Check the settings; returns the evaluation to run."""
    lengths = parse_lengths(args.lengths)
    positions = parse_lengths(args.positions, "--positions")
    if args.repeats < 1 or args.gen_tokens < 1 or args.batch_size < 1:
        raise EvalError("--repeats, --gen-tokens and --batch-size must be positive")
    check_kv_cache(checkpoints, max(lengths + [P + args.gen_tokens for P in positions]), args.batch_size, args.device,
                   "--lengths or --positions")
    return lambda partial: run(checkpoints, lengths, positions, args, partial)


def run(checkpoints, lengths: list[int], positions: list[int], args, partial: PartialResults) -> Outcome:
    results = partial.per_model(checkpoints, lambda c: evaluate(c, lengths, positions, args))
    labels = [length_label(L) for L in lengths]
    rows = [[name, r["kind"], *(e["ms"] for e in r["forward"])] for name, r in results.items()]
    baseline = next((name for name, r in results.items() if r["kind"] == "transformer"), None)
    ratios = {}
    if baseline is not None:
        base = [e["ms"] for e in results[baseline]["forward"]]
        for name, r in results.items():
            if name != baseline:
                per_length = [e["ms"] / b for e, b in zip(r["forward"], base)]
                ratios[name] = {"per_length": per_length, "mean": sum(per_length) / len(per_length)}
                rows.append([f"{name} / {baseline}", "ratio", *per_length])
    parts = [f"End-to-end forward latency (ms, median of {args.repeats}, batch {args.batch_size}, "
             f"chunks of {args.chunk_len}) on {args.device}:", table(["model", "kind"] + labels, rows)]
    parts += [f"Mean latency ratio {name} / {baseline}: {r['mean']:.2f}x (the paper: 0.52x)."
              for name, r in ratios.items()]
    if positions:
        parts += [f"Generation latency (ms per token, {args.gen_tokens} greedy steps) at position:",
                  table(["model"] + [length_label(P) for P in positions],
                        [[name, *(e["ms_per_token"] for e in r["generation"])] for name, r in results.items()])]
    plot = {"title": f"Forward latency ({args.device})", "xlabel": "input length (tokens)", "ylabel": "ms",
            "logx": True, "logy": True,
            "series": {name: (lengths, [e["ms"] for e in r["forward"]]) for name, r in results.items()}}
    settings = {"lengths": lengths, "positions": positions, "repeats": args.repeats, "gen_tokens": args.gen_tokens,
                "batch_size": args.batch_size, "chunk_len": args.chunk_len, "device": str(args.device),
                "dtype": args.dtype, "threads": torch.get_num_threads()}
    return Outcome(settings, {"models": results, "ratios": ratios}, "\n\n".join(parts), plot)
