"""prepare: tokenizer training, shard writing, manifests, resuming, and the CLI, on pg19-mini."""

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
import webdataset

from data_pipeline import DataError, cli, progress
from data_pipeline.corpus import Corpus, read_book
from data_pipeline.evaluation import iter_books
from data_pipeline.prepare import prepare, tokenizer_for
from data_pipeline.progress import Progress
from data_pipeline.storage import output_lock
from data_pipeline.stream import PackedWindows
from data_pipeline.tokenizer import Tokenizer, train_tokenizer, training_sample
from data_pipeline import writer
from data_pipeline.writer import shard_split

REPO = Path(__file__).resolve().parents[1]


def snapshot(folder):
    """Every file under folder with its modification time and sha256."""
    return {
        path.relative_to(folder): (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
        for path in sorted(folder.rglob("*")) if path.is_file()
    }


def manifest_of(root, split):
    return json.loads((Path(root) / split / "manifest.json").read_text())


def test_layout_and_tokenizer(pg19_shards):
    root = pg19_shards.root
    names = sorted(p.name for p in root.iterdir())
    assert names == [".lock", "test", "tokenizer.json", "tokenizer.model", "train", "validation"]
    info = json.loads((root / "tokenizer.json").read_text())
    tokenizer = Tokenizer(pg19_shards.tokenizer_path)
    assert info["checksum"] == tokenizer.checksum == hashlib.sha256(pg19_shards.tokenizer_path.read_bytes()).hexdigest()
    assert info["special_ids"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "newline": 4}
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)
    assert tokenizer.vocab_size == 1024 and tokenizer.dtype == np.uint16
    assert [r.shards_written for r in pg19_shards.reports] == [6, 1, 1]
    for split in ("train", "validation", "test"):
        manifest = manifest_of(root, split)
        assert manifest["complete"] and manifest["tokenizer_checksum"] == tokenizer.checksum
        assert sorted(p.name for p in (root / split).iterdir()) == (
            ["manifest.json"] + [s["name"] for s in manifest["shards"]]
        )


def test_tokenizer_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match=f"^{tmp_path}/missing.model: no such tokenizer model$"):
        Tokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match=f"^{tmp_path}/junk.model: not a sentencepiece model"):
        Tokenizer(tmp_path / "junk.model")
    with pytest.raises(DataError, match=f"^{tmp_path}: a folder, not a tokenizer model$"):
        Tokenizer(tmp_path)


def test_round_trip_reproduces_normalised_text(pg19_mini, pg19_shards):
    corpus, tokenizer = Corpus(pg19_mini), Tokenizer(pg19_shards.tokenizer_path)
    books = {book.book_id: book for split in ("validation", "test") for book in corpus.books(split)}
    for split in ("validation", "test"):
        for meta, tokens in iter_books(pg19_shards.root, split, pg19_shards.checksum):
            text, _, _ = read_book(corpus.fs, books[meta["book_id"]])
            assert tokenizer.decode(tokens) == text
            if split == "validation":  # encoding line by line gives sentencepiece's ids for the whole text
                assert tokenizer._sp.encode(text) == tokens.tolist()
    assert tokenizer.decode(tokenizer.encode("a\u2581b")) == "a b"  # the one exception, documented


