"""Run one measurement in a fresh process and report its time and peak memory.

A fresh process per measurement makes the peak resident memory (`ru_maxrss`) that of one
configuration alone. Times are wall-clock seconds of the second call (the first warms up
the allocator and the kernels).
"""
from __future__ import annotations

import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the repo root, for `model`


def _child(fn: Callable[..., Callable[[], Any]], kwargs: dict, queue: mp.Queue) -> None:
    try:
        step = fn(**kwargs)          # builds the model and inputs, returns the thing to time
        base_mb = _rss_mb()
        step()
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        queue.put({"seconds": seconds, "peak_mb": peak_mb, "base_mb": base_mb})
    except Exception as e:   # report and keep going: one OOM must not stop a table
        queue.put({"error": f"{type(e).__name__}: {e}"})


def measure(fn: Callable[..., Callable[[], Any]], **kwargs) -> dict:
    """fn(**kwargs) -> step; returns {"seconds", "peak_mb", "base_mb"} or {"error"}."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, kwargs, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        return {"error": f"exit code {proc.exitcode} (killed: out of memory?)"}
    return queue.get()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def machine() -> str:
    import os
    import platform
    import torch
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
