"""Run a program on a simulated full disk: `python tests/full_disk.py <name> recipes/sft.py --config x.yaml`.

From the first save into a folder called <name> on (e.g. checkpoint-4), torch.save writes part of its file and
fails with the error torch raises on a real full disk (measured on a 200 KB tmpfs: "unexpected pos ... vs ..."),
and the filesystem reports no free space (shutil.disk_usage). Everything else runs unchanged.
"""

import collections
import os
import runpy
import shutil
import sys

import torch

target, program = sys.argv[1], sys.argv[2]
real_save, real_usage, full = torch.save, shutil.disk_usage, []


def save(obj, f, *args, **kwargs):
    if full or (isinstance(f, (str, os.PathLike)) and target in os.fspath(f).split(os.sep)):
        full.append(f)
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04" + b"\0" * 530)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    return real_save(obj, f, *args, **kwargs)


def disk_usage(path):
    usage = real_usage(path)
    return collections.namedtuple("usage", "total used free")(usage.total, usage.total, 0) if full else usage


torch.save, shutil.disk_usage = save, disk_usage
sys.argv = sys.argv[2:]
sys.path.insert(0, os.path.dirname(os.path.abspath(program)))
runpy.run_path(program, run_name="__main__")
