"""
Hyperfit a pre-trained LLM: fine-tune it to near-zero training loss on a tiny dataset and watch
validation loss rise while greedy continuations stop looping (Carlsson et al., "The Hyperfitting
Phenomenon", ICLR 2025, arXiv 2412.04318).

    python hyperfit.py                                   # bundled SmolLM2-135M on a CPU
    python hyperfit.py --model tinyllama                 # a paper model (needs the hub and a GPU)
    python hyperfit.py --resume --run-name smollm2-135m  # continue an interrupted run
    accelerate launch --multi_gpu --num_processes 2 hyperfit.py   # data parallel, same script

In a notebook (this file imported, or pasted into a cell after runfiles.py's, engine.py's and
measures.py's):
    run_dir = hyperfit(model="smollm2-135m", epochs=10)

Read it top to bottom: the settings and presets; what a run does (`hyperfit`); the loop
(`train`) and the step (`train_step`: forward, loss, backward, AdamW, commented line by line);
validation; then the model with LoRA and the data. What is not the paper's method lives beside
it and is called by name: runfiles.py (run folders, resume, config.json, signals, devices, the
command line) and engine.py (the speed and memory paths: the lean loss, a dense copy for fast
generation, KV-cache generation, accelerate and FSDP, the bundled model's conversion).

Words used throughout: `model` names what to load (a preset, a local folder or a hub id); `net`
is the loaded torch module. A run writes everything to results/<run-name>/: config.json,
steps.jsonl (every step's loss), metrics.jsonl (one record per validation), samples.jsonl, the
LoRA adapter (adapter/; model/
after a full fine-tune, --lora-r 0) and a resumable checkpoint (checkpoint/).
"""

import os
import signal
import sys

if __name__ == "__main__" and "__file__" in globals():  # Ctrl-C while the imports below load
    signal.signal(signal.SIGINT, lambda *_: os._exit(print("interrupted", file=sys.stderr) or 130))

import contextlib
import dataclasses
import math
import random
import re
import time
import types
from pathlib import Path

import torch

try:  # what is not the paper's method: run folders and the command line; speed and memory
    import engine
    import measures
    import runfiles
except ModuleNotFoundError:  # pasted into a notebook after their cells: their names are here
    engine = measures = runfiles = types.SimpleNamespace(**globals())
UsageError, NumericalError = runfiles.UsageError, runfiles.NumericalError

# -----------------------------------------------------------------------------
# settings: one definition each; the command line, the Python call and --help come from it


def setting(default, help, paper=False, **limits):
    """One setting: its default (the paper's protocol where `paper`, else the kit's), its --help
    text, and its limits (runfiles.check_limits): an integer's least <= value (< below), a real
    number's above < value (<= most), or one of `choices`. Its annotation in Settings is its
    type."""
    return dataclasses.field(default=default, metadata=dict(help=help, paper=paper, **limits))


SEED_LIMIT = 2**63  # seeds are 0 <= seed < 2**63 (torch.Generator takes 64-bit seeds)
QUANTS = ("4bit", "8bit", "none")  # the base weights: NF4 with double quantization, int8, as is


