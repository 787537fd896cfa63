"""Bounded memory while `datasets` reads its Arrow files: the pages a process has read leave its RSS again.

datasets memory-maps every Arrow file, and each page a process reads stays resident in it: a map worker that walks
its half of 1M tokenized rows ends +0.5 GB, and the main process that saves the prepared data to the cache touches
every page of it (docs/BENCHMARKS.md, issue 19). The pages are page cache that the kernel could drop, but RSS counts
them and grows with the data. Neither datasets nor pyarrow offers a way to let them go, so `release_read_pages`
reads /proc/self/maps and calls madvise(MADV_DONTNEED) on the read-only Arrow ranges: the pages stay in the page
cache and a later read maps them back, so no data can be lost (a mapping without write permission has no dirty
pages). Elsewhere than Linux it does nothing.

- `drops_read_pages(fn)`: a batched map function that releases after each batch (runs in the map workers);
- `released_while_running()`: a thread that releases every half second in this process while the block runs
  (the main process: column reads, select, save_to_disk, statistics).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading

MADV_DONTNEED = 4  # Linux


def release_read_pages() -> int:
    """Release this process's resident pages of read-only memory-mapped `.arrow` files; the bytes of the ranges
    released (0 where /proc or madvise is absent)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            maps = f.read().splitlines()
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released = 0
    for line in maps:
        parts = line.split(None, 5)  # address perms offset dev inode path
        if len(parts) < 6 or not parts[5].endswith(".arrow") or "w" in parts[1]:
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        if madvise(start, end - start, MADV_DONTNEED) == 0:
            released += end - start
    return released


def drops_read_pages(fn):
    """`fn`, a batched map function, followed by `release_read_pages` after each batch."""

    @functools.wraps(fn)
    def batch(*args, **kwargs):
        out = fn(*args, **kwargs)
        release_read_pages()
        return out

    return batch


@contextlib.contextmanager
def released_while_running(interval: float = 0.5):
    """Release this process's read Arrow pages every `interval` seconds while the block runs, and once at its end."""
    stop = threading.Event()

    def loop():
        while not stop.wait(interval):
            release_read_pages()

    thread = threading.Thread(target=loop, name="arrow-pages", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        release_read_pages()
