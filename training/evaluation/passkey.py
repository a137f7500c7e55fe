"""Passkey retrieval by context length and depth (Table 2).

A prompt of exactly L tokens: instructions, book text as filler, and the sentence
"The pass key is 71432. Remember it. 71432 is the pass key." at a given depth of the
filler, then "What is the pass key? The pass key is". The model decodes greedily; a sample
is correct when the first number it produces is the key (exact match). The same samples
(keys, filler, depths) are drawn for every model that shares a tokenizer. Fine-tune first
(training.tasks.PasskeyWindows, configs/passkey_finetune_tiny.json), as DeciMamba and
MemMamba did: a base language model has never seen the prompt's format.
"""
from __future__ import annotations

import numpy as np
import torch

from data_pipeline.reader import ShardedBooks
from training.evaluation.common import EvalError, Progress, check_kv_cache, greedy, parse_lengths
from training.evaluation.report import Outcome, PartialResults, length_label, table
from training.tasks import MAX_KEY_DIGITS, BookFiller, PasskeyTask

NAME = "passkey"
HELP = "passkey retrieval by length and depth (Table 2)"
PAPER_LENGTHS = ["1k", "2k", "4k", "8k", "16k", "32k", "64k", "128k", "256k", "400k"]
PAPER_DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, help="prepared shards; the filler comes from their books")
    parser.add_argument("--split", default="test", help="the split whose books are the filler")
    parser.add_argument("--lengths", nargs="+", default=PAPER_LENGTHS, help="prompt lengths (4k = 4000 tokens)")
    parser.add_argument("--depths", nargs="+", type=float, default=PAPER_DEPTHS,
                        help="where the passkey sits in the filler: 0 = first, 1 = last")
    parser.add_argument("--samples", type=int, default=2, help="samples per length and depth")
    parser.add_argument("--key-digits", type=int, default=5, help="digits of each passkey")
    parser.add_argument("--seed", type=int, default=0, help="of the keys, depths and filler")
    parser.add_argument("--batch-size", type=int, default=1, help="samples of one length run side by side")


def evaluate(checkpoint, task: PasskeyTask, lengths: list[int], depths: list[float], args,
             partial: PartialResults) -> dict:
    """Accuracy by length and depth, and every prediction; a length is a unit of `partial`."""
    todo = [L for L in lengths if not partial.has(checkpoint.name, L)]
    per_length = len(depths) * args.samples
    # counted in prompt tokens: a 400k prompt costs 400 times a 1k one
    progress = Progress(sum(todo) * per_length, f"passkey {checkpoint.name}", "token")
    for L in todo:
        samples = [task.sample(L, depth, np.random.default_rng([args.seed, L, d, s]))
                   for d, depth in enumerate(depths) for s in range(args.samples)]
        correct, predictions = [], []
        for first in range(0, len(samples), args.batch_size):
            batch = samples[first:first + args.batch_size]
            ids = torch.from_numpy(np.stack([s.ids for s in batch])).to(args.device)
            running = f"sample {len(correct) + len(batch)}/{per_length} of {L} tokens"
            new = greedy(checkpoint.model, ids, max(len(s.answer) for s in batch) + 1, args.chunk_len,
                         task.tokenizer.vocab_size, lambda tokens: progress.advance(tokens, running)).cpu()
            for sample, tokens in zip(batch, new):
                text = task.tokenizer.decode(tokens.tolist())
                correct.append(task.is_correct(sample, text))
                predictions.append({"length": L, "depth": sample.depth, "key": sample.key,
                                    "continuation": text, "correct": correct[-1]})
            progress.update(0, f"{running}, {np.mean(correct):.2f} correct")
        by_depth = np.array(correct).reshape(len(depths), args.samples).mean(1)
        partial.add(checkpoint.name, L, {"length": L, "accuracy": float(np.mean(correct)),
                                         "by_depth": {str(d): float(a) for d, a in zip(depths, by_depth)},
                                         "predictions": predictions})
    progress.close()
    done = [dict(partial.get(checkpoint.name, L)) for L in lengths]
    predictions = [p for entry in done for p in entry.pop("predictions")]
    return {"lengths": done, "predictions": predictions}


def prepare(checkpoints, args):
    """Check the settings and every model's filler and prompt lengths; returns the evaluation to run."""
    lengths = parse_lengths(args.lengths)
    if not all(0 <= d <= 1 for d in args.depths):
        raise EvalError(f"--depths must lie in [0, 1], got {args.depths}")
    args.depths = list(dict.fromkeys(d + 0.0 for d in args.depths))   # each once (-0.0 as 0.0), as rows of a table
    if args.samples < 1 or args.batch_size < 1:
        raise EvalError("--samples and --batch-size must be positive")
    if not 1 <= args.key_digits <= MAX_KEY_DIGITS:
        raise EvalError(f"--key-digits must be between 1 and {MAX_KEY_DIGITS}, got {args.key_digits}")
    tasks = {}
    for checkpoint in checkpoints:
        books = ShardedBooks(args.data, args.split, checkpoint.tokenizer.checksum)
        tasks[checkpoint.name] = task = PasskeyTask(checkpoint.tokenizer, BookFiller(books), args.key_digits)
        short = [length_label(L) for L in lengths if L < task.shortest()]
        if short:
            raise EvalError(f"--lengths {' '.join(short)}: a passkey prompt needs at least {task.shortest()} tokens")
    check_kv_cache(checkpoints, max(lengths), args.batch_size, args.device)
    return lambda partial: run(checkpoints, tasks, lengths, args, partial)


def run(checkpoints, tasks: dict, lengths: list[int], args, partial: PartialResults) -> Outcome:
    results = {c.name: evaluate(c, tasks[c.name], lengths, args.depths, args, partial) for c in checkpoints}
    labels = [length_label(L) for L in lengths]
    parts = [f"Exact-match accuracy, {len(args.depths)} depths x {args.samples} samples per length:",
             table(["model"] + labels, [[name, *(e["accuracy"] for e in r["lengths"])]
                                        for name, r in results.items()])]
    for name, r in results.items():
        rows = [[f"depth {d:g}", *(e["by_depth"][str(d)] for e in r["lengths"])] for d in args.depths]
        parts += [f"{name}, by depth:", table([""] + labels, rows)]
    plot = {"title": "Passkey retrieval", "xlabel": "prompt length (tokens)", "ylabel": "accuracy", "logx": True,
            "series": {name: (lengths, [e["accuracy"] for e in r["lengths"]]) for name, r in results.items()}}
    settings = {"data": str(args.data), "split": args.split, "lengths": lengths, "depths": args.depths,
                "samples": args.samples, "key_digits": args.key_digits, "seed": args.seed,
                "chunk_len": args.chunk_len}
    return Outcome(settings, results, "\n\n".join(parts), plot)
