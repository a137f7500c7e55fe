"""The training stream and the evaluation readers: packing, shuffling, rank splitting, exact resume, bad data."""

import json
import os
import re
import shutil
import signal
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline import DataError
from data_pipeline.evaluation import iter_books, validation_windows
from data_pipeline.reader import ShardedBooks
from data_pipeline.stream import PackedWindows, RankBatches, train_loader
from data_pipeline.tokenizer import EOS_ID

DOCS = Path(__file__).resolve().parents[1] / "docs" / "data_pipeline.md"


def packed_stream(root, split, book_order=None):
    """The split's books joined with EOS, in manifest order or in the given order of book indices."""
    books = [tokens for _, tokens in iter_books(root, split)]
    order = range(len(books)) if book_order is None else book_order
    return np.concatenate([np.append(books[i].astype(np.int64), EOS_ID) for i in order])


def test_unshuffled_windows_tile_the_packed_stream(pg19_shards):
    ds = PackedWindows(pg19_shards.root, "validation", seq_len=1000, seed=0, shuffle=False)
    stream = packed_stream(pg19_shards.root, "validation")
    assert len(ds) == (len(stream) - 1) // 1000 == 443
    for k in range(len(ds)):
        assert torch.equal(ds[k], torch.from_numpy(stream[k * 1000 : k * 1000 + 1001]))
    assert ds[0].dtype == torch.int64


def test_each_epoch_is_a_reshuffle_of_books_and_windows(pg19_shards):
    ds = PackedWindows(pg19_shards.root, "validation", seq_len=1000, seed=7)
    for epoch in (0, 1):
        books, _, windows = ds._epoch(epoch)
        assert sorted(windows) == list(range(len(ds)))  # every window of the epoch exactly once
        stream = packed_stream(pg19_shards.root, "validation", books)
        for i in range(0, len(ds), 37):
            w = int(windows[i])
            assert torch.equal(ds[epoch * len(ds) + i], torch.from_numpy(stream[w * 1000 : w * 1000 + 1001]))
    assert not np.array_equal(ds._epoch(0)[2], ds._epoch(1)[2])
    same = PackedWindows(pg19_shards.root, "validation", seq_len=1000, seed=7)
    other = PackedWindows(pg19_shards.root, "validation", seq_len=1000, seed=8)
    assert all(torch.equal(ds[k], same[k]) for k in (0, 5, 900))
    assert not torch.equal(ds[0], other[0])
    with pytest.raises(IndexError, match="^sample index -1 is negative$"):
        ds[-1]


def test_rank_batches_follow_the_global_order():
    batches = RankBatches(micro_batch_size=3, dp_rank=1, dp_world=4, consumed_samples=24)
    first = [next(b) for b in [iter(batches)] for _ in range(3)]
    assert first == [[27, 28, 29], [39, 40, 41], [51, 52, 53]]
    with pytest.raises(ValueError, match="^bad stream position: micro_batch_size=2, dp_rank=2, dp_world=2, "
                                         "consumed_samples=0$"):
        RankBatches(2, dp_rank=2, dp_world=2)


def test_a_window_needs_one_token_more_than_seq_len_and_never_reads_past_the_stream(pg19_shards):
    """A stream of n tokens holds (n - 1) // seq_len windows: the last one ends at or before the final EOS."""
    stream = packed_stream(pg19_shards.root, "test")
    n = len(stream)
    pairs = PackedWindows(pg19_shards.root, "test", seq_len=1, seed=0, shuffle=False)
    assert len(pairs) == n - 1  # every token but the first is a target once
    assert torch.equal(pairs[n - 2], torch.from_numpy(stream[-2:]))
    whole = PackedWindows(pg19_shards.root, "test", seq_len=n - 1, seed=0, shuffle=False)
    assert len(whole) == 1 and torch.equal(whole[0], torch.from_numpy(stream))
    with pytest.raises(DataError, match=f"^{pg19_shards.root}/test: {n} tokens, fewer than one window of {n + 1}$"):
        PackedWindows(pg19_shards.root, "test", seq_len=n, seed=0)
    with pytest.raises(ValueError, match="^seq_len must be positive, got 0$"):
        PackedWindows(pg19_shards.root, "test", seq_len=0, seed=0)