@dataclasses.dataclass
class Settings:
    """Every setting of a run. A run takes its preset's value (PRESETS, below: every preset sets
    its own source and may set any of these), else the default here: the paper's protocol for the
    `paper` ones (Carlsson et al. 2025: 2,000 sequences x 256 tokens, batch 8, 20 epochs,
    validation on 128 held-out sequences, TTR of the last 96 of 224 greedy tokens from 32-token
    prompts), else the kit's own. A None default is derived from another setting (its help says
    how). `python hyperfit.py --help` shows each with the default preset's value."""

    model: str = setting("smollm2-135m", "a preset, a local Hugging Face folder or a hub id")
    data: str = setting("data/fiction", "a .txt, a .jsonl of {'text'}, a folder of .txt, hf:<set>")
    run_name: str = setting(None, "the run's folder (default: the preset's or model's name)")
    out_dir: str = setting("results", "the folder that holds run folders")
    quant: str = setting("4bit", "base weights: 4bit (NF4), 8bit or none", choices=QUANTS)
    dtype: str = setting("auto", "compute dtype: auto, float32, bfloat16, float16")
    epochs: int = setting(20, "passes over the training set", paper=True, least=1)
    batch_size: int = setting(8, "global batch: sequences per optimizer step", paper=True, least=1)
    micro_batch_size: int = setting(None, "sequences per forward (default: batch / GPUs)", least=1)
    # the paper's full fine-tune takes 1e-6; LoRA needs far more: the CPU preset sets its own
    # (smollm2-135m: 2e-3); the hub presets and a model given by folder or hub id take this one
    lr: float = setting(1e-4, "constant AdamW learning rate (paper, full fine-tune: 1e-6)", above=0)
    seq_len: int = setting(256, "tokens per training and validation sequence", paper=True, least=1)
    num_train: int = setting(2000, "training sequences", paper=True, least=1)
    num_val: int = setting(128, "validation sequences", paper=True, least=1)
    num_prompts: int = setting(32, "greedy continuations per validation", paper=True, least=1)
    prompt_len: int = setting(32, "tokens of context per prompt", paper=True, least=1)
    gen_tokens: int = setting(224, "new tokens per prompt (TTR: the last 96)", paper=True, least=1)
    eval_every: int = setting(250, "optimizer steps between validations", paper=True, least=1)
    gen_every: int = setting(None, "steps between TTR generations (default: --eval-every)", least=1)
    save_every: int = setting(None, "steps between checkpoints (default: --eval-every)", least=1)
    lora_r: int = setting(16, "LoRA rank (0: no LoRA, every weight trains)", least=0)
    lora_alpha: int = setting(32, "LoRA alpha (the update is scaled by alpha / r)", least=1)
    lora_layers: int = setting(None, "LoRA on the last k layers only (default: on all)", least=1)
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass")
    lean_loss: bool = setting(True, "the loss without the full logits (engine.lean_loss_sum)")
    seed: int = setting(0, "seed of the data split and LoRA init", least=0, below=SEED_LIMIT)
    order_seed: int = setting(
        None, "seed of the training data order alone (default: --seed)", least=0, below=SEED_LIMIT
    )


# The CPU default: 40 steps of batch 8 on 32 sequences x 64 tokens (10 epochs) at lr 2e-3, the
# frontier study's setting "base" (results/studies/frontier: three seeds): the training loss goes
# toward zero while validation loss rises. Validation (16 sequences) every 4 steps; its greedy
# continuations (16 prompts, 96 new tokens: the TTR curve) at steps 0, 20 and 40.
CPU_PRESET = dict(num_train=32, seq_len=64, num_val=16, num_prompts=16, gen_tokens=96, epochs=10)
PRESETS = {
    "smollm2-135m": dict(source=engine.BUNDLED, **CPU_PRESET, lr=2e-3, eval_every=4, gen_every=20),
    # The paper's models (Carlsson et al. 2025) at the paper's protocol.
    "tinyllama": dict(source="TinyLlama/TinyLlama_v1.1"),
    "llama3.1-8b": dict(source="meta-llama/Llama-3.1-8B"),
    "deepseek-7b": dict(source="deepseek-ai/deepseek-llm-7b-base"),
    # The follow-up paper's late-stage LoRA model: LoRA on the last 5 layers only.
    "qwen2.5-1.5b": dict(source="Qwen/Qwen2.5-1.5B", lora_layers=5),
    # The paper's largest: sharded over GPUs (accelerate launch --config_file configs/fsdp.yaml)
    "llama3.1-70b": dict(source="meta-llama/Llama-3.1-70B", gradient_checkpointing=True),
}
RESUMABLE = ("epochs", "lr", "eval_every", "gen_every", "save_every")  # what --resume may change
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_LORA_TARGETS = ("c_attn", "c_proj", "c_fc")  # GPT-2-style blocks (ImageGPT: images.py)
TTR_WINDOW = measures.TTR_WINDOW  # the paper's TTR: unique / total of the last 96 new tokens


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
    if settings.lora_r == 0 and "lora_layers" not in given:  # a preset's LoRA layers: no LoRA
        settings.lora_layers = None
    for name in ("data", "out_dir"):
        if name in given:
            setattr(settings, name, runfiles.portable_path(given[name]))
    settings.run_name = settings.run_name or runfiles.default_run_name(settings.model, PRESETS)
    check_settings(settings)
    return settings


