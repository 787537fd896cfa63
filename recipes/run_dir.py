"""Run-directory safety: the output guard, checkpoint completeness, atomic writes, the completion marker.

Output guard (used by every program that writes, before any weights load or work starts):
- an output equal to an input, or inside one, is always refused (`input_problems`);
- a folder that holds anything this program did not write (a finished model, a dataset, a base model, any other
  file) is refused unless `--overwrite_output_dir` (`folder_problems`, `training_output_problems`); a program marks
  a folder as its own with `claim`, so a relaunch (resume) is not refused;
- a file output that exists is refused unless the program recognizes it as its own (`file_problems`);
- a dry run never writes into a finished model's folder.
Writes go to a temporary path and a rename (`write_text`, `replace_folder`, `save_model_atomically`).

One run per output: `RunLock` (a lock file created with O_EXCL, recording host, pid and start time) refuses a second
run into the same output while the first is alive; a lock whose process is gone (on this host, or an earlier run of
the same requeued SLURM job) is taken over with a message.

Runs that survive: `checkpoint_to_resume` picks the newest COMPLETE `checkpoint-N` in output_dir (a checkpoint
cut off mid-write is skipped, renamed `incomplete-checkpoint-N`, never loaded); `save_model_atomically` +
`mark_complete` write the final model so that a crash while saving never leaves a folder that looks finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import struct
import sys
import time
import zipfile

import arrow_pages
import checks
import env

COMPLETE_MARKER = "cai_sft_complete.json"
LOCK = ".cai_run.lock"  # {"program", "host", "pid", "started", ...}: the run writing this output now
PREEMPTED = "cai_sft_preempted.json"  # the run stopped on a signal after saving a checkpoint (relaunch resumes)
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped on a stop signal with a complete checkpoint; relaunch to resume
DISK_FULL_EXIT = 74  # EX_IOERR: a save ran out of space; the last complete checkpoint is intact
FINAL_TMP = ".cai_sft_final.tmp"
OWNER = ".cai_owner.json"  # {"program": "sft.py"}: this folder was created by that program (a relaunch may use it)
CHECKPOINT_RE = re.compile(r"^(incomplete-)?checkpoint-(\d+)(\.\d+)?$")
WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "adapter_model.bin", "pytorch_model.bin.index.json")
# What sft.py writes into output_dir before it writes OWNER (runs of earlier versions of the recipe had no OWNER).
SFT_OWN = (OWNER, LOCK, COMPLETE_MARKER, FINAL_TMP, PREEMPTED, "runs", "data_summary.json", "preview.jsonl")
OVERWRITE = "--overwrite_output_dir"


def _say(*args):
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, flush=True)


# --------------------------------------------------------------------------------------------- output guard


def _real(path: str) -> str:
    return os.path.realpath(os.path.expanduser(str(path)))


def same_or_inside(path: str, other: str) -> bool:
    """Whether `path` is `other` or lies inside the folder `other` (links resolved)."""
    a, b = _real(path), _real(other)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def input_problems(key: str, output: str, inputs: dict) -> list[str]:
    """An output equal to an input, or inside one: always refused. `inputs` is {key: path} (hub ids are skipped)."""
    p = []
    for in_key, path in inputs.items():
        if not path or not env.is_local_path(str(path)):
            continue
        if same_or_inside(output, path):
            what = "is" if _real(output) == _real(path) else "is inside"
            p.append(f"{key}: {output} {what} the input {in_key} ({path}); writing there would destroy it. Choose "
                     f"another {key}.")
    return p


def _read_json(path: str) -> dict | None:
    """A JSON object file's content, or None (missing, unreadable, cut off, not an object)."""
    try:
        with open(path, encoding="utf-8") as f:
            found = json.load(f)
        return found if isinstance(found, dict) else None
    except (OSError, ValueError):
        return None


def owner_of(folder: str) -> str | None:
    """The program that created `folder` (its OWNER file), or None."""
    return (_read_json(os.path.join(folder, OWNER)) or {}).get("program")


