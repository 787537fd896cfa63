"""Facts about where a program runs, each with one home: environment booleans, offline mode, local path or hub id.

Whether a run shards its parameters (ZeRO-3 / FSDP) lives in `memory.launch_setup`, which reads the same launcher
variables in full; `checks` asks it.
"""

from __future__ import annotations

import os
import re

TRUE = ("1", "true", "yes", "on")
# Endings that make a name a file, never a hub id `org/name`.
FILE_ENDING = re.compile(r"\.(jsonl|json|parquet|csv|tsv|txt|xlsx?|arrow|gz|zip|bz2|xz|zst|pkl|pickle|safetensors|bin)$",
                         re.I)


def env_true(name: str, env=None) -> bool:
    """Whether environment variable `name` is set to 1/true/yes/on (any case)."""
    return str((os.environ if env is None else env).get(name, "")).lower() in TRUE


def offline() -> bool:
    """The hub is not to be contacted (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)."""
    return env_true("HF_HUB_OFFLINE") or env_true("HF_DATASETS_OFFLINE")


def is_local_path(name: str) -> bool:
    """A local path (which may not exist yet) rather than a hub id `org/name`.

    Local: it exists; starts with `.`, `/` or `~`; has more than one `/`; ends like a data or weights file; or its
    first part is an existing folder (`models/x` when ./models exists).
    """
    name = str(name)
    first = name.split("/")[0]
    return bool(os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1
                or (os.sep != "/" and os.sep in name) or FILE_ENDING.search(name)
                or ("/" in name and os.path.isdir(first)))


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether this x86 CPU computes bf16 natively (AVX512-BF16 or AMX-BF16); None when it cannot tell (not Linux,
    or not x86: ARM names its bf16 support differently)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386"):
        return None
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            flags = f.read()
    except OSError:
        return None
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))
