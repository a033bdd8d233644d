"""
The files of a run, kept safe: one plain folder per run, never a folder the kit did not make, one
process at a time in it (an OS lock), checkpoints that a kill at any moment leaves whole, files
written whole or not at all, and bad input as one line. hyperfit.py builds the run on these;
evaluate.py, the experiments and bench.py use them too. Pasted into a notebook cell (before
hyperfit.py's) it only defines its names.

    RunLock(run_dir, command)          one process writes into a run folder at a time
    check_writable_run_dir(run_dir)    never enter a folder that is not a run of the kit
    save_checkpoint / load_checkpoint  resumable state; nothing in it runs as code
    write_atomic, read_json, read_jsonl, append_jsonl, portable_path, absolute_path
"""

import argparse
import contextlib
import dataclasses
import errno
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import unicodedata
import warnings
from pathlib import Path

import torch

LOCK_FILE = ".lock"  # inside a run folder: held while a run (or an evaluation) writes to it
MIN_FREE_BYTES = 200 * 2**20  # refuse to start a run with less free disk under its folder
DTYPES = dict(float32=torch.float32, bfloat16=torch.bfloat16, float16=torch.float16)
DTYPE_ALIASES = dict(fp32="float32", bf16="bfloat16", fp16="float16", auto="auto")


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


# what the kit writes into a run's eval/ (evaluate.py, images.py, plot.py): the only files a new
# evaluation may replace there; anything else in the folder is someone else's and stops it
EVAL_FILES = frozenset(
    {"summary.json", "generations.jsonl", "images.json", "table.md", "paper_comparison.md"}
    | {"repetition.html"}
    | {
        f"{name}.{ext}"
        for name in ("decoding_comparison", "ttr_by_position", "quality", "completions")
        for ext in ("png", "svg")
    }
)


def foreign_entry(folder, owned):
    """Why `folder` may not be replaced whole, or None: it is a link (its target lies elsewhere,
    beyond the kit's reach), not a folder, or it holds something other than the files `owned`
    (names the kit writes there, or a temporary file of write_atomic left by a kill)."""
    folder = Path(folder)
    if folder.is_symlink():
        return f"is a link to {os.readlink(folder)}"
    if not folder.exists():
        return None
    if not folder.is_dir():
        return "is not a folder"
    for entry in sorted(folder.iterdir()):
        leftover = re.fullmatch(r"\.(.+)\.tmp\d+", entry.name)
        name = leftover.group(1) if leftover else entry.name
        if name not in owned or entry.is_symlink() or not entry.is_file():
            return f"holds {entry.name}, which the kit did not write there"
    return None


def recover_folder(folder, owned, needed=()):
    """Put back `.<folder>.old` when a kill between write_folder's two renames left it and no
    `folder`: it is the last whole folder written (the new one never took its place), so without
    this plot.py shows the run as unevaluated and the next write_folder deletes it. Only an old
    folder that is a real folder holding nothing but `owned` files (no temporary file) and at
    least one of `needed` (default: any file) is put back; returns whether it was."""
    folder = Path(folder)
    old = folder.with_name(f".{folder.name}.old")
    if folder.exists() or folder.is_symlink() or old.is_symlink() or not old.is_dir():
        return False
    names = {entry.name for entry in old.iterdir()}
    complete = names and (not needed or set(needed) & names)
    if not complete or foreign_entry(old, owned) or any(n.startswith(".") for n in names):
        return False
    old.rename(folder)
    return True


def recover_eval_folder(folder):
    """recover_folder for an evaluation's folder (whole when it has its summary)."""
    return recover_folder(folder, EVAL_FILES, ("summary.json", "images.json"))


def write_folder(folder, files, failure, owned=None):
    """Write `files` ({name: text}) as the whole of `folder`: into a new folder beside it that
    then takes its place, so a reader (or a kill, or a full disk) sees the old folder or the new
    one, never a mix. The old folder goes with it, so it must hold only `owned` files (names the
    kit writes there; default: those of `files`) and not be a link: else a UsageError, nothing
    touched. An OSError while writing is a UsageError: "could not write <folder> (<why>);
    <failure>", the old folder untouched."""
    folder = Path(folder)
    owned = set(files) if owned is None else owned
    recover_folder(folder, owned)  # else a kill's last whole folder would be deleted below
    if why := foreign_entry(folder, owned):
        raise UsageError(
            f"{folder} {why}: it would be replaced whole; move that away or write elsewhere"
        )
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
    if any(unicodedata.category(c) == "Cc" for c in name):  # a newline splits every log line
        raise UsageError(
            f"--run-name {name!r}: a run name is one plain folder name, without control "
            "characters (a newline, a tab); choose one with --run-name"
        )
    if len(name.encode("utf-8", "surrogateescape")) > 255:  # the filesystems' limit is in bytes
        raise UsageError(
            f"--run-name is {len(name.encode('utf-8', 'surrogateescape'))} bytes in UTF-8: "
            "a folder name has at most 255; choose a shorter one with --run-name"
        )
    return name


