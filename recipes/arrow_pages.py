"""Bounded memory while `datasets` reads its Arrow files: the pages a process has read leave its RSS again.

datasets memory-maps every Arrow file, and each page a process reads stays resident in it: a map worker that walks
its half of 1M tokenized rows ends +0.5 GB, and the main process that saves the prepared data to the cache touches
every page of it (docs/BENCHMARKS.md, issue 19). The pages are page cache that the kernel could drop, but RSS counts
them and they grow with the data. Neither datasets nor pyarrow offers a way to let them go, so `release_read_pages`
reads /proc/self/maps and calls madvise on the read-only `.arrow` ranges, one of two ways:
- MADV_DONTNEED (`keep_cached=True`): the pages leave this process and stay in the page cache (a re-run reads them
  from memory). It would zero anonymous memory that had taken such an address since /proc/self/maps was read, so it
  is used only where no other thread frees a mapping meanwhile: in a map worker between batches, and in the main
  thread's own loops. The call keeps the GIL (ctypes.PyDLL), so no Python thread runs between the read and the calls.
- MADV_PAGEOUT (`keep_cached=False`, Linux 5.4+): the kernel reclaims the pages (a clean file page is dropped from the
  page cache too and read again from the file if needed), and never zeroes anything: safe from any thread.
Elsewhere (no /proc, no madvise, an older kernel) nothing is released.

- `DropsReadPages(fn)`: a batched map function that releases (DONTNEED) after each batch, in the map workers;
- `released_while_running()`: a thread that releases (PAGEOUT) every half second while the block runs (the main
  process while it saves the prepared data: files that are removed afterwards, so nothing worth caching is dropped).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading

MADV_DONTNEED = 4  # Linux
MADV_PAGEOUT = 21  # Linux 5.4+; EINVAL before


@functools.lru_cache(maxsize=1)
def libc_madvise():
    """libc's madvise, called with the GIL held (looked up once; None where there is none). Kept out of module
    globals: a ctypes function cannot be pickled, and datasets pickles the map functions that use this module."""
    try:
        fn = ctypes.PyDLL(None, use_errno=True).madvise
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


libc_madvise()  # at import, so that a releasing thread never calls dlopen


def release_read_pages(keep_cached: bool = True) -> int:
    """Release this process's resident pages of read-only memory-mapped `.arrow` files (module docstring: which
    advice, from which thread); the bytes of the ranges the kernel accepted (0 where nothing can be released)."""
    madvise = libc_madvise()
    if madvise is None:
        return 0
    try:
        with open("/proc/self/maps", "rb") as f:  # bytes: a mapped file's name need not be UTF-8
            maps = f.read().splitlines()
    except OSError:
        return 0
    advice = MADV_DONTNEED if keep_cached else MADV_PAGEOUT
    released = 0
    for line in maps:
        parts = line.split(None, 5)  # address perms offset dev inode path
        if len(parts) < 6 or not parts[5].endswith(b".arrow") or b"w" in parts[1]:
            continue
        start, end = (int(x, 16) for x in parts[0].split(b"-"))
        if madvise(start, end - start, advice) == 0:
            released += end - start
    return released


class DropsReadPages:
    """`fn`, a batched map function, followed by `release_read_pages()` after each batch (the worker's only thread is
    between batches). A class at module level, so that datasets pickles it by reference and hashes it by `fn`."""

    def __init__(self, fn):
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        release_read_pages()
        return out


@contextlib.contextmanager
def released_while_running(interval: float = 0.5):
    """Release this process's read Arrow pages every `interval` seconds while the block runs, and once at its end."""
    stop = threading.Event()

    def loop():
        while not stop.wait(interval):
            release_read_pages(keep_cached=False)  # another thread: only the advice that never zeroes memory

    thread = threading.Thread(target=loop, name="arrow-pages", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    release_read_pages(keep_cached=False)
