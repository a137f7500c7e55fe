"""Progress while a split is tokenized, and the report at the end of a run."""

import sys
import time
from dataclasses import dataclass, field

from tqdm import tqdm


def _count(n):
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


class Progress:
    """A tqdm bar (books, tokens, MB/s) on a terminal; otherwise a plain log line every `interval` seconds."""

    def __init__(self, label, total_books, enabled=True, interval=30.0, stream=sys.stderr):
        self.label, self.total, self.enabled, self.interval, self.stream = label, total_books, enabled, interval, stream
        self.books = self.tokens = self.bytes = 0
        self.start = self.last_line = time.monotonic()
        terminal = enabled and getattr(stream, "isatty", lambda: False)()
        self.bar = None
        if terminal:
            self.bar = tqdm(total=total_books, desc=label, unit="book", file=stream, dynamic_ncols=True)

    def update(self, tokens, nbytes):
        self.books += 1
        self.tokens += tokens
        self.bytes += nbytes
        now = time.monotonic()
        if self.bar is not None:
            self.bar.set_postfix_str(self._rates(now), refresh=False)
            self.bar.update(1)
        elif self.enabled and now - self.last_line >= self.interval:
            self.last_line = now
            print(f"[data_pipeline] {self.label}: {self.books}/{self.total} books, {self._rates(now)}",
                  file=self.stream, flush=True)

    def _rates(self, now):
        return f"{_count(self.tokens)} tokens, {self.bytes / 1e6 / max(now - self.start, 1e-9):.1f} MB/s"

    def close(self):
        if self.bar is not None:
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


@dataclass
class SplitReport:
    """What one run did to one split. Skipped books and warnings are also kept in the split's manifest."""

    split: str
    books: int = 0  # tokenized by this run
    tokens: int = 0
    shards_written: int = 0
    shards_kept: int = 0  # already complete from an earlier run
    skipped: list = field(default_factory=list)  # "train/123.txt: empty"
    warnings: list = field(default_factory=list)
    seconds: float = 0.0

    def lines(self, show=10):
        out = [
            f"{self.split}: {self.books} books, {self.tokens:,} tokens, {self.shards_written} shards written, "
            f"{self.shards_kept} already complete, {len(self.skipped)} books skipped, "
            f"{len(self.warnings)} warnings, {self.seconds:.1f} s"
        ]
        for kind, items in (("skipped", self.skipped), ("warning", self.warnings)):
            out += [f"  {kind}: {item}" for item in items[:show]]
            if len(items) > show:
                out.append(f"  ... and {len(items) - show} more {kind} (listed in {self.split}/manifest.json)")
        return out
