"""Shared data fixtures: pg19-mini, and its shards built once per test session.

`pg19_shards` is also used by the training tests: a small (1,024-piece) tokenizer and every split of pg19-mini
in shards of about 1 M tokens (train: 6 shards, validation and test: 1 each).
"""

import shutil
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

PG19_MINI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pg19-mini"

# Small enough to build in a few seconds on 2 cores, big enough for several shards per split.
SHARDS_SETTINGS = dict(vocab_size=1024, sample_bytes=2_000_000, seed=0, tokens_per_shard=1_000_000)


class Shards(NamedTuple):
    root: Path  # the --output of prepare: tokenizer.model, <split>/shard-*.tar, <split>/manifest.json
    tokenizer_path: Path
    checksum: str  # sha256 of tokenizer.model
    settings: dict  # the prepare() arguments it was built with
    reports: list  # one SplitReport per split


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared CPU an intra-op thread
    that waits for a busy core makes every small op many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def pg19_mini():
    assert PG19_MINI.is_dir(), f"{PG19_MINI} is missing: the data tests read pg19-mini from ../shared"
    return PG19_MINI


@pytest.fixture(scope="session")
def pg19_shards(pg19_mini, tmp_path_factory):
    from data_pipeline.prepare import prepare
    from data_pipeline.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("pg19_shards")
    reports = prepare(pg19_mini, root, workers=2, progress=False, **SHARDS_SETTINGS)
    checksum = Tokenizer(root / "tokenizer.model").checksum
    return Shards(root, root / "tokenizer.model", checksum, SHARDS_SETTINGS, reports)


@pytest.fixture
def tokenizer_settings(pg19_shards):
    """The session tokenizer's training settings: with them, prepare reuses a copy of it instead of training."""
    return {key: pg19_shards.settings[key] for key in ("vocab_size", "sample_bytes", "seed")}


@pytest.fixture
def output_with_tokenizer(pg19_shards, tmp_path):
    """An empty output folder holding only the session's tokenizer, so prepare skips training."""
    output = tmp_path / "out"
    output.mkdir()
    for name in ("tokenizer.model", "tokenizer.json"):
        shutil.copy(pg19_shards.root / name, output / name)
    return output