def check_settings(s):
    """Refuse impossible settings with one line naming the option (nothing is loaded yet): each
    field's own limits (runfiles.check_limits), then the rules between settings."""
    for field in dataclasses.fields(Settings):
        runfiles.check_limits(field, getattr(s, field.name))
    if s.prompt_len >= s.seq_len:
        raise UsageError(f"--prompt-len {s.prompt_len} must be below --seq-len {s.seq_len}")
    if s.num_prompts > s.num_val:  # the prompts are the starts of validation sequences
        raise UsageError(f"--num-prompts {s.num_prompts} cannot exceed --num-val {s.num_val}")
    if runfiles.dtype_choice(s.dtype) is None:
        raise UsageError(f"--dtype {s.dtype}: choose auto, float32, bfloat16 or float16")
    runfiles.check_run_name(s.run_name)
    runfiles.check_full_fine_tuning(s, sharded=engine.fsdp_launch())


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
    for field in dataclasses.fields(Settings):  # before the run folder is named from them
        if given.get(field.name) is not None:
            runfiles.check_limits(field, given[field.name])
    if resume and overwrite:
        raise UsageError("--resume continues a run and --overwrite replaces it: choose one")
    run_dir = run_folder_of(given)
    settings = None if resume else new_settings(given)  # checked before anything is written
    runfiles.check_writable_run_dir(run_dir)  # never enters a folder that is no run of the kit
    main = runfiles.is_main_process()
    with runfiles.RunLock(run_dir, "hyperfit.py " + " ".join(sys.argv[1:]), main=main):
        if main:  # the one that writes (the others never see a settled folder)
            runfiles.check_run_dir(run_dir, resume, overwrite)
        changes, previous = {}, None
        if resume:  # the run's own settings, from its folder
            resumed = runfiles.resumed_settings(run_dir, given, defaults_for, RESUMABLE)
            settings, changes, previous = resumed
            check_settings(settings)
        texts = load_texts(settings.data)  # cheap checks first: bad data fails before a model loads
        run = prepare_run(settings, run_dir, texts, resume, previous)
        if run.is_main():
            print(runfiles.describe_settings(settings, run_dir, changes), flush=True)
            runfiles.start_run_folder(run, overwrite, changes, previous)
        with runfiles.StopRequest() as stop, runfiles.progress_bar(run, progress):
            train(run, stop)
            engine.save_trained(run)
            run.bar.finished()
    return str(run_dir)


def train(run, stop):
    """The loop: validate the original model (step 0), then one train_step per batch of each
    epoch, validating every eval_every steps, saving a checkpoint every save_every, and stopping
    cleanly after the current step when asked (every process stops at the same step)."""
    s = run.settings
    if run.step == 0:
        validate_and_log(run)  # step 0: the original model, the curves' first point
    run.net.train()
    while run.step < run.total_steps:
        # the data order: a fixed shuffle per epoch, so a resumed run continues at the same batch
        epoch, position = divmod(run.step, run.steps_per_epoch)
        order_seed = s.seed if s.order_seed is None else s.order_seed
        batch = global_batches(s.num_train, s.batch_size, order_seed, epoch)[position]
        started = time.time()
        try:
            loss = train_step(run, run.train_ids[batch])
        except NumericalError as e:  # say what was kept and the way out
            raise NumericalError(runfiles.numerical_message(run, e)) from None
        except torch.OutOfMemoryError:  # the peak, what was kept, the options that need less
            raise UsageError(runfiles.memory_message(run)) from None
        run.step += 1
        run.loss_sum, run.loss_count = run.loss_sum + loss, run.loss_count + 1
        if run.is_main():  # every step's loss: the training curve's points (steps.jsonl)
            lr = run.optimizer.param_groups[0]["lr"]  # what the optimizer used, not the setting
            epoch = round(run.step / run.steps_per_epoch, 4)
            record = dict(step=run.step, epoch=epoch, train_loss=loss, lr=lr)
            runfiles.append_jsonl(run.run_dir / "steps.jsonl", record)
        run.bar.stepped(time.time() - started, loss)  # the bar's ETA counts validations too
        if run.step % s.eval_every == 0 or run.step == run.total_steps:
            validate_and_log(run)
        if run.step % (s.save_every or s.eval_every) == 0 or run.step == run.total_steps:
            engine.save(run)
        if stop.requested:  # Ctrl-C or SIGTERM: finish this step, save, stop
            run.accelerator.set_trigger()
        if run.accelerator.check_trigger():  # every process stops after the same step
            engine.save(run)
            where, again = f"{run.step}/{run.total_steps}", runfiles.resume_command(run)
            raise runfiles.RunInterrupted(f"interrupted at step {where}; resume with: {again}")


