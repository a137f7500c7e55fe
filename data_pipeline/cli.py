"""`python -m data_pipeline <command>`: prepare (everything), or each step on its own, and verify.

Problems with the data end the command with a one-line message and exit status 1, not a traceback.
"""

import argparse
import hashlib
import math
import shlex
import signal
import sys

from data_pipeline import __version__, manifest
from data_pipeline.corpus import SPLITS, Corpus
from data_pipeline.errors import DataError
from data_pipeline.prepare import prepare, tokenizer_for
from data_pipeline.progress import Progress
from data_pipeline.storage import check_folder, display, join, output_lock, resolve
from data_pipeline.tokenizer import Tokenizer
from data_pipeline.writer import default_workers, shard_split


def _parser():
    parser = argparse.ArgumentParser(prog="python -m data_pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)

    def corpus_args(command):
        command.add_argument("--input", required=True, help="PG19-layout corpus: a folder or fsspec URL (gs://, s3://)")
        command.add_argument("--output", required=True, help="folder or fsspec URL for tokenizer and shards")
        command.add_argument("--gutenberg", action="store_true",
                             help="strip Project Gutenberg licence header/footer (raw downloads; PG19 needs none)")
        command.add_argument("--quiet", action="store_true", help="no progress output, only the final report")

    def tokenizer_args(command):
        command.add_argument("--vocab-size", type=int, default=32000, help="tokenizer pieces (default 32000)")
        command.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe",
                             help="sentencepiece model (default bpe)")
        command.add_argument("--sample-mb", type=float, default=100.0,
                             help="MB of train text the tokenizer is trained on (default 100)")
        command.add_argument("--seed", type=int, default=0, help="seed of the tokenizer's training sample (default 0)")

    def shard_args(command):
        command.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS), help="(default: all)")
        command.add_argument("--tokens-per-shard", type=int, default=50_000_000,
                             help="a shard is closed after the book that reaches this (default 50,000,000)")
        command.add_argument("--workers", type=int, default=default_workers(), help="tokenizing processes (all cores)")

    command = commands.add_parser("prepare", help="train the tokenizer (if needed) and shard every split")
    corpus_args(command), tokenizer_args(command), shard_args(command)
    command = commands.add_parser("tokenizer", help="only train <output>/tokenizer.model (if needed)")
    corpus_args(command), tokenizer_args(command)
    command = commands.add_parser("shard", help="only shard splits with the existing <output>/tokenizer.model")
    corpus_args(command), shard_args(command)
    command = commands.add_parser("verify", help="check every shard of prepared splits, sha256 included")
    command.add_argument("output", help="the --output of prepare")
    command.add_argument("--splits", nargs="+", choices=SPLITS, help="(default: those in output)")
    return parser


def _print_reports(reports):
    for report in reports:
        print("\n".join(report.lines()))


def _check_arguments(args):
    """What can be wrong with the command line, found before a tokenizer is trained or a book is read."""
    for name in ("workers", "tokens_per_shard", "vocab_size"):
        if getattr(args, name, 1) < 1:
            raise DataError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 < getattr(args, "sample_mb", 1) < math.inf:  # argparse's float() also reads "nan" and "inf"
        raise DataError(f"--sample-mb must be more than 0 and finite, got {args.sample_mb:g}")
    check_folder(args.output)
    for split in getattr(args, "splits", []):
        check_folder(join(args.output, split))


def _verify(output, splits=None):
    """Check every shard of the splits (default: those in output), sha256 included; returns every problem found."""
    fs, root = resolve(output)
    if splits is None:
        splits = [split for split in SPLITS if fs.isdir(join(root, split))]
        if not splits:
            raise DataError(f"{display(fs, root)}: no prepared split in it (train/, validation/, test/)")
    model = join(root, "tokenizer.model")
    checksum = Tokenizer(fs.unstrip_protocol(model)).checksum if fs.exists(model) else None  # as `shard` uses
    problems = []
    for split in splits:
        try:
            problems += _verify_split(fs, join(root, split), split, checksum)
        except DataError as error:  # the split as a whole: no manifest, another tokenizer
            problems.append(str(error))
    return problems


def _verify_split(fs, split_dir, split, checksum):
    info = manifest.load(fs, split_dir)
    manifest.require_tokenizer(fs, split_dir, info, checksum)
    if not info["shards"]:
        print(f"{split}: no shards (the corpus has no book with text in it): ok")
        return []
    problems = []
    with Progress(f"verify {split}", len(info["shards"]), unit="shard") as bar:
        for shard in info["shards"]:
            path = join(split_dir, shard["name"])
            try:
                manifest.check_shard(fs, path, shard, info["dtype"])  # size, tar structure and npy headers
                digest = hashlib.sha256()
                with fs.open(path, "rb") as file:
                    while block := file.read(1 << 24):
                        digest.update(block)
                if digest.hexdigest() != shard["sha256"]:
                    raise DataError(f"{display(fs, path)}: sha256 does not match manifest.json (corrupt data)")
            except DataError as error:
                problems.append(str(error))
            bar.update(shard["num_tokens"], shard["bytes"])
    if not problems:
        print(f"{split}: {len(info['shards'])} shards, {info['num_books']} books, {info['num_tokens']:,} tokens: ok")
    return problems


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    command = shlex.join(["python", "-m", "data_pipeline", *argv])
    # SIGTERM (a scheduler, `kill`) stops a run like Ctrl-C does: worker processes stopped, one line, no traceback.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if args.command == "verify":
            problems = _verify(args.output, args.splits)
            for problem in problems:
                print(f"error: {problem}", file=sys.stderr)
            return 1 if problems else 0
        _check_arguments(args)
        tokenizer_settings = {}
        if args.command in ("prepare", "tokenizer"):
            tokenizer_settings = dict(vocab_size=args.vocab_size, model_type=args.model_type,
                                      sample_bytes=int(args.sample_mb * 1e6), seed=args.seed)
        if args.command == "prepare":
            _print_reports(prepare(args.input, args.output, args.splits, tokens_per_shard=args.tokens_per_shard,
                                   workers=args.workers, gutenberg=args.gutenberg, progress=not args.quiet,
                                   command=command, **tokenizer_settings))
        elif args.command == "tokenizer":
            corpus = Corpus(args.input)
            with output_lock(args.output):
                tokenizer_for(corpus, args.output, gutenberg=args.gutenberg, log=None if args.quiet else sys.stderr,
                              **tokenizer_settings)
        else:
            corpus = Corpus(args.input)
            corpus.check_splits(args.splits)
            tokenizer = Tokenizer(join(args.output, "tokenizer.model"))
            with output_lock(args.output):
                _print_reports([
                    shard_split(corpus, split, tokenizer, args.output, args.tokens_per_shard, args.workers,
                                args.gutenberg, not args.quiet, command)
                    for split in args.splits
                ])
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: run the same command again to go on where it stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
