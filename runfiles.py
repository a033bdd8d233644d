"""
The files of a run, kept safe: one plain folder per run, never a folder the kit did not make, one
process at a time in it (an OS lock), checkpoints that a kill at any moment leaves whole, files
written whole or not at all, and bad input as one line. hyperfit.py builds the run on these;
every script of the kit uses them through hyperfit.py. Pasted into a notebook cell (before
hyperfit.py's) it only defines its names.

    RunLock(run_dir, command)          one process writes into a run folder at a time
    check_writable_run_dir(run_dir)    never enter a folder that is not a run of the kit
    save_checkpoint / load_checkpoint  resumable state; nothing in it runs as code
    write_atomic, read_json, read_jsonl, append_jsonl, portable_path, absolute_path
"""

import argparse
import contextlib
import errno
import json
import os
import random
import shutil
import socket
import time
import warnings
from pathlib import Path

import torch

LOCK_FILE = ".lock"  # inside a run folder: held while a run (or an evaluation) writes to it
MIN_FREE_BYTES = 200 * 2**20  # refuse to start a run with less free disk under its folder


class UsageError(ValueError):
    """Bad input or an unusable environment: the CLI prints the message as one line and exits 2,
    having written nothing (or, for a full disk, keeping the last checkpoint intact)."""


class RunInterrupted(Exception):
    """SIGINT/SIGTERM: the run saved a checkpoint and can be resumed (CLI exit code 130)."""


class NumericalError(RuntimeError):
    """The loss or the weights became NaN/inf; nothing of that step is saved (CLI exit code 1)."""


EXIT_CODES = {UsageError: 2, RunInterrupted: 130, NumericalError: 1}


class Parser(argparse.ArgumentParser):
    """argparse whose bad input is a UsageError: one line and exit 2 from the script's main, not
    the usage block."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


# -----------------------------------------------------------------------------
# paths and files written whole


def repo_root():
    """The folder of this script (data/ and results/ live there), or the working directory when
    the code was pasted into a notebook cell (there is no __file__ there)."""
    file = globals().get("__file__")
    return Path(file).resolve().parent if file else Path.cwd()


def portable_path(path):
    """`path` as config.json and summary.json record it: relative to the kit's folder when it is
    inside it (results made on one machine read the same on another), else absolute."""
    if str(path).startswith("hf:"):
        return str(path)
    path = Path(path).expanduser().resolve()
    with contextlib.suppress(ValueError):
        return str(path.relative_to(repo_root()))
    return str(path)


def absolute_path(path):
    """The inverse of portable_path: a relative path is relative to the kit's folder."""
    if str(path).startswith("hf:"):
        return str(path)
    path = Path(path).expanduser()
    return str(path if path.is_absolute() else repo_root() / path)


def write_atomic(path, text):
    """Write `text` to a temporary name beside `path`, then rename: a reader (or a kill) never
    leaves half a file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_folder(folder, files, failure):
    """Write `files` ({name: text}) as the whole of `folder`: into a new folder beside it that
    then takes its place, so a reader (or a kill, or a full disk) sees the old folder or the new
    one, never a mix; whatever else the old folder held goes with it. An OSError while writing is
    a UsageError: "could not write <folder> (<why>); <failure>", the old folder untouched."""
    folder = Path(folder)
    tmp, old = folder.with_name(f".{folder.name}.new"), folder.with_name(f".{folder.name}.old")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"could not write {folder} ({e.strerror or e}); {failure}") from None
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def read_json(path, what):
    """A JSON object from `path`; a missing, truncated, absurdly nested or non-object file is a
    UsageError that names `what` the file is."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path} is missing: {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise UsageError(f"{path} is not readable JSON ({e.__class__.__name__}): {what}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{path} holds no JSON object: {what}")
    return value


