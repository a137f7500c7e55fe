"""Multi-document retrieval under noise (Table 3).

A gold document hides among N distractors, each document preceded by the question
(DeciMamba's multi-document SQuAD layout), and the model must name the gold document's id:

    Question: <q>\\nDocument 412: <passage>\\n\\n  ... x (N + 1)
    Question: <q>\\nAnswer: Document  ->  " 412"

Passages come from a JSON-lines file (--passages; one {"question", "text"} per line, e.g.
SQuAD's questions with their paragraphs) or, by default, from the paragraphs of the
split's books, each asking which document begins with its first words. Accuracy is exact
match of the first number decoded greedily.
"""
from __future__ import annotations

import numpy as np
import torch

from data_pipeline.reader import ShardedBooks
from training.evaluation.common import EvalError, Progress, greedy
from training.evaluation.report import Outcome, PartialResults, table
from training.tasks import RetrievalTask, book_passages, load_passages

NAME = "retrieval"
HELP = "multi-document retrieval under noise (Table 3)"
PAPER_DISTRACTORS = [10, 20, 120, 160, 200]


def add_arguments(parser) -> None:
    parser.add_argument("--passages", help="JSON lines of {\"question\", \"text\"} (default: book paragraphs)")
    parser.add_argument("--data", help="prepared shards whose books give the passages (without --passages)")
    parser.add_argument("--split", default="test", help="the split whose books give the passages")
    parser.add_argument("--distractors", nargs="+", type=int, default=PAPER_DISTRACTORS,
                        help="distractor passages per sample")
    parser.add_argument("--samples", type=int, default=20, help="questions per number of distractors")
    parser.add_argument("--seed", type=int, default=0, help="of the samples")


def evaluate(checkpoint, task: RetrievalTask, distractors: list[int], args, partial: PartialResults) -> list[dict]:
    """Accuracy and predictions per number of distractors, each a unit of `partial`."""
    todo = [n for n in distractors if not partial.has(checkpoint.name, n)]
    progress = Progress(len(todo) * args.samples, f"retrieval {checkpoint.name}")
    for n in todo:
        correct, lengths, predictions = [], [], []
        for s in range(args.samples):
            sample = task.sample(n, np.random.default_rng([args.seed, n, s]))
            ids = torch.from_numpy(sample.ids)[None].to(args.device)
            text = checkpoint.tokenizer.decode(greedy(checkpoint.model, ids, len(sample.answer) + 1, args.chunk_len,
                                                      checkpoint.tokenizer.vocab_size)[0].tolist())
            correct.append(task.is_correct(sample, text))
            lengths.append(len(sample.ids))
            predictions.append({"gold_id": sample.gold_id, "gold_index": sample.gold_index,
                                "continuation": text, "correct": correct[-1]})
            progress.update(1, f"{n} distractors, {np.mean(correct):.2f} correct")
        partial.add(checkpoint.name, n, {"distractors": n, "accuracy": float(np.mean(correct)),
                                         "mean_prompt_tokens": float(np.mean(lengths)), "predictions": predictions})
    progress.close()
    return [partial.get(checkpoint.name, n) for n in distractors]


def prepare(checkpoints, args):
    """Check the settings and every model's passages; returns the evaluation to run."""
    if args.passages is None and args.data is None:
        raise EvalError("retrieval needs --passages FILE.jsonl or --data (book paragraphs as passages)")
    if args.samples < 1 or min(args.distractors) < 0:
        raise EvalError("--samples must be positive and --distractors non-negative")
    args.distractors = list(dict.fromkeys(args.distractors))   # one column each
    from_file = load_passages(args.passages) if args.passages else None
    tasks = {}
    for checkpoint in checkpoints:
        passages = from_file or book_passages(ShardedBooks(args.data, args.split, checkpoint.tokenizer.checksum),
                                              checkpoint.tokenizer)
        tasks[checkpoint.name] = task = RetrievalTask(checkpoint.tokenizer, passages)
        too_many = [str(n) for n in args.distractors if n > task.most_distractors()]
        if too_many:
            raise EvalError(f"--distractors {' '.join(too_many)}: at most {task.most_distractors()} "
                            f"({len(task.texts)} distinct passages, ids below {task.max_id})")
    return lambda partial: run(checkpoints, tasks, args, partial)


def run(checkpoints, tasks: dict, args, partial: PartialResults) -> Outcome:
    results = {c.name: evaluate(c, tasks[c.name], args.distractors, args, partial) for c in checkpoints}
    header = ["model"] + [str(n) for n in args.distractors]
    rows = [[name, *(e["accuracy"] for e in entries)] for name, entries in results.items()]
    first = next(iter(results.values()))
    rows.append(["prompt tokens (mean)", *(f"{e['mean_prompt_tokens']:.0f}" for e in first)])
    source = args.passages or f"paragraphs of {args.data}/{args.split}"
    markdown = (f"Exact-match accuracy of the gold document's id, {args.samples} questions per column "
                f"(number of distractors); passages: {source}.\n\n" + table(header, rows))
    plot = {"title": "Multi-document retrieval", "xlabel": "distractor documents", "ylabel": "accuracy",
            "series": {name: (args.distractors, [e["accuracy"] for e in entries])
                       for name, entries in results.items()}}
    settings = {"passages": source, "distractors": args.distractors, "samples": args.samples, "seed": args.seed,
                "chunk_len": args.chunk_len}
    return Outcome(settings, results, markdown, plot)
