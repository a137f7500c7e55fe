"""Benchmark of the data pipeline: tokenization throughput of `prepare`, and of the training stream.

    .venv/bin/python bench/data_pipeline.py [--input ../shared/data/pg19-mini] [--repeats 5] [--copies 1]

Tokenization: `shard_split` (what `prepare` runs per split: read, normalise, encode, write tar shards and manifest)
on the train split with 1 and 2 workers, against plain sentencepiece encoding of the same normalised text in one
process with one thread (line by line, as the pipeline does, and whole books with `encode(text)` for reference).
Stream: PackedWindows at the paper's seq_len 8000, read directly and through `train_loader` for one of 8 ranks.

--copies N benchmarks a corpus whose train split holds every book N times (links in a temporary folder), to see
throughput once the fixed cost of starting the worker pool is spread over more work, as it is on the real PG19.

The machine may be shared, so the measurements are interleaved, each figure is the best of --repeats runs, and the
single-process ones are also given in CPU time, which other processes disturb much less than wall time.
Printed as markdown tables (for docs/benchmarks.md) and as JSON.
"""

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline import writer  # noqa: E402
from data_pipeline.corpus import Corpus, read_book  # noqa: E402
from data_pipeline.prepare import tokenizer_for  # noqa: E402


class Best:
    """The best wall and CPU time of repeated runs of named measurements."""

    def __init__(self):
        self.wall, self.cpu = {}, {}

    def run(self, name, function):
        wall, cpu = time.perf_counter(), time.process_time()
        result = function()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        self.wall[name] = min(wall, self.wall.get(name, wall))
        self.cpu[name] = min(cpu, self.cpu.get(name, cpu))
        return result


def replicated(root, copies, scratch):
    """A corpus in scratch whose train split links to every train book of root `copies` times."""
    source, target = Path(root), Path(scratch) / "corpus"
    (target / "train").mkdir(parents=True)
    rows = (source / "metadata.csv").read_text().splitlines()
    for book in sorted((source / "train").glob("*.txt")):
        for copy in range(copies):
            (target / "train" / f"{book.stem}{copy:02d}.txt").symlink_to(book.resolve())
    (target / "metadata.csv").write_text(
        "".join(f"{row.split(',', 1)[0]}{copy:02d},{row.split(',', 1)[1]}\n" for row in rows for copy in range(copies))
    )
    return str(target)


def tokenization(corpus, tokenizer, split, repeats, scratch):
    texts = [read_book(corpus.fs, book)[0] for book in corpus.books(split)]
    sp = tokenizer._sp
    best = Best()
    tokens = sum(best.run("sentencepiece_whole_books", lambda: [len(sp.encode(text)) for text in texts]))
    # The fixed cost inside the 2-worker figure: spawning the pool and sending it the tokenizer, once per split.
    def start_pool():
        with multiprocessing.get_context("spawn").Pool(2, writer._start_worker, (tokenizer, corpus.fs, False)) as pool:
            pool.map(abs, [1, 2])

    best.run("pool_start", start_pool)
    for run in range(repeats):
        best.run("sentencepiece_by_line", lambda: [sp.encode(text.split("\n"), num_threads=1) for text in texts])
        for workers in (1, 2):
            output = f"{scratch}/{workers}-workers-{run}"
            report = best.run(f"prepare_{workers}_workers", lambda: writer.shard_split(
                corpus, split, tokenizer, output, workers=workers, progress=False))
            assert report.tokens == tokens
    return {"books": len(texts), "text_mb": sum(len(t.encode()) for t in texts) / 1e6, "tokens": tokens,
            "wall_seconds": best.wall, "cpu_seconds": best.cpu}


