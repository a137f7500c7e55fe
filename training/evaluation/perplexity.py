"""PG19 perplexity by context length (Table 1), the DeciMamba / MemMamba protocol.

For a context length L, every book of the split with at least L + 1 tokens gives
`--windows-per-book` windows of L + 1 tokens, spread evenly from its start to its end.
The model reads a window's first L tokens (chunk by chunk, carrying its state) and is
scored on its last `--scored` predictions only, so every scored token has nearly L tokens
of context. Shorter books are skipped and counted. Perplexity is token-level,
exp(total NLL / scored tokens) over all windows of the length; its spread is a 95%
interval over windows, exp(mean window NLL +- 1.96 standard errors).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_pipeline.reader import ShardedBooks
from training.evaluation.common import EvalError, Progress, check_kv_cache, chunked_hidden, log, parse_lengths
from training.evaluation.report import Outcome, PartialResults, length_label, table

NAME = "ppl"
HELP = "PG19 perplexity by context length (Table 1)"
PAPER_LENGTHS = ["1k", "2k", "4k", "10k", "20k", "30k", "40k", "50k", "60k"]


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, help="the --output folder of `python -m data_pipeline prepare`")
    parser.add_argument("--split", default="test", help="the split whose books are scored")
    parser.add_argument("--lengths", nargs="+", default=PAPER_LENGTHS, help="context lengths (4k = 4000 tokens)")
    parser.add_argument("--windows-per-book", type=int, default=10, help="windows of each length per book")
    parser.add_argument("--scored", type=int, default=100, help="predictions scored at the end of each window")
    parser.add_argument("--batch-size", type=int, default=1, help="windows of one length run side by side")


def window_starts(book_tokens: int, length: int, count: int) -> list[int]:
    """Starts of up to `count` windows of length + 1 tokens, evenly from the book's start to its end."""
    last = book_tokens - (length + 1)
    if last < 0:
        return []
    return sorted({int(s) for s in np.linspace(0, last, count).round()})


@torch.no_grad()
def scored_nll(model: nn.Module, windows: Tensor, scored: int, chunk_len: int,
               on_chunk: Callable[[int], None] | None = None) -> Tensor:
    """windows [B, L + 1] -> NLL [B, scored] (float64) of the last `scored` tokens given all before."""
    L = windows.shape[1] - 1
    hidden, _ = chunked_hidden(model, windows[:, :-1], chunk_len, keep=(L - scored, L), on_chunk=on_chunk)
    logits = model.lm_head(hidden).float()
    targets = windows[:, L - scored + 1:]
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets).double()


def _summary(window_nll: list[Tensor], books: dict[str, list[float]], skipped: int, length: int) -> dict:
    entry = {"length": length, "books": len(books), "books_skipped": skipped, "windows": len(window_nll)}
    if not window_nll:
        return {**entry, "ppl": None, "ci95": None, "tokens": 0, "per_book": {}}
    nll = torch.stack(window_nll)                      # [windows, scored]
    per_window = nll.mean(1)
    mean = float(per_window.mean())
    half = 1.96 * float(per_window.std()) / math.sqrt(len(per_window)) if len(per_window) > 1 else None
    return {**entry, "ppl": math.exp(mean), "tokens": nll.numel(),
            "ci95": [math.exp(mean - half), math.exp(mean + half)] if half is not None else None,
            "per_book": {book: math.exp(float(np.mean(values))) for book, values in books.items()}}


