"""MemMamba's data pipeline: PG19-style book corpora -> tokenizer -> WebDataset shards -> training stream.

Modules, one concept each:
    storage     local paths and fsspec URLs (gs://, s3://, memory://) behind one interface
    text        bytes of a book -> normalised text
    corpus      the PG19 layout: splits, books, metadata.csv
    tokenizer   the sentencepiece tokenizer: training, encoding, fixed special ids
    manifest    manifest.json of a split, and checking shards against it
    writer      tokenizing books in a process pool and writing tar shards, resumably
    processes   child processes (pool, tokenizer trainer) that leave Ctrl-C to the parent
    progress    progress bars and lines of the long phases, and the per-split report
    prepare     the whole preprocessing run (tokenizer, then every split)
    reader      checked random access to the books of a prepared split
    stream      packed, shuffled, exactly resumable training windows and their loader (needs torch)
    evaluation  whole books and fixed validation windows (needs torch for the windows)
    cli         `python -m data_pipeline ...`
    errors      DataError, the one exception type for bad input or bad data

This package import stays light (no torch): the tokenizing process pool imports it in every worker.
"""

from data_pipeline.errors import DataError

__version__ = "0.1.0"

__all__ = ["DataError", "__version__"]