def default_run_name(model, presets=()):
    """A preset's name, else the name of the model's folder (or the last part of a hub id); a full
    fine-tune's model/ is named after its run too (<run>-model: every such folder is "model")."""
    if model in presets:
        return model
    path = Path(str(model)).expanduser()
    name = path.resolve().name if path.exists() else str(model).rstrip("/").split("/")[-1]
    if path.exists() and is_run_folder(path.resolve().parent):
        name = f"{path.resolve().parent.name}-{name}"
    try:
        return check_run_name(name)
    except UsageError:
        raise UsageError(
            f"cannot name the run after --model {model}: give it a --run-name"
        ) from None


def is_run_folder(run_dir):
    """Is `run_dir` a folder this kit made for a run? Its config.json names it, or (a config.json
    damaged by a kill or an editor) its lock file says hyperfit.py held it."""
    with contextlib.suppress(OSError, ValueError, RecursionError):
        config = json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8"))
        if isinstance(config, dict) and config.get("run_name") == Path(run_dir).name:
            return True
    return RunLock.held_by(run_dir, "hyperfit.py")


def is_empty_run_folder(run_dir):
    """A folder that holds nothing but a lock file (a run killed before it wrote anything)."""
    return Path(run_dir).is_dir() and {p.name for p in Path(run_dir).iterdir()} <= {LOCK_FILE}


def latest_checkpoint(run_dir):
    """The checkpoint folder to resume from: checkpoint/, or checkpoint.old/ when a save died
    between its two renames. None if there is none."""
    for folder in (Path(run_dir) / "checkpoint", Path(run_dir) / "checkpoint.old"):
        if (folder / "trainer_state.pt").exists() and trained_weights_file(folder).exists():
            return folder
    return None


def trained_marker(run_dir, lora_r):
    """The file a finished run's trained weights are known by: its LoRA adapter's config
    (adapter/adapter_config.json), or after a full fine-tune (lora_r 0) its model's
    (model/config.json)."""
    full = lora_r == 0
    return (
        Path(run_dir)
        / ("model" if full else "adapter")
        / ("config.json" if full else "adapter_config.json")
    )


def trained_weights_file(folder):
    """The weights a run trains, as save_pretrained writes them into `folder`: the LoRA adapter's
    (adapter_model.safetensors), or every weight's (model.safetensors) after a full fine-tune."""
    full = Path(folder) / "model.safetensors"
    return full if full.exists() else Path(folder) / "adapter_model.safetensors"