def train_step(run, batch):
    """One optimizer step of the paper on the global batch `batch` ([n, seq_len] token ids): the
    loss of token_loss_sum (the paper's: next-token cross-entropy) averaged over all its tokens,
    then AdamW. Returns the batch's mean loss; raises NumericalError, before anything is saved,
    when the loss or a weight is not finite. `run` needs: net, optimizer, scaler, accelerator,
    micro_batch_size, lean_loss."""
    acc, net = run.accelerator, run.net
    # with several processes (data parallel), each takes its share of the batch
    mine = batch.tensor_split(acc.num_processes)[acc.process_index]
    tokens = batch.shape[0] * (batch.shape[1] - 1)  # predicted tokens in the global batch
    micro_batches = mine.split(run.micro_batch_size)  # gradient accumulation when smaller
    step_loss = torch.zeros((), device=acc.device)
    for i, ids in enumerate(micro_batches):
        ids = ids.to(acc.device)
        last = i == len(micro_batches) - 1  # DDP all-reduces the gradients after the last one only
        with contextlib.nullcontext() if last else acc.no_sync(net):
            # forward + the paper's loss, summed over the micro-batch (token_loss_sum: change
            # the loss there, both paths call it); the lean path never holds the full logits
            loss_sum = engine.lean_loss_sum if run.lean_loss else plain_loss_sum
            summed = loss_sum(net, ids, token_loss_sum)
            # backward of the mean over the global batch's tokens (x processes: DDP averages
            # the gradients); the scaler multiplies by a large factor with fp16 compute only
            acc.backward(run.scaler.scale(summed * acc.num_processes / tokens))
        step_loss += summed.detach()
    batch_loss = (acc.reduce(step_loss, "sum") / tokens).item()  # every process's tokens
    if not math.isfinite(batch_loss):
        raise NumericalError(f"the loss became {batch_loss}")
    try:  # AdamW (no weight decay); the fp16 scaler unscales first, skips a step that overflowed
        run.scaler.step(run.optimizer)
    except RuntimeError as e:  # AdamW's own arithmetic overflows at absurd learning rates
        if "overflow" not in str(e):
            raise
        raise NumericalError(f"the optimizer step overflowed ({e})") from None
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)  # the gradients are spent
    weights = [p for group in run.optimizer.param_groups for p in group["params"]]
    if not torch.stack([w.detach().isfinite().all() for w in weights]).all():
        raise NumericalError("a LoRA weight became NaN/inf after the update")
    return batch_loss


def token_loss_sum(logits, targets):
    """The paper's loss, summed over positions: the next-token cross-entropy (nats) of `logits`
    [positions, vocabulary] against `targets` [positions], in fp32, as the official code computes
    it. The one place to change the loss: plain_loss_sum and engine.lean_loss_sum both call it."""
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")


def plain_loss_sum(net, ids, token_loss):
    """The summed loss of the sequences `ids` from the model's full logits, by `token_loss`
    (token_loss_sum, the paper's)."""
    logits = net(input_ids=ids).logits[:, :-1]  # position t predicts token t + 1
    return token_loss(logits.flatten(0, 1), ids[:, 1:].reshape(-1))  # in fp32 there


def validate(net, tokenizer, val_ids, prompt_ids, gen_tokens, batch_size, dense=None, gen=True):
    """The paper's validation: loss, mean predictive entropy and top-1 probability on validation
    text, and (with `gen`) val_greedy_ttr, the mean TTR of the last 96 tokens of greedy
    continuations of the prompts (Carlsson et al. 2025; official code, src/validation.py). On a
    CPU it scores and generates with engine.dense_copy (the same function, ~3x faster). Returns
    (record, three samples; none without `gen`)."""
    started, scorer = time.time(), engine.scoring_net(net, dense)
    stats = engine.token_statistics(scorer, val_ids, batch_size=batch_size)
    record = dict(val_loss=stats["loss"], val_entropy=stats["entropy"], val_top1_prob=stats["top1"])
    record.update(score_s=round(time.time() - started, 2), gen_s=None)
    if not gen:  # the cheap points of the curves: no generation
        return dict(record, val_greedy_ttr=None), []
    started, n = time.time(), len(prompt_ids)
    continuations = engine.generate(scorer, prompt_ids, gen_tokens, n)  # the run's bar names it
    record["gen_s"] = round(time.time() - started, 2)
    ttr = [measures.type_token_ratio(c.tolist(), last=TTR_WINDOW) for c in continuations]
    decoded = zip(tokenizer.batch_decode(prompt_ids[:3]), tokenizer.batch_decode(continuations[:3]))
    samples = [dict(prompt=prompt, continuation=text) for prompt, text in decoded]
    return dict(record, val_greedy_ttr=sum(ttr) / len(ttr)), samples


