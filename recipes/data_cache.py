"""The prepared datasets, kept on disk under a key of everything that makes their tokens, so a re-run skips the work.

- The key: a SHA-256 over the data files' contents, the data options, the tokenizer and chat format, `max_length`,
  the seed, the code that prepares the rows, and the library versions (`key`). Anything that changes a token
  changes the key; nothing else does.
- The folder `<cache_dir>/<key>` holds `train/` and `eval/` (datasets' `save_to_disk`), `eval_pairs/` (the held-out
  conversations the sample answers use), `report.json`, and last `manifest.json`: every file's size and SHA-256.
- Written under a temporary name and renamed into place: a run killed mid-write leaves no folder under the key.
  A folder whose files do not match its manifest (edited, truncated, copied half) is set aside and rebuilt, never
  used.
- Under `accelerate launch` the main process prepares and the other ranks load its result (sft.py wraps this in
  `main_process_first`); with the cache on storage every node sees, the nodes prepare once in all.

datasets' own fingerprints cache each map step, but the numpy steps between them (split, dedupe, mixture) would
run again, and a fingerprint covers neither the data files' contents nor the tokenizer's files: hence one key here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time

import arrow_pages

MANIFEST = "manifest.json"
TMP = ".tmp-"
SPLITS = ("train", "eval", "eval_pairs")


def default_dir() -> str:
    """`$HF_DATASETS_CACHE/cai_sft_prepared` (under `$HF_HOME`, which clusters usually put on shared storage)."""
    import datasets

    return os.path.join(str(datasets.config.HF_DATASETS_CACHE), "cai_sft_prepared")


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def key(**parts) -> str:
    """SHA-256 of the parts (JSON; file contents enter as their digests, given by the caller)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _files(folder: str) -> list[str]:
    out = []
    for root, _, names in os.walk(folder):
        out += [os.path.relpath(os.path.join(root, n), folder) for n in names]
    return sorted(f for f in out if f != MANIFEST)


def problem(folder: str) -> str | None:
    """Why a cache folder cannot be used (no manifest, a file missing, changed or added to a split), or None.
    Files that later steps add beside the splits (datasets' map caches of TRL's own steps) are not ours to check."""
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "it has no readable manifest.json (a write that did not finish, or an edit)"
    for name, (size, digest) in manifest.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != size or file_digest(path) != digest:
            return f"{name} changed since it was written"
    return None


def _load(folder: str):
    import datasets

    sets = {s: datasets.load_from_disk(os.path.join(folder, s)) if os.path.isdir(os.path.join(folder, s)) else None
            for s in SPLITS}  # fmt: skip
    with open(os.path.join(folder, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    return sets["train"], sets["eval"], sets["eval_pairs"], report


def _save(folder: str, train, eval_ds, eval_pairs, report: dict) -> None:
    # Saving reads every page of the prepared data: they leave this process's RSS as it goes (arrow_pages.py).
    # No worker is forked meanwhile (save_to_disk without num_proc), so the releasing thread never meets a fork.
    with arrow_pages.released_while_running():
        for name, ds in zip(SPLITS, (train, eval_ds, eval_pairs)):
            if ds is not None:
                ds.save_to_disk(os.path.join(folder, name))
    with open(os.path.join(folder, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f)
    files = {n: [os.path.getsize(os.path.join(folder, n)), file_digest(os.path.join(folder, n))] for n in _files(folder)}
    with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as f:  # last: a folder with it is whole
        json.dump({"files": files, "written": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
        f.flush()
        os.fsync(f.fileno())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_leftovers(root: str, say) -> None:
    """Remove the temporary folders of killed preparations on this host (another host's are left alone); each
    names its host and process in `owner.json`."""
    host = socket.gethostname()
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if not name.startswith(TMP):
            continue
        try:
            with open(os.path.join(root, name, "owner.json"), encoding="utf-8") as f:
                owner = json.load(f)
        except (OSError, ValueError):
            continue
        if owner.get("host") == host and owner.get("pid") != os.getpid() and not _pid_alive(int(owner["pid"])):
            say(f"Data cache: removing {os.path.join(root, name)}, left by a preparation that was killed")
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def prepared(root: str, cache_key: str, build, rebuild: bool = False, say=print):
    """(train, eval, eval_pairs, report dict) from `<root>/<key>`, or from `build(work_dir)` (then kept there).

    `build` gets a folder for datasets' intermediate files (removed afterwards) and returns the same four things.
    """
    folder = os.path.join(root, cache_key[:32])
    os.makedirs(root, exist_ok=True)
    if os.path.isdir(folder):
        why = "rebuild_data_cache is set" if rebuild else problem(folder)
        if why is None:
            say(f"Data cache: hit, loading the prepared data from {folder}")
            return _load(folder)
        say(f"Data cache: {folder} is not used ({why}); preparing the data again")
        aside = f"{folder}.stale-{socket.gethostname()}-{os.getpid()}"
        try:
            os.replace(folder, aside)  # out of the way first: another rank never loads half of a removal
            shutil.rmtree(aside, ignore_errors=True)
        except FileNotFoundError:  # another node set it aside first
            pass
    else:
        say(f"Data cache: miss, preparing the data into {folder}")
    _clean_leftovers(root, say)
    import tempfile

    tmp = tempfile.mkdtemp(prefix=f"{TMP}{cache_key[:32]}-", dir=root)
    with open(os.path.join(tmp, "owner.json"), "w", encoding="utf-8") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid()}, f)
    try:
        train, eval_ds, eval_pairs, report = build(os.path.join(tmp, "work"))
        out = os.path.join(tmp, "out")
        os.makedirs(out)
        _save(out, train, eval_ds, eval_pairs, report)
        try:
            os.rename(out, folder)  # atomic; fails if another process put a folder there first
        except OSError:
            if problem(folder) is not None:
                raise
            say(f"Data cache: another process wrote {folder} first; using it")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _load(folder)