def claim(folder: str, program: str) -> None:
    """Create `folder` if needed and mark it as written by `program`, so that a relaunch is not refused."""
    os.makedirs(folder, exist_ok=True)
    if owner_of(folder) != program:
        write_text(os.path.join(folder, OWNER), json.dumps({"program": program}) + "\n")


def _parent_problem(key: str, path: str) -> str | None:
    """A file where a folder above `path` would have to be (checked now, not when the work is done)."""
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        return f"{key}: {parent} is a file, so {path} cannot be created. Choose another {key}."
    return None


def _listing(names: list[str]) -> str:
    shown = ", ".join(sorted(names)[:4])
    return shown + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def folder_problems(key: str, folder: str, program: str, overwrite: bool, inputs: dict | None = None,
                    own=()) -> list[str]:
    """A folder output: not a file, not an input, and holding nothing this program did not write (unless overwrite).

    `own` names entries this program writes (recognized even without its OWNER file)."""
    if not folder:
        return []
    p = input_problems(key, folder, inputs or {})
    if os.path.exists(folder) and not os.path.isdir(folder):
        return p + [f"{key}: {folder} is a file, but a folder is needed here. Choose another {key}."]
    if _parent_problem(key, folder):
        return p + [_parent_problem(key, folder)]
    if p or overwrite or not os.path.isdir(folder) or owner_of(folder) == program:
        return p
    foreign = [n for n in os.listdir(folder) if n not in own and not CHECKPOINT_RE.match(n)
               and not n.startswith((OWNER, LOCK))]  # their temporary files, while another process writes them
    if foreign:
        p.append(f"{key}: {folder} already holds files that {program} did not write ({_listing(foreign)}). Choose "
                 f"a new or empty {key}, or add {OVERWRITE} to write into it anyway.")
    return p


def file_problems(key: str, path: str, overwrite: bool, inputs: dict | None = None, is_own=None,
                  program: str = "this program") -> list[str]:
    """A file output: not a folder, not an input, and if it exists, this program's own (`is_own(path)`) or
    overwrite."""
    if not path:
        return []
    p = input_problems(key, path, inputs or {})
    if os.path.isdir(path):
        return p + [f"{key}: {path} is a folder, but a file is needed here. Choose another {key}."]
    if _parent_problem(key, path):
        return p + [_parent_problem(key, path)]
    if p or overwrite or not os.path.exists(path) or (is_own is not None and is_own(path)):
        return p
    return [f"{key}: {path} already exists and was not written by {program}. Choose another {key}, or add "
            f"{OVERWRITE} to replace it."]


def training_output_problems(output_dir: str, overwrite: bool, dry_run: bool, inputs: dict | None = None,
                             replace_same_run: bool = False, program: str = "sft.py") -> list[str]:
    """A training program's output_dir (sft.py, dpo.py): a finished model is never replaced silently, and never
    touched by a dry run.
    With `replace_same_run` the finished model is judged later, by `same_run_problem` (it needs the settings)."""
    if not output_dir:
        return []
    if dry_run and is_complete(output_dir):
        return [f"output_dir: {output_dir} holds a finished model ({COMPLETE_MARKER}); a dry run never writes into "
                f"it. Give the dry run another output_dir (e.g. --output_dir {output_dir.rstrip('/')}-dry-run)."]
    p = folder_problems("output_dir", output_dir, program, overwrite, inputs, SFT_OWN)
    problem = None if p else output_dir_problem(output_dir, overwrite or (replace_same_run and is_complete(output_dir)))
    return p + ([problem] if problem else [])