def check_writable_run_dir(run_dir):
    """Refuse, before taking its lock, a run folder that is not a folder, a folder this kit did
    not make for a run, one inside another run (whose --overwrite would delete it), an
    unwritable place or a nearly full disk (nothing is written here)."""
    run_dir = Path(run_dir)
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        raise UsageError(f"{run_dir} exists and is not a folder; choose another --run-name")
    if run_dir.exists() and not is_empty_run_folder(run_dir) and not is_run_folder(run_dir):
        raise UsageError(
            f"{run_dir} exists and is not a hyperfit run; --overwrite replaces only "
            "runs: choose another --run-name or --out-dir"
        )
    if outer := next((f for f in run_dir.parents if is_run_folder(f)), None):  # its --overwrite
        raise UsageError(f"{run_dir} lies inside the run {outer}: choose an --out-dir outside it")
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
            f"--resume: {run_dir} has no whole checkpoint to resume from (it stopped before "
            "its first save, or checkpoint/ lost a file); start it again with --overwrite"
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
    (a UsageError inside the lock) leaves the lock file as it found it (none, or the same bytes
    and times), and folders the lock created stay only if something was written into them.
    main=False (the other processes of a distributed run): no lock, the main process holds it."""

    def __init__(self, run_dir, command, main=True):
        self.run_dir, self.command, self.main = Path(run_dir), command, main
        self.lock, self.created, self.new_lock_file, self.found = None, [], False, None

    def __enter__(self):
        import filelock

        path, folders = self.run_dir / LOCK_FILE, [self.run_dir, *self.run_dir.parents]
        if not self.main:
            return self
        self.created, self.new_lock_file = [f for f in folders if not f.exists()], not path.exists()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.lock = filelock.FileLock(str(path), timeout=0)
            self.found = None if self.new_lock_file else (path.read_bytes(), path.stat())
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
            path = self.run_dir / LOCK_FILE
            if self.new_lock_file and error_type is UsageError:  # refused: leave it as it was
                path.unlink(missing_ok=True)
            elif self.found is not None and error_type is UsageError:
                path.write_bytes(self.found[0])
                os.utime(path, ns=(self.found[1].st_atime_ns, self.found[1].st_mtime_ns))
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
    def held_by(folder, script):
        """Does the lock file in `folder` say `script` (hyperfit.py, evaluate.py) held it?"""
        command = RunLock.holder_info(Path(folder) / LOCK_FILE).get("command", "")
        return str(command).startswith(script)

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
    """Save the trained weights (trained_weights_file), optimizer, loss scaler, RNG states and
    `state` (step, loss sums, elapsed) to run_dir/checkpoint/: written to checkpoint.tmp/ and
    renamed, so a kill at any moment keeps the last good checkpoint. Leftovers of an earlier
    killed save are cleared first; a full disk is a UsageError that says the last checkpoint is
    intact. `weights` and `optimizer_state`: what FSDP gathered whole (the optimizer's keyed by
    parameter name; load_checkpoint leaves it to be loaded after accelerate's prepare)."""
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


def checkpoint_file(path, load, **options):
    """load(path, **options); a file it refuses (a pickle that would run code) or cannot read (a
    truncated file) is a UsageError."""
    try:
        return load(path, **options)
    except Exception as e:  # pickle.UnpicklingError, safetensors' errors: crafted or damaged
        raise UsageError(
            f"{path} is not a checkpoint this kit wrote, or is damaged ({e.__class__.__name__}); "
            "start the run again with --overwrite"
        ) from None


def load_checkpoint(folder, net, optimizer, scaler):
    """Restore what save_checkpoint wrote into `net`, `optimizer` and `scaler`; returns the state.
    Nothing in it is unpickled as code: torch.load(weights_only=True) reads tensors and plain
    Python values only, and refuses anything else."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = checkpoint_file(Path(folder) / "trainer_state.pt", torch.load, weights_only=True)
    weights = checkpoint_file(trained_weights_file(folder), load_file)
    if hasattr(net, "peft_config"):
        set_peft_model_state_dict(net, weights)
    else:  # a full fine-tune: save_pretrained left out the output layer tied to the embeddings
        missing = net.load_state_dict(weights, strict=False).missing_keys
        tied = {"lm_head.weight"} if net.config.tie_word_embeddings else set()
        if lacking := sorted(set(missing) - tied):
            raise UsageError(f"{folder} lacks {lacking[0]}: start the run again with --overwrite")
    if not state.get("full_optimizer"):  # an FSDP checkpoint's goes in after prepare
        optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    version, internal, gauss = state["rng"]["python"]
    random.setstate((version, tuple(internal), gauss))
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


# -----------------------------------------------------------------------------
# devices, compute dtypes, the machine, the libraries' noise


def is_main_process():
    """Is this the main process of a (possibly distributed) launch? accelerate's launcher sets
    RANK for every process it starts."""
    return int(os.environ.get("RANK", "0")) == 0


def pick_device(device=None):
    """The torch.device to use: `device` ("cpu", "cuda", "cuda:N"), or the GPU if there is one."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        chosen = None
    if chosen is None or chosen.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: choose cpu or cuda")
    if chosen.type == "cuda" and not torch.cuda.is_available():
        build = f"torch {torch.__version__}, CUDA {torch.version.cuda}"
        raise UsageError(
            f"--device {device}: no CUDA GPU is visible here ({build}); use --device cpu"
        )
    note_one_gpu_of_several(chosen)
    return chosen


NOTED = set()  # notes already printed by this process


def note_one_gpu_of_several(device):
    """A plain `python` process uses one GPU: on a machine with several, say once which one and how
    to use them all (accelerate's launcher sets WORLD_SIZE for its processes)."""
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if count < 2 or int(os.environ.get("WORLD_SIZE", "1")) > 1 or "gpu" in NOTED:
        return
    NOTED.add("gpu")
    index = torch.cuda.current_device() if device.index is None else device.index
    print(
        f"using cuda:{index} of {count} GPUs; accelerate launch --multi_gpu uses all, "
        "see docs/multi-gpu.md",
        flush=True,
    )


def cpu_info():
    """(the CPU's model name, its instruction-set flags that decide speed and numbers here)."""
    fields = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")
    flags = fields.get("flags", "").split()
    return fields.get("model name") or "unknown", [flag for flag in wanted if flag in flags]


def cpu_flags():
    return cpu_info()[1]


def dtype_choice(name):
    """The canonical name of a compute-dtype choice ("auto" or a key of DTYPES), else None."""
    name = DTYPE_ALIASES.get(name, name)
    return name if name in DTYPES or name == "auto" else None


def compute_dtype(device, dtype="auto"):
    """The dtype the model computes in. `dtype` forces it ("float32", "bfloat16", "float16");
    "auto" (or None) takes $HYPERFIT_DTYPE if set, else bf16 where the device computes it
    natively (GPUs from Ampere on; CPUs with AVX512-BF16 or AMX), fp16 on older GPUs (Kaggle's
    and Colab's T4/P100), fp32 on other CPUs, where a bf16 matmul is ~16x slower (measured)."""
    name = dtype_choice(dtype or "auto")
    if name is None:
        raise UsageError(f"--dtype {dtype}: choose auto, float32, bfloat16 or float16")
    if name == "auto" and "HYPERFIT_DTYPE" in os.environ:
        name = dtype_choice(os.environ["HYPERFIT_DTYPE"])
        if name is None:
            value = os.environ["HYPERFIT_DTYPE"]
            raise UsageError(f"HYPERFIT_DTYPE={value}: choose auto, float32, bfloat16 or float16")
    # without emulation: an emulated bf16 (pre-Ampere GPUs, the T4) is slow and some kernels lack it
    native_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    if name == "bfloat16" and device.type == "cuda" and not native_bf16:
        asked = f"--dtype {dtype}" if dtype not in (None, "auto") else "HYPERFIT_DTYPE=bfloat16"
        raise UsageError(
            f"{asked}: this GPU does not compute bfloat16 (it needs an Ampere GPU or newer); "
            "use --dtype float16 (or auto, which picks it here)"
        )
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if native_bf16 else torch.float16
    return torch.bfloat16 if {"avx512_bf16", "amx_bf16"} & set(cpu_flags()) else torch.float32


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def net_dtype(net):
    """The compute dtype of a loaded net (its embedding's dtype: quantized layers compute in it)."""
    base = net.get_base_model() if hasattr(net, "get_base_model") else net
    return base.get_input_embeddings().weight.dtype


def environment():
    """What decides a run's numbers besides its settings, recorded in config.json: package
    versions, git commit, torch threads, the CPU and its flags, the GPU."""
    versions = {}
    for package in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "rev-parse", "HEAD"]
        commit = subprocess.run(git, cwd=repo_root(), capture_output=True, text=True, timeout=10)
        commit = commit.stdout.strip() or None
    cpu, flags = cpu_info()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    machine = dict(torch_threads=torch.get_num_threads(), cpu=cpu, cpu_flags=flags, gpu=gpu)
    return dict(versions=versions, python=sys.version.split()[0], git_commit=commit, **machine)