def stream(root, split, seq_len, samples, repeats):
    # Imported here, not at the top: the tokenizing workers are spawned and import this script again, and
    # torch would add seconds to their start that `python -m data_pipeline prepare` does not pay.
    from data_pipeline.stream import PackedWindows, train_loader

    dataset = PackedWindows(root, split, seq_len, seed=0)
    best = Best()
    loaders = {}
    for workers in (0, 2):
        loaders[workers] = iter(train_loader(dataset, 4, dp_rank=3, dp_world=8, num_workers=workers))
        next(loaders[workers])  # worker start-up happens once per training run: leave it out
    for _ in range(repeats):
        best.run("direct", lambda: [dataset[k] for k in range(samples)])
        for workers, loader in loaders.items():
            best.run(f"loader_{workers}_workers", lambda: [next(loader) for _ in range(samples // 4)])
    tokens = samples * (seq_len + 1)
    return {"seq_len": seq_len, "windows_per_epoch": len(dataset),
            **{name: tokens / seconds for name, seconds in best.wall.items()}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default="../shared/data/pg19-mini")
    parser.add_argument("--split", default="train")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=8000)
    parser.add_argument("--stream-samples", type=int, default=2000)
    parser.add_argument("--copies", type=int, default=1, help="benchmark the train split repeated this many times")
    args = parser.parse_args()

    load = os.getloadavg()[0]  # other processes on the machine skew every figure
    with tempfile.TemporaryDirectory() as scratch:
        corpus = Corpus(args.input if args.copies == 1 else replicated(args.input, args.copies, scratch))
        start = time.perf_counter()
        tokenizer = tokenizer_for(corpus, scratch, vocab_size=args.vocab_size)
        trained = time.perf_counter() - start
        tok = tokenization(corpus, tokenizer, args.split, args.repeats, scratch)
        writer.shard_split(corpus, args.split, tokenizer, scratch, progress=False)
        flow = stream(scratch, args.split, args.seq_len, args.stream_samples, args.repeats)
    load = max(load, os.getloadavg()[0])

    wall, cpu = tok["wall_seconds"], tok["cpu_seconds"]
    print(f"load average: {load:.2f} (before or after, the higher)")
    print(f"tokenizer: {args.vocab_size} pieces, trained in {trained:.1f} s")
    print(f"{args.split}: {tok['books']} books, {tok['text_mb']:.1f} MB of text, {tok['tokens']:,} tokens\n")
    print("| tokenization | tokens/s (wall) | tokens/s (CPU) |\n| --- | ---: | ---: |")
    for name, key in [("plain sentencepiece, whole books, 1 process", "sentencepiece_whole_books"),
                      ("plain sentencepiece, line by line, 1 process", "sentencepiece_by_line"),
                      ("`prepare`, 1 worker", "prepare_1_workers"), ("`prepare`, 2 workers", "prepare_2_workers")]:
        by_cpu = f"{tok['tokens'] / cpu[key] / 1e6:.2f} M" if key != "prepare_2_workers" else "-"
        print(f"| {name} | {tok['tokens'] / wall[key] / 1e6:.2f} M | {by_cpu} |")
    base = "sentencepiece_by_line"
    print(f"\n1 worker vs plain sentencepiece by line: {wall['prepare_1_workers'] / wall[base] - 1:+.1%} time (wall), "
          f"{cpu['prepare_1_workers'] / cpu[base] - 1:+.1%} (CPU)")
    two, start = wall["prepare_2_workers"], wall["pool_start"]
    print(f"2 workers vs 1: {wall['prepare_1_workers'] / two:.2f}x; starting the pool takes {start:.2f} s of the "
          f"2-worker run's {two:.2f} s; without it: {wall['prepare_1_workers'] / (two - start):.2f}x")
    print(f"\n| stream, seq_len {flow['seq_len']} ({flow['windows_per_epoch']} windows/epoch) | tokens/s per rank |"
          "\n| --- | ---: |")
    for name, key in [("`PackedWindows[k]` in a loop", "direct"), ("`train_loader`, 0 workers", "loader_0_workers"),
                      ("`train_loader`, 2 workers", "loader_2_workers")]:
        print(f"| {name} | {flow[key] / 1e6:.0f} M |")
    print("\n" + json.dumps({"load_average": load, "tokenizer_seconds": trained, "tokenization": tok, "stream": flow}))


if __name__ == "__main__":
    main()