def write_text(path: str, text) -> None:
    """Write a whole text file (a string, or an iterable of strings written as they come): to a temporary file,
    then an atomic rename (never a half-written file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines([text] if isinstance(text, str) else text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fresh_sibling(folder: str, tag: str = "partial") -> str:
    """A new, empty folder next to `folder` to write into before `replace_folder`: never an existing one."""
    import tempfile

    parent, name = os.path.split(os.path.abspath(folder.rstrip("/")))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{name}.{tag}-", dir=parent)


def replace_folder(tmp: str, folder: str) -> None:
    """Move a folder written at `tmp` to `folder`, replacing what is there (the caller checked it may)."""
    if os.path.isdir(folder):
        old = fresh_sibling(folder, "old")
        os.replace(folder, old)  # onto the new empty folder
        os.replace(tmp, folder)
        shutil.rmtree(old)
    else:
        os.replace(tmp, folder)


# --------------------------------------------------------------------------------------------- one run per output


def _process_start(pid: int) -> str | None:
    """The kernel's start time of process `pid` (Linux /proc): a pid reused by another process is not the old run."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    now = _process_start(pid)
    return start is None or now is None or now == start


class RunLock:
    """One run per output: a lock file, created atomically (O_EXCL) before any work, removed when the run ends.

    It records program, host, pid, the pid's start time, the start time of the run, the command, and SLURM's job id
    and restart count. A second run is refused (exit status 2) with a message naming the first. A lock is stale, and
    taken over with a message, when its process is gone on this host, or when it was left by an earlier run of the
    same SLURM job (a requeue). A lock held by a process on another host cannot be checked from here: it is
    refused, and the message says how to remove it if that run is gone.
    """

    def __init__(self, output: str, program: str, inside: bool = True):
        """`inside`: the lock lives in the output folder (programs that write into it); else next to the output
        (programs that write a file, or replace a whole folder)."""
        self.output, self.program = output, program
        if inside:
            self.path = os.path.join(output, LOCK)
        else:
            parent, name = os.path.split(os.path.abspath(output.rstrip("/")))
            self.path = os.path.join(parent, f".{name}{LOCK}")
        self.me = {
            "program": program, "host": socket.gethostname(), "pid": os.getpid(),
            "pid_start": _process_start(os.getpid()), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv)[:1000], "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
            "token": os.urandom(8).hex(),  # this lock, not another taken by the same process
        }  # fmt: skip
        self.held = False

    def stale(self, holder: dict) -> str | None:
        """Why a lock held by `holder` may be taken over, or None when its run may still be alive."""
        if holder.get("slurm_job_id") and holder["slurm_job_id"] == self.me["slurm_job_id"] and int(
                holder.get("slurm_restart_count") or 0) < self.me["slurm_restart_count"]:
            return f"it was left by an earlier run of this SLURM job ({holder['slurm_job_id']}, requeued)"
        if holder.get("host") == self.me["host"] and isinstance(holder.get("pid"), int) and not _alive(
                holder["pid"], holder.get("pid_start")):
            return f"its process {holder['pid']} is gone"
        return None

    def refusal(self, holder: dict) -> str:
        return (f"{self.path}: {self.output} is in use by another run: {holder.get('program', '?')}, pid "
                f"{holder.get('pid', '?')} on host {holder.get('host', '?')}, started {holder.get('started', '?')}"
                f" ({holder.get('command', '')}). Wait for it to end, or choose another output. If that run is gone "
                f"(a machine that crashed), delete {self.path} and launch again.")

    def _create(self) -> bool:
        """Create the lock whole: written to a temporary file, then hard-linked to its name (atomic, and it fails
        when the name exists, also on NFS); where links are not supported, O_EXCL then a write. False if it
        exists."""
        tmp = f"{self.path}.{os.getpid()}.{self.me['token']}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.me, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.me, f)
                f.flush()
                os.fsync(f.fileno())
            return True
        finally:
            os.remove(tmp)

    def acquire(self) -> RunLock:
        """Take the lock, or raise checks.ConfigError naming the run that holds it."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        deadline = time.time() + 10
        while not self._create():
            holder = _read_json(self.path)
            if holder is None:  # gone meanwhile, or (no hard links) being written by its creator, or left empty
                try:
                    young = time.time() - os.path.getmtime(self.path) < 10
                except FileNotFoundError:
                    continue
                if young and time.time() < deadline:
                    time.sleep(0.05)
                    continue
                holder, why = {}, "it is empty (its writer died while creating it)"
            elif all(holder.get(k) == self.me[k] for k in ("host", "pid", "pid_start")):
                why = "this process holds it"  # a program called twice in one process (tests, a notebook)
            else:
                why = self.stale(holder)
            if why is None:
                raise checks.ConfigError([self.refusal(holder)])
            # Take over: only one contender's rename succeeds. A lock renamed by mistake (not the one judged stale)
            # is linked back, never over a lock created meanwhile.
            aside = f"{self.path}.stale-{os.getpid()}"
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                continue
            if (_read_json(aside) or {}) != holder:
                with contextlib.suppress(OSError):
                    os.link(aside, self.path)
                os.remove(aside)
                continue
            os.remove(aside)
            if why != "this process holds it":
                _say(f"Took over the lock {self.path}: {why} (was {holder.get('program', '?')}, pid "
                     f"{holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}).")
        self.held = True
        import atexit

        atexit.register(self.release)
        return self

    def release(self) -> None:
        """Remove the lock if it is still this run's."""
        if self.held and _read_json(self.path) == self.me:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
        self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def lock_run(output: str, program: str, is_main: bool = True, world_size: int = 1) -> RunLock | None:
    """The main process takes `output`'s RunLock; every process learns whether it was refused, and all exit with
    the same message (status 2) when it was. Call it before any weights load."""
    problem, lock = None, None
    if is_main:
        try:
            lock = RunLock(output, program).acquire()
        except checks.ConfigError as e:
            problem = e.problems
    if world_size > 1:
        from accelerate.utils import broadcast_object_list

        problem = broadcast_object_list([problem])[0]
    if problem:
        raise checks.ConfigError(problem if is_main else ["(another process of this run could not take the lock)"])
    return lock


