"""Checked random access to the books of a prepared split.

Shards are checked against the manifest once, when the reader is made; after that a read of tokens [start, stop)
of a book is a slice of a memory map of the shard (local files) or one range request (fsspec URLs), so no book
is ever loaded whole unless asked for, and PG19's 2 B tokens never need to fit in memory.
"""

import hashlib

import numpy as np

from data_pipeline import manifest
from data_pipeline.errors import DataError
from data_pipeline.storage import display, is_local, join, resolve


class ShardedBooks:
    """The books of <root>/<split>, in manifest order.

    tokenizer_checksum: refuse shards made with any other tokenizer (None: accept the manifest's).
    skip_bad_shards: leave out truncated or corrupt shards (listed in `bad_shards`) instead of raising.
    """

    def __init__(self, root, split, tokenizer_checksum=None, skip_bad_shards=False):
        self.fs, path = resolve(root)
        self.split_dir = join(path, split)
        self.where = display(self.fs, self.split_dir)  # how messages name the split
        self.manifest = manifest.load(self.fs, self.split_dir)
        manifest.require_tokenizer(self.fs, self.split_dir, self.manifest, tokenizer_checksum)
        if not self.manifest["shards"]:
            raise DataError(f"{self.where}: no shards")
        self.tokenizer_checksum = self.manifest["tokenizer_checksum"]
        self.dtype = np.dtype(self.manifest["dtype"])
        self.bad_shards = []  # one-line messages naming the shards left out
        self.paths, self.books = [], []
        shard_of, offsets = [], []
        for shard in self.manifest["shards"]:
            path = join(self.split_dir, shard["name"])
            try:
                manifest.check_shard(self.fs, path, shard, self.dtype)
            except DataError as error:
                if not skip_bad_shards:
                    raise
                self.bad_shards.append(str(error))
                continue
            for sample in shard["samples"]:
                self.books.append({key: sample[key] for key in ("book_id", "title", "year", "num_tokens")})
                shard_of.append(len(self.paths))
                offsets.append(sample["offset"])
            self.paths.append(path)
        if not self.books:
            raise DataError(f"{self.where}: no readable shards")
        self.num_tokens = np.array([book["num_tokens"] for book in self.books], dtype=np.int64)
        self._shard_of = np.array(shard_of, dtype=np.int64)
        self._offsets = np.array(offsets, dtype=np.int64)
        self._maps = {}  # shard index -> memory map, opened on first use in each process

    def __len__(self):
        return len(self.books)

    @property
    def digest(self) -> str:
        """Which books, in which order, with how many tokens: what a training stream's order is made from."""
        listing = "".join(f"{book['book_id']}\t{book['num_tokens']}\n" for book in self.books)
        return hashlib.sha256(listing.encode()).hexdigest()[:16]

    def tokens(self, index, start=0, stop=None):
        """Tokens [start, stop) of book `index` (default: all of it), as an array of `self.dtype`."""
        stop = int(self.num_tokens[index]) if stop is None else stop
        shard = int(self._shard_of[index])
        begin = int(self._offsets[index]) + start * self.dtype.itemsize
        end = begin + (stop - start) * self.dtype.itemsize
        if not is_local(self.fs):
            return np.frombuffer(self.fs.cat_file(self.paths[shard], start=begin, end=end), dtype=self.dtype)
        if shard not in self._maps:
            self._maps[shard] = np.memmap(self.paths[shard], dtype=np.uint8, mode="r")
        return self._maps[shard][begin:end].view(self.dtype)

    # Memory maps stay with the process that opened them; a copy sent to a DataLoader worker opens its own.
    def __getstate__(self):
        return {**self.__dict__, "_maps": {}}