def append_jsonl(path, record):
    """Append one JSON record and flush it to disk: a killed run loses at most the line in
    flight."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path):
    """The JSON objects of a .jsonl file, one per line. A line that does not parse (half-written
    by a killed run) is skipped with a warning naming the file and line; no file: no records.
    plot.py keeps a copy of this function (it stays torch-free); the two behave the same."""
    records = []
    if not Path(path).exists():
        return records
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                record = None
            if not isinstance(record, dict):
                warnings.warn(
                    f"{path}:{number}: skipping a line that is not a JSON object", stacklevel=2
                )
                continue
            records.append(record)
    return records


# -----------------------------------------------------------------------------
# run folders: names, locks, checkpoints


def check_run_name(name):
    """A run name is one plain folder name: no separators, not empty, not . or .. ."""
    bad = not name or name in (".", "..") or any(c in name for c in "/\\\0") or name.startswith("~")
    if bad or len(name) > 200 or name != name.strip():
        raise UsageError(
            f"--run-name {name!r}: a run name is one plain folder name (no '/', not "
            "empty, not '.' or '..'); choose one with --run-name"
        )
    return name


def is_run_folder(run_dir):
    """Is `run_dir` a folder this kit made for a run? Its config.json names it, or (a config.json
    damaged by a kill or an editor) its lock file says hyperfit.py held it."""
    with contextlib.suppress(OSError, ValueError, RecursionError):
        config = json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8"))
        if isinstance(config, dict) and config.get("run_name") == Path(run_dir).name:
            return True
    holder = RunLock.holder_info(Path(run_dir) / LOCK_FILE).get("command", "")
    return str(holder).startswith("hyperfit.py")


def is_empty_run_folder(run_dir):
    """A folder that holds nothing but a lock file (a run killed before it wrote anything)."""
    return Path(run_dir).is_dir() and {p.name for p in Path(run_dir).iterdir()} <= {LOCK_FILE}


def latest_checkpoint(run_dir):
    """The checkpoint folder to resume from: checkpoint/, or checkpoint.old/ when a save died
    between its two renames. None if there is none."""
    for folder in (Path(run_dir) / "checkpoint", Path(run_dir) / "checkpoint.old"):
        if (folder / "trainer_state.pt").exists() and (
            folder / "adapter_model.safetensors"
        ).exists():
            return folder
    return None


def check_writable_run_dir(run_dir):
    """Refuse, before taking its lock, a run folder that is not a folder, a folder this kit did
    not make for a run, an unwritable place or a nearly full disk (nothing is written here)."""
    run_dir = Path(run_dir)
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        raise UsageError(f"{run_dir} exists and is not a folder; choose another --run-name")
    if run_dir.exists() and not is_empty_run_folder(run_dir) and not is_run_folder(run_dir):
        raise UsageError(
            f"{run_dir} exists and is not a hyperfit run; --overwrite replaces only "
            "runs: choose another --run-name or --out-dir"
        )
    parent = run_dir
    while not parent.exists():  # the nearest existing folder is where we would write
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write to {parent}; choose a writable --out-dir")
    if shutil.disk_usage(parent).free < MIN_FREE_BYTES:
        raise UsageError(
            f"less than 200 MB free under {parent}; free some space or choose another --out-dir"
        )


def check_run_dir(run_dir, resume, overwrite):
    """Under the run folder's lock, before any work: a resume needs a checkpoint, and a folder
    holding a run is replaced only with --overwrite."""
    if resume and latest_checkpoint(run_dir) is None:
        raise UsageError(
            f"--resume: {run_dir} has no checkpoint to resume from (it stopped before "
            "its first save); start it again with --overwrite"
        )
    if not resume and not overwrite and not is_empty_run_folder(run_dir):
        raise UsageError(
            f"{run_dir} already holds a run; pass --resume to continue it, "
            "--overwrite to replace it, or choose another --run-name"
        )


class RunLock:
    """An exclusive lock on a run folder while a run (or an evaluation) writes to it: a second
    process gets a UsageError naming the holder. filelock takes an OS lock, which the kernel
    drops when its process dies, so a killed run never blocks the next one. The holder's pid,
    host, start time and command are written into the lock file for that message. A refused run
    (a UsageError inside the lock) leaves no lock file behind, and folders the lock created stay
    only if something was written into them. main=False (the other processes of a distributed
    run): no lock, the main process holds it."""

    def __init__(self, run_dir, command, main=True):
        self.run_dir, self.command, self.main = Path(run_dir), command, main
        self.lock, self.created, self.new_lock_file = None, [], False

    def __enter__(self):
        import filelock

        path, folders = self.run_dir / LOCK_FILE, [self.run_dir, *self.run_dir.parents]
        if not self.main:
            return self
        self.created, self.new_lock_file = [f for f in folders if not f.exists()], not path.exists()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.lock = filelock.FileLock(str(path), timeout=0)
            self.lock.acquire()
            holder = dict(pid=os.getpid(), host=socket.gethostname(), command=self.command)
            path.write_text(json.dumps(dict(holder, started=time.strftime("%Y-%m-%d %H:%M:%S"))))
        except filelock.Timeout:
            message = f"{self.run_dir} is in use by {self.holder(path)}; wait for it to finish"
            raise UsageError(f"{message}, or choose another --run-name") from None
        except OSError as e:  # a read-only folder or disk
            self.__exit__()
            raise UsageError(
                f"cannot write to {self.run_dir} ({e.strerror or e}); choose another --out-dir"
            ) from None
        return self

    def __exit__(self, error_type=None, *exc_info):
        if self.lock is not None and self.lock.is_locked:
            self.lock.release()
            if self.new_lock_file and error_type is UsageError:  # refused: leave it as it was
                (self.run_dir / LOCK_FILE).unlink(missing_ok=True)
        if self.created and is_empty_run_folder(self.run_dir):  # made for nothing: leave no trace
            shutil.rmtree(self.run_dir, ignore_errors=True)
            for folder in self.created[1:]:  # the parents it made, while nothing else is in them
                with contextlib.suppress(OSError):
                    folder.rmdir()

    @staticmethod
    def holder_info(path):
        with contextlib.suppress(OSError, ValueError, RecursionError):
            info = json.loads(Path(path).read_text(encoding="utf-8"))
            return info if isinstance(info, dict) else {}
        return {}

    @staticmethod
    def holder(path):
        info = RunLock.holder_info(path)
        if not {"command", "pid", "host", "started"} <= set(info):
            return "another process"
        return f"{info['command']} (pid {info['pid']} on {info['host']}, since {info['started']})"


def clear_run_dir(run_dir):
    """Empty a run folder for --overwrite, keeping its lock; config.json goes last, so a folder
    left half-cleared by a kill is still recognised as a run."""
    for entry in sorted(Path(run_dir).iterdir(), key=lambda p: p.name == "config.json"):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.name != LOCK_FILE:
            entry.unlink()


def disk_full(error, folder):
    """Did `error` (raised while writing under `folder`) come from a full disk?"""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch.save reports a failed write as a RuntimeError from its C++ writer, without an errno
    return isinstance(error, RuntimeError) and shutil.disk_usage(folder).free < 64 * 2**20


def save_checkpoint(run_dir, net, optimizer, scaler, state, weights=None, optimizer_state=None):
    """Save the adapter, optimizer, loss scaler, RNG states and `state` (step, loss sums, elapsed)
    to run_dir/checkpoint/: written to checkpoint.tmp/ and renamed, so a kill at any moment keeps
    the last good checkpoint. Leftovers of an earlier killed save are cleared first; a full disk
    is a UsageError that says the last checkpoint is intact. `weights` and `optimizer_state`:
    what FSDP gathered whole (the optimizer's keyed by parameter name; load_checkpoint leaves it
    to be loaded after accelerate's prepare)."""
    final, tmp, old = (Path(run_dir) / f"checkpoint{end}" for end in ("", ".tmp", ".old"))
    shutil.rmtree(tmp, ignore_errors=True)
    if final.exists():  # a complete checkpoint: an old one beside it is stale
        shutil.rmtree(old, ignore_errors=True)
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    rng = dict(torch=torch.get_rng_state(), python=list(random.getstate()), cuda=cuda)
    full = optimizer_state is not None
    optimizer_state = optimizer_state if full else optimizer.state_dict()
    state = dict(state, optimizer=optimizer_state, full_optimizer=full, rng=rng)
    state["scaler"] = scaler.state_dict()
    try:
        net.save_pretrained(tmp, state_dict=weights)
        torch.save(state, tmp / "trainer_state.pt")
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not disk_full(e, run_dir):
            raise
        kept = latest_checkpoint(run_dir)
        intact = f"the last checkpoint ({kept.name}/) is intact" if kept else "none was kept"
        where = f"no space left under {run_dir} while saving step {state['step']}"
        raise UsageError(f"{where}; {intact}: free some space, then resume with --resume") from None
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder, net, optimizer, scaler):
    """Restore what save_checkpoint wrote into `net`, `optimizer` and `scaler`; returns the state.
    Nothing in it is unpickled as code: torch.load(weights_only=True) reads tensors and plain
    Python values only, and refuses anything else."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        state = torch.load(Path(folder) / "trainer_state.pt", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError and friends: a crafted or corrupt file
        raise UsageError(
            f"{folder}/trainer_state.pt is not a checkpoint this kit wrote "
            f"({e.__class__.__name__}); start the run again with --overwrite"
        ) from None
    set_peft_model_state_dict(net, load_file(Path(folder) / "adapter_model.safetensors"))
    if not state.get("full_optimizer"):  # an FSDP checkpoint's goes in after prepare
        optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    version, internal, gauss = state["rng"]["python"]
    random.setstate((version, tuple(internal), gauss))
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state
