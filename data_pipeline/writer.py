"""Tokenizing a split's books in a process pool and writing them as WebDataset tar shards, resumably.

A shard is a plain, uncompressed tar with two members per book, so `tar` and `webdataset.WebDataset` read it as is:

    <key>.json   {"book_id", "title", "year", "num_tokens"}
    <key>.npy    the token ids, 1-d, uint16 (uint32 for vocabularies over 65,536)

Books go into shard-000000.tar, shard-000001.tar, ... in book-id order; a shard is closed after the book that
brings it to `tokens_per_shard` tokens, so a book is never split. Shards are written under a temporary name and
renamed when complete, then the split's manifest is rewritten to list them: a re-run goes on after the last listed
shard. The shard bytes depend only on the books and settings (fixed tar metadata, results kept in book order),
so a run that was killed and re-run gives the same bytes as one that never stopped.
"""

import collections
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import shlex
import sys
import tarfile
import time
from dataclasses import dataclass, field

import numpy as np

from data_pipeline import __version__, manifest
from data_pipeline.corpus import books_digest, read_book
from data_pipeline.errors import DataError
from data_pipeline.processes import SPAWN, children_ignore_ctrl_c
from data_pipeline.progress import Progress, SplitReport
from data_pipeline.storage import commit, display, is_process_local, join, open_partial, resolve

# How many books each worker may be ahead of the writer: enough to keep workers busy behind a long book,
# few enough that the results waiting to be written stay small.
READ_AHEAD_PER_WORKER = 8


def default_workers():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_workers(corpus, workers):
    """Refuse a pool that could not read the corpus: memory:// files exist only in this process."""
    if (workers or default_workers()) > 1 and is_process_local(corpus.fs):
        raise DataError(f"{corpus.url}: memory:// files are not visible to worker processes; use workers=1")


class _HashingFile:
    """A write-only file that also keeps the sha256 and size of what went through it."""

    def __init__(self, file):
        self.file, self.sha256, self.size = file, hashlib.sha256(), 0

    def write(self, data):
        self.file.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return len(data)

    def tell(self):
        return self.size