@pytest.mark.parametrize("position", [dict(micro_batch_size=0, dp_rank=0, dp_world=1, consumed_samples=0),
                                      dict(micro_batch_size=2, dp_rank=-1, dp_world=2, consumed_samples=0),
                                      dict(micro_batch_size=2, dp_rank=0, dp_world=2, consumed_samples=-4)])
def test_an_impossible_stream_position_is_refused(position):
    # an empty micro-batch would loop for ever; a negative position would read samples before the run's first
    expected = ", ".join(f"{key}={value}" for key, value in position.items())
    with pytest.raises(ValueError, match=f"^bad stream position: {expected}$"):
        RankBatches(**position)


def test_loader_workers_outlive_the_stop_signals(pg19_shards):
    # Slurm and the launchers signal the whole process group: the workers must keep feeding the training process
    # while it finishes its step and checkpoints.
    ds = PackedWindows(pg19_shards.root, "test", seq_len=64, seed=0)
    loader = iter(train_loader(ds, micro_batch_size=2, dp_rank=0, dp_world=1, num_workers=1))
    assert torch.equal(next(loader), torch.stack([ds[0], ds[1]]))
    for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        os.kill(loader._workers[0].pid, stop)
    for k in range(2, 40, 2):  # more batches than the loader prefetches: the worker itself must make them
        assert torch.equal(next(loader), torch.stack([ds[k], ds[k + 1]]))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_union_over_ranks_and_workers_is_exactly_the_epoch(pg19_shards, num_workers):
    ds = PackedWindows(pg19_shards.root, "validation", seq_len=2048, seed=3)
    dp_world, micro = 3, 4
    steps = len(ds) // (dp_world * micro)  # whole global batches in one epoch (216 windows -> 18)
    seen = {}
    for rank in range(dp_world):
        loader = iter(train_loader(ds, micro, rank, dp_world, consumed_samples=0, num_workers=num_workers))
        for step in range(steps):
            batch = next(loader)
            assert batch.shape == (micro, 2049) and batch.dtype == torch.int64
            for i, row in enumerate(batch):
                seen[step * dp_world * micro + rank * micro + i] = row
    assert sorted(seen) == list(range(steps * dp_world * micro))
    assert len(ds) == steps * dp_world * micro  # so the union is the whole epoch
    for k, row in seen.items():
        assert torch.equal(row, ds[k])


def run(ds, dp_world, micro, accum, steps, consumed=0, num_workers=0):
    """The global batches of `steps` optimizer steps, each as rows in global order, as a data-parallel job sees them."""
    loaders = [iter(train_loader(ds, micro, r, dp_world, consumed, num_workers)) for r in range(dp_world)]
    out = []
    for _ in range(steps):
        rows = [next(loaders[r]) for _ in range(accum) for r in range(dp_world)]  # micro-step by micro-step
        out.append(torch.cat(rows))
    return out