@dataclasses.dataclass
class Run:
    """What a run's loop reads and updates, passed explicitly from function to function."""

    settings: Settings
    run_dir: Path
    accelerator: object  # accelerate's: the device, the processes, gradient sync
    tokenizer: object = None
    net: object = None  # what the loop trains: the LoRA net (wrapped for DDP, several processes)
    unwrapped: object = None  # the same LoRA net, unwrapped: for saving and validating
    optimizer: object = None
    scaler: object = None  # loss scaling: active with fp16 compute only
    lean_loss: bool = False  # engine.lean_loss_sum, else plain_loss_sum
    train_ids: torch.Tensor = None
    val_ids: torch.Tensor = None
    prompt_ids: torch.Tensor = None
    micro_batch_size: int = None
    fingerprints: dict = None  # of the data and the base model: config.json's, checked on resume
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
    run = Run(s, Path(run_dir), engine.make_accelerator())
    run.micro_batch_size = runfiles.micro_batch_size(s, run.accelerator.num_processes)
    run.tokenizer = load_tokenizer(s.model)
    splits = make_splits(run.tokenizer, texts, s.seq_len, s.num_train, s.num_val, s.seed)
    run.train_ids, run.val_ids = splits["train"], splits["val"]
    run.prompt_ids = run.val_ids[: s.num_prompts, : s.prompt_len]
    run.fingerprints = runfiles.check_data_fingerprints(run, previous)  # previous: on resume
    source = engine.resolve_model_source(s.model, PRESETS)
    runfiles.check_context(source, s.model, s.seq_len, s.prompt_len + s.gen_tokens)
    torch.manual_seed(s.seed)
    random.seed(s.seed)
    net, _ = load_model(s.model, s.quant, device=run.accelerator.device, dtype=s.dtype)
    runfiles.check_model_fingerprint(run, source, previous)
    torch.manual_seed(s.seed)  # the LoRA initialisation
    run.net = add_lora(net, s.lora_r, s.lora_alpha, s.lora_layers, s.gradient_checkpointing)
    trainable = [p for p in run.net.parameters() if p.requires_grad]
    run.optimizer = torch.optim.AdamW(trainable, lr=s.lr, weight_decay=0.0)
    fp16 = runfiles.net_dtype(run.net) == torch.float16
    run.scaler = torch.amp.GradScaler(run.accelerator.device.type, enabled=fp16)
    run.lean_loss = s.lean_loss and engine.lean_loss_fits(run.net)
    run.steps_per_epoch = math.ceil(s.num_train / s.batch_size)
    run.total_steps = run.steps_per_epoch * s.epochs
    full_optimizer_state = runfiles.restore(run) if resume else None
    run.net, run.optimizer = run.accelerator.prepare(run.net, run.optimizer)
    run.unwrapped = run.accelerator.unwrap_model(run.net)
    if full_optimizer_state is not None:  # an FSDP checkpoint's: into the shards, after prepare
        engine.load_full_optimizer_state(run, full_optimizer_state)
    for group in run.optimizer.param_groups:  # a --resume --lr takes effect from here on
        group["lr"] = s.lr
    return run