class ShardWriter:
    """One tar shard being written; `close` completes it and returns its manifest entry."""

    def __init__(self, fs, split_dir, index):
        self.fs, self.name = fs, manifest.shard_name(index)
        self.path = join(split_dir, self.name)
        self._file = _HashingFile(open_partial(fs, self.path))
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples, self.num_tokens = [], 0

    def add(self, book, tokens):
        key = book.key
        meta = {"book_id": book.book_id, "title": book.title, "year": book.year, "num_tokens": len(tokens)}
        self._add_member(f"{key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode())
        npy = io.BytesIO()
        np.save(npy, tokens, allow_pickle=False)
        # The tokens are the last bytes of the .npy; their offset in the tar lets readers skip the tar format.
        offset = self._add_member(f"{key}.npy", npy.getvalue()) + npy.tell() - tokens.nbytes
        self.samples.append({"key": key, **meta, "offset": offset})
        self.num_tokens += len(tokens)

    def _add_member(self, name, data):
        """Append a file to the tar and return the offset of its data in the shard."""
        # TarInfo's defaults (mtime 0, mode 644, uid/gid 0, no user names) keep shards byte-reproducible.
        info = tarfile.TarInfo(name)
        info.size = len(data)
        header_offset = self._tar.offset
        self._tar.addfile(info, io.BytesIO(data))
        return header_offset + tarfile.BLOCKSIZE  # a USTAR header with a short name is one block

    def close(self):
        self._tar.close()
        commit(self.fs, self._file.file, self.path)
        return {
            "name": self.name,
            "bytes": self._file.size,
            "sha256": self._file.sha256.hexdigest(),
            "num_samples": len(self.samples),
            "num_tokens": self.num_tokens,
            "samples": self.samples,
        }


@dataclass
class _Tokenized:
    book: object
    tokens: np.ndarray | None
    nbytes: int = 0
    skipped: str | None = None  # why the book is not in any shard
    warnings: list = field(default_factory=list)


def _tokenize(book, tokenizer, fs, gutenberg):
    try:
        text, warnings, nbytes = read_book(fs, book, gutenberg)
    except OSError as error:
        return _Tokenized(book, None, skipped=f"unreadable ({error})")
    if not text or text.isspace():
        return _Tokenized(book, None, nbytes, skipped="empty", warnings=warnings)
    return _Tokenized(book, tokenizer.encode_array(text), nbytes, warnings=warnings)


_worker = {}  # set in each pool process by _start_worker


def _start_worker(tokenizer, fs, gutenberg):
    _worker.update(tokenizer=tokenizer, fs=fs, gutenberg=gutenberg)


def _tokenize_in_worker(book):
    return _tokenize(book, _worker["tokenizer"], _worker["fs"], _worker["gutenberg"])


def _tokenize_all(books, tokenizer, fs, gutenberg, workers):
    """Tokenized books, in the order of `books`."""
    if workers <= 1:
        for book in books:
            yield _tokenize(book, tokenizer, fs, gutenberg)
        return
    split = books[0].split
    before = set(multiprocessing.active_children())
    try:
        with children_ignore_ctrl_c():
            pool = SPAWN.Pool(workers, initializer=_start_worker, initargs=(tokenizer, fs, gutenberg))
    except OSError as error:   # a limit on processes or open files; not the output's fault (see shard_split)
        raise DataError(f"{split}: cannot start {workers} tokenizing processes ({error.strerror or error}); "
                        "try fewer --workers") from None
    started = [process for process in multiprocessing.active_children() if process not in before]
    with pool:
        pending = collections.deque()
        for book in books:
            pending.append(pool.apply_async(_tokenize_in_worker, (book,)))
            if len(pending) >= READ_AHEAD_PER_WORKER * workers:
                yield _result(pending.popleft(), started, split)
        while pending:
            yield _result(pending.popleft(), started, split)


def _result(result, processes, split):
    """The result of a book sent to the pool, or an error once one of its workers has died.

    A pool replaces a worker that dies (the kernel's out-of-memory killer, a `kill -9`) but never answers for the
    book it held, so waiting for that book alone would wait forever.
    """
    while not result.ready():
        result.wait(1.0)
        died = next((process.exitcode for process in processes if process.exitcode is not None), None)
        if died is not None:
            raise DataError(f"{split}: a tokenizing process died (exit status {died}: killed, or out of memory?); "
                            "run the same command again to go on where it stopped, with fewer --workers if memory "
                            "is short")
    return result.get()


def _start_or_resume(fs, split_dir, settings, report):
    """The manifest to continue from: the existing one if it was made with the same settings, else a new one."""
    fresh = {"format": manifest.FORMAT, "split": report.split, "complete": False, **settings,
             "next_book": 0, "skipped": [], "warnings": [], "shards": []}
    path = join(split_dir, manifest.NAME)
    try:
        old = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return fresh
    except json.JSONDecodeError:
        raise DataError(f"{display(fs, path)}: not valid JSON; remove {display(fs, split_dir)} and run again") from None
    different = [key for key, value in settings.items() if old.get(key) != value]
    if different:
        raise DataError(
            f"{display(fs, path)}: made with a different {', '.join(different)}; "
            f"use another --output or remove {display(fs, split_dir)}"
        )
    for shard in old["shards"]:
        shard_path = join(split_dir, shard["name"])
        if not fs.exists(shard_path) or fs.size(shard_path) != shard["bytes"]:
            # Each shard's contents depend on where the previous one ended, so redo the split from its start.
            report.warnings.append(
                f"{display(fs, shard_path)}: missing or changed since it was written; redoing {report.split}"
            )
            return fresh
    return old


def _remove_partials(fs, split_dir):
    """Delete the temporary files a killed run left behind."""
    if fs.isdir(split_dir):
        for path in fs.ls(split_dir, detail=False):
            name = path.rsplit("/", 1)[-1]
            if name.startswith(".") and name.endswith(".partial"):
                fs.rm(path)


def shard_split(corpus, split, tokenizer, output, tokens_per_shard=50_000_000, workers=None, gutenberg=False,
                progress=True, command=None):
    """Tokenize one split of the corpus into <output>/<split>/shard-*.tar + manifest.json; returns a SplitReport.

    Re-running with the same arguments keeps the shards already complete and redoes only the rest.
    """
    started = time.monotonic()
    workers = workers or default_workers()
    check_workers(corpus, workers)
    books = corpus.books(split)
    fs, root = resolve(output)
    split_dir = join(root, split)
    settings = {
        "tokenizer_checksum": tokenizer.checksum,
        "vocab_size": tokenizer.vocab_size,
        "dtype": tokenizer.dtype.name,
        "tokens_per_shard": tokens_per_shard,
        "gutenberg": gutenberg,
        # A re-run goes on from a position in this list, so it must be the same list of books.
        "books_sha256": books_digest(books),
    }
    report = SplitReport(split)
    state = _start_or_resume(fs, split_dir, settings, report)
    report.shards_kept = len(state["shards"])
    if state["complete"]:
        report.seconds = time.monotonic() - started
        return report
    _remove_partials(fs, split_dir)
    state["input"] = corpus.url
    state["created_by"] = {"command": command or shlex.join(sys.argv), "version": __version__}
    # Skipped books and warnings are committed to the manifest with the next completed shard, like the books;
    # the corpus's own warnings (and the split's files that are not books) with the first, so a resumed run does not
    # add them again.
    skipped, writer = [], None
    warnings = corpus.warnings + corpus.ignored[split] if state["next_book"] == 0 else []
    todo = books[state["next_book"] :]
    workers = min(workers, len(todo))  # a process per book at most
    try:
        tokenized = _tokenize_all(todo, tokenizer, corpus.fs, gutenberg, workers)
        with Progress(split, len(todo), enabled=progress) as bar, contextlib.closing(tokenized) as results:
            for position, result in enumerate(results, start=state["next_book"] + 1):
                book = result.book
                if corpus.metadata is not None and book.book_id not in corpus.metadata:  # a missing file: one warning
                    result.warnings.append(f"{book.name}: no row in metadata.csv")
                warnings += result.warnings
                if result.skipped:
                    skipped.append(f"{book.name}: {result.skipped}")
                else:
                    writer = writer or ShardWriter(fs, split_dir, len(state["shards"]))
                    writer.add(book, result.tokens)
                    report.books += 1
                    report.tokens += len(result.tokens)
                bar.update(0 if result.tokens is None else len(result.tokens), result.nbytes)
                if writer is not None and writer.num_tokens >= tokens_per_shard:
                    _add_shard(state, writer, position, skipped, warnings, report)
                    manifest.save(fs, split_dir, state)
                    skipped, warnings, writer = [], [], None
        if writer is None and not state["shards"]:   # say so now, not when training first opens the split
            warnings.append(f"{split}: no book with text, so no shards: training and evaluation cannot read this split")
        _add_shard(state, writer, len(books), skipped, warnings, report)
        state.update(
            complete=True,
            num_books=sum(shard["num_samples"] for shard in state["shards"]),
            num_tokens=sum(shard["num_tokens"] for shard in state["shards"]),
        )
        manifest.save(fs, split_dir, state)
    except OSError as error:   # a full disk, a quota, a lost mount: the shards completed so far stay
        _remove_partials(fs, split_dir)
        where = display(fs, error.filename) if error.filename else display(fs, split_dir)
        raise DataError(f"{where}: cannot write ({error.strerror or error}); the shards completed so far are kept, "
                        "and the same command goes on from there") from None
    report.seconds = time.monotonic() - started
    return report


def _add_shard(state, writer, next_book, skipped, warnings, report):
    """Complete the writer's shard (if any) and record it, with the books skipped up to next_book, in state."""
    if writer is not None:
        state["shards"].append(writer.close())
        report.shards_written += 1
    state["next_book"] = next_book
    state["skipped"] += skipped
    state["warnings"] += warnings
    report.skipped += skipped
    report.warnings += warnings