def test_resume_on_same_and_different_rank_counts(pg19_shards):
    ds = PackedWindows(pg19_shards.root, "validation", seq_len=4096, seed=11)
    global_batch = 8
    assert len(ds) == 108  # so 20 steps of 8 cross into the second epoch
    uninterrupted = run(ds, dp_world=2, micro=2, accum=2, steps=20)
    for step, batch in enumerate(uninterrupted):  # step s is samples [8s, 8s + 8), in order
        assert torch.equal(batch, torch.stack([ds[k] for k in range(step * 8, step * 8 + 8)]))

    state = ds.state_dict(consumed_samples=9 * global_batch)  # a checkpoint after 9 steps
    assert json.loads(json.dumps(state)) == state and state["consumed_samples"] == 72
    documented = re.search(r"`state_dict\(consumed_samples\)` is `\{(.*?)\}`", DOCS.read_text(), re.S).group(1)
    assert state.keys() == set(re.findall(r'"(\w+)"', documented))
    for dp_world, micro, accum, workers in [(2, 2, 2, 2), (4, 1, 2, 1), (1, 4, 2, 0), (8, 1, 1, 0)]:
        restarted = PackedWindows(pg19_shards.root, "validation", seq_len=4096, seed=11)
        consumed = restarted.load_state_dict(state)
        resumed = run(restarted, dp_world, micro, accum, steps=11, consumed=consumed, num_workers=workers)
        assert all(torch.equal(a, b) for a, b in zip(resumed, uninterrupted[9:], strict=True))


def test_checkpoint_state_of_another_dataset_is_refused(pg19_shards):
    ds = PackedWindows(pg19_shards.root, "validation", seq_len=4096, seed=11)
    state = ds.state_dict(64)
    for other in (PackedWindows(pg19_shards.root, "validation", seq_len=2048, seed=11),
                  PackedWindows(pg19_shards.root, "test", seq_len=4096, seed=11),
                  PackedWindows(pg19_shards.root, "validation", seq_len=4096, seed=12)):
        with pytest.raises(DataError, match="checkpoint's data stream does not match this dataset"):
            other.load_state_dict(state)


def test_checkpoint_state_of_the_same_amount_of_other_data_is_refused(pg19_shards, tmp_path):
    """The same books in another order (or other books) with the same number of windows: another data order."""
    shutil.copytree(pg19_shards.root / "train", tmp_path / "train")
    manifest_path = tmp_path / "train" / "manifest.json"
    listing = json.loads(manifest_path.read_text())
    listing["shards"].reverse()
    manifest_path.write_text(json.dumps(listing))
    original = PackedWindows(pg19_shards.root, "train", seq_len=4096, seed=11)
    reordered = PackedWindows(tmp_path, "train", seq_len=4096, seed=11)
    state = original.state_dict(64)
    assert len(reordered) == len(original) and not torch.equal(reordered[64], original[64])
    with pytest.raises(DataError) as error:
        reordered.load_state_dict(state)
    assert str(error.value) == f"{tmp_path}/train: checkpoint's data stream does not match this dataset " \
                               "(other books than the checkpoint's, or in another order)"
    del state["books"]   # written before the books were recorded
    assert reordered.load_state_dict(state) == 64


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # more workers than cores, on purpose
def test_a_rank_with_fewer_shards_than_workers_does_not_hang(pg19_shards):
    ds = PackedWindows(pg19_shards.root, "test", seq_len=512, seed=0)  # one shard, three books
    assert len(ds.books.paths) == 1
    loader = iter(train_loader(ds, micro_batch_size=2, dp_rank=1, dp_world=2, num_workers=3))
    assert [tuple(next(loader).shape) for _ in range(10)] == [(2, 513)] * 10


def test_windows_read_a_long_split_without_loading_whole_books(pg19_shards):
    ds = PackedWindows(pg19_shards.root, "train", seq_len=8000, seed=0)
    assert len(ds) == (int(ds.books.num_tokens.sum()) + 29 - 1) // 8000
    tokens = ds.books.tokens(0, 10, 20)
    assert isinstance(tokens.base, np.memmap) or isinstance(tokens.base.base, np.memmap)
    assert ds[123456].shape == (8001,)