def validate_and_log(run):
    """Validate, append the record to metrics.jsonl (and, where it generates, three samples to
    samples.jsonl), and print one line (the main process; under FSDP every process runs the
    forwards, which gather the shards, and the main one writes)."""
    s, step, sharded = run.settings, run.step, engine.is_sharded(run.accelerator)
    run.bar.validating(step)  # names the phase: validating k/N
    if run.is_main() or sharded:
        texts = (run.val_ids, run.prompt_ids, s.gen_tokens, s.batch_size)
        dense = False if sharded else None  # under FSDP the sharded net itself, else engine's
        gen = step % (s.gen_every or s.eval_every) == 0 or step == run.total_steps
        record, samples = validate(run.unwrapped, run.tokenizer, *texts, dense=dense, gen=gen)
    if run.is_main():
        train_loss = run.loss_sum / run.loss_count if run.loss_count else None
        epoch, elapsed = round(step / run.steps_per_epoch, 4), round(run.elapsed(), 2)
        record = dict(step=step, epoch=epoch, elapsed_s=elapsed, train_loss=train_loss, **record)
        lr = run.optimizer.param_groups[0]["lr"]  # what the optimizer used, not the setting
        runfiles.append_jsonl(run.run_dir / "metrics.jsonl", dict(record, lr=lr))
        run.bar.validated(record["score_s"], record["gen_s"])
        for i, sample in enumerate(samples):
            sample = dict(step=step, prompt_id=i, **sample)
            runfiles.append_jsonl(run.run_dir / "samples.jsonl", sample)
        shown = {k: v for k, v in record.items() if isinstance(v, float) and k != "epoch"}
        values = " | ".join(f"{k} {v:.3f}" for k, v in shown.items())
        run.bar.write(f"step {step:4d} | epoch {epoch:5.2f} | {values}")
    run.loss_sum, run.loss_count = 0.0, 0
    run.accelerator.wait_for_everyone()


# -----------------------------------------------------------------------------
# models


def load_tokenizer(model):
    """The tokenizer of `model` (a preset, folder or hub id), with a pad token (EOS if it has
    none: every sequence the kit feeds has the same length, so padding never shows)."""
    from transformers import AutoTokenizer

    runfiles.quiet_libraries()
    source = engine.resolve_model_source(model, PRESETS)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as e:  # a missing or damaged tokenizer file, the network
        raise runfiles.load_error(source, e) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    model=Settings.model, quant="4bit", adapter=None, device=None, dtype="auto", tokenizer=None
):
    """Load (net, tokenizer) for training or evaluation (`tokenizer`: one already loaded).

    model: a preset name, a local Hugging Face folder or a hub id. quant: "4bit" (NF4, double
    quantization), "8bit" or "none". adapter: a LoRA adapter folder to attach (a peft PeftModel,
    frozen). device: "cpu", "cuda" or None (the GPU if there is one). dtype: the compute dtype,
    see compute_dtype. Files that cannot be loaded (a missing or foreign weights file, a pickle,
    an adapter of another model) are a one-line UsageError; nothing in them runs as code."""
    from transformers import AutoModelForCausalLM, ImageGPTConfig, ImageGPTForCausalImageModeling

    runfiles.quiet_libraries()
    # ImageGPT (images.py) predicts the next pixel like a causal LM, but transformers files it
    # apart; without exist_ok, register() silently skips a built-in config
    AutoModelForCausalLM.register(ImageGPTConfig, ImageGPTForCausalImageModeling, exist_ok=True)
    device = runfiles.pick_device(device)
    dtype = runfiles.compute_dtype(device, dtype)
    quantization = engine.quantization_config(quant, dtype)
    tokenizer = tokenizer or load_tokenizer(model)
    source = engine.resolve_model_source(model, PRESETS)
    try:
        net = AutoModelForCausalLM.from_pretrained(
            source, quantization_config=quantization, dtype=dtype, device_map={"": device}
        )
    except Exception as e:  # a damaged or foreign weights file, a refused pickle, the network
        raise runfiles.load_error(source, e) from None
    if quant == "4bit":
        # bitsandbytes on AVX512-BF16 CPUs repacks 4-bit weights at the first eval forward, after
        # which backprop silently stops reaching LoRA; keep the plain kernel (a test checks it).
        import bitsandbytes as bnb

        for module in net.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
    if device.type == "cpu":
        engine.release_file_mapping(net)  # frees ~400 MB the file map would hold
    net.config.pad_token_id = net.generation_config.pad_token_id = tokenizer.pad_token_id
    return (net if adapter is None else runfiles.attach_adapter(net, adapter)), tokenizer


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
    if r == 0:  # full fine-tuning, the paper's own setting: every weight trains as loaded
        return net
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets)
    config.task_type = "CAUSAL_LM"  # peft's causal-LM wrapper: generate() and the loss as usual
    return get_peft_model(net, config)


