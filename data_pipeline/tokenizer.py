"""The sentencepiece tokenizer: training it reproducibly on a sample of the train split, and using it.

Every tokenizer the pipeline trains has the same fixed special ids, which the rest of the stack relies on:

    0 <pad>   padding (never produced by encode)
    1 <unk>   unknown (never produced either: unknown characters fall back to their UTF-8 bytes)
    2 <s>     beginning of sequence (not added by encode; reserved for the model)
    3 </s>    end of sequence: joins documents in the training stream
    4 "\n"    newline, a piece of its own
"""

import hashlib
import io
import itertools
import json
import random
import time

import numpy as np
import sentencepiece as spm

from data_pipeline import __version__, progress
from data_pipeline.corpus import books_digest, read_book
from data_pipeline.errors import DataError
from data_pipeline.processes import SPAWN, children_ignore_ctrl_c
from data_pipeline.storage import display, join, resolve, write_bytes

PAD_ID, UNK_ID, BOS_ID, EOS_ID, NEWLINE_ID = 0, 1, 2, 3, 4

# sentencepiece's trainer output depends on its thread count, so it is fixed for reproducibility.
TRAINER_THREADS = 8
# Per book, the sample takes one contiguous stretch of at least this many characters.
SAMPLE_CHUNK = 64 * 1024


class Tokenizer:
    """A trained sentencepiece model with the pipeline's fixed special ids."""

    def __init__(self, path_or_url):
        fs, path = resolve(path_or_url)
        try:
            model = fs.cat_file(path)
        except FileNotFoundError:
            raise DataError(f"{display(fs, path)}: no such tokenizer model") from None
        except IsADirectoryError:
            raise DataError(f"{display(fs, path)}: a folder, not a tokenizer model") from None
        self._load(model, display(fs, path))

    @classmethod
    def from_bytes(cls, model, name="<tokenizer bytes>"):
        tokenizer = cls.__new__(cls)
        tokenizer._load(model, name)
        return tokenizer

    def _load(self, model, name):
        self._model, self.name = model, name
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model)
        except (RuntimeError, OSError) as error:
            raise DataError(f"{name}: not a sentencepiece model ({str(error).strip()})") from None
        ids = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id(), self._sp.piece_to_id("\n"))
        if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID, NEWLINE_ID):
            raise DataError(f"{name}: special ids pad/unk/bos/eos/newline are {ids}, expected (0, 1, 2, 3, 4)")
        self.checksum = hashlib.sha256(model).hexdigest()
        self.vocab_size = self._sp.vocab_size()
        self.dtype = np.dtype(np.uint16 if self.vocab_size <= 1 << 16 else np.uint32)

    # A tokenizer is sent to the worker processes as its model bytes.
    def __reduce__(self):
        return Tokenizer.from_bytes, (self._model, self.name)

    pad_id, unk_id, bos_id, eos_id, newline_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID, NEWLINE_ID

    def _encode_lines(self, text):
        # Newline is a piece of its own, which sentencepiece never merges with its neighbours, so encoding line
        # by line gives exactly the ids of encoding the whole text, and is 2.5x to 4x faster on books.
        lines = self._sp.encode(text.split("\n"), num_threads=1)
        for line in lines[:-1]:
            line.append(NEWLINE_ID)
        return lines

    def encode(self, text):
        """Token ids of text (no bos/eos added)."""
        return list(itertools.chain.from_iterable(self._encode_lines(text)))

    def encode_array(self, text):
        """Token ids of text as a 1-d array of `self.dtype`, the form shards store."""
        lines = self._encode_lines(text)
        count = sum(map(len, lines))
        return np.fromiter(itertools.chain.from_iterable(lines), dtype=self.dtype, count=count)

    def decode(self, ids):
        return self._sp.decode([int(i) for i in ids])

    def save(self, output, training):
        """Write <output>/tokenizer.model and a small tokenizer.json describing it."""
        fs, root = resolve(output)
        info = {
            "checksum": self.checksum,
            "vocab_size": self.vocab_size,
            "special_ids": {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID, "newline": NEWLINE_ID},
            "training": training,
            "version": __version__,
        }
        # The model first: a tokenizer.json is only ever next to the model it describes.
        write_bytes(fs, join(root, "tokenizer.model"), self._model)
        write_bytes(fs, join(root, "tokenizer.json"), (json.dumps(info, indent=2) + "\n").encode())