def test_iter_books_and_validation_windows(pg19_shards):
    books = list(iter_books(pg19_shards.root, "test", pg19_shards.checksum))
    assert [m["book_id"] for m, _ in books] == ["43", "145", "2591"]
    meta, tokens = books[0]
    assert meta == {"book_id": "43", "title": "The Strange Case Of Dr. Jekyll And Mr. Hyde by Robert Louis Stevenson",
                    "year": 1886, "num_tokens": len(tokens)}

    windows = validation_windows(pg19_shards.root, "validation", seq_len=1024, max_windows=16)
    assert windows.shape == (16, 1025)
    unshuffled = PackedWindows(pg19_shards.root, "validation", 1024, seed=0, shuffle=False)
    assert torch.equal(windows[0], unshuffled[0]) and torch.equal(windows[-1], unshuffled[len(unshuffled) - 1])
    assert torch.equal(windows, validation_windows(pg19_shards.root, "validation", 1024, 16))


@pytest.fixture
def copy(pg19_shards, tmp_path):
    """A copy of the session's shards that a test may damage."""
    shutil.copytree(pg19_shards.root, tmp_path / "shards")
    return tmp_path / "shards"


def test_wrong_tokenizer_is_refused(copy):
    with pytest.raises(DataError, match=f"{copy}/train/manifest.json: shards were made with tokenizer .*, not 000000"):
        PackedWindows(copy, "train", 128, seed=0, tokenizer_checksum="0" * 64)
    with pytest.raises(DataError, match=f"{copy}/test/manifest.json: shards were made with tokenizer"):
        list(iter_books(copy, "test", tokenizer_checksum="0" * 64))


def test_checkpoint_state_of_the_same_books_with_other_lengths_is_refused(pg19_mini, pg19_shards, output_with_tokenizer,
                                                                         tokenizer_settings, tmp_path):
    """The same book ids re-prepared from other text (say, other cleaning), with the same tokenizer and number of
    windows: other windows at every position."""
    from data_pipeline.prepare import prepare

    corpus = tmp_path / "corpus"
    shutil.copytree(pg19_mini / "test", corpus / "test")
    first, second = sorted((corpus / "test").glob("*.txt"))[:2]
    text = first.read_bytes()
    cut = text.rindex(b"\n", 0, len(text) - 5000)  # a paragraph or so moves from one book to the other
    first.write_bytes(text[:cut + 1])
    second.write_bytes(second.read_bytes() + text[cut + 1:])
    prepare(corpus, output_with_tokenizer, splits=["test"], workers=1, progress=False, **tokenizer_settings)
    original = PackedWindows(pg19_shards.root, "test", seq_len=100_000, seed=0)
    changed = PackedWindows(output_with_tokenizer, "test", seq_len=100_000, seed=0)
    assert [book["book_id"] for book in changed.books.books] == [book["book_id"] for book in original.books.books]
    assert len(changed) == len(original) and changed.books.tokenizer_checksum == original.books.tokenizer_checksum
    assert not np.array_equal(changed.books.num_tokens, original.books.num_tokens)
    with pytest.raises(DataError, match="\\(other books than the checkpoint's, or in another order\\)$"):
        changed.load_state_dict(original.state_dict(5))


def test_checkpoint_state_of_shards_from_another_tokenizer_is_refused(copy):
    # the same books with the same lengths, tokenized otherwise: other token ids in every window
    state = PackedWindows(copy, "validation", seq_len=1024, seed=0).state_dict(64)
    path = copy / "validation" / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "tokenizer_checksum": "0" * 64}))
    retokenized = PackedWindows(copy, "validation", seq_len=1024, seed=0)
    with pytest.raises(DataError, match=f"^{copy}/validation: checkpoint's data stream does not match this dataset "
                                        f"\\(tokenizer_checksum '{state['tokenizer_checksum']}' != '0{{64}}'\\)$"):
        retokenized.load_state_dict(state)


