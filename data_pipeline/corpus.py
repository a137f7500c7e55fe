"""A corpus in PG19's layout, read through any fsspec URL.

    <root>/train/<book_id>.txt, <root>/validation/..., <root>/test/...
    <root>/metadata.csv   no header: book_id,short_book_title,publication_date,url
"""

import csv
import hashlib
import io
from dataclasses import dataclass

from data_pipeline.errors import DataError
from data_pipeline.storage import display, join, resolve
from data_pipeline.text import decode_utf8, normalise_newlines, strip_gutenberg

SPLITS = ("train", "validation", "test")
MAX_KEY_BYTES = 95  # a USTAR member name holds 100 bytes: the key and ".json"


@dataclass(frozen=True)
class Book:
    split: str
    book_id: str
    path: str  # inside the corpus filesystem
    title: str
    year: int | None

    @property
    def name(self):
        """How reports name the book: its path relative to the corpus root."""
        return f"{self.split}/{self.book_id}.txt"

    @property
    def key(self):
        """The book's name inside a shard: WebDataset splits a member name into key and extension at a dot."""
        return self.book_id.replace(".", "_")


def _book_order(book_id):
    # PG19 ids are Gutenberg numbers: sort them as numbers, anything else after them as text. The id itself breaks
    # ties ("07" and "7"), so the order never depends on how a filesystem lists a folder.
    return (0, int(book_id), book_id) if book_id.isdigit() else (1, 0, book_id)


def _shown(name):
    """A file name as messages show it: bytes that are not UTF-8 as \\xNN escapes."""
    return name.encode(errors="surrogateescape").decode(errors="backslashreplace")


class Corpus:
    """The books of a PG19-layout corpus. `warnings` collects problems with metadata.csv; `metadata` is None
    without one.

    Files whose names start with a dot (macOS's `._46.txt`, editors' backups) are not books, silently; other
    files not ending in .txt (`904.TXT`, `notes.md`) are not books either, with a warning in `ignored`.
    """

    def __init__(self, url):
        self.url = str(url)
        self.fs, self.root = resolve(self.url)
        if not self.fs.isdir(self.root):
            raise DataError(f"{self.url}: no such directory")
        self.warnings = []
        self.metadata = self._read_metadata()
        self.ignored = {}  # split -> a warning per file in its folder that is not a book, set by books(split)
        self._books = {}   # split -> its books, listed once

    def _read_metadata(self):
        """{book_id: (title, year)}, or None when there is no metadata.csv. Rows that cannot be read are warned
        about and left out (their books get empty titles, and each its own warning when it is sharded)."""
        path = join(self.root, "metadata.csv")
        where = display(self.fs, path)
        if not self.fs.exists(path):
            self.warnings.append(f"{where}: missing, books get empty titles and no year")
            return None
        text, _ = decode_utf8(self.fs.cat_file(path))
        metadata, malformed = {}, []
        rows = csv.reader(io.StringIO(text.removeprefix("\ufeff")))  # spreadsheets save a byte-order mark
        try:
            for row in rows:
                # A stray quote makes one field of the rest of the file: fewer fields, and newlines in them.
                if len(row) < 3 or any("\n" in field for field in row):
                    malformed.append(rows.line_num)
                    continue
                book_id, title, date = row[0].strip(), row[1], row[2].strip()
                metadata[book_id] = (title, int(date) if date.isdigit() else None)
        except csv.Error as error:
            malformed.append(f"{rows.line_num} ({error})")
        if malformed:
            self.warnings.append(f"{where}: {len(malformed)} malformed rows ignored (fewer than 3 fields or a stray "
                                 f"quote), the first ending on line {malformed[0]}")
        if not metadata:
            self.warnings.append(f"{where}: no usable row, books get empty titles and no year")
        return metadata

    def books(self, split):
        """The split's books in a fixed order (by book id), as a new list.

        A split is listed once per Corpus: a run's phases (the checks, the tokenizer's digest and sample, sharding)
        ask for it up to five times, and listing a bucket of PG19's 28,602 train books takes seconds.
        """
        if split not in self._books:
            self._books[split] = self._list(split)
        return list(self._books[split])

    def _list(self, split):
        folder = join(self.root, split)
        if not self.fs.isdir(folder):
            raise DataError(f"{display(self.fs, folder)}: no such directory (expected train/, validation/, test/)")
        books, by_key, ignored = [], {}, []
        for path in self.fs.ls(folder, detail=False):
            name = path.rsplit("/", 1)[-1]
            if name.startswith("."):
                continue
            if not name.endswith(".txt"):
                ignored.append(f"{split}/{_shown(name)}: not a .txt file, so not a book; ignored")
                continue
            if _shown(name) != name:  # a name in another encoding, its bytes kept as surrogates by Python
                raise DataError(f"{display(self.fs, folder)}/{_shown(name)}: the file name is not valid UTF-8; "
                                "rename the file")
            book_id = name.removesuffix(".txt")
            title, year = (self.metadata or {}).get(book_id, ("", None))
            book = Book(split, book_id, path, title, year)
            if len(book.key.encode()) > MAX_KEY_BYTES:
                raise DataError(f"{display(self.fs, path)}: a book id of over {MAX_KEY_BYTES} bytes does not fit "
                                "a tar member name; rename the file")
            if book.key in by_key:
                raise DataError(f"{display(self.fs, by_key[book.key].path)} and {name}: both would be stored as "
                                f"{book.key!r} in a shard; rename one")
            by_key[book.key] = book
            books.append(book)
        self.ignored[split] = ignored
        return sorted(books, key=lambda book: _book_order(book.book_id))

    def check_splits(self, splits):
        """List every split now, so a missing folder or a bad file name stops a run before hours of tokenizing."""
        for split in splits:
            self.books(split)


def books_digest(books):
    """sha256 of a list of books (their names, in order): what a tokenizer or a split was made from."""
    return hashlib.sha256("\n".join(book.name for book in books).encode()).hexdigest()


def read_book(fs, book, gutenberg=False):
    """(normalised text, warnings, size of the file in bytes) of a book. Raises OSError when it cannot be read."""
    raw = fs.cat_file(book.path)
    text, undecodable = decode_utf8(raw)
    warnings = []
    if undecodable:
        warnings.append(f"{book.name}: {undecodable} undecodable bytes replaced with U+FFFD")
    text = normalise_newlines(text)
    if gutenberg:
        text, found = strip_gutenberg(text)
        if not found:
            warnings.append(f"{book.name}: no Project Gutenberg header or footer found, kept whole")
    return text, warnings, len(raw)