# --------------------------------------------------------------------------------------------- output_dir


def is_complete(output_dir: str) -> bool:
    """Whether output_dir holds a finished run: the marker, written last, parses."""
    return bool((_read_json(os.path.join(output_dir, COMPLETE_MARKER)) or {}).get("complete"))


def _checkpoints(output_dir: str) -> list[str]:
    """checkpoint-N folders, newest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(2)), n) for n in os.listdir(output_dir)
             if (m := CHECKPOINT_RE.match(n)) and not m.group(1) and not m.group(3)]
    return [os.path.join(output_dir, n) for _, n in sorted(found, reverse=True)
            if os.path.isdir(os.path.join(output_dir, n))]


def output_dir_problem(output_dir: str, overwrite: bool) -> str | None:
    """A new run must not silently replace a finished model (or weights of unknown origin)."""
    if overwrite or not os.path.isdir(output_dir):
        return None
    if is_complete(output_dir):
        return (f"output_dir: {output_dir} already holds a finished model ({COMPLETE_MARKER}). Pick another "
                "output_dir, or add --overwrite_output_dir to train again and replace it.")
    weights = [f for f in WEIGHT_FILES if os.path.isfile(os.path.join(output_dir, f))]
    if weights and not any(checkpoint_problem(c) is None for c in _checkpoints(output_dir)):
        return (f"output_dir: {output_dir} holds model weights ({', '.join(weights)}) not marked as a finished run of "
                "this recipe and no checkpoint to resume from. Pick another output_dir, or add "
                "--overwrite_output_dir to replace them.")
    return None


# --------------------------------------------------------------------------------------------- checkpoints


def safetensors_problem(path: str) -> str | None:
    """None if the file's header parses and its size is exactly header + tensor data, else why not."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{os.path.basename(path)} is truncated ({size} bytes)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"{os.path.basename(path)} is truncated (header of {n} bytes, file of {size})"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"{os.path.basename(path)} has an unreadable header ({type(e).__name__})"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        return f"{os.path.basename(path)} is truncated ({size} bytes, its header says {8 + n + end})"
    return None


