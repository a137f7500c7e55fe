"""Evaluation data: whole books for long-context perplexity, and a fixed set of validation windows."""

import numpy as np
import torch

from data_pipeline.reader import ShardedBooks
from data_pipeline.stream import PackedWindows


def iter_books(root, split, tokenizer_checksum=None, skip_bad_shards=False):
    """(meta, tokens) for every book of the split in manifest order (by book id).

    meta: {"book_id", "title", "year", "num_tokens"}; tokens: a 1-d uint16/uint32 array of the whole book
    (no EOS added). All shards are checked before the first book is returned.
    """
    books = ShardedBooks(root, split, tokenizer_checksum, skip_bad_shards)
    for index, meta in enumerate(books.books):
        yield dict(meta), np.array(books.tokens(index))


def validation_windows(root, split, seq_len, max_windows, tokenizer_checksum=None):
    """LongTensor[n, seq_len + 1]: up to max_windows windows spread evenly over the unshuffled split.

    Always the same windows for the same shards, so validation losses are comparable across runs and resumes.
    """
    dataset = PackedWindows(root, split, seq_len, seed=0, tokenizer_checksum=tokenizer_checksum, shuffle=False)
    count = min(max_windows, len(dataset))
    picks = np.unique(np.linspace(0, len(dataset) - 1, count).round().astype(np.int64))
    return torch.stack([dataset[int(k)] for k in picks])