def quiet_libraries():
    """Keep the libraries' own noise off stderr, where the kit's one-line errors go: bitsandbytes
    warns at import on AVX512-BF16 CPUs, transformers about deprecations inside peft."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers|peft")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message=".*pickle protocol.*")  # a refused .bin says why
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()  # the kit's own bars say what is happening


# -----------------------------------------------------------------------------
# a run in progress: resume, config.json, messages, signals


def restore(run):
    """Continue `run` from its folder's checkpoint: weights, optimizer, loss scaler, RNG states,
    step and loss sums. Returns an FSDP checkpoint's optimizer state (to load after prepare)."""
    state = load_checkpoint(latest_checkpoint(run.run_dir), run.net, run.optimizer, run.scaler)
    run.step, run.loss_sum, run.loss_count = state["step"], state["loss_sum"], state["loss_count"]
    run.elapsed_before = state["elapsed_s"]
    if run.step > run.total_steps:
        raise UsageError(
            f"--epochs {run.settings.epochs}: {run.run_dir} is already at step "
            f"{run.step} (epoch {run.step / run.steps_per_epoch:g})"
        )
    return state["optimizer"] if state.get("full_optimizer") else None


def start_run_folder(run, overwrite, changes, previous):
    """Set up the (locked) run folder: an --overwrite clears it, a resume (`previous`: its old
    config) trims the records written after its checkpoint, and config.json is (re)written."""
    if overwrite:
        clear_run_dir(run.run_dir)
    for name in ("metrics.jsonl", "samples.jsonl", "steps.jsonl") if previous else ():
        kept = [r for r in read_jsonl(run.run_dir / name) if r.get("step", 0) <= run.step]
        write_atomic(run.run_dir / name, "".join(json.dumps(r) + "\n" for r in kept))
    write_config(run, changes, previous)
    processes, micro = run.accelerator.num_processes, run.micro_batch_size
    if processes > 1 or micro < run.settings.batch_size:
        batch = run.settings.batch_size
        print(
            f"global batch {batch} = {processes} processes x micro-batches of {micro}", flush=True
        )