def checkpoint_problem(path: str, save_only_model: bool = False) -> str | None:
    """None if a checkpoint folder is complete enough to resume from, else the reason (never loads it)."""
    if not os.path.isdir(path):
        return "not a folder"
    names = set(os.listdir(path))
    if "trainer_state.json" not in names:
        return "trainer_state.json is missing (the Trainer writes it last: the save was cut off)"
    try:
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
            json.load(f)["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return "trainer_state.json is not valid (cut off mid-write)"
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    if "model.safetensors.index.json" in names:
        with contextlib.suppress(OSError, ValueError):
            with open(os.path.join(path, "model.safetensors.index.json"), encoding="utf-8") as f:
                wanted = set(json.load(f)["weight_map"].values())
            if wanted - names:
                return f"weight shards {sorted(wanted - names)} are missing"
    sharded_state = any(n.startswith("global_step") or "fsdp" in n for n in names)  # DeepSpeed / FSDP own formats
    if not shards and not sharded_state:
        return "no model weights (model.safetensors or adapter_model.safetensors)"
    for name in shards:
        problem = safetensors_problem(os.path.join(path, name))
        if problem:
            return problem
    if not save_only_model and not sharded_state:
        for name in ("optimizer.pt", "scheduler.pt"):
            if name not in names:
                return f"{name} is missing"
    for name in sorted(n for n in names if n.endswith((".pt", ".pth", ".bin"))):
        if not zipfile.is_zipfile(os.path.join(path, name)):  # torch.save writes a zip; a cut-off one has no index
            return f"{name} is truncated"
    return None


def _set_aside(path: str) -> str:
    parent, name = os.path.split(path)
    target, i = os.path.join(parent, f"incomplete-{name}"), 1
    while os.path.exists(target):
        target, i = os.path.join(parent, f"incomplete-{name}.{i}"), i + 1
    os.replace(path, target)
    return target


def _barrier():
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def checkpoint_to_resume(training_args, overwrite_output_dir: bool = False):
    """The checkpoint to resume from: `resume_from_checkpoint` if given (and complete), else the newest complete
    `checkpoint-N` in output_dir, else None (a fresh run). Incomplete ones are reported and set aside.

    transformers' `get_last_checkpoint` returns the newest folder even when it was cut off mid-write; we check.
    """
    out, main = training_args.output_dir, training_args.process_index == 0
    save_only = bool(getattr(training_args, "save_only_model", False))
    given = training_args.resume_from_checkpoint
    if given and str(given).lower() not in env.TRUE:
        problem = checkpoint_problem(given, save_only)
        if problem:
            raise checks.ConfigError([f"resume_from_checkpoint: {given} is incomplete ({problem}). Point it at an earlier "
                               "checkpoint, or leave it out to pick the newest complete one."])
        _say(f"Resuming from {given} (resume_from_checkpoint).")
        return given
    if is_complete(out):
        if not overwrite_output_dir:
            raise checks.ConfigError([output_dir_problem(out, False)])
        # Start over: the finished model is no longer marked complete, and the old run's checkpoints must not be
        # resumed by a relaunch of this one.
        old = _checkpoints(out)
        _barrier()
        if main:
            os.remove(os.path.join(out, COMPLETE_MARKER))
            for c in old:
                shutil.rmtree(c)
            _say(f"--overwrite_output_dir: starting over in {out}; removed {COMPLETE_MARKER} and {len(old)} old "
                 "checkpoint(s).")
        _barrier()
        return None
    chosen, broken = None, []
    for c in _checkpoints(out):
        problem = checkpoint_problem(c, save_only)
        if problem is None:
            chosen = c
            break
        broken.append((c, problem))
    _barrier()  # every process has decided before the main one renames anything
    for c, problem in broken:
        if main:
            _say(f"Skipping {c}: {problem}. Set aside as {_set_aside(c)}; it will not be loaded.")
    _barrier()
    if chosen:
        _say(f"Resuming from {chosen} (the newest complete checkpoint in {out}).")
    return chosen


# --------------------------------------------------------------------------------------------- final save


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_model_atomically(trainer, output_dir: str) -> None:
    """trainer.save_model into a temporary folder, then each file moved into output_dir with an atomic rename.

    The Trainer writes straight into output_dir; a crash there leaves a half-written model.safetensors. Here
    every file in output_dir is whole, and `mark_complete` (called last) is what says the set is finished.
    """
    tmp = os.path.join(output_dir, FINAL_TMP)
    main = trainer.accelerator.is_main_process
    if main:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(output_dir, COMPLETE_MARKER))
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(tmp)  # every process: DeepSpeed/FSDP gather the weights collectively
    trainer.accelerator.wait_for_everyone()
    if main:
        for root, _, files in os.walk(tmp):
            target_dir = os.path.join(output_dir, os.path.relpath(root, tmp))
            os.makedirs(target_dir, exist_ok=True)
            for name in files:
                _fsync(os.path.join(root, name))
                os.replace(os.path.join(root, name), os.path.join(target_dir, name))
        shutil.rmtree(tmp)
    trainer.accelerator.wait_for_everyone()


