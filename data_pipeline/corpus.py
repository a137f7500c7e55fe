"""A corpus in PG19's layout, read through any fsspec URL.

    <root>/train/<book_id>.txt, <root>/validation/..., <root>/test/...
    <root>/metadata.csv   no header: book_id,short_book_title,publication_date,url
"""

import csv
import io
from dataclasses import dataclass

from data_pipeline.errors import DataError
from data_pipeline.storage import display, join, resolve
from data_pipeline.text import decode_utf8, normalise_newlines, strip_gutenberg

SPLITS = ("train", "validation", "test")


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


def _book_order(book_id):
    # PG19 ids are Gutenberg numbers: sort them as numbers, anything else after them as text.
    return (0, int(book_id), "") if book_id.isdigit() else (1, 0, book_id)


class Corpus:
    """The books of a PG19-layout corpus. `warnings` collects problems with metadata.csv."""

    def __init__(self, url):
        self.url = str(url)
        self.fs, self.root = resolve(self.url)
        if not self.fs.isdir(self.root):
            raise DataError(f"{self.url}: no such directory")
        self.warnings = []
        self.metadata = self._read_metadata()

    def _read_metadata(self):
        path = join(self.root, "metadata.csv")
        if not self.fs.exists(path):
            self.warnings.append(f"{display(self.fs, path)}: missing, books get empty titles and no year")
            return {}
        text, _ = decode_utf8(self.fs.cat_file(path))
        metadata = {}
        for row in csv.reader(io.StringIO(text)):
            if len(row) < 3:
                continue
            book_id, title, date = row[0].strip(), row[1], row[2].strip()
            metadata[book_id] = (title, int(date) if date.isdigit() else None)
        return metadata

    def books(self, split):
        """The split's books in a fixed order (by book id)."""
        folder = join(self.root, split)
        if not self.fs.isdir(folder):
            raise DataError(f"{display(self.fs, folder)}: no such directory (expected train/, validation/, test/)")
        books = []
        for path in self.fs.ls(folder, detail=False):
            name = path.rsplit("/", 1)[-1]
            if not name.endswith(".txt"):
                continue
            book_id = name.removesuffix(".txt")
            title, year = self.metadata.get(book_id, ("", None))
            books.append(Book(split, book_id, path, title, year))
        return sorted(books, key=lambda book: _book_order(book.book_id))


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