def evaluate(checkpoint, books: ShardedBooks, lengths: list[int], args, partial: PartialResults) -> list[dict]:
    """Every length's summary; a length is a unit of `partial`, skipped when an earlier run finished it."""
    plan = {L: [(i, s) for i in range(len(books)) for s in window_starts(int(books.num_tokens[i]), L,
                                                                         args.windows_per_book)]
            for L in lengths if not partial.has(checkpoint.name, L)}
    # counted in tokens read: a 60k window costs 60 times a 1k one
    progress = Progress(sum(L * len(windows) for L, windows in plan.items()), f"ppl {checkpoint.name}", "token")
    for L, windows in plan.items():
        window_nll, per_book = [], {}
        for first in range(0, len(windows), args.batch_size):
            batch = windows[first:first + args.batch_size]
            ids = torch.from_numpy(np.stack([books.tokens(i, s, s + L + 1).astype(np.int64) for i, s in batch]))
            status = f"window {first + len(batch)}/{len(windows)} of {L} tokens"
            nll = scored_nll(checkpoint.model, ids.to(args.device), args.scored, args.chunk_len,
                             lambda tokens: progress.advance(tokens, status)).cpu()
            for (i, _), row in zip(batch, nll):
                window_nll.append(row)
                per_book.setdefault(books.books[i]["book_id"], []).append(float(row.mean()))
            progress.update(0, status)
        skipped = int((books.num_tokens < L + 1).sum())
        partial.add(checkpoint.name, L, _summary(window_nll, per_book, skipped, L))
    progress.close()
    return [partial.get(checkpoint.name, L) for L in lengths]


def prepare(checkpoints, args):
    """Check the settings and every model's books; returns the evaluation to run."""
    lengths = parse_lengths(args.lengths)
    if args.scored < 1 or any(args.scored > L for L in lengths):
        raise EvalError(f"--scored {args.scored} must be between 1 and the shortest length ({min(lengths)})")
    if args.windows_per_book < 1 or args.batch_size < 1:
        raise EvalError("--windows-per-book and --batch-size must be positive")
    books = {c.name: ShardedBooks(args.data, args.split, c.tokenizer.checksum) for c in checkpoints}
    longest = {b.where: int(b.num_tokens.max()) for b in books.values()}
    for where, tokens in longest.items():
        too_long = [length_label(L) for L in lengths if L + 1 > tokens]   # a window is L + 1 tokens
        if len(too_long) == len(lengths):
            raise EvalError(f"--lengths: no book of {where} is long enough, the longest has {tokens} tokens")
        if too_long:
            log(f"warning: no book of {where} is longer than {tokens} tokens: no perplexity at "
                f"{', '.join(too_long)}")
    check_kv_cache(checkpoints, max(L for L in lengths if L < max(longest.values())), args.batch_size, args.device)
    return lambda partial: run(checkpoints, books, lengths, args, partial)


def run(checkpoints, books: dict, lengths: list[int], args, partial: PartialResults) -> Outcome:
    results = {c.name: evaluate(c, books[c.name], lengths, args, partial) for c in checkpoints}
    header = ["model", "params"] + [length_label(L) for L in lengths]
    rows, spread = [], []
    for checkpoint in checkpoints:
        entries = results[checkpoint.name]
        params = f"{sum(p.numel() for p in checkpoint.model.parameters()) / 1e6:.1f}M"
        rows.append([checkpoint.name, params] + [e["ppl"] for e in entries])
        spread.append([checkpoint.name, ""] + [f"{e['ci95'][0]:.2f}-{e['ci95'][1]:.2f}" if e["ci95"] else None
                                                for e in entries])
    first = results[checkpoints[0].name]
    counts = [["books (skipped)"] + [f"{e['books']} ({e['books_skipped']})" for e in first],
              ["windows"] + [e["windows"] for e in first]]
    markdown = "\n\n".join([
        f"Token-level perplexity on the last {args.scored} tokens of each window, {args.split} split:",
        table(header, rows),
        "95% interval over windows:",
        table(header, spread),
        table([""] + [length_label(L) for L in lengths], counts),
    ])
    plot = {"title": f"Perplexity by context length ({args.split})", "xlabel": "context length (tokens)",
            "ylabel": "perplexity", "logx": True,
            "series": {name: (lengths, [e["ppl"] for e in entries]) for name, entries in results.items()}}
    settings = {"data": str(args.data), "split": args.split, "lengths": lengths,
                "windows_per_book": args.windows_per_book, "scored": args.scored, "chunk_len": args.chunk_len}
    return Outcome(settings, results, markdown, plot)
