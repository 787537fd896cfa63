"""recipes/arrow_pages.py: the Arrow pages a process has read leave its RSS again, and the data stays readable.

Measured per mapping in /proc/self/smaps (the resident size of the memory-mapped .arrow files), in this process and
in real `datasets.map` worker processes."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

import arrow_pages  # noqa: E402

def kernel_has_pageout() -> bool:
    """Linux 5.4 or later (MADV_PAGEOUT) with /proc/self/smaps to measure by."""
    try:
        major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    except (AttributeError, ValueError):
        return False
    return os.path.exists("/proc/self/smaps") and (major, minor) >= (5, 4)


pytestmark = pytest.mark.skipif(not kernel_has_pageout(), reason="needs Linux 5.4+ (MADV_PAGEOUT) and "
                                "/proc/self/smaps; elsewhere the release does nothing, by design")

ROWS, TEXT = 20_000, 1_000  # about 20 MB of text in the Arrow file


def arrow_resident_bytes() -> int:
    """Resident bytes of this process's mappings of .arrow files."""
    total, arrow = 0, False
    with open("/proc/self/smaps", encoding="utf-8") as f:
        for line in f:
            first = line.split(None, 1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header line
                arrow = line.rstrip().endswith(".arrow")
            elif arrow and first == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


def read_all(ds) -> int:
    """Read every byte of the text column (an Arrow slice alone touches no pages)."""
    import pyarrow.compute as pc

    return pc.sum(pc.utf8_length(ds.with_format("arrow")[:]["text"])).as_py()


@pytest.fixture
def on_disk(tmp_path):
    """A dataset memory-mapped from its Arrow file (not held in memory)."""
    import datasets

    ds = datasets.Dataset.from_dict({"text": [f"{i:08d}" + "x" * TEXT for i in range(ROWS)]})
    ds.save_to_disk(str(tmp_path / "ds"))
    return datasets.load_from_disk(str(tmp_path / "ds"))


def test_release_drops_the_pages_read_and_the_data_stays_readable(on_disk):
    arrow_pages.release_read_pages()
    before = arrow_resident_bytes()
    first = read_all(on_disk)  # every page of the column read
    grown = arrow_resident_bytes() - before
    assert grown > ROWS * TEXT // 2, grown  # the read pages are resident (the file is ~ROWS x TEXT bytes)
    assert arrow_pages.release_read_pages() >= ROWS * TEXT  # the whole mapping's range
    assert arrow_resident_bytes() < before + ROWS * TEXT // 20
    assert read_all(on_disk) == first == ROWS * (8 + TEXT)  # the pages map back from the page cache
    assert on_disk[ROWS - 1]["text"].startswith(f"{ROWS - 1:08d}")


def test_released_while_running_releases_in_the_background(on_disk):
    import time

    arrow_pages.release_read_pages()
    before = arrow_resident_bytes()
    with arrow_pages.released_while_running(interval=0.05):
        read_all(on_disk)
        deadline = time.monotonic() + 10  # the thread's next tick, however busy the machine is
        while arrow_resident_bytes() >= before + ROWS * TEXT // 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert arrow_resident_bytes() < before + ROWS * TEXT // 20
    read_all(on_disk)
    assert arrow_resident_bytes() > before + ROWS * TEXT // 2  # no release once the block is over


def resident_after_batch(batch):
    """A batched map function that records, per batch, the worker's resident Arrow bytes while the batch is held."""
    return {"resident": [arrow_resident_bytes()] * len(batch["text"])}


@pytest.mark.parametrize("wrapped", [True, False], ids=["DropsReadPages", "plain map (control)"])
def test_map_workers_hold_only_the_current_batch(on_disk, wrapped):
    fn = arrow_pages.DropsReadPages(resident_after_batch) if wrapped else resident_after_batch
    out = on_disk.map(fn, batched=True, batch_size=500, num_proc=2, remove_columns=["text"],
                      load_from_cache_file=False)
    peak = max(out["resident"])  # the most any worker held while a batch was in hand
    half = ROWS * TEXT // 2  # each worker reads about half of the file
    if wrapped:
        assert peak < half // 4, peak  # about one batch (0.5 MB) plus Arrow's read-ahead, not its whole half
    else:
        assert peak > half // 2, peak  # control: without the release a worker keeps what it has read
