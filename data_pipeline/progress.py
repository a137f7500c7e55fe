"""Progress of the long phases (the tokenizer's sample and training, tokenizing, verifying) and the final report."""

import sys
import time
from dataclasses import dataclass, field

from tqdm import tqdm

# Seconds between progress lines when stderr is not a terminal (a log file).
INTERVAL = 30.0


def log_line(stream, message):
    """A progress line, or nothing when stream is None (--quiet)."""
    if stream is not None:
        print(f"[data_pipeline] {message}", file=stream, flush=True)


def _count(n):
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


class Progress:
    """A tqdm bar (items, tokens, MB/s) on a terminal; otherwise a plain log line every `interval` seconds."""

    def __init__(self, label, total, enabled=True, interval=None, stream=None, unit="book"):
        self.label, self.total, self.enabled, self.unit = label, total, enabled, unit
        self.interval = INTERVAL if interval is None else interval
        self.stream = sys.stderr if stream is None else stream
        self.done = self.tokens = self.bytes = 0
        self.start = self.last_line = time.monotonic()
        terminal = enabled and getattr(self.stream, "isatty", lambda: False)()
        self.bar = None
        if terminal:
            self.bar = tqdm(total=total, desc=label, unit=unit, file=self.stream, dynamic_ncols=True)

    def update(self, tokens, nbytes):
        self.done += 1
        self.tokens += tokens
        self.bytes += nbytes
        now = time.monotonic()
        if self.bar is not None:
            self.bar.set_postfix_str(self._rates(now), refresh=False)
            self.bar.update(1)
        elif self.enabled and now - self.last_line >= self.interval:
            self.last_line = now
            log_line(self.stream, f"{self.label}: {self.done}/{self.total} {self.unit}s, {self._rates(now)}")

    def _rates(self, now):
        tokens = f"{_count(self.tokens)} tokens, " if self.tokens else ""  # none counted while sampling
        return f"{tokens}{self.bytes / 1e6 / max(now - self.start, 1e-9):.1f} MB/s"

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
