"""Bytes of a book file -> the normalised text the tokenizer sees.

Normalisation is deliberately small so that decode(encode(text)) gives back exactly this text (but for U+2581,
sentencepiece's sign for a space, which decodes as a space): UTF-8 decoding, one kind of line ending, and (only for
raw Gutenberg downloads) dropping the licence.
"""

import re

# surrogateescape decodes each undecodable byte to one lone surrogate in this range; we count and replace them.
_UNDECODABLE = re.compile("[\udc80-\udcff]")

# Project Gutenberg wraps each raw e-book in a licence header and footer; PG19 files are already stripped.
_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK[^\n]*\n", re.I | re.M)
_GUTENBERG_END = re.compile(
    r"^(?:\*\*\*\s*END OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK|End of (?:the )?Project Gutenberg)", re.I | re.M
)


def decode_utf8(raw):
    """(text, number of undecodable bytes); each undecodable byte becomes U+FFFD instead of an exception."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        return _UNDECODABLE.subn("\ufffd", raw.decode("utf-8", errors="surrogateescape"))


def normalise_newlines(text):
    """Drop a leading byte-order mark; CRLF and lone CR become LF."""
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def strip_gutenberg(text):
    """(text between the Gutenberg START and END markers, whether any marker was found)."""
    start = _GUTENBERG_START.search(text)
    begin = start.end() if start else 0
    end = _GUTENBERG_END.search(text, begin)
    if not start and not end:
        return text, False
    return text[begin : end.start() if end else len(text)].strip("\n") + "\n", True
