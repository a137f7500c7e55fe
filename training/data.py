"""What the loop trains and validates on: the dataset named by `data.source`, read in the global sample order.

A dataset item is a LongTensor [seq_len + 1] of token ids, or a pair (ids, BoolTensor [seq_len] loss mask)
for tasks that score only some targets (a passkey's answer). Every batch comes out as (ids, mask or None).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from data_pipeline.evaluation import validation_windows
from data_pipeline.errors import DataError
from data_pipeline.stream import PackedWindows, train_loader
from training.config import RunConfig
from training.tasks import PasskeyWindows

Batch = tuple[Tensor, "Tensor | None"]


def train_dataset(cfg: RunConfig, tokenizer_checksum: str | None) -> Dataset:
    with _split_named("data.train_split", cfg.data.train_split):
        return _dataset(cfg, cfg.data.train_split, cfg.train.seed, tokenizer_checksum)


def validation_batches(cfg: RunConfig, tokenizer_checksum: str | None, dp_rank: int, dp_world: int
                       ) -> list[Batch]:
    """This rank's share of the fixed validation windows, in micro-batches, each batch with its loss mask.

    The ranks score every window once, whatever their number, so a run's validation loss does not change when it
    resumes on another number of ranks. Every rank runs as many forward passes as the others (ZeRO-3 needs it):
    a rank short of windows pads its share with ones it does not score (an all-False loss mask).
    """
    with _split_named("validation.split", cfg.validation.split):
        if cfg.data.source == "shards":
            items = list(validation_windows(cfg.data.path, cfg.validation.split, cfg.data.seq_len,
                                            cfg.validation.windows, tokenizer_checksum))
        else:  # a task's first windows of its validation split, always the same ones
            dataset = _dataset(cfg, cfg.validation.split, 0, tokenizer_checksum)
            items = [dataset[k] for k in range(cfg.validation.windows)]
    per_rank = -(-len(items) // dp_world)
    mine = [_with_mask(item, scored=True) for item in items[dp_rank * per_rank:(dp_rank + 1) * per_rank]]
    mine += [_with_mask(items[0], scored=False)] * (per_rank - len(mine))
    size = cfg.train.micro_batch_size
    return [collate(mine[i:i + size]) for i in range(0, per_rank, size)]


def train_batches(dataset: Dataset, cfg: RunConfig, dp_rank: int, dp_world: int, consumed_samples: int,
                  pin_memory: bool) -> DataLoader:
    """Endless micro-batches for one data-parallel rank, starting after `consumed_samples` global samples.

    Rank r's k-th micro-batch holds global samples consumed + k * dp_world * mb + r * mb + [0, mb), so an
    optimizer step covers the same samples on any number of ranks (data_pipeline.stream.RankBatches).
    """
    return train_loader(dataset, cfg.train.micro_batch_size, dp_rank, dp_world, consumed_samples,
                        cfg.data.num_workers, pin_memory, collate_fn=collate)


def stream_state(dataset: Dataset, consumed_samples: int) -> dict:
    """The data stream's checkpoint state: its position and what the windows depend on (seq_len, seed, ...)."""
    return dataset.state_dict(consumed_samples)


# The config keys behind a stream state's entries: another value of one is another order of the data.
STREAM_SETTINGS = {"seq_len": "data.seq_len", "seed": "train.seed", "key_digits": "data.passkey.key_digits"}


def check_stream_state(dataset: Dataset, state: dict, checkpoint: Path) -> None:
    """Refuse a checkpoint's stream state that does not fit this dataset (another source, seq_len, seed or
    tokenizer), naming the config key where a setting makes the difference."""
    current = dataset.state_dict(state["consumed_samples"])
    changed = [f"{name} is {current[key]!r} here, {state[key]!r} in the checkpoint"
               for key, name in STREAM_SETTINGS.items()
               if key in state and key in current and state[key] != current[key]]   # (not across sources)
    new_run = f"to train its weights on with this data, start a new run with train.init_from={checkpoint}"
    if changed:
        raise DataError(f"{checkpoint}: {', '.join(changed)}, which would change the order of the data; {new_run}")
    try:
        dataset.load_state_dict(state)
    except DataError as error:
        raise DataError(f"{error}; {new_run}") from None


def collate(items: list) -> Batch:
    if isinstance(items[0], Tensor):
        return torch.stack(items), None
    ids, masks = zip(*items)
    return torch.stack(ids), torch.stack(masks)


def _with_mask(item, scored: bool) -> tuple[Tensor, Tensor]:
    """A dataset item as (ids, loss mask); an unscored item's mask is all False."""
    ids, mask = (item, torch.ones(len(item) - 1, dtype=torch.bool)) if isinstance(item, Tensor) else item
    return ids, mask if scored else torch.zeros_like(mask)


@contextlib.contextmanager
def _split_named(key: str, split: str):
    """Adds the config key that chose the split to a data error about it: a corpus prepared without that split
    (prepare --splits train) is fixed there, or by preparing the split."""
    try:
        yield
    except DataError as error:
        raise DataError(f"{error}; set by {key}={split!r}") from None


def _dataset(cfg: RunConfig, split: str, seed: int, tokenizer_checksum: str | None) -> Dataset:
    if cfg.data.source == "shards":
        return PackedWindows(cfg.data.path, split, cfg.data.seq_len, seed, tokenizer_checksum)
    return PasskeyWindows(root=cfg.data.path, split=split, seq_len=cfg.data.seq_len, seed=seed,
                          tokenizer_checksum=tokenizer_checksum, key_digits=cfg.data.passkey.key_digits)

