"""Child processes (the tokenizing pool, the tokenizer's trainer) that leave Ctrl-C to the parent."""

import contextlib
import multiprocessing
import signal
import threading

# spawn, not fork: the parent may hold threads (torch, pytest plugins) that fork would copy mid-state.
SPAWN = multiprocessing.get_context("spawn")


@contextlib.contextmanager
def children_ignore_ctrl_c():
    """Processes started in this block ignore SIGINT from their first instruction on.

    Ctrl-C reaches the whole process group; only the parent handles it, by stopping its children, so a terminal
    shows one message instead of a traceback per process. An ignored signal stays ignored across exec, and Python
    then installs no KeyboardInterrupt handler. The price: the parent ignores a Ctrl-C pressed while the block runs
    (keep it to starting processes). SIGTERM stays as it is: it is how the parent stops its children.
    """
    if threading.current_thread() is not threading.main_thread():  # only the main thread may change handlers
        yield
        return
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
