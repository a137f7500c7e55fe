"""Text normalisation and corpus reading: the parts of the pipeline before the tokenizer."""

import fsspec
import pytest

from data_pipeline import DataError
from data_pipeline.corpus import Corpus, read_book
from data_pipeline.text import decode_utf8, normalise_newlines, strip_gutenberg


def test_decode_counts_and_replaces_undecodable_bytes():
    assert decode_utf8("naïve".encode()) == ("naïve", 0)
    assert decode_utf8(b"caf\xe9 \xff\xfe ok") == ("caf\ufffd \ufffd\ufffd ok", 3)


def test_newlines_and_byte_order_mark():
    assert normalise_newlines("\ufeffone\r\ntwo\rthree\n") == "one\ntwo\nthree\n"


def test_strip_gutenberg_keeps_only_the_book():
    raw = (
        "The Project Gutenberg EBook of Example, by Someone\n\nLicence blah.\n\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK EXAMPLE ***\n\n\nChapter 1\n\nIt was a dark night.\n\n"
        "End of the Project Gutenberg EBook of Example\n\n*** END OF THIS PROJECT GUTENBERG EBOOK EXAMPLE ***\nmore\n"
    )
    assert strip_gutenberg(raw) == ("Chapter 1\n\nIt was a dark night.\n", True)
    assert strip_gutenberg("Just a book.\n") == ("Just a book.\n", False)


def test_corpus_reads_layout_metadata_and_order(pg19_mini):
    corpus = Corpus(pg19_mini)
    books = corpus.books("validation")
    assert [book.book_id for book in books] == ["11", "98", "219"]  # numeric order
    assert books[0].title == "Alice's Adventures in Wonderland by Lewis Carroll" and books[0].year == 1865
    assert len(corpus.books("train")) == 29 and corpus.warnings == []
    text, warnings, nbytes = read_book(corpus.fs, books[0])
    assert text.startswith("ALICE’S ADVENTURES IN WONDERLAND") and warnings == [] and nbytes == len(text.encode())


def test_a_split_is_listed_once_and_each_caller_gets_its_own_list(pg19_mini, monkeypatch):
    corpus = Corpus(pg19_mini)
    listed = []
    ls = corpus.fs.ls
    monkeypatch.setattr(corpus.fs, "ls", lambda path, **kwargs: listed.append(path) or ls(path, **kwargs))
    first = corpus.books("train")
    first.reverse()   # as the tokenizer's sample shuffles its list
    assert corpus.books("train") == first[::-1] and len(listed) == 1


def test_corpus_errors_name_the_missing_folder(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}/nothing: no such directory"):
        Corpus(tmp_path / "nothing")
    (tmp_path / "train").mkdir()
    corpus = Corpus(tmp_path)
    assert corpus.warnings == [f"{tmp_path}/metadata.csv: missing, books get empty titles and no year"]
    with pytest.raises(DataError, match=f"{tmp_path}/test: no such directory"):
        corpus.books("test")


def test_memory_corpus_with_crlf_and_bad_bytes():
    fs = fsspec.filesystem("memory")
    fs.pipe({"/text-corpus/train/7.txt": b"one\r\ntwo \xff\r\n", "/text-corpus/metadata.csv": b'7,"A, B",1900,url\n'})
    corpus = Corpus("memory://text-corpus")
    (book,) = corpus.books("train")
    assert (book.title, book.year) == ("A, B", 1900)
    text, warnings, nbytes = read_book(corpus.fs, book)
    assert (text, nbytes) == ("one\ntwo \ufffd\n", 12)
    assert warnings == ["train/7.txt: 1 undecodable bytes replaced with U+FFFD"]
    fs.rm("/text-corpus", recursive=True)


def test_a_book_file_name_that_is_not_utf8_is_refused(tmp_path):
    (tmp_path / "train").mkdir()
    with open(bytes(tmp_path) + b"/train/caf\xe9.txt", "w") as file:
        file.write("a book")
    with pytest.raises(DataError, match=rf"^{tmp_path}/train/caf\\xe9\.txt: the file name is not valid UTF-8"):
        Corpus(tmp_path).books("train")


def test_metadata_with_a_byte_order_mark_and_malformed_rows(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "metadata.csv").write_bytes(b'\xef\xbb\xbf11,Alice,1865,url\n12,"Stray quote,1900,url\n13,B,1901,url\n')
    corpus = Corpus(tmp_path)
    assert corpus.metadata == {"11": ("Alice", 1865)}
    assert corpus.warnings == [f"{tmp_path}/metadata.csv: 1 malformed rows ignored (fewer than 3 fields or a stray "
                               "quote), the first ending on line 3"]
    (tmp_path / "metadata.csv").write_text("just one field\n")
    corpus = Corpus(tmp_path)
    assert corpus.metadata == {} and corpus.warnings == [
        f"{tmp_path}/metadata.csv: 1 malformed rows ignored (fewer than 3 fields or a stray quote), the first ending "
        "on line 1",
        f"{tmp_path}/metadata.csv: no usable row, books get empty titles and no year",
    ]


@pytest.mark.parametrize("names", [["07.txt", "7.txt"], ["7.txt", "07.txt"]])
def test_book_order_is_total_and_files_that_are_not_books_are_listed(names):
    fs = fsspec.filesystem("memory")
    for name in [*names, "904.TXT", "notes.md", ".hidden.txt"]:  # memory:// lists files in the order written
        fs.pipe(f"/order-corpus/train/{name}", b"text")
    corpus = Corpus("memory://order-corpus")
    assert [book.book_id for book in corpus.books("train")] == ["07", "7"]
    assert corpus.ignored == {"train": ["train/904.TXT: not a .txt file, so not a book; ignored",
                                        "train/notes.md: not a .txt file, so not a book; ignored"]}
    fs.rm("/order-corpus", recursive=True)