def same_run_problem(output_dir: str, digest: str) -> str | None:
    """`replace_same_run`: None when output_dir holds no finished model, or one this same command trained (its
    marker records the same settings digest); else the refusal."""
    if not is_complete(output_dir):
        return None
    found = (_read_json(os.path.join(output_dir, COMPLETE_MARKER)) or {}).get("settings")
    if found == digest:
        return None
    if found is None:
        return (f"output_dir: {output_dir} holds a finished model whose marker ({COMPLETE_MARKER}) records no "
                "settings (an earlier version of the recipe, or another program); replace_same_run cannot tell "
                "whether this command trained it. Pick another output_dir, or add --overwrite_output_dir to replace "
                "it.")
    return (f"output_dir: {output_dir} holds a finished model trained with other settings ({COMPLETE_MARKER}); "
            "replace_same_run only replaces a model this same command trained. Pick another output_dir, or add "
            "--overwrite_output_dir to replace it.")


def same_run_to_replace(output_dir: str, digest: str) -> bool:
    """`replace_same_run`: True when output_dir holds a finished model this same command trained (to be replaced),
    False when it holds none; a finished model trained otherwise raises checks.ConfigError."""
    problem = same_run_problem(output_dir, digest)
    if problem:
        raise checks.ConfigError([problem])
    if is_complete(output_dir):
        _say(f"replace_same_run: {output_dir} holds a model this same command trained; training it again.")
        return True
    return False