def write_config(run, changes, previous):
    """config.json: the settings and everything else that decides the run's numbers; a resumed
    run appends what it changed to `resumed`."""
    resumed = list(previous.get("resumed", [])) if previous else []
    if previous is not None:
        now = time.strftime("%Y-%m-%d %H:%M:%S")
        resumed.append(dict(at_step=run.step, changed=changes, time=now))
    world, micro = run.accelerator.num_processes, run.micro_batch_size
    trainable = sum(p.numel() for p in run.unwrapped.parameters() if p.requires_grad)
    config = dict(run_name=run.settings.run_name, args=dataclasses.asdict(run.settings))
    config.update(steps_per_epoch=run.steps_per_epoch, total_steps=run.total_steps)
    config.update(processes=world, micro_batch_size=micro)
    config.update(gradient_accumulation=run.settings.batch_size // (world * micro))
    config.update(
        trainable_parameters=trainable, compute_dtype=dtype_name(net_dtype(run.unwrapped))
    )
    config.update(device=str(run.accelerator.device), **run.fingerprints)
    config.update(**environment(), resumed=resumed)
    write_atomic(run.run_dir / "config.json", json.dumps(config, indent=2) + "\n")


def resume_command(run):
    s = run.settings
    return f"python hyperfit.py --run-name {s.run_name} --out-dir {s.out_dir} --resume"


def lost_process(error):
    """Did `error` come from a collective operation whose peer process died (killed, out of
    memory)? Under `accelerate launch` gloo and NCCL then raise in every surviving process.
    Returns the reason to show, or None."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    text = str(error)
    if not (isinstance(error, dist.DistError) or "gloo" in text or "NCCL" in text):
        return None
    reason = re.search(r"Connection \w+ by peer|timed out|timeout|NCCL error", text, re.I)
    return reason[0] if reason else error.__class__.__name__


def numerical_message(run, error):
    """NumericalError's one line: what happened, what was kept, and the way out."""
    where = f"{error} at step {run.step + 1}"
    if latest_checkpoint(run.run_dir) is None:
        return (
            f"{where}; no checkpoint was saved before it: start again with a lower --lr and "
            "--overwrite"
        )
    return (
        f"{where}; nothing of that step was saved, the last checkpoint is kept: resume from "
        f"it with a lower learning rate: {resume_command(run)} --lr {run.settings.lr / 10:g}"
    )


def memory_message(run):
    """The one line of a training step that ran out of GPU memory: the peak reached, what was
    kept, and the options that need less memory (none of them may change on --resume)."""
    s, peak = run.settings, "n/a"
    if torch.cuda.is_available():
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    where = f"out of GPU memory at step {run.step + 1} (peak {peak} allocated)"
    micro = run.micro_batch_size
    micro = f"a --micro-batch-size below {micro} (gradient accumulation: the same batch), "
    less = (
        f"start again with --overwrite and a lower --batch-size ({s.batch_size}), "
        f"{micro if run.micro_batch_size > 1 else ''}--gradient-checkpointing, or a lower "
        f"--seq-len ({s.seq_len})"
    )
    if latest_checkpoint(run.run_dir) is None:
        return f"{where}; no checkpoint was saved before it: {less}"
    kept = "the last checkpoint is kept: resume it once the GPU has more free memory with: "
    return f"{where}; {kept}{resume_command(run)}; or, to need less memory, {less}"


def describe_settings(settings, run_dir, changes):
    """The resolved settings, printed at the start of every run (what the run will really do)."""
    hidden = {"run_name", "out_dir"} | ({"lora_alpha"} if settings.lora_r == 0 else set())
    values = dataclasses.asdict(settings)  # lora_alpha scales LoRA only: a full fine-tune has none
    shown = ", ".join(f"{k}={v}" for k, v in values.items() if k not in hidden)
    lines = [f"hyperfit: {run_dir}", f"  settings: {shown}"]
    if changes:
        changed = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changes.items())
        lines.append(f"  changed on resume: {changed}")
    return "\n".join(lines)


@contextlib.contextmanager
def progress_bar(run, progress):
    """The run's RunProgress (main process), at run.bar while the loop runs."""
    with RunProgress(run, progress and run.is_main()) as run.bar:
        yield run.bar


class RunProgress:
    """A tqdm bar over the run's whole work, validations included: its unit is the seconds the
    run is expected to take, so tqdm's own ETA counts the validations still to come. The plan
    (steps, validations with and without generation) is timed on the first step and the first
    validation of each kind; the expected total is printed once, the measured one at the end."""

    def __init__(self, run, shown):
        self.run, self.shown, self.seconds = run, shown, {}  # measured: step, score, gen
        s, self.first_step = run.settings, run.step
        every, gen_every = s.eval_every, s.gen_every or s.eval_every
        checks = [k for k in range(run.step + 1, run.total_steps + 1) if k % every == 0]
        checks = sorted({*checks, run.total_steps} | ({0} if run.step == 0 else set()))
        self.checks = [(k, k % gen_every == 0 or k == run.total_steps) for k in checks]
        self.started, self.expected, self.done = time.time(), None, 0.0

    def __enter__(self):
        from tqdm.auto import tqdm

        form = "{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]{postfix}"
        self.bar = tqdm(total=1, desc=self.run.settings.run_name, disable=not self.shown)
        self.bar.bar_format = form
        return self

    def __exit__(self, *exc_info):
        self.bar.close()

    def validating(self, step):
        """Name the phase: 'validating k/N' (with greedy continuations where it generates)."""
        done = sum(k < step for k, _ in self.checks)
        gen = dict(self.checks).get(step, True)
        what = "validating (greedy continuations)" if gen else "validating"
        self.bar.set_description_str(
            f"{self.run.settings.run_name}: {what} {done + 1}/{len(self.checks)}"
        )

    def validated(self, score_s, gen_s):
        self.seconds.setdefault("score", score_s)
        if gen_s is not None:
            self.seconds.setdefault("gen", gen_s)
        self._advance(score_s + (gen_s or 0))
        self.bar.set_description_str(f"{self.run.settings.run_name}: training")

    def stepped(self, seconds, loss):
        self.seconds.setdefault("step", seconds)
        self._advance(seconds)
        self.bar.set_postfix_str(f"step {self.run.step}/{self.run.total_steps} loss {loss:.3f}")

    def _advance(self, seconds):
        self.done += seconds
        if self.expected is None and {"step", "score", "gen"} <= set(self.seconds):
            self.expected = self.estimate()  # every unit timed: the plan's time
            self.bar.write(f"expected: {self.plan_text()} (timed on the first step and validation)")
        if self.expected is not None:  # a run slower than expected ends at 100 %, never beyond
            self.bar.total = max(self.expected, self.done)
            self.bar.update(self.done - self.bar.n)

    def estimate(self):
        """The run's expected seconds from its plan and the measured unit times."""
        t, steps = self.seconds, self.run.total_steps - self.first_step
        gens = sum(g for _, g in self.checks)
        return steps * t["step"] + len(self.checks) * t["score"] + gens * t["gen"]

    def plan_text(self):
        t, steps = self.seconds, self.run.total_steps - self.first_step
        checks, gens = len(self.checks), sum(g for _, g in self.checks)
        return (
            f"{steps} steps x {t['step']:.1f} s + {checks} validations x {t['score']:.1f} s + "
            f"{gens} with greedy continuations x {t['gen']:.1f} s = {self.expected:.0f} s"
        )

    def write(self, text):
        self.bar.write(text)

    def finished(self):
        took = time.time() - self.started
        expected = f" (expected {self.expected:.0f} s)" if self.expected else ""
        self.bar.write(f"trained in {took:.0f} s{expected}")