def test_truncated_shard_names_the_shard_or_is_skipped_and_counted(copy):
    shard = copy / "train" / "shard-000002.tar"
    shard.write_bytes(shard.read_bytes()[:-5000])
    with pytest.raises(DataError, match=f"^{shard}: .* bytes, manifest.json says .* \\(truncated or overwritten\\)$"):
        PackedWindows(copy, "train", 128, seed=0)
    ds = PackedWindows(copy, "train", 128, seed=0, skip_bad_shards=True)
    assert len(ds.books.bad_shards) == 1 and ds.books.bad_shards[0].startswith(str(shard))
    lost = json.loads((copy / "train/manifest.json").read_text())["shards"][2]["num_samples"]
    assert len(ds.books) == 29 - lost
    assert ds[len(ds) * 2].shape == (129,)


def test_corrupt_tar_header_names_the_shard(copy):
    shard = copy / "train" / "shard-000001.tar"
    with tarfile.open(shard) as tar:
        header = tar.getmembers()[2].offset  # the tar header of the second book's .json
    data = bytearray(shard.read_bytes())
    data[header : header + 100] = b"x" * 100  # its name field: the header checksum no longer matches
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"^{shard}: corrupt, or its members do not match manifest.json$"):
        list(iter_books(copy, "train"))
    (meta, _), *_ = iter_books(copy, "train", skip_bad_shards=True)
    assert meta["book_id"] == "12"  # the first book of shard-000000


def test_corrupt_npy_header_names_the_shard_and_the_book(copy):
    shard = copy / "validation" / "shard-000000.tar"
    key = json.loads((copy / "validation" / "manifest.json").read_text())["shards"][0]["samples"][1]["key"]
    with tarfile.open(shard) as tar:
        header = tar.getmember(f"{key}.npy").offset_data
    data = bytearray(shard.read_bytes())
    descr = data.index(b"'descr': '<u2'", header)
    data[descr : descr + 14] = b"'descr': '<i2'"  # still a valid .npy header, of other tokens than the manifest's
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"^{shard}: {key}.npy has a corrupt .npy header$"):
        ShardedBooks(copy, "validation")


def test_manifest_that_does_not_match_the_shards_is_refused(copy):
    path = copy / "validation" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shards"][0]["samples"][1]["num_tokens"] += 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=f"^{copy}/validation/shard-000000.tar: 98.npy does not match manifest.json$"):
        ShardedBooks(copy, "validation")


def test_missing_and_unfinished_splits_are_refused(copy, tmp_path):
    with pytest.raises(DataError, match=f"^{tmp_path}/nothing/train: no such directory$"):
        PackedWindows(tmp_path / "nothing", "train", 128, seed=0)
    (copy / "test" / "manifest.json").unlink()
    with pytest.raises(DataError, match=f"^{copy}/test/manifest.json: missing"):
        list(iter_books(copy, "test"))
    path = copy / "validation" / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(DataError, match=f"^{path}: unfinished"):
        validation_windows(copy, "validation", 128, 4)
    path.write_text(json.dumps({**manifest, "complete": True, "format": "memmamba-shards/0"}))
    with pytest.raises(DataError, match=f"^{path}: format 'memmamba-shards/0', expected 'memmamba-shards/1'$"):
        ShardedBooks(copy, "validation")
    path.write_text("[]")
    with pytest.raises(DataError, match=f"^{path}: format None, expected 'memmamba-shards/1'$"):
        ShardedBooks(copy, "validation")
    path.write_text(json.dumps({key: value for key, value in manifest.items() if key not in ("dtype", "num_books")}))
    with pytest.raises(DataError, match=f"^{path}: no dtype, num_books; prepare the split again$"):
        ShardedBooks(copy, "validation")
    path.write_text(json.dumps({**manifest, "shards": []}))
    with pytest.raises(DataError, match=f"^{copy}/validation: no shards$"):
        ShardedBooks(copy, "validation")
    (copy / "train" / "shard-000003.tar").unlink()
    with pytest.raises(DataError, match=f"^{copy}/train/shard-000003.tar: missing \\(listed in manifest.json\\)$"):
        ShardedBooks(copy, "train")