def mark_complete(output_dir: str, settings: str | None = None) -> None:
    """Write the completion marker last, after every file of the model is on disk; `settings`: the run's
    settings digest (sft.settings_digest; replace_same_run compares it)."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(output_dir, PREEMPTED))  # the run that was stopped has now finished
    files = {}
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if os.path.isfile(path) and name not in (COMPLETE_MARKER, LOCK):
            _fsync(path)
            files[name] = os.path.getsize(path)
    tmp = os.path.join(output_dir, COMPLETE_MARKER + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"complete": True, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "settings": settings,
                   "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(output_dir, COMPLETE_MARKER))


# --------------------------------------------------------------------------------------------- stop and full disk


def preempted(output_dir: str, received: str, step: int, save_only_model: bool = False) -> str:
    """After StopOnSignal ended training (main process): check the checkpoint it saved, record what happened in
    output_dir/cai_sft_preempted.json (and in $CAI_PREEMPTED_FILE when set: scripts/slurm_sft.sh requeues on it),
    and return the message for the log."""
    ckpt = os.path.join(output_dir, f"checkpoint-{step}")
    problem = checkpoint_problem(ckpt, save_only_model)
    record = {"signal": received, "step": step, "checkpoint": ckpt, "complete": problem is None,
              "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname()}
    write_text(os.path.join(output_dir, PREEMPTED), json.dumps(record, indent=1) + "\n")
    if os.environ.get("CAI_PREEMPTED_FILE"):
        write_text(os.environ["CAI_PREEMPTED_FILE"], json.dumps({**record, "output_dir": output_dir}) + "\n")
    if problem:
        return (f"Stopped on {received} at step {step}, but {ckpt} is incomplete ({problem}); a relaunch resumes "
                f"from the newest complete checkpoint. Exit status {PREEMPTED_EXIT}.")
    return (f"Stopped on {received} at step {step}: {ckpt} is complete. Relaunch the same command to resume from "
            f"it (auto-resume). Exit status {PREEMPTED_EXIT} (preempted, resumable).")


FULL_BELOW = 16 << 20  # bytes: a filesystem with less free space than this after a failed save counts as full


class DiskFull(Exception):
    """A save ran out of space. Its message names the path, the size being written and what is intact;
    entry.py turns it into exit status DISK_FULL_EXIT."""


def folder_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(path) for n in names)


def _save_estimate(trainer, final: bool) -> int:
    """Bytes a save of this model writes: weights saved (trainable ones only for an adapter) + Adam's two fp32
    states of the trainable ones (checkpoints only)."""
    params = list(trainer.model.parameters())
    trainable = [p for p in params if p.requires_grad]
    adapter = len(trainable) < len(params)

    def numel(p):  # ZeRO-3 keeps a 0-element placeholder on each rank; ds_numel is the full size
        return getattr(p, "ds_numel", None) or p.numel()

    weights = sum(numel(p) * p.element_size() for p in (trainable if adapter else params))
    return weights + (0 if final else 8 * sum(numel(p) for p in trainable))


def _out_of_space(e: BaseException, path: str) -> bool:
    import errno

    if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    if any(s in str(e) for s in ("No space left", "os error 28", "Disk quota exceeded", "os error 122")):
        return True
    try:  # torch.save names no cause on a full disk ("unexpected pos 576 vs 534"): ask the filesystem
        return shutil.disk_usage(path).free < FULL_BELOW
    except OSError:
        return False


@contextlib.contextmanager
def disk_full_guard(trainer, output_dir: str, final: bool = False):
    """Around training (checkpoints) or, with `final`, the final save: a save that runs out of space removes its
    partial folder (the last complete checkpoint and a finished model stay as they are) and becomes DiskFull,
    naming path and size. Other errors pass through unchanged."""
    try:
        yield
    except Exception as e:
        save_only = bool(getattr(trainer.args, "save_only_model", False))
        step = trainer.state.global_step
        partial, final_tmp = os.path.join(output_dir, f"checkpoint-{step}"), os.path.join(output_dir, FINAL_TMP)
        if final and os.path.isdir(final_tmp):
            writing, what = final_tmp, "the final model"
        elif not final and os.path.isdir(partial) and checkpoint_problem(partial, save_only) is not None:
            writing, what = partial, f"checkpoint-{step}"
        else:
            raise
        good = next((c for c in _checkpoints(output_dir) if c != partial and checkpoint_problem(c, save_only) is None),
                    None)
        need = folder_size(good) if good and writing == partial else _save_estimate(trainer, writing == final_tmp)
        if not _out_of_space(e, output_dir):
            raise
        free = shutil.disk_usage(output_dir).free
        shutil.rmtree(writing, ignore_errors=True)  # useless when partial, and it frees space
        intact = (f"The last complete checkpoint, {good}, is intact: free the space and relaunch the same command to "
                  f"resume from it." if good else "No complete checkpoint was saved before; free the space and "
                  "relaunch to start again.")
        raise DiskFull(
            f"No space left on device while writing {what} to {writing} (about {need / 1e6:.1f} MB; "
            f"{free / 1e6:.1f} MB free there): {type(e).__name__}: {str(e)[:200]}. Removed the partial {what}. "
            f"{intact} Or point output_dir at a larger disk, or keep fewer checkpoints (save_total_limit)."
        ) from e


# --------------------------------------------------------------------------------------------- dry-run preview


def _render_labels(tokenizer, ids, labels, color: bool) -> str:
    """Decode an example with the trained tokens highlighted (green in a terminal, [[...]] otherwise)."""
    out, run, trained = [], [], None
    for t, lab in zip(ids, labels):
        is_trained = lab != -100
        if trained is not None and is_trained != trained:
            out.append((trained, tokenizer.decode(run)))
            run = []
        run.append(t)
        trained = is_trained
    if run:
        out.append((trained, tokenizer.decode(run)))
    if color:
        return "".join(f"\033[1;32m{s}\033[0m" if tr else f"\033[2m{s}\033[0m" for tr, s in out)
    return "".join(f"[[{s}]]" if tr else s for tr, s in out)


def _write_preference_preview(path, train_ds, shown, tokenizer) -> str:
    """dpo.py's preview: both sequences of each pair as DPOTrainer trains them, labels -100 on the prompt."""
    def sequences(ex):
        p = ex["expected_prompt_ids"]
        return {side: {"input_ids": p + ex[f"expected_{side}_ids"], "labels": [-100] * len(p) + ex[f"expected_{side}_ids"]}
                for side in ("chosen", "rejected")}  # fmt: skip

    write_text(path, (json.dumps({**sequences(ex), "source": ex["source"], "row": ex["row"]}) + "\n" for ex in shown))
    first = sequences(train_ds[0])
    for side in ("chosen", "rejected"):
        print(f"\nFirst pair, {side} (trained tokens highlighted; the prompt is never trained):")
        print(_render_labels(tokenizer, first[side]["input_ids"], first[side]["labels"], sys.stdout.isatty()))
    more = "" if len(shown) == len(train_ds) else " (preview_examples; preview_all: true writes every one)"
    print(f"Dry run: wrote {len(shown)} of {len(train_ds)} pairs to {path}{more}; no weights were loaded.")
    return path


