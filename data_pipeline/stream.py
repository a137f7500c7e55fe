"""The training stream: packed, shuffled windows of tokens, split over data-parallel ranks, exactly resumable.

Each epoch joins all books of the split into one token stream, every book followed by EOS, in an order shuffled
from (seed, epoch). The stream is cut into windows of seq_len + 1 tokens that start every seq_len tokens (the last
token of one window is the first of the next, so every token is a prediction target once), and the windows are
shuffled from (seed, epoch) too. Every epoch has the same number of windows, W.

Global sample index k is window k % W of epoch k // W. An optimizer step with global batch G covers samples
[step * G, (step + 1) * G), whatever the number of ranks, so the stream's whole state is one number,
consumed_samples: resuming on another number of ranks with the same G continues the same global order.
"""

import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data_pipeline.errors import DataError
from data_pipeline.reader import ShardedBooks
from data_pipeline.tokenizer import EOS_ID


class PackedWindows(Dataset):
    """Map-style dataset: ds[k] is global sample k, a LongTensor of seq_len + 1 tokens; len(ds) is W.

    Any k >= 0 is valid: k >= W reads later epochs. shuffle=False keeps books and windows in manifest order
    (used for fixed validation windows).
    """

    def __init__(self, root, split, seq_len, seed, tokenizer_checksum=None, shuffle=True, skip_bad_shards=False):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.books = ShardedBooks(root, split, tokenizer_checksum, skip_bad_shards)
        self.split, self.seq_len, self.seed, self.shuffle = split, seq_len, seed, shuffle
        self._lengths = self.books.num_tokens + 1  # each book is followed by EOS
        self.windows_per_epoch = int((self._lengths.sum() - 1) // seq_len)
        if self.windows_per_epoch == 0:
            raise DataError(f"{self.books.where}: {self._lengths.sum()} tokens, fewer than one window of {seq_len + 1}")
        self._epochs = {}  # epoch -> (book order, start of each book in the stream, window order)

    def __len__(self):
        return self.windows_per_epoch

    def _epoch(self, epoch):
        if epoch not in self._epochs:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch])
                books, windows = rng.permutation(len(self._lengths)), rng.permutation(self.windows_per_epoch)
            else:
                books, windows = np.arange(len(self._lengths)), np.arange(self.windows_per_epoch)
            starts = np.concatenate([[0], np.cumsum(self._lengths[books])[:-1]])
            if len(self._epochs) >= 2:  # a DataLoader worker at an epoch boundary needs two epochs at once
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = (books, starts, windows)
        return self._epochs[epoch]

    def __getitem__(self, k):
        if k < 0:
            raise IndexError(f"sample index {k} is negative")
        epoch, i = divmod(int(k), self.windows_per_epoch)
        books, starts, windows = self._epoch(epoch)
        position = int(windows[i]) * self.seq_len  # in the epoch's stream
        size = self.seq_len + 1
        out = np.empty(size, dtype=np.int64)
        slot = int(np.searchsorted(starts, position, side="right")) - 1  # the book slot the window starts in
        filled = 0
        while filled < size:
            book = int(books[slot])
            offset = position + filled - int(starts[slot])
            length = int(self.books.num_tokens[book])
            if offset < length:
                take = min(length - offset, size - filled)
                out[filled : filled + take] = self.books.tokens(book, offset, offset + take)
                filled += take
            else:  # the EOS after the book
                out[filled] = EOS_ID
                filled += 1
                slot += 1
        return torch.from_numpy(out)

    def state_dict(self, consumed_samples):
        """The stream's checkpoint state after `consumed_samples` global samples."""
        return {
            "consumed_samples": int(consumed_samples),
            "seed": self.seed,
            "seq_len": self.seq_len,
            "windows_per_epoch": self.windows_per_epoch,
            "tokenizer_checksum": self.books.tokenizer_checksum,
            "books": self.books.digest,
        }

    def load_state_dict(self, state):
        """Check a state from `state_dict` against this dataset and return its consumed_samples."""
        return checked_position(self.books.where, state, self.state_dict(state["consumed_samples"]))


def checked_position(where: str, state: dict, current: dict) -> int:
    """A dataset's `load_state_dict`: the saved stream state's consumed_samples, if every other entry is this
    dataset's (`current`); else a DataError naming what differs."""
    # a state without "books" comes from a version of the stack that did not record them
    different = [key for key in current if state.get(key) != current[key] and (key != "books" or key in state)]
    if different:
        detail = ", ".join("other books than the checkpoint's, or in another order" if key == "books"  # a digest
                           else f"{key} {state.get(key)!r} != {current[key]!r}" for key in different)
        raise DataError(f"{where}: checkpoint's data stream does not match this dataset ({detail})")
    return state["consumed_samples"]


class RankBatches(Sampler):
    """Micro-batches of global sample indices for one data-parallel rank, without end.

    Rank r's k-th micro-batch (counting from the resume point) holds samples
    consumed_samples + k * dp_world * micro_batch_size + r * micro_batch_size + [0, micro_batch_size).
    """

    def __init__(self, micro_batch_size, dp_rank, dp_world, consumed_samples=0):
        if not 0 <= dp_rank < dp_world or micro_batch_size < 1 or consumed_samples < 0:
            raise ValueError(f"bad stream position: micro_batch_size={micro_batch_size}, dp_rank={dp_rank}, "
                             f"dp_world={dp_world}, consumed_samples={consumed_samples}")
        self.micro_batch_size, self.dp_rank, self.dp_world = micro_batch_size, dp_rank, dp_world
        self.consumed_samples = consumed_samples

    def __iter__(self):
        start = self.consumed_samples + self.dp_rank * self.micro_batch_size
        while True:
            yield list(range(start, start + self.micro_batch_size))
            start += self.dp_world * self.micro_batch_size


def train_loader(dataset, micro_batch_size, dp_rank, dp_world, consumed_samples=0, num_workers=2,
                 pin_memory=False, collate_fn=None):
    """An endless DataLoader of LongTensor[micro_batch_size, seq_len + 1] for one data-parallel rank.

    Batches come in RankBatches order whatever num_workers is (the DataLoader hands batches to workers in turn
    and returns them in order). Sequence-parallel ranks of one group pass the same dp_rank. `collate_fn` is
    the DataLoader's, for datasets whose items are not plain tensors.
    """
    sampler = RankBatches(micro_batch_size, dp_rank, dp_world, consumed_samples)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                      collate_fn=collate_fn, worker_init_fn=ignore_stop_signals)


def ignore_stop_signals(worker_id=None):
    # A launcher or Slurm signals the whole process group; the training process must outlive the signal long
    # enough to finish its step and checkpoint, so its loader workers leave the stopping to it.
    for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(stop, signal.SIG_IGN)