# -----------------------------------------------------------------------------
# data


def load_texts(data=Settings.data):
    """Read `data` into a list of (name, text): a .txt file, a .jsonl file with a "text" field per
    line, a folder of .txt files, or "hf:<dataset>" (Hugging Face datasets, needs the network).
    A relative path is relative to the kit's folder."""
    if data.startswith("hf:"):  # a Hugging Face dataset (needs the network and `datasets`)
        return runfiles.load_hub_texts(data[3:])
    path = Path(runfiles.absolute_path(data))
    if not path.exists():
        raise UsageError(f"--data {data}: no such file or folder")
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise UsageError(f"--data {data}: the folder holds no .txt files")
    texts = [pair for file in files for pair in runfiles.read_text_file(file) if pair[1].strip()]
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
    if train_fingerprint and runfiles.fingerprint(splits["train"]) != train_fingerprint:
        raise UsageError(
            f"the training split rebuilt from {args['data']} is not what the run trained on "
            "(config.json's train_fingerprint): the data or the tokenizer changed since "
            "training; restore them"
        )
    return splits


def global_batches(num_sequences, batch_size, order_seed, epoch):
    """The index batches of one epoch: a fixed permutation per (order_seed, epoch), so the data
    order is reproducible and a resumed run picks up at exactly the same batch."""
    seed = (order_seed * 100_003 + epoch) % SEED_LIMIT
    order = torch.randperm(num_sequences, generator=torch.Generator().manual_seed(seed))
    return list(order.split(batch_size))


# -----------------------------------------------------------------------------
# the run folder and the command line


def run_folder_of(given):
    """The run folder the given settings name: <out_dir>/<run_name>/ (paths given are relative to
    the working directory; the default out_dir is the kit's results/)."""
    out_dir = runfiles.portable_path(given["out_dir"]) if given.get("out_dir") else Settings.out_dir
    name = given.get("run_name")
    if name is None:
        name = runfiles.default_run_name(given.get("model") or Settings.model, PRESETS)
    return Path(runfiles.absolute_path(out_dir)) / runfiles.check_run_name(name)


def build_parser():
    about = "Hyperfit an LLM (4-bit + LoRA) on a tiny dataset into <out-dir>/<run-name>/."
    presets = "presets: " + "; ".join(f"{k} = {v['source']}" for k, v in PRESETS.items())
    p = runfiles.Parser(description=about, epilog=presets)
    runfiles.add_arguments(p, Settings, defaults_for(Settings.model), PRESETS[Settings.model])
    resume = f"continue the run from its checkpoint (it may change {', '.join(RESUMABLE)})"
    p.add_argument("--resume", action="store_true", help=resume)
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    quick = "check the install in ~2 minutes: a tiny run, evaluated and plotted, its signs checked"
    p.add_argument("--quick", action="store_true", help=quick)
    return p


def main(argv=None):
    """The command line: returns the exit code (0 done, 2 bad input, 1 numbers broke, 130
    interrupted); errors are one line on stderr."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C from here: KeyboardInterrupt
    try:
        args = vars(build_parser().parse_args(argv))
        if args.pop("quick"):  # the whole chain (evaluate.py imports this file, so only here)
            import evaluate

            return evaluate.quick_check(**args)
        run = os.path.relpath(hyperfit(**args))
    except tuple(runfiles.EXIT_CODES) as e:
        print(f"hyperfit.py: {e}", file=sys.stderr)
        return next(code for kind, code in runfiles.EXIT_CODES.items() if isinstance(e, kind))
    except KeyboardInterrupt:
        print("hyperfit.py: aborted; a run keeps its last checkpoint (--resume)", file=sys.stderr)
        return 130
    except RuntimeError as e:  # under accelerate launch: another process died mid-step
        if not (reason := runfiles.lost_process(e)):
            raise
        stopped = f"another process of this run stopped ({reason})"
        print(f"hyperfit.py: {stopped}; launch it again with --resume", file=sys.stderr)
        return 1
    if runfiles.is_main_process():
        print(f"done: {run}  (next: python evaluate.py {run} && python plot.py {run})")
    return 0


if __name__ == "__main__" and "__file__" in globals():  # not when pasted into a notebook cell
    sys.exit(main())