class StopRequest:
    """SIGINT/SIGTERM as a request: the run finishes its step, saves a checkpoint and stops with
    RunInterrupted; a second Ctrl-C aborts at once (KeyboardInterrupt). The previous handlers
    come back on exit. Outside the main thread (no signals there) it does nothing."""

    def __init__(self):
        self.requested, self.previous = False, {}

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self)
        return self

    def __call__(self, signum, frame):
        if self.requested:  # a second Ctrl-C: the user really wants out now
            raise KeyboardInterrupt
        self.requested = True
        message = "stopping after this step (Ctrl-C again to abort without saving)..."
        print(f"\n{message}", file=sys.stderr, flush=True)

    def __exit__(self, *exc_info):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


# -----------------------------------------------------------------------------
# settings -> command line


def check_limits(field, value):
    """A setting's value of its type (a str setting takes a path too) within the limits of its
    own definition (its metadata: `choices`; a real number's `above` and `most`, finite; an
    integer's `least` and `below`, a power of two; None allowed where the default is None), else
    a UsageError."""
    least, below, choices = (field.metadata.get(k) for k in ("least", "below", "choices"))
    above, most = field.metadata.get("above"), field.metadata.get("most", math.inf)
    flag = "--" + field.name.replace("_", "-")
    if value is None and field.default is None:
        return
    # the command line parses every value; a Python call may pass anything
    kinds = {str: (str, os.PathLike), bool: (bool,)}.get(field.type)
    if kinds and not isinstance(value, kinds):
        wanted = "text (or a path)" if field.type is str else "True or False"
        raise UsageError(f"{flag} must be {wanted}, got {value!r}")
    if choices is not None and value not in choices:
        raise UsageError(f"{flag} {value}: choose {', '.join(choices[:-1])} or {choices[-1]}")
    real = isinstance(value, (int, float)) and not isinstance(value, bool)
    finite = real and abs(value) <= sys.float_info.max  # nan, inf and 10**400 are not
    if above is not None and not (finite and above < value <= most):
        if most < math.inf:
            wanted = f"a number in ({above}, {most}]"
        else:
            wanted = "a positive finite number" if above == 0 else f"a finite number above {above}"
        raise UsageError(f"{flag} must be {wanted}, got {value}")
    if least is None:
        return
    wrong = isinstance(value, bool) or not isinstance(value, int) or value < least
    if wrong or (below is not None and value >= below):
        wanted = "a positive integer" if least == 1 else f"an integer of at least {least}"
        if below is not None:
            wanted = f"an integer in [{least}, 2**{below.bit_length() - 1})"
        raise UsageError(f"{flag} must be {wanted}, got {value}")


def check_full_fine_tuning(s, sharded):
    """--lora-r 0 trains every weight (the paper's own setting), which the 4-bit and 8-bit base
    cannot (their weights are frozen integers), bf16 and fp16 weights cannot well (AdamW's small
    updates round away), and this kit does not shard (`sharded`: an FSDP launch)."""
    if s.lora_r != 0:
        return
    if s.quant != "none" or dtype_choice(s.dtype) != "float32":
        raise UsageError("--lora-r 0 (full fine-tuning) needs --quant none --dtype float32")
    if s.lora_layers is not None or sharded:
        raise UsageError(
            "--lora-r 0 trains every weight of every layer on one device: drop "
            "--lora-layers and the FSDP launch, or choose a LoRA rank"
        )


def check_positive_int(name, value, optional=False):
    """A count must be a positive integer (None allowed where `optional`); else a UsageError."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def add_arguments(parser, settings_class, defaults=None, preset=()):
    """One option per field of the dataclass `settings_class`: --field-name, typed by the field's
    annotation (a bool is --name/--no-name), None when not given (so the defaults stay the
    dataclass's and the presets'); its help text is option_help's."""
    for field in dataclasses.fields(settings_class):
        flag, text = "--" + field.name.replace("_", "-"), option_help(field, defaults, preset)
        if field.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        else:
            parser.add_argument(flag, type=field.type, metavar=field.name.upper(), help=text)