def training_sample(corpus, sample_bytes, seed, gutenberg=False, log=None):
    """Lines of text, sample_bytes of UTF-8 in all, from the train split: the same for the same seed.

    Books are visited in a seeded random order and each gives one contiguous stretch at a seeded random
    place, so the sample spreads over many books without reading the whole split.
    Unreadable books are passed over here; sharding the train split reports them.
    """
    books = corpus.books("train")
    rng = random.Random(seed)
    rng.shuffle(books)
    chunk = max(sample_bytes // max(len(books), 1), SAMPLE_CHUNK)
    lines, total = [], 0
    with progress.Progress("tokenizer: sample", len(books), enabled=log is not None, stream=log) as bar:
        for book in books:
            try:
                text, _, nbytes = read_book(corpus.fs, book, gutenberg)
            except OSError:
                continue
            bar.update(0, nbytes)
            if text.isspace():  # a book without text, as sharding sees it
                continue
            start = rng.randrange(max(1, len(text) - chunk))
            stretch = text.split("\n") if len(text) <= chunk else text[start : start + chunk].split("\n")[1:-1]
            for line in stretch:
                if line:
                    lines.append(line)
                    total += len(line.encode())
                    if total >= sample_bytes:
                        return lines
    if not lines:
        raise DataError(f"{join(corpus.url, 'train')}: no book with text to train the tokenizer on")
    return lines


def train_tokenizer(corpus, vocab_size=32000, model_type="bpe", sample_bytes=100_000_000, seed=0, gutenberg=False,
                    log=None):
    """Train a tokenizer on a seeded sample of the corpus's train split; returns (tokenizer, training record).

    log: a stream for progress lines (reading the sample, then training), or None.
    """
    lines = training_sample(corpus, sample_bytes, seed, gutenberg, log)
    progress.log_line(log, f"tokenizer: training on {len(lines):,} lines of sample")
    options = dict(
        model_type=model_type,
        vocab_size=vocab_size,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        user_defined_symbols=["\n"],
        # Keep text exactly as it is, so that decode(encode(text)) == text (but for U+2581, which decodes as a space).
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        byte_fallback=True,
        character_coverage=0.9999,
        split_digits=True,
        max_sentence_length=1 << 16,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=TRAINER_THREADS,
        minloglevel=2,
    )
    model, error = _train_in_child(lines, options, log)
    if error is not None:
        raise DataError(f"{corpus.url}: tokenizer training failed: {error}")
    training = {
        "model_type": model_type,
        "vocab_size": vocab_size,
        "sample_bytes": sample_bytes,
        "seed": seed,
        "gutenberg": gutenberg,
        "sample_lines": len(lines),
        "input": corpus.url,
        "train_books_sha256": books_digest(corpus.books("train")),
        "sentencepiece": spm.__version__,
    }
    return Tokenizer.from_bytes(model), training


def _train_in_child(lines, options, log):
    """(model bytes, None) or (None, why training failed), from sentencepiece's trainer run in a child process.

    The trainer holds the thread that calls it until it is done, which can be hours, and a signal handler only
    runs between Python instructions; in a child, the parent stays free to stop it on Ctrl-C or SIGTERM.
    """
    connection, child_end = SPAWN.Pipe()
    trainer = SPAWN.Process(target=_train, args=(child_end, options), daemon=True)
    with children_ignore_ctrl_c():
        trainer.start()
    try:
        child_end.close()  # so that recv sees the end of the pipe if the trainer dies
        connection.send(lines)  # not as an argument of the process: starting it stays quick
        started = time.monotonic()
        while not connection.poll(progress.INTERVAL):
            progress.log_line(log, f"tokenizer: training, {time.monotonic() - started:.0f} s so far")
        return connection.recv()
    except (EOFError, BrokenPipeError):  # it died without an answer: killed, or out of memory
        trainer.join()
        return None, f"the training process died (exit status {trainer.exitcode})"
    finally:
        if trainer.is_alive():
            trainer.terminate()
            trainer.join()


def _train(connection, options):
    lines, model = connection.recv(), io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, **options)
    except RuntimeError as error:
        connection.send((None, str(error).strip()))
        return
    connection.send((model.getvalue(), None))


def existing_tokenizer(output, requested, train_books=None):
    """The tokenizer already saved in output, or None; refuses one trained with other settings or on other books.

    `requested` holds the training settings that must match (model_type, vocab_size, sample_bytes, seed, ...);
    `train_books`, the books_digest of the corpus's train split (None: not checked).
    """
    fs, root = resolve(output)
    model_path, info_path = join(root, "tokenizer.model"), join(root, "tokenizer.json")
    if not fs.exists(info_path):  # the json is written last: the model alone is not known to be ours
        if fs.exists(model_path):
            raise DataError(f"{display(fs, model_path)}: no tokenizer.json next to it (not made by prepare, or its run "
                            "stopped while saving it); remove it to train a new one, or use another --output")
        return None
    info = _read_info(fs, info_path)
    different = {key: (info["training"].get(key), value) for key, value in requested.items()
                 if info["training"].get(key) != value}
    if different:
        detail = ", ".join(f"{key}={old!r} (asked {new!r})" for key, (old, new) in different.items())
        raise DataError(f"{display(fs, model_path)}: trained with {detail}; use another --output, or remove "
                        "tokenizer.model and tokenizer.json to train a new one")
    trained_on = info["training"].get("train_books_sha256")  # absent from older tokenizer.json files
    if train_books is not None and trained_on is not None and trained_on != train_books:
        raise DataError(f"{display(fs, model_path)}: trained on other train books ({info['training']['input']}); "
                        "use another --output, remove tokenizer.model and tokenizer.json to train a new one, or "
                        "use `shard` to shard with this tokenizer anyway")
    tokenizer = Tokenizer(fs.unstrip_protocol(model_path))
    if tokenizer.checksum != info["checksum"]:
        raise DataError(f"{display(fs, model_path)}: checksum does not match tokenizer.json")
    return tokenizer


def _read_info(fs, path):
    """tokenizer.json, refused with a one-line error when it is not one the pipeline wrote."""
    try:
        info = json.loads(fs.cat_file(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        problem = f"not valid JSON ({error})"
    else:
        if isinstance(info, dict) and isinstance(info.get("training"), dict) and isinstance(info.get("checksum"), str):
            return info
        problem = "no 'checksum' and 'training' record"
    raise DataError(f"{display(fs, path)}: {problem}; remove it and tokenizer.model to train a new tokenizer")
