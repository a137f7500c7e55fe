"""The whole preprocessing run: a tokenizer trained on the train split, then every split tokenized into shards."""

import sys

from data_pipeline.corpus import SPLITS, Corpus, books_digest
from data_pipeline.progress import log_line
from data_pipeline.storage import join, output_lock
from data_pipeline.tokenizer import existing_tokenizer, train_tokenizer
from data_pipeline.writer import check_workers, shard_split


def tokenizer_for(corpus, output, vocab_size=32000, model_type="bpe", sample_bytes=100_000_000, seed=0,
                  gutenberg=False, log=None):
    """The tokenizer in <output>/tokenizer.model, trained first if it is not there yet."""
    settings = {"model_type": model_type, "vocab_size": vocab_size, "sample_bytes": sample_bytes, "seed": seed,
                "gutenberg": gutenberg}
    # Sharding only some splits may need no train split, when the tokenizer is already there.
    has_train = corpus.fs.isdir(join(corpus.root, "train"))
    tokenizer = existing_tokenizer(output, settings, books_digest(corpus.books("train")) if has_train else None)
    if tokenizer is not None:
        log_line(log, f"tokenizer: using {tokenizer.name} ({tokenizer.checksum[:12]}...)")
        return tokenizer
    corpus.check_splits(["train"])   # before saying that it trains on it
    log_line(log, f"tokenizer: training a {vocab_size}-piece {model_type} model on {sample_bytes / 1e6:g} MB of train "
             "text; reading the sample")
    tokenizer, training = train_tokenizer(corpus, **settings, log=log)
    tokenizer.save(output, training)
    log_line(log, f"tokenizer: saved {output}/tokenizer.model ({tokenizer.checksum[:12]}...)")
    return tokenizer


def prepare(input, output, splits=SPLITS, vocab_size=32000, model_type="bpe", sample_bytes=100_000_000, seed=0,
            tokens_per_shard=50_000_000, workers=None, gutenberg=False, progress=True, command=None):
    """Tokenizer + shards of every split in `splits`; returns one SplitReport per split.

    Safe to re-run: a complete tokenizer and complete shards are kept, anything partial is redone.
    """
    log = sys.stderr if progress else None
    corpus = Corpus(input)
    corpus.check_splits(splits)
    check_workers(corpus, workers)
    with output_lock(output):
        tokenizer = tokenizer_for(corpus, output, vocab_size, model_type, sample_bytes, seed, gutenberg, log)
        return [
            shard_split(corpus, split, tokenizer, output, tokens_per_shard, workers, gutenberg, progress, command)
            for split in splits
        ]