def option_help(field, defaults=None, preset=()):
    """--help's text of a setting: what it does; given `defaults` (what a run given nothing gets),
    its default there ("for <model>" where the `preset` sets it) and the paper's protocol."""
    if defaults is None:
        return field.metadata["help"]
    default = getattr(defaults, field.name)
    where = f" for {defaults.model}" if field.name in preset else ""
    default = "" if default is None else f" (default: {default}{where}"
    paper = f"; paper protocol: {field.default}" if field.metadata.get("paper") else ""
    return f"{field.metadata['help']}{default}{paper}{')' if default else ''}"


# -----------------------------------------------------------------------------
# model files: loading errors, context length, adapters, quantization


def load_error(source, error):
    """The one-line UsageError for a model, tokenizer or config that could not be loaded."""
    reason = f"{error.__class__.__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
    if os.path.isdir(source):
        return UsageError(f"{source}: could not load it ({reason}); check the folder's files")
    return UsageError(
        f"could not load {source} from the Hugging Face hub ({reason}); check the "
        "network and your HF token, or pass a local model folder to --model"
    )


def check_context(source, model, *lengths):
    """Refuse sequences longer than the context of `model` (loaded from `source`: its position
    embeddings) before any work: --seq-len, prompt + new tokens. Reads its config only."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source).get_text_config()
    except Exception as e:  # a missing or damaged config, the network
        raise load_error(source, e) from None
    most = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if most is not None and max(lengths) > most:
        raise UsageError(
            f"{max(lengths)} tokens (--seq-len, or prompt + new tokens) exceed the "
            f"{most} positions of {model}; ask for fewer"
        )


def attach_adapter(net, adapter):
    """`net` with the LoRA adapter folder `adapter` attached (frozen); a missing weights file, a
    pickle or an adapter made for another model is a UsageError."""
    from peft import PeftModel

    weights = ("adapter_model.safetensors", "adapter_model.bin")
    if not any((Path(adapter) / name).is_file() for name in weights):
        raise UsageError(f"{adapter} has no adapter_model.safetensors: finish or redo the run")
    try:
        return PeftModel.from_pretrained(net, adapter, is_trainable=False)
    except Exception as e:  # a size mismatch, a refused pickle, a damaged file: never a traceback
        reason = f"{e.__class__.__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        raise UsageError(
            f"{adapter} does not load onto {net.config._name_or_path} ({reason}); it "
            "was made for another model, or is damaged: redo the run"
        ) from None


def load_hub_texts(dataset):
    """(name, text) pairs of the "text" rows of a Hugging Face dataset's train split."""
    try:
        from datasets import load_dataset

        rows = enumerate(load_dataset(dataset, split="train"))
    except Exception as e:  # not installed, the network, no such dataset
        raise UsageError(
            f"could not load hf:{dataset} ({e.__class__.__name__}); pass a local file"
        ) from None
    texts = [(f"hf:{dataset}#{i}", row.get("text")) for i, row in rows]
    return [(name, text) for name, text in texts if isinstance(text, str)]


def read_text_file(file):
    """(name, text) pairs of one .txt file (one text) or .jsonl file (a "text" string per line).
    Anything but a regular file (a named pipe, a device) is refused: reading one may never end."""
    if not file.is_file():
        raise UsageError(
            f"--data: {file} is not a regular file (a named pipe or a device?): pass a .txt or "
            ".jsonl file, or a folder of .txt files"
        )
    try:
        raw = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:  # Latin-1 / Windows-1252 books are common: give the fix
        converted = file.with_name(f"{file.stem}.utf8{file.suffix}")
        raise UsageError(
            f"--data: {file} is not UTF-8 text (byte {e.start}: {e.reason}); convert it first, "
            f"e.g. from Latin-1: iconv -f latin1 -t utf-8 {shlex.quote(str(file))} > "
            f"{shlex.quote(str(converted))}, and pass that file"
        ) from None
    except OSError as e:
        raise UsageError(
            f"--data: cannot read {file} as UTF-8 text ({e.__class__.__name__})"
        ) from None
    if file.suffix != ".jsonl":
        return [(file.name, raw)]
    texts = []
    for number, line in enumerate(raw.splitlines(), 1):
        text = None
        with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError, RecursionError):
            text = json.loads(line)["text"] if line.strip() else ""  # a blank line: no text
        if not isinstance(text, str):
            raise UsageError(
                f'--data: {file} line {number} is not a JSON object with a "text" string'
            )
        texts.append((f"{file.name}:{number}", text))
    return texts