def write_preview(train_ds, tokenizer, training_args, model_args, report, limit: int | None = None) -> str:
    """preview.jsonl: {"input_ids", "labels", "source", "row"} of the first `limit` training examples (all when
    None), exactly as the collator receives them; the statistics printed cover every example."""
    import pyarrow.compute as pc

    path = os.path.join(training_args.output_dir, "preview.jsonl")
    shown = train_ds if limit is None or limit >= len(train_ds) else train_ds.select(range(limit))
    if "expected_chosen_ids" in train_ds.column_names:
        return _write_preference_preview(path, train_ds, shown, tokenizer)
    write_text(path, (json.dumps({"input_ids": ex["input_ids"], "labels": ex["labels"], "source": ex["source"],
                                  "row": ex["row"]}) + "\n" for ex in shown))
    longest = 0
    for table in train_ds.select_columns(["input_ids"]).with_format("arrow").iter(batch_size=100_000):
        longest = max(longest, pc.max(pc.list_value_length(table["input_ids"])).as_py() or 0)
        arrow_pages.release_read_pages()  # RSS bounded at any size (arrow_pages.py)
    first = train_ds[0]
    print("\nFirst training example (trained tokens highlighted):")
    print(_render_labels(tokenizer, first["input_ids"], first["labels"], sys.stdout.isatty()))
    n, tokens = len(train_ds), report.counts.get("train_tokens", 0)
    print(f"\nAll {n} training examples: {tokens} tokens (mean {tokens / n:.1f}, longest {longest}), "
          f"{report.counts.get('train_trained_tokens', 0)} trained.")
    more = "" if len(shown) == n else " (preview_examples; preview_all: true writes every one)"
    print(f"Dry run: wrote {len(shown)} of {n} examples to {path}{more}; no weights were loaded.")
    return path
