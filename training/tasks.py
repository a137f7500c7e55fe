"""Synthetic long-context tasks: passkey retrieval and multi-document retrieval.

Both are built at the token level, so a sample has exactly the length asked for and the
key sits exactly where asked; the text pieces (instructions, the passkey sentence, the
question) are tokenized once and the filler is cut from real books, not a repeated
sentence.

    passkey    [prefix][filler ... ][needle][ ... filler][query] -> answer
               the needle starts depth * len(filler) filler tokens in
    retrieval  ("Question: q\\nDocument id: passage\\n\\n") x (distractors + 1), then
               "Question: q\\nAnswer: Document" -> " <gold id>"

`PasskeyWindows` turns the passkey task into a training set (the fine-tuning recipe of
DeciMamba and MemMamba: about 2k tokens, loss on the answer only).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
import torch

from data_pipeline.reader import ShardedBooks
from data_pipeline.storage import join
from data_pipeline.stream import checked_position
from data_pipeline.tokenizer import NEWLINE_ID, Tokenizer
from model import ConfigError

MAX_KEY_DIGITS = 18   # keys are drawn as 64-bit integers

PASSKEY_PREFIX = ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
                  "I will quiz you about the pass key.\n")
PASSKEY_NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
PASSKEY_QUERY = "\nWhat is the pass key? The pass key is"
PASSKEY_ANSWER = " {key}"


@dataclass
class PasskeySample:
    ids: np.ndarray       # the prompt, exactly the length asked for
    answer: np.ndarray    # the tokens a correct model continues with
    key: str
    key_position: int     # index in `ids` of the needle's first token
    depth: float


def place_needle(prefix, filler, needle, query, depth: float) -> tuple[np.ndarray, int]:
    """prefix + filler[:n] + needle + filler[n:] + query with n = round(depth * len(filler)).

    Returns (ids, index of the needle's first token). depth 0 puts the needle right after
    the prefix, depth 1 right before the query.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    n = round(depth * len(filler))
    ids = np.concatenate([prefix, filler[:n], needle, filler[n:], query]).astype(np.int64)
    return ids, len(prefix) + n


class BookFiller:
    """Stretches of real text: the books of a prepared split read as one stream, each book
    followed by a newline, wrapping around at the end (so any length can be filled)."""

    def __init__(self, books: ShardedBooks):
        self.books = books
        self.lengths = books.num_tokens + 1
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        self.total = int(self.lengths.sum())

    def take(self, offset: int, n: int) -> np.ndarray:
        """n tokens of the stream from `offset` on."""
        out = np.empty(n, dtype=np.int64)
        filled, offset = 0, offset % self.total
        while filled < n:
            book = int(np.searchsorted(self.starts, offset, side="right")) - 1
            inside = offset - int(self.starts[book])
            length = int(self.books.num_tokens[book])
            if inside < length:
                count = min(length - inside, n - filled)
                out[filled:filled + count] = self.books.tokens(book, inside, inside + count)
            else:  # the newline after the book
                count, out[filled] = 1, NEWLINE_ID
            filled += count
            offset = (offset + count) % self.total
        return out

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.take(int(rng.integers(self.total)), n)


class PasskeyTask:
    """Passkey prompts of an exact token length with filler from books."""

    def __init__(self, tokenizer: Tokenizer, filler: BookFiller, key_digits: int = 5):
        if not 1 <= key_digits <= MAX_KEY_DIGITS:
            raise ValueError(f"key_digits must be between 1 and {MAX_KEY_DIGITS}, got {key_digits}")
        self.tokenizer, self.filler, self.key_digits = tokenizer, filler, key_digits
        self.prefix = np.array(tokenizer.encode(PASSKEY_PREFIX), dtype=np.int64)
        self.query = np.array(tokenizer.encode(PASSKEY_QUERY), dtype=np.int64)

    def random_key(self, rng: np.random.Generator) -> str:
        return str(int(rng.integers(10 ** (self.key_digits - 1), 10 ** self.key_digits)))

    def needle(self, key: str) -> np.ndarray:
        return np.array(self.tokenizer.encode(PASSKEY_NEEDLE.format(key=key)), dtype=np.int64)

    def shortest(self) -> int:
        """The tokens of a prompt with no filler. Digits are pieces of their own (the tokenizer splits
        them), so every key of `key_digits` digits takes as many tokens."""
        return len(self.prefix) + len(self.needle("9" * self.key_digits)) + len(self.query)

    def answer(self, key: str) -> np.ndarray:
        return np.array(self.tokenizer.encode(PASSKEY_ANSWER.format(key=key)), dtype=np.int64)

    def sample(self, length: int, depth: float, rng: np.random.Generator, key: str | None = None) -> PasskeySample:
        """A prompt of exactly `length` tokens, its key (random unless given) at `depth` of the filler."""
        key = self.random_key(rng) if key is None else key
        needle = self.needle(key)
        n_filler = length - len(self.prefix) - len(needle) - len(self.query)
        if n_filler < 0:
            raise ValueError(f"a passkey prompt needs at least {length - n_filler} tokens, asked for {length}")
        ids, position = place_needle(self.prefix, self.filler.sample(rng, n_filler), needle, self.query, depth)
        return PasskeySample(ids, self.answer(key), key, position, depth)

    def is_correct(self, sample: PasskeySample, generated_text: str) -> bool:
        """Exact match: the first number in the model's continuation is the key."""
        found = re.search(r"\d+", generated_text)
        return found is not None and found.group() == sample.key


class PasskeyWindows(torch.utils.data.Dataset):
    """Map-style passkey training set: item k is (window [seq_len + 1], loss_mask [seq_len]).

    The window is a passkey prompt followed by its answer, so that it ends with the answer;
    the mask selects the targets that are answer tokens. Item k depends only on (seed, k),
    for any k >= 0: the key, its depth (uniform in [0, 1]) and the filler (from the books
    of <root>/<split>) are drawn from a generator seeded with [seed, k]. `len` is the
    split's number of seq_len windows, so that an epoch covers about as much filler text
    as the split holds.
    """

    def __init__(self, root, split, seq_len, seed, tokenizer_checksum=None, key_digits=5):
        self.books = ShardedBooks(root, split, tokenizer_checksum)
        self.task = PasskeyTask(Tokenizer(join(str(root), "tokenizer.model")), BookFiller(self.books), key_digits)
        shortest = self.task.shortest() + len(self.task.answer("9" * key_digits)) - 1   # window: prompt + answer
        if seq_len < shortest:   # found now, not by the data loader's workers
            raise ConfigError(f"data.seq_len {seq_len}: a passkey window needs at least {shortest} tokens "
                              f"(instructions, passkey sentence, question and answer)")
        self.seq_len, self.seed = seq_len, seed
        self.windows_per_epoch = max(1, int(self.books.num_tokens.sum()) // seq_len)

    def __len__(self):
        return self.windows_per_epoch

    def __getitem__(self, k):
        if k < 0:
            raise IndexError(f"sample index {k} is negative")
        rng = np.random.default_rng([self.seed, int(k)])
        depth, key = float(rng.random()), self.task.random_key(rng)
        sample = self.task.sample(self.seq_len + 1 - len(self.task.answer(key)), depth, rng, key)
        window = torch.from_numpy(np.concatenate([sample.ids, sample.answer]))
        mask = torch.zeros(self.seq_len, dtype=torch.bool)
        mask[self.seq_len - len(sample.answer):] = True
        return window, mask

    def state_dict(self, consumed_samples):
        """The stream's checkpoint state after `consumed_samples` global samples, with what item k depends on."""
        return {
            "consumed_samples": int(consumed_samples),
            "seed": self.seed,
            "seq_len": self.seq_len,
            "key_digits": self.task.key_digits,
            "tokenizer_checksum": self.books.tokenizer_checksum,
            "books": self.books.digest,   # the filler
        }

    def load_state_dict(self, state):
        """Check a state from `state_dict` against this dataset and return its consumed_samples."""
        return checked_position(self.books.where, state, self.state_dict(state["consumed_samples"]))


RETRIEVAL_DOCUMENT = "Question: {question}\nDocument {id}: {text}\n\n"
RETRIEVAL_QUERY = "Question: {question}\nAnswer: Document"
RETRIEVAL_ANSWER = " {id}"


@dataclass
class Passage:
    text: str
    question: str | None = None   # only gold candidates need one


@dataclass
class RetrievalSample:
    ids: np.ndarray            # the prompt
    answer: np.ndarray         # the tokens of " <gold id>"
    gold_id: int
    gold_index: int            # which of the documents is the gold one
    doc_ids: list[int]         # every document's id, in prompt order
    doc_starts: list[int]      # index in `ids` where each document's "Question:" block starts


class RetrievalTask:
    """Multi-document retrieval under noise: name the id of the document that answers a
    question, among `n` distractors, with the question repeated before every document
    (DeciMamba's multi-document SQuAD layout in plain text)."""

    def __init__(self, tokenizer: Tokenizer, passages: list[Passage], max_id: int = 1000):
        self.tokenizer, self.passages, self.max_id = tokenizer, passages, max_id
        self.gold_candidates = [i for i, p in enumerate(passages) if p.question]
        if not self.gold_candidates:
            raise ValueError("no passage has a question, so none can be the gold document")
        # SQuAD repeats a paragraph once per question: distractors are drawn from distinct texts
        self.texts = list(dict.fromkeys(p.text for p in passages))

    def most_distractors(self) -> int:
        """The most distractors a sample can have: every other distinct text, each with its own id."""
        return min(len(self.texts), self.max_id) - 1

    def sample(self, n_distractors: int, rng: np.random.Generator) -> RetrievalSample:
        if n_distractors > self.most_distractors():
            raise ValueError(f"{n_distractors} distractors asked, at most {self.most_distractors()} "
                             f"({len(self.texts)} distinct passages, ids below {self.max_id})")
        gold = self.passages[self.gold_candidates[int(rng.integers(len(self.gold_candidates)))]]
        others = [text for text in self.texts if text != gold.text]
        texts = [others[i] for i in rng.choice(len(others), n_distractors, replace=False)]
        gold_index = int(rng.integers(n_distractors + 1))
        texts.insert(gold_index, gold.text)
        doc_ids = [int(i) for i in rng.choice(self.max_id, n_distractors + 1, replace=False)]
        # "\n" is a piece of its own, so encoding block by block gives the ids of the whole text.
        pieces, starts, length = [], [], 0
        for doc_id, text in zip(doc_ids, texts):
            piece = self.tokenizer.encode(RETRIEVAL_DOCUMENT.format(question=gold.question, id=doc_id, text=text))
            starts.append(length)
            pieces.append(piece)
            length += len(piece)
        pieces.append(self.tokenizer.encode(RETRIEVAL_QUERY.format(question=gold.question)))
        ids = np.concatenate([np.array(p, dtype=np.int64) for p in pieces])
        answer = np.array(self.tokenizer.encode(RETRIEVAL_ANSWER.format(id=doc_ids[gold_index])), dtype=np.int64)
        return RetrievalSample(ids, answer, doc_ids[gold_index], gold_index, doc_ids, starts)

    @staticmethod
    def is_correct(sample: RetrievalSample, generated_text: str) -> bool:
        """Exact match: the first number in the model's continuation is the gold id."""
        found = re.search(r"\d+", generated_text)
        return found is not None and int(found.group()) == sample.gold_id


QUOTE_WORDS = 12


def load_passages(path) -> list[Passage]:
    """Passages from a JSON-lines file: {"text": ..., "question": ...} per line, the question
    optional (SQuAD: one line per question with its paragraph as the text)."""
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.readlines()
    except OSError as error:
        raise ValueError(f"{path}: {error.strerror.lower()}") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start})") from None
    passages = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            passages.append(Passage(str(row["text"]), row.get("question")))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{number}: not a JSON object with a \"text\" field") from None
    if not passages:
        raise ValueError(f"{path}: no passages")
    if not any(passage.question for passage in passages):
        raise ValueError(f"{path}: no line has a \"question\", so no passage can be the gold document")
    return passages


def book_passages(books: ShardedBooks, tokenizer: Tokenizer, min_words: int = 30, max_words: int = 150
                  ) -> list[Passage]:
    """Paragraphs of the books as passages; each asks which document begins with its first
    `QUOTE_WORDS` words.

    A stand-in for SQuAD that needs no download: the question can only be answered by
    finding the paragraph it quotes.
    """
    passages = []
    for index in range(len(books)):
        text = tokenizer.decode(books.tokens(index))
        for paragraph in re.split(r"\n\s*\n", text):
            words = paragraph.split()
            if not min_words <= len(words) <= max_words:
                continue
            quote = " ".join(words[:QUOTE_WORDS])
            passages.append(Passage(" ".join(words), f'Which document begins with the words "{quote}"?'))
    return passages