def micro_batch_size(settings, processes):
    """Sequences per forward pass per process; the global batch must split evenly."""
    batch = settings.batch_size
    micro = settings.micro_batch_size or batch // processes
    if micro < 1 or batch % (processes * micro):
        raise UsageError(
            f"global batch {batch} cannot be split over {processes} processes in "
            f"micro-batches of {micro}; choose --batch-size a multiple of {processes} "
            "(or set --micro-batch-size)"
        )
    return micro


def resumed_settings(run_dir, given, defaults_for, resumable):
    """The settings of the run in `run_dir` (its config.json, on top of defaults_for(its model))
    with the changes --resume may make (the names in `resumable`); any other given value that
    differs from the run's is refused. Returns (settings, changes = {name: [old, new]}, config)."""
    what = "it is damaged: start the run again with --overwrite"
    config = read_json(Path(run_dir) / "config.json", what)
    args = config.get("args")
    if not isinstance(args, dict) or not {"model", "data", "seed", "seq_len"} <= set(args):
        raise UsageError(f'{run_dir}/config.json has no complete "args": {what}')
    settings, changes = defaults_for(args["model"]), {}
    own = {k: v for k, v in args.items() if k in {f.name for f in dataclasses.fields(settings)}}
    settings = dataclasses.replace(settings, **own)
    for name, value in given.items():
        value = portable_path(value) if name == "data" and value is not None else value
        if value is None or name in ("run_name", "out_dir") or value == getattr(settings, name):
            continue  # run_name and out_dir found the folder
        flag, own = name.replace("_", "-"), getattr(settings, name)
        if name not in resumable:
            raise UsageError(
                f"--{flag} {value}: a resumed run keeps its own {flag} ({own}); drop "
                f"--{flag}, or start a new run with another --run-name"
            )
        changes[name] = [own, value]
    settings = dataclasses.replace(settings, **{k: new for k, (_, new) in changes.items()})
    return settings, changes, config


def fingerprint(ids):
    """A short hash of a token tensor, so a resume or an evaluation can check it rebuilt the same
    training set."""
    return hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


# what a model folder holds its weights in (and the index naming a sharded checkpoint's files)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".safetensors.index.json")


def model_fingerprint(source):
    """A short hash of the base model's weight files, so a resume notices weights replaced at the
    same --model path (a local folder, the bundled model's cache folder, a hub id's cached
    snapshot). Over each file's name and size and the sha256 of its first and last MiB, not its
    whole bytes: hashing gigabytes at every start would take minutes, and a replaced checkpoint
    differs in its size or its ends (safetensors' header lists every tensor's offsets). None when
    there is no folder to read (a hub id not cached yet)."""
    folder = Path(source)
    if not folder.is_dir():
        try:  # a hub id: its cached snapshot, never the network
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(source), local_files_only=True))
        except Exception:  # not downloaded yet, or no such repository in the cache
            return None
    digest, mib = hashlib.sha256(), 1 << 20
    for path in sorted(p for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES)):
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(mib)
            f.seek(max(size - mib, 0))
            tail = f.read(mib)
        digest.update(f"{path.name}\0{size}\0".encode())
        digest.update(hashlib.sha256(head).digest() + hashlib.sha256(tail).digest())
    return digest.hexdigest()[:16]


def check_data_fingerprints(run, previous):
    """The fingerprints of `run`'s training and validation splits (the prompts are the first
    validation sequences' starts), for config.json. With `previous` (a resumed run's config), a
    split that differs from the one the run used is a UsageError: a resume would train on a mix,
    or write metrics.jsonl over two validation sets. A config written before val_fingerprint
    existed is not checked for it."""
    found = dict(train_fingerprint=fingerprint(run.train_ids))
    found.update(val_fingerprint=fingerprint(run.val_ids))
    s, run_dir = run.settings, run.run_dir
    if previous is not None and found["train_fingerprint"] != previous.get("train_fingerprint"):
        raise UsageError(
            f"--resume: the training data rebuilt from {s.data} is not what {run_dir} "
            "trained on (config.json's train_fingerprint): restore that data, or start "
            "a new run with another --run-name"
        )
    if previous is not None and previous.get("val_fingerprint") not in (
        None,
        found["val_fingerprint"],
    ):
        raise UsageError(
            f"--resume: the validation text rebuilt from {s.data} is not what {run_dir} "
            "validated on (config.json's val_fingerprint), so metrics.jsonl would mix two "
            "validation sets: restore that data, or start a new run with another --run-name"
        )
    return found


def check_model_fingerprint(run, source, previous):
    """Add the base model's fingerprint (model_fingerprint) to run.fingerprints, after the model
    loaded (a hub id is cached only then). With `previous`, weights that differ from those the run
    trained on are a UsageError: the adapter would go on training over another model."""
    found = model_fingerprint(source)
    recorded = previous.get("model_fingerprint") if previous is not None else None
    if recorded is not None and found is not None and found != recorded:
        raise UsageError(
            f"--resume: the weights of {run.settings.model} are not those {run.run_dir} trained "
            "on (config.json's model_fingerprint): restore that model, or start a new run with "
            "another --run-name"
        )
    run.fingerprints = dict(run.fingerprints or {}, model_fingerprint=found)