def test_manifest_counts_match_a_plain_tarfile_read(pg19_shards):
    for split in ("train", "validation", "test"):
        manifest = manifest_of(pg19_shards.root, split)
        for shard in manifest["shards"]:
            path = pg19_shards.root / split / shard["name"]
            assert path.stat().st_size == shard["bytes"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
            with tarfile.open(path) as tar:
                members = tar.getmembers()
                npys = [m for m in members if m.name.endswith(".npy")]
                jsons = [json.load(tar.extractfile(m)) for m in members if m.name.endswith(".json")]
                arrays = [np.load(io.BytesIO(tar.extractfile(m).read())) for m in npys]
            assert len(npys) == len(jsons) == shard["num_samples"] == len(shard["samples"])
            assert sum(a.size for a in arrays) == shard["num_tokens"]
            for sample, member, meta, array in zip(shard["samples"], npys, jsons, arrays):
                assert member.name == f"{sample['key']}.npy" and array.dtype == np.uint16
                assert meta == {k: sample[k] for k in ("book_id", "title", "year", "num_tokens")}
                assert sample["offset"] == member.offset_data + member.size - array.nbytes
        assert manifest["num_tokens"] == sum(s["num_tokens"] for s in manifest["shards"])
        assert manifest["num_books"] == (29 if split == "train" else 3)


def test_webdataset_reads_shards_as_they_are(pg19_shards):
    split = pg19_shards.root / "validation"
    urls = [str(split / s["name"]) for s in manifest_of(pg19_shards.root, "validation")["shards"]]
    samples = list(webdataset.WebDataset(urls, shardshuffle=False).decode())
    expected = list(iter_books(pg19_shards.root, "validation"))
    assert [s["__key__"] for s in samples] == ["11", "98", "219"]
    for sample, (meta, tokens) in zip(samples, expected):
        assert sample["json"] == meta
        assert np.array_equal(sample["npy"], tokens)


def test_rerunning_prepare_is_a_no_op(pg19_mini, pg19_shards):
    before = snapshot(pg19_shards.root)
    reports = prepare(pg19_mini, pg19_shards.root, workers=2, progress=False, **pg19_shards.settings)
    assert [(r.books, r.shards_written, r.shards_kept) for r in reports] == [(0, 0, 6), (0, 0, 1), (0, 0, 1)]
    assert snapshot(pg19_shards.root) == before


def test_tokenizer_training_is_reproducible(pg19_mini):
    corpus = Corpus(pg19_mini)
    first, _ = train_tokenizer(corpus, vocab_size=400, sample_bytes=300_000, seed=1)
    second, training = train_tokenizer(corpus, vocab_size=400, sample_bytes=300_000, seed=1)
    other, _ = train_tokenizer(corpus, vocab_size=400, sample_bytes=300_000, seed=2)
    assert first.checksum == second.checksum != other.checksum
    assert training["sample_lines"] > 1000


def test_settings_that_differ_from_existing_output_are_refused(pg19_mini, pg19_shards):
    with pytest.raises(DataError, match=r"tokenizer.model: trained with vocab_size=1024 \(asked 2048\); use another "
                                        "--output, or remove tokenizer.model and tokenizer.json to train a new one$"):
        prepare(pg19_mini, pg19_shards.root, vocab_size=2048, sample_bytes=2_000_000, progress=False)
    settings = {**pg19_shards.settings, "tokens_per_shard": 123}
    with pytest.raises(DataError, match=r"train/manifest.json: made with a different tokens_per_shard"):
        prepare(pg19_mini, pg19_shards.root, progress=False, **settings)


KILLER = """
import json, os, signal, sys
from data_pipeline import writer
from data_pipeline.prepare import prepare, tokenizer_for

limit, written = int(sys.argv[3]), 0
tokenizer_settings = json.loads(sys.argv[4])
write = writer._HashingFile.write

def write_then_die(self, data):
    # Write part of this block, then die as a killed process does: no cleanup, no exception handlers.
    global written
    if written + len(data) > limit:
        self.file.write(data[: limit - written])
        self.file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    written += len(data)
    return write(self, data)

writer._HashingFile.write = write_then_die
prepare(sys.argv[1], sys.argv[2], splits=["validation", "test"], tokens_per_shard=150_000, workers=2,
        progress=False, **tokenizer_settings)
"""


@pytest.mark.parametrize("metadata", [True, False])  # without it, the corpus has a warning of its own
def test_killed_run_resumes_to_byte_identical_shards(pg19_mini, tmp_path, output_with_tokenizer, tokenizer_settings,
                                                     metadata):
    if not metadata:
        for split in ("validation", "test"):
            shutil.copytree(pg19_mini / split, tmp_path / "corpus" / split)
        pg19_mini = tmp_path / "corpus"
    reference = tmp_path / "reference"
    shutil.copytree(output_with_tokenizer, reference)
    prepare(pg19_mini, reference, splits=["validation", "test"], tokens_per_shard=150_000, workers=1,
            progress=False, **tokenizer_settings)
    validation = [s["bytes"] for s in manifest_of(reference, "validation")["shards"]]
    test = [s["bytes"] for s in manifest_of(reference, "test")["shards"]]
    assert len(validation) == 2 and len(test) == 2
    kill_at = sum(validation) + test[0] + test[1] // 2  # the middle of test/shard-000001.tar

    arguments = [str(pg19_mini), str(output_with_tokenizer), str(kill_at), json.dumps(tokenizer_settings)]
    killed = subprocess.run([sys.executable, "-c", KILLER, *arguments], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    out = output_with_tokenizer
    assert (out / "test" / "shard-000000.tar").exists() and not (out / "test" / "shard-000001.tar").exists()
    assert (out / "test" / ".shard-000001.tar.partial").stat().st_size == test[1] // 2
    assert not manifest_of(out, "test")["complete"] and len(manifest_of(out, "test")["shards"]) == 1
    with pytest.raises(DataError, match="test/manifest.json: unfinished"):
        PackedWindows(out, "test", 128, seed=0)

    reports = prepare(pg19_mini, out, splits=["validation", "test"], tokens_per_shard=150_000, workers=1,
                      progress=False, **tokenizer_settings)
    assert [(r.shards_kept, r.shards_written) for r in reports] == [(2, 0), (1, 1)]
    for split in ("validation", "test"):
        names = sorted(p.name for p in (out / split).iterdir())
        assert names == sorted(p.name for p in (reference / split).iterdir())  # the partial file is gone
        for name in names:
            if name.endswith(".tar"):
                assert (out / split / name).read_bytes() == (reference / split / name).read_bytes()
        resumed, uninterrupted = manifest_of(out, split), manifest_of(reference, split)
        resumed.pop("created_by"), uninterrupted.pop("created_by")  # the command that made it
        assert resumed == uninterrupted


@pytest.mark.parametrize("damage", ["lost", "overwritten"])
def test_a_lost_shard_is_noticed_and_the_split_redone(pg19_mini, output_with_tokenizer, tokenizer_settings, damage):
    def run():
        return prepare(pg19_mini, output_with_tokenizer, splits=["validation"], tokens_per_shard=150_000, workers=1,
                       progress=False, **tokenizer_settings)[0]

    run()
    shards = sorted((output_with_tokenizer / "validation").glob("shard-*.tar"))
    before = [shard.read_bytes() for shard in shards]
    if damage == "lost":
        shards[1].unlink()
    else:  # by hand, or by another program: a shard of another size cannot be the one the manifest lists
        shards[1].write_bytes(before[1][: len(before[1]) // 2])
    report = run()
    assert report.warnings == [f"{shards[1]}: missing or changed since it was written; redoing validation"]
    assert (report.shards_kept, report.shards_written) == (0, 2)
    assert [shard.read_bytes() for shard in shards] == before


def test_a_full_disk_stops_the_run_with_one_line_and_a_rerun_finishes(pg19_mini, output_with_tokenizer, tmp_path,
                                                                       tokenizer_settings, monkeypatch, capsys):
    reference = tmp_path / "reference"
    shutil.copytree(output_with_tokenizer, reference)
    arguments = ["shard", "--input", str(pg19_mini), "--splits", "validation", "--tokens-per-shard", "150000",
                 "--workers", "1", "--quiet"]
    assert cli.main([*arguments, "--output", str(reference)]) == 0
    capsys.readouterr()

    write = writer._HashingFile.write

    def fill_up(self, data):   # the disk fills up in the middle of the second shard
        if len(list((output_with_tokenizer / "validation").glob("shard-*.tar"))) == 1 and self.size > 100_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, data)

    monkeypatch.setattr(writer._HashingFile, "write", fill_up)
    assert cli.main([*arguments, "--output", str(output_with_tokenizer)]) == 1
    split = output_with_tokenizer / "validation"
    assert capsys.readouterr().err.splitlines() == [
        f"error: {split}: cannot write (No space left on device); the shards completed so far are kept, and the "
        "same command goes on from there"]
    assert sorted(path.name for path in split.iterdir()) == ["manifest.json", "shard-000000.tar"]  # no partial
    assert len(manifest_of(output_with_tokenizer, "validation")["shards"]) == 1

    monkeypatch.setattr(writer._HashingFile, "write", write)
    assert cli.main([*arguments, "--output", str(output_with_tokenizer)]) == 0
    for shard in manifest_of(reference, "validation")["shards"]:
        name = f"validation/{shard['name']}"
        assert (output_with_tokenizer / name).read_bytes() == (reference / name).read_bytes()


def test_a_pool_that_cannot_start_is_not_called_a_write_error(pg19_mini, output_with_tokenizer, monkeypatch, capsys):
    def no_more_processes(*args, **kwargs):
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(writer.SPAWN, "Pool", no_more_processes)
    assert cli.main(["shard", "--input", str(pg19_mini), "--output", str(output_with_tokenizer), "--splits",
                     "validation", "--workers", "2", "--quiet"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: validation: cannot start 2 tokenizing processes (Resource temporarily unavailable); try fewer "
        "--workers"]


def test_a_shard_is_closed_by_the_book_that_brings_it_to_tokens_per_shard(pg19_mini, pg19_shards,
                                                                           output_with_tokenizer, tokenizer_settings):
    lengths = [meta["num_tokens"] for meta, _ in iter_books(pg19_shards.root, "test")]
    assert min(lengths) == lengths[0]  # so with tokens_per_shard = lengths[0], every book fills a shard alone
    report, = prepare(pg19_mini, output_with_tokenizer, splits=["test"], tokens_per_shard=lengths[0], workers=1,
                      progress=False, **tokenizer_settings)
    shards = manifest_of(output_with_tokenizer, "test")["shards"]
    assert [[sample["num_tokens"] for sample in shard["samples"]] for shard in shards] == [[n] for n in lengths]
    # the last book closed the last shard: nothing is left to write, which is not a split without text
    assert report.shards_written == 3 and report.warnings == []


def test_memory_urls_for_input_and_output(pg19_mini):
    fs = fsspec.filesystem("memory")
    for path in ["metadata.csv", "train/46.txt", "train/2542.txt", "validation/11.txt"]:
        fs.pipe(f"/pg19/{path}", (pg19_mini / path).read_bytes())
    try:
        reports = prepare("memory://pg19", "memory://prepared", splits=["train", "validation"], vocab_size=512,
                          sample_bytes=200_000, tokens_per_shard=50_000, workers=1, progress=False)
        assert [r.books for r in reports] == [2, 1] and reports[0].shards_written == 2
        assert fs.exists("/prepared/tokenizer.model") and fs.exists("/prepared/train/shard-000001.tar")
        tokenizer = Tokenizer("memory://prepared/tokenizer.model")
        ((meta, tokens),) = list(iter_books("memory://prepared", "validation", tokenizer.checksum))
        assert meta["book_id"] == "11" and tokenizer.decode(tokens) == (pg19_mini / "validation/11.txt").read_text()
        windows = PackedWindows("memory://prepared", "train", 64, seed=0)
        assert windows[len(windows) + 3].shape == (65,)
        with pytest.raises(DataError, match="memory:// files are not visible to worker processes"):
            prepare("memory://pg19", "memory://other", splits=["train", "validation"], workers=2, vocab_size=512,
                    sample_bytes=200_000, progress=False)
        assert not fs.exists("/other")  # refused before training a tokenizer
    finally:
        fs.rm("/pg19", recursive=True)
        fs.rm("/prepared", recursive=True)


def test_file_urls_for_input_and_output(pg19_mini, pg19_shards, output_with_tokenizer):
    prepare(f"file://{pg19_mini}", f"file://{output_with_tokenizer}", splits=["validation"], workers=1,
            progress=False, **pg19_shards.settings)
    shard = "validation/shard-000000.tar"
    assert (output_with_tokenizer / shard).read_bytes() == (pg19_shards.root / shard).read_bytes()
    assert len(list(iter_books(f"file://{output_with_tokenizer}", "validation"))) == 3


def shard_with_tokenizer(corpus, output, split, workers=1):
    """`shard`: a split of any corpus with the tokenizer in output (prepare refuses one trained on other books)."""
    return shard_split(Corpus(corpus), split, Tokenizer(output / "tokenizer.model"), output, workers=workers,
                       progress=False)


def test_bad_books_are_skipped_and_counted(pg19_mini, output_with_tokenizer, tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "train").mkdir(parents=True)
    shutil.copy(pg19_mini / "train/46.txt", corpus / "train/46.txt")
    (corpus / "train/5.txt").write_bytes(b"Windows line\r\nends, and a bad byte: \xff.\r\n")
    (corpus / "train/6.txt").write_bytes(b"\n \n")
    (corpus / "train/7.txt").mkdir()  # not a readable file
    (corpus / "train/904.TXT").write_text("not a book")
    (corpus / "metadata.csv").write_text("46,A Christmas Carol,1843,url\n5,Five,,url\n6,Six,1900,url\n")
    report = shard_with_tokenizer(corpus, output_with_tokenizer, "train", workers=2)
    assert report.books == 2 and len(report.skipped) == 2
    assert report.skipped[0] == "train/6.txt: empty" and report.skipped[1].startswith("train/7.txt: unreadable")
    assert report.warnings == [
        "train/904.TXT: not a .txt file, so not a book; ignored",
        "train/5.txt: 1 undecodable bytes replaced with U+FFFD",
        "train/7.txt: no row in metadata.csv",
    ]
    manifest = manifest_of(output_with_tokenizer, "train")
    assert manifest["skipped"] == report.skipped and manifest["warnings"] == report.warnings
    assert manifest["num_books"] == report.books  # the books in its shards, not the files it was given
    books = dict((meta["book_id"], (meta, tokens)) for meta, tokens in iter_books(output_with_tokenizer, "train"))
    meta, tokens = books["5"]
    assert (meta["title"], meta["year"]) == ("Five", None)
    assert Tokenizer(output_with_tokenizer / "tokenizer.model").decode(tokens) == (
        "Windows line\nends, and a bad byte: \ufffd.\n"
    )


def test_a_split_without_text_is_reported_empty_and_verifies(pg19_mini, output_with_tokenizer, tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "train").mkdir(parents=True)
    (corpus / "validation").mkdir()
    shutil.copy(pg19_mini / "train/46.txt", corpus / "train/46.txt")
    (corpus / "validation/6.txt").write_bytes(b"\n \n")
    train, validation = (shard_with_tokenizer(corpus, output_with_tokenizer, split)
                         for split in ("train", "validation"))
    assert train.shards_written == 1 and validation.shards_written == 0
    assert validation.warnings[-1] == ("validation: no book with text, so no shards: training and evaluation "
                                       "cannot read this split")
    verified = run_cli("verify", output_with_tokenizer, "--splits", "validation")
    assert (verified.returncode, verified.stdout) == (0, "validation: no shards (the corpus has no book with text "
                                                         "in it): ok\n")


def test_book_files_that_cannot_be_shard_members_are_refused_before_any_work(pg19_mini, tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "train").mkdir(parents=True)
    shutil.copy(pg19_mini / "train/46.txt", corpus / "train/46.txt")
    (corpus / "train/._46.txt").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    assert [book.name for book in Corpus(corpus).books("train")] == ["train/46.txt"]

    (corpus / "train/a.b.txt").write_text("one")
    (corpus / "train/a_b.txt").write_text("two")
    with pytest.raises(DataError, match=r"/train/a\.b\.txt and a_b\.txt: both would be stored as 'a_b' in a shard"):
        Corpus(corpus).books("train")
    (corpus / "train/a_b.txt").unlink()
    long_id = "x" * 96
    (corpus / "validation").mkdir()
    (corpus / f"validation/{long_id}.txt").write_text("three")
    for command in ("prepare", "shard"):
        refused = run_cli(command, "--input", corpus, "--output", tmp_path / "out")
        assert refused.returncode == 1
        assert refused.stderr == (f"error: {corpus}/validation/{long_id}.txt: a book id of over 95 bytes does not "
                                  "fit a tar member name; rename the file\n")
        assert not (tmp_path / "out").exists()


def cli_settings(tokenizer_settings):
    """The command-line options for prepare() tokenizer settings."""
    return ["--vocab-size", str(tokenizer_settings["vocab_size"]), "--seed", str(tokenizer_settings["seed"]),
            "--sample-mb", str(tokenizer_settings["sample_bytes"] / 1e6)]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "data_pipeline", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_cli_prepare_shard_and_verify(pg19_mini, pg19_shards, output_with_tokenizer):
    done = run_cli("shard", "--input", pg19_mini, "--output", output_with_tokenizer, "--splits", "validation",
                   "--tokens-per-shard", 1_000_000, "--workers", 1)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("validation: 3 books, 443,219 tokens, 1 shards written")
    shard = "validation/shard-000000.tar"
    assert (output_with_tokenizer / shard).read_bytes() == (pg19_shards.root / shard).read_bytes()
    assert manifest_of(output_with_tokenizer, "validation")["created_by"]["command"].startswith(
        "python -m data_pipeline shard --input"
    )
    verified = run_cli("verify", output_with_tokenizer, "--splits", "validation")
    assert verified.returncode == 0 and verified.stdout == "validation: 1 shards, 3 books, 443,219 tokens: ok\n"


def test_cli_errors_are_one_line_without_traceback(tmp_path, pg19_shards):
    missing = run_cli("prepare", "--input", tmp_path / "nowhere", "--output", tmp_path / "out")
    assert (missing.returncode, missing.stderr) == (1, f"error: {tmp_path}/nowhere: no such directory\n")
    cloud = run_cli("prepare", "--input", "s3://bucket/pg19", "--output", tmp_path / "out")
    assert cloud.returncode == 1
    assert cloud.stderr == "error: s3://bucket/pg19: s3:// needs the optional package s3fs (pip install s3fs)\n"
    copy = tmp_path / "copy"
    shutil.copytree(pg19_shards.root, copy)
    shard = copy / "validation" / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[-20000] ^= 0xFF  # inside the last book's tokens: only the sha256 can tell
    shard.write_bytes(bytes(data))
    afile = tmp_path / "afile"
    afile.write_text("x")
    for args, message in [(["--output", afile], f"{afile}: is a file, not a folder"),
                          (["--output", afile / "sub"], f"{afile}/sub: cannot be made, {afile} is a file"),
                          (["--output", "/proc/nope"], "/proc/nope: cannot be made, /proc is not writable"),
                          (["--output", tmp_path, "--splits", "train"], f"{afile.parent / 'train'}: is a file"),
                          (["--output", tmp_path / "out", "--workers", 0], "--workers must be at least 1, got 0"),
                          (["--output", tmp_path / "out", "--sample-mb", 0], "--sample-mb must be more than 0"),
                          (["--output", tmp_path / "out", "--sample-mb", -1], "--sample-mb must be more than 0"),
                          (["--output", tmp_path / "out", "--sample-mb", "nan"], "--sample-mb must be more than 0"),
                          (["--output", tmp_path / "out", "--sample-mb", "inf"], "--sample-mb must be more than 0")]:
        (tmp_path / "train").write_text("x")
        refused = run_cli("prepare", "--input", pg19_shards.root, *args)
        assert (refused.returncode, refused.stderr.startswith(f"error: {message}")) == (1, True), refused.stderr
        assert not (tmp_path / "out").exists()
    corrupt = run_cli("verify", copy)
    assert corrupt.returncode == 1
    assert corrupt.stderr == f"error: {shard}: sha256 does not match manifest.json (corrupt data)\n"


def test_progress_without_a_terminal_is_plain_log_lines():
    stream = io.StringIO()
    progress = Progress("train", total=3, interval=0.0, stream=stream)
    progress.update(tokens=1_500_000, nbytes=6_000_000)
    progress.update(tokens=2_000, nbytes=8_000)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("[data_pipeline] train: 1/3 books, 1.5M tokens, ")
    assert lines[1].startswith("[data_pipeline] train: 2/3 books, 1.5M tokens, ") and lines[1].endswith(" MB/s")
    silent = io.StringIO()
    Progress("train", 3, enabled=False, interval=0.0, stream=silent).update(1, 1)
    assert silent.getvalue() == ""


def test_preprocess_script_takes_paths_relative_to_the_caller(pg19_mini, tmp_path, output_with_tokenizer,
                                                              tokenizer_settings):
    corpus, python = (os.path.relpath(path, tmp_path) for path in (pg19_mini, sys.executable))
    arguments = [corpus, "out", "--splits", "validation", "--workers", "1", "--quiet",
                 *cli_settings(tokenizer_settings)]
    done = subprocess.run(["bash", REPO / "launch/preprocess.sh", *arguments], cwd=tmp_path,
                          env={**os.environ, "PYTHON": python}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("validation: 3 books") and (output_with_tokenizer / "validation").is_dir()


INTERRUPTED = "interrupted: run the same command again to go on where it stopped"


def start_cli(*args):
    """The CLI in a process group of its own, as a terminal runs it (Ctrl-C reaches the whole group), with Ctrl-C's
    default action even where the tests run in the background, whose processes inherit it ignored."""
    return subprocess.Popen([sys.executable, "-m", "data_pipeline", *map(str, args)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_sigterm_while_sharding_stops_with_one_line_and_a_rerun_finishes(pg19_mini, pg19_shards,
                                                                          output_with_tokenizer, tokenizer_settings):
    arguments = ["prepare", "--input", pg19_mini, "--output", output_with_tokenizer, "--splits", "train",
                 "--workers", 2, "--tokens-per-shard", 1_000_000, *cli_settings(tokenizer_settings)]
    run = start_cli(*arguments)
    while run.poll() is None and not list((output_with_tokenizer / "train").glob(".shard-*.partial")):
        time.sleep(0.01)  # until the pool is tokenizing and the first shard is being written
    os.kill(run.pid, signal.SIGTERM)
    _, stderr = run.communicate(timeout=120)
    assert (run.returncode, stderr.splitlines()[-1]) == (130, INTERRUPTED), stderr
    assert "Traceback" not in stderr
    assert run_cli(*arguments).returncode == 0
    for shard in manifest_of(pg19_shards.root, "train")["shards"]:
        name = f"train/{shard['name']}"
        assert (output_with_tokenizer / name).read_bytes() == (pg19_shards.root / name).read_bytes()


def child_commands(pid):
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    commands = []
    for child in children:
        with contextlib.suppress(FileNotFoundError):  # it may have ended meanwhile
            commands.append(Path(f"/proc/{child}/cmdline").read_bytes())
    return commands


def ignores_ctrl_c(pid):
    ignored = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigIgn"))
    return bool(int(ignored.split()[1], 16) & 1 << signal.SIGINT - 1)


def test_the_tokenizer_command_logs_its_training_unless_quiet(pg19_mini, tmp_path):
    settings = ["--input", pg19_mini, "--vocab-size", 512, "--sample-mb", 0.2]
    logged = run_cli("tokenizer", *settings, "--output", tmp_path / "logged")
    quiet = run_cli("tokenizer", *settings, "--output", tmp_path / "quiet", "--quiet")
    assert logged.returncode == quiet.returncode == 0, logged.stderr + quiet.stderr
    assert "tokenizer: training on " in logged.stderr and quiet.stderr == ""
    assert (tmp_path / "quiet" / "tokenizer.model").read_bytes() == \
        (tmp_path / "logged" / "tokenizer.model").read_bytes()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_tokenizer_training_at_once(pg19_mini, tmp_path, signum):
    # Settings that train for many seconds, so the signal comes while sentencepiece is busy.
    run = start_cli("tokenizer", "--input", pg19_mini, "--output", tmp_path, "--vocab-size", 30000, "--sample-mb", 20,
                    "--model-type", "unigram")
    while run.poll() is None and not (any(b"spawn_main" in command for command in child_commands(run.pid))
                                      and not ignores_ctrl_c(run.pid)):
        time.sleep(0.01)  # until the trainer process is started, and the parent handles Ctrl-C again
    assert run.poll() is None, "trained without a child process the signal could stop"
    os.killpg(run.pid, signum)
    _, stderr = run.communicate(timeout=120)
    assert (run.returncode, stderr.splitlines()[-1]) == (130, INTERRUPTED), stderr
    assert "Traceback" not in stderr and not (tmp_path / "tokenizer.model").exists()


def test_a_tokenizing_process_that_dies_stops_the_run_with_one_line(pg19_mini, pg19_shards, output_with_tokenizer,
                                                                    tokenizer_settings):
    arguments = ["prepare", "--input", pg19_mini, "--output", output_with_tokenizer, "--splits", "train",
                 "--workers", 2, "--tokens-per-shard", 1_000_000, *cli_settings(tokenizer_settings)]
    run = start_cli(*arguments)
    while run.poll() is None and not list((output_with_tokenizer / "train").glob(".shard-*.partial")):
        time.sleep(0.01)  # until the pool is tokenizing
    children = Path(f"/proc/{run.pid}/task/{run.pid}/children").read_text().split()
    worker = next(int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes())
    os.kill(worker, signal.SIGKILL)  # as the kernel's out-of-memory killer does
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 1 and "Traceback" not in stderr, stderr
    assert stderr.splitlines()[-1].startswith("error: train: a tokenizing process died (exit status -9")
    assert run_cli(*arguments).returncode == 0
    for shard in manifest_of(pg19_shards.root, "train")["shards"]:
        name = f"train/{shard['name']}"
        assert (output_with_tokenizer / name).read_bytes() == (pg19_shards.root / name).read_bytes()


def test_long_phases_log_progress_lines(pg19_mini, pg19_shards, monkeypatch, capsys):
    monkeypatch.setattr(progress, "INTERVAL", 0.0)  # a line at every step (30 s apart in real runs)
    stream = io.StringIO()
    training_sample(Corpus(pg19_mini), 300_000, seed=1, log=stream)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[data_pipeline] tokenizer: sample: 1/29 books, ") and lines[0].endswith(" MB/s")
    assert lines[-1].startswith(f"[data_pipeline] tokenizer: sample: {len(lines)}/29 books, ")

    monkeypatch.setattr(progress, "INTERVAL", 0.01)
    stream = io.StringIO()
    train_tokenizer(Corpus(pg19_mini), vocab_size=400, sample_bytes=300_000, seed=1, log=stream)
    lines = [line for line in stream.getvalue().splitlines() if "tokenizer: sample" not in line]
    assert lines[0].startswith("[data_pipeline] tokenizer: training on ") and lines[0].endswith(" lines of sample")
    assert lines[1].startswith("[data_pipeline] tokenizer: training, ") and lines[1].endswith(" s so far")

    monkeypatch.setattr(progress, "INTERVAL", 0.0)
    assert cli.main(["verify", str(pg19_shards.root), "--splits", "train"]) == 0
    logged = capsys.readouterr().err.splitlines()
    expected = [f"[data_pipeline] verify train: {n}/6 shards" for n in range(1, 7)]
    assert [line.split(", ")[0] for line in logged] == expected


@pytest.mark.parametrize("content", [b'{"checksum": "ab', b"{}", b"[]"])
def test_a_broken_tokenizer_json_is_a_one_line_error(pg19_mini, output_with_tokenizer, tokenizer_settings, content):
    (output_with_tokenizer / "tokenizer.json").write_bytes(content)
    with pytest.raises(DataError, match=f"^{output_with_tokenizer}/tokenizer.json: .*; remove it and tokenizer.model"):
        prepare(pg19_mini, output_with_tokenizer, splits=["validation"], workers=1, progress=False,
                **tokenizer_settings)


def test_a_train_split_without_text_cannot_train_a_tokenizer(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "train").mkdir(parents=True)
    for book in (None, "\n \n"):  # no books, then only an empty one
        if book is not None:
            (corpus / "train" / "1.txt").write_text(book)
        with pytest.raises(DataError, match=f"^{corpus}/train: no book with text to train the tokenizer on$"):
            prepare(corpus, tmp_path / "runs" / "out", splits=["train"], vocab_size=400, workers=1, progress=False)
        assert not (tmp_path / "runs").exists()   # nor the folders made for it


def test_a_corpus_without_a_train_split_cannot_train_a_tokenizer_and_does_not_start_to(pg19_mini, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(pg19_mini / "validation", corpus / "validation")
    log = io.StringIO()
    with pytest.raises(DataError, match=f"^{corpus}/train: no such directory"):
        tokenizer_for(Corpus(corpus), str(tmp_path / "out"), vocab_size=400, log=log)
    assert log.getvalue() == ""


def test_books_without_a_row_are_warned_about_even_when_no_row_is_usable(pg19_mini, output_with_tokenizer, tmp_path,
                                                                         tokenizer_settings):
    corpus = tmp_path / "corpus"
    (corpus / "validation").mkdir(parents=True)
    shutil.copy(pg19_mini / "validation/11.txt", corpus / "validation/11.txt")
    (corpus / "metadata.csv").write_text('11,"Alice,1865,url\n')
    (report,) = prepare(corpus, output_with_tokenizer, splits=["validation"], workers=1, progress=False,
                        **tokenizer_settings)
    assert report.warnings[-1] == "validation/11.txt: no row in metadata.csv"


def test_a_tokenizer_not_made_for_this_corpus_is_not_reused(pg19_mini, output_with_tokenizer, tmp_path,
                                                             tokenizer_settings):
    corpus = tmp_path / "corpus"
    (corpus / "train").mkdir(parents=True)
    shutil.copy(pg19_mini / "train/46.txt", corpus / "train/46.txt")
    with pytest.raises(DataError, match=f"^{output_with_tokenizer}/tokenizer.model: trained on other train books "
                                        rf"\({pg19_mini}\); use another --output, remove tokenizer.model and "):
        prepare(corpus, output_with_tokenizer, splits=["train"], workers=1, progress=False, **tokenizer_settings)

    (output_with_tokenizer / "tokenizer.json").unlink()  # a model of the user's own, or of unknown origin
    model = (output_with_tokenizer / "tokenizer.model").read_bytes()
    with pytest.raises(DataError, match=f"^{output_with_tokenizer}/tokenizer.model: no tokenizer.json next to it"):
        prepare(pg19_mini, output_with_tokenizer, splits=["validation"], workers=1, progress=False,
                **tokenizer_settings)
    assert (output_with_tokenizer / "tokenizer.model").read_bytes() == model


def test_verify_checks_the_splits_there_are_against_the_tokenizer_and_lists_every_problem(
        pg19_mini, pg19_shards, output_with_tokenizer, tokenizer_settings, tmp_path):
    out = output_with_tokenizer
    assert run_cli("verify", out).stderr == f"error: {out}: no prepared split in it (train/, validation/, test/)\n"
    prepare(pg19_mini, out, splits=["test"], workers=1, progress=False, tokens_per_shard=1_000_000,
            **tokenizer_settings)
    verified = run_cli("verify", out)
    assert (verified.returncode, verified.stdout) == (0, "test: 1 shards, 3 books, 950,735 tokens: ok\n")

    other, training = train_tokenizer(Corpus(pg19_mini), vocab_size=400, sample_bytes=300_000)
    other.save(tmp_path / "other", training)
    shutil.copy(tmp_path / "other" / "tokenizer.model", out / "tokenizer.model")
    verified = run_cli("verify", out)
    assert verified.returncode == 1
    assert verified.stderr == (f"error: {out}/test/manifest.json: shards were made with tokenizer "
                               f"{pg19_shards.checksum[:12]}..., not {other.checksum[:12]}...\n")

    copy = tmp_path / "copy"
    shutil.copytree(pg19_shards.root, copy)
    first, last = copy / "train/shard-000000.tar", copy / "train/shard-000005.tar"
    data = bytearray(first.read_bytes())
    data[-20000] ^= 0xFF
    first.write_bytes(bytes(data))
    last.write_bytes(last.read_bytes()[:1000])
    (copy / "validation/manifest.json").unlink()
    verified = run_cli("verify", copy)
    assert verified.returncode == 1 and verified.stdout == "test: 1 shards, 3 books, 950,735 tokens: ok\n"
    assert verified.stderr.splitlines() == [
        f"error: {first}: sha256 does not match manifest.json (corrupt data)",
        f"error: {last}: 1000 bytes, manifest.json says {manifest_of(copy, 'train')['shards'][5]['bytes']} "
        "(truncated or overwritten)",
        f"error: {copy}/validation/manifest.json: missing (run `python -m data_pipeline prepare` first)",
    ]


def test_a_second_run_into_the_same_output_is_refused(pg19_mini, output_with_tokenizer, tokenizer_settings):
    with open(output_with_tokenizer / ".lock", "a") as lock:  # as a run in progress holds it
        fcntl.flock(lock, fcntl.LOCK_EX)
        for command in ("prepare", "shard"):
            refused = run_cli(command, "--input", pg19_mini, "--output", output_with_tokenizer, "--splits", "test",
                              *cli_settings(tokenizer_settings) * (command == "prepare"))
            assert (refused.returncode, refused.stderr) == (
                1, f"error: {output_with_tokenizer}: another run is writing into it (it holds {output_with_tokenizer}"
                   "/.lock)\n")
    assert not (output_with_tokenizer / "test").exists()
    prepare(pg19_mini, output_with_tokenizer, splits=["test"], workers=1, progress=False, **tokenizer_settings)


def test_an_output_on_a_file_system_without_locks_is_written_unlocked(tmp_path, monkeypatch):
    def flock(file, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")   # as on Lustre mounted noflock

    monkeypatch.setattr(fcntl, "flock", flock)
    with output_lock(tmp_path / "out"):
        (tmp_path / "out" / "shard.tar").write_bytes(b"")
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [".lock", "shard.tar"]


def test_no_more_worker_processes_than_books(pg19_mini, output_with_tokenizer, monkeypatch):
    pools, spawn = [], writer.SPAWN

    class RecordingSpawn:
        def Pool(self, processes, **options):
            pools.append(processes)
            return spawn.Pool(processes, **options)

    monkeypatch.setattr(writer, "SPAWN", RecordingSpawn())
    report = shard_with_tokenizer(pg19_mini, output_with_tokenizer, "validation", workers=8)
    assert report.books == 3 and pools == [3]
