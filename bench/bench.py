"""
How fast and how small the kit trains (vs the paper's fp32 full fine-tune), generates (with and
without citation blocking) and measures (evaluate.py's metrics); nanoGPT-style, see defaults.

    python bench/bench.py                   # the bundled SmolLM2-135M, 8 x 128 tokens on a CPU
    python bench/bench.py --quick           # a tiny random model, in this process, seconds
    python bench/bench.py --shapes          # GPU: random-init TinyLlama-1.1B, Llama-3.1-8B shapes
    python bench/bench.py --dtype bfloat16  # force the compute dtype (also: HYPERFIT_DTYPE)
"""

import argparse
import contextlib
import ctypes
import gc
import importlib.util
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

# the kit's folder: bench/.. when run as a file, the working directory when pasted in a notebook
ROOT = Path(__file__).resolve().parents[1] if "__file__" in globals() else Path.cwd()
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the kit, and its tests' tiny random models
import runfiles  # noqa: E402

runfiles.quiet_libraries()  # before peft imports bitsandbytes (it warns on AVX512-BF16 CPUs)
from accelerate import Accelerator  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

import engine  # noqa: E402
import evaluate  # noqa: E402
import hyperfit  # noqa: E402
import measures  # noqa: E402
import tiny  # noqa: E402

# -----------------------------------------------------------------------------
# defaults: the paper's batch, prompts, training set (the blocking and overlap index), outputs
PAPER = dict(batch=8, prompt_len=32, index_seqs=2000, index_len=256, eval_seqs=300)
PAPER.update(eval_tokens=256, repeats=2)  # timed generations per mode, plain and blocked in turn
SIZES = dict(  # the paper's 256-token sequences on a GPU, 128 on a CPU (the kit's CPU preset)
    cuda=dict(PAPER, seq_len=256, warmup=2, steps=5, gen_batches=(1, 16, 64), new_tokens=64),
    cpu=dict(PAPER, seq_len=128, warmup=1, steps=5, gen_batches=(1, 16), new_tokens=128, score=32),
    quick=dict(PAPER, seq_len=32, warmup=1, steps=2, gen_batches=(1, 16), new_tokens=8),
)
SIZES["quick"].update(prompt_len=8, index_seqs=64, index_len=64, eval_seqs=30, eval_tokens=64)
PAPER_LR, LORA_LR = 1e-6, 1e-4  # the paper's and the kit's learning rates (no effect on timing)
ALICE = ROOT / "data/fiction/carroll_alice_in_wonderland.txt"  # --quick: its first 40 kB
MIN_START_S = 20  # --time-budget: a measurement with less time left is skipped, and says so
CONFIGS = {  # quant, LoRA, gradient checkpointing, lean loss, what it is; full_fp32: reference
    "full_fp32": ("none", False, False, False, "the paper's loop: fp32 full fine-tune, AdamW"),
    "4bit_lora": ("4bit", True, False, True, "kit default: 4-bit NF4 + LoRA"),
    "4bit_lora_gc": ("4bit", True, True, True, "4-bit + LoRA + gradient checkpointing"),
    "4bit_lora_plain_loss": ("4bit", True, False, False, "4-bit + LoRA, full-logits loss"),
    "8bit_lora": ("8bit", True, False, True, "8-bit + LoRA"),
    "none_lora": ("none", True, False, True, "unquantized + LoRA"),
    # peers: the same QLoRA work as users would write it instead (gc: what their defaults say)
    "trainer_qlora": ("4bit", True, False, False, "peer: transformers Trainer + peft, QLoRA"),
    "sft_qlora": ("4bit", True, True, False, "peer: TRL SFTTrainer + peft, its defaults (gc)"),
}
PEERS = ("trainer_qlora", "sft_qlora")  # timed by time_peer: inside their trainers' own loops
SIZE_KEYS = "hidden_size intermediate_size num_hidden_layers num_attention_heads"
SIZE_KEYS = (SIZE_KEYS + " num_key_value_heads vocab_size").split()
SHAPES = {  # the paper models' config.json sizes with random weights: nothing is downloaded
    "tinyllama-1.1b": dict(zip(SIZE_KEYS, (2048, 5632, 22, 32, 4, 32000)), rms_norm_eps=1e-5),
    "llama3.1-8b": dict(zip(SIZE_KEYS, (4096, 14336, 32, 32, 8, 128256)), rms_norm_eps=1e-5),
    "tiny": dict(tiny.TINY_SHAPE, vocab_size=512),  # the same path on a CPU, in seconds
}
ROPE = dict(rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0)  # Llama 3.1's
ROPE.update(high_freq_factor=4.0, original_max_position_embeddings=8192)
SHAPES["llama3.1-8b"]["rope_parameters"] = ROPE  # transformers 5's LlamaConfig takes this dict
# per shape, most wanted first (a time budget cuts the tail); 8B's fp32 full fine-tune: >130 GB
SHAPE_CONFIGS = dict(tiny=("full_fp32", "4bit_lora", "4bit_lora_gc", *PEERS))  # and TinyLlama's
SHAPE_CONFIGS["llama3.1-8b"] = ("4bit_lora_gc", "4bit_lora", *PEERS, "4bit_lora_plain_loss")
SHAPE_TOKENIZER = (2_000_000, 32_000)  # chars of data/fiction, BPE vocabulary (below every one)
GOALS = dict(  # each phrased against the reference it comes from; the target is read from it
    qlora_memory="4-bit + LoRA + checkpointing peak memory <= 0.5x the paper's fp32 full fine-tune"
    " (QLoRA, Dettmers et al. 2023: ~0.25-0.3x at 7B+; at 135M the frozen weights weigh less)",
    step_speed="train step >= 1.4x the paper's fp32 loop at fp32 compute (LoRA's FLOP bound at "
    "equal precision ~1.5x: 4 vs 6 x params x tokens)",
    blocking="citation blocking <= 1.05x plain greedy (the largest batch measured)",
    metrics="evaluation metrics over the paper's 300 x 256 tokens <= 30 s",
    peer_speed="kit default step >= 1.2x the tokens/s of the faster peer (transformers Trainer or "
    "TRL SFTTrainer + peft, the same 4-bit + LoRA work)",
    peer_memory="kit default peak memory <= 1.0x the lower peer's peak memory",
    peak_8b="8B-shape QLoRA step at 8 x 256 <= 8 GB peak (torchtune publishes 7.4 GiB for "
    "Llama-3.1-8B QLoRA on a 4090)",
)


def release_freed_heap():
    """Hand memory the loader freed back to the OS (glibc's malloc_trim; elsewhere nothing), so
    the peak RSS of the training steps does not start from the loader's leftovers."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def time_train(spec):
    """Load one config as hyperfit.py does (the reference: fp32 whatever --dtype says, as the
    paper's loop), peak memory from after loading, and time its steps on one fixed batch."""
    if spec["config"] in PEERS:
        return time_peer(spec)
    quant, lora, gc, lean, _ = CONFIGS[spec["config"]]
    device, ids = torch.device(spec["device"]), torch.load(spec["work"])["train_batch"]
    dtype = spec["dtype"] if lora else "float32"
    net, _ = hyperfit.load_model(spec["model"], quant, device=device, dtype=dtype)
    torch.manual_seed(0)  # LoRA's A init as the peers' (their trainers seed 0 before theirs)
    net = hyperfit.add_lora(net, gradient_checkpointing=gc) if lora else net
    trainable = [p for p in net.train().parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LORA_LR if lora else PAPER_LR, weight_decay=0.0)
    compute, ids, times, losses = runfiles.net_dtype(net), ids.to(device), [], []
    scaler = torch.amp.GradScaler(device.type, enabled=compute == torch.float16)
    accelerator = Accelerator(cpu=device.type == "cpu")
    reset_peak(device)
    for _ in range(spec["warmup"] + spec["steps"]):  # warm-up: AdamW's state, caches
        start = time.perf_counter()
        # the kit's own step, exactly as hyperfit.py's loop calls it; without the lean loss it
        # takes the full logits, as the official code's loss does
        step = SimpleNamespace(
            net=net,
            optimizer=optimizer,
            scaler=scaler,
            lean_loss=lean,
            accelerator=accelerator,
            micro_batch_size=len(ids),
        )
        losses.append(hyperfit.train_step(step, ids))
        times.append(time.perf_counter() - start)
    row = dict(quant=quant, lora=lora, gradient_checkpointing=gc, lean_loss=lean)
    return dict(row, **step_row(spec, ids, trainable, compute, times, losses))


class StepTimer:
    """A transformers TrainerCallback (made one in time_peer, where transformers' Trainer is
    imported): each optimizer step's seconds, from on_step_begin (the batch already fetched, as
    the kit's step gets it) to on_step_end, and each step's loss from the trainer's log."""

    def __init__(self, cuda):
        self.cuda, self.times, self.losses = cuda, [], []

    def sync(self):
        if self.cuda:  # the GPU's queued kernels are part of the step
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self.sync()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.sync()
        self.times.append(time.perf_counter() - self.start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:  # logging_steps=1: this step's mean loss
            self.losses.append(float(logs["loss"]))


def peer_trainer(spec, net, tokenizer, ids, out_dir):
    """A Trainer (trainer_qlora) or an SFTTrainer (sft_qlora) set up as a user would for the
    kit's job: same batch, steps and lr, constant schedule, no warm-up, AdamW without weight
    decay; everything else their defaults (SFTTrainer's: gradient checkpointing on, the LoRA
    weights of a quantized model cast to bf16, entropy and accuracy logged every step)."""
    dtype = spec["dtype"]
    common = dict(output_dir=out_dir, per_device_train_batch_size=len(ids), learning_rate=LORA_LR)
    common.update(max_steps=spec["warmup"] + spec["steps"], lr_scheduler_type="constant")
    common.update(warmup_steps=0, weight_decay=0.0, logging_steps=1, save_strategy="no", seed=0)
    common.update(report_to="none", disable_tqdm=True, use_cpu=spec["device"] == "cpu")
    common.update(bf16=dtype == "bfloat16", fp16=dtype == "float16")  # the kit's precision
    lora = dict(r=hyperfit.Settings.lora_r, lora_alpha=hyperfit.Settings.lora_alpha)
    lora = LoraConfig(**lora, lora_dropout=0.0, target_modules=list(hyperfit.LORA_TARGETS))
    lora.task_type = "CAUSAL_LM"
    if spec["config"] == "trainer_qlora":
        from transformers import Trainer, TrainingArguments, default_data_collator

        torch.manual_seed(0)  # LoRA's A init, as the kit's row and SFTTrainer's seed=0
        rows = [dict(input_ids=row, labels=row) for row in ids]  # the model shifts the labels
        args = TrainingArguments(**common)
        net = get_peft_model(net, lora)
        return Trainer(net, args, train_dataset=rows, data_collator=default_data_collator)
    import datasets
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()  # its map() bars: our own lines say what is happening
    Dataset = datasets.Dataset

    rows = Dataset.from_dict(dict(input_ids=ids.tolist()))  # tokenized: SFTTrainer keeps it
    args = SFTConfig(**common, packing=False)
    return SFTTrainer(net, args, train_dataset=rows, processing_class=tokenizer, peft_config=lora)


def time_peer(spec):
    """One peer row: the kit's model and batch trained by transformers' Trainer or TRL's
    SFTTrainer, each step timed inside its own loop by a TrainerCallback; the row as the kit's."""
    if spec["config"] == "sft_qlora" and importlib.util.find_spec("trl") is None:
        return dict(skipped="trl is not installed: pip install -r bench/requirements.txt")
    from transformers import PrinterCallback, TrainerCallback

    device, ids = torch.device(spec["device"]), torch.load(spec["work"])["train_batch"]
    net, tokenizer = hyperfit.load_model(spec["model"], "4bit", device=device, dtype=spec["dtype"])
    callback = type("Timer", (StepTimer, TrainerCallback), {})(device.type == "cuda")
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as out_dir:
        trainer = peer_trainer(spec, net, tokenizer, ids, out_dir)
        trainer.add_callback(callback)
        trainer.remove_callback(PrinterCallback)  # its per-step log lines: our row has them
        reset_peak(device)
        trainer.train()
    net = trainer.model
    trainable = [p for p in net.parameters() if p.requires_grad]
    row = dict(quant="4bit", lora=True, lean_loss=False, optimizer=trainer.args.optim)
    row.update(gradient_checkpointing=bool(trainer.args.gradient_checkpointing))
    row.update(max_grad_norm=trainer.args.max_grad_norm, adapter_dtype=str(trainable[0].dtype))
    compute = runfiles.net_dtype(net)
    return dict(row, **step_row(spec, ids, trainable, compute, callback.times, callback.losses))


def reset_peak(device):
    """Start the peak memory count here: after loading, the peak of the steps alone."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:  # the loader's freed heap back to the OS, then writing 5 to clear_refs resets VmHWM,
        # the peak RSS, to the current RSS (Linux): the peak of the steps, as on a GPU
        release_freed_heap()
        Path("/proc/self/clear_refs").write_text("5")


def step_row(spec, ids, trainable, compute, times, losses):
    """The timing, memory and loss fields every training row shares (the kit's and the peers')."""
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    vmhwm = re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())  # KiB
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else int(vmhwm[1]) / 1024
    row = dict(compute_dtype=runfiles.dtype_name(compute), batch=len(ids), seq_len=ids.shape[1])
    # the first loss is before any update (LoRA B starts at 0): equal for the same work
    row.update(first_loss=losses[0], last_loss=losses[-1], losses=losses)
    row.update(trainable_params=sum(p.numel() for p in trainable))
    times, seconds = times[spec["warmup"] :], statistics.median(times[spec["warmup"] :])
    row.update(warmup=spec["warmup"], steps=spec["steps"], s_per_step_all=times, peak_mem_mb=peak)
    row.update(s_per_step=seconds, tokens_per_s=ids.numel() / seconds)
    return dict(row, peak_memory="torch.cuda.max_memory_allocated" if cuda else "VmHWM: peak RSS")


def time_generation(spec):
    """Greedy tokens/s per batch size, plain and blocked in turn (drift hits both alike), with
    evaluate.py's net (engine.scoring_net: on a CPU a dense copy)."""
    work = torch.load(spec["work"])
    net, _ = hyperfit.load_model(spec["model"], "4bit", device=spec["device"], dtype=spec["dtype"])
    net = engine.scoring_net(hyperfit.add_lora(net))
    blocker, index_s = timed(evaluate.NGramBlocker, work["index"], evaluate.Options.block_ngrams)
    rows, new = [], spec["new_tokens"]
    for batch in spec["gen_batches"]:
        prompts, times = work["prompts"][:batch], dict(plain=[], blocked=[])
        for processors in ((), [blocker]):  # warm-up: kernels, allocator, the cache's growth
            engine.generate(net, prompts, 4, batch_size=batch, logits_processor=processors)
        for kind, processors in (("plain", ()), ("blocked", [blocker])) * spec["repeats"]:
            start = time.perf_counter()
            engine.generate(net, prompts, new, batch_size=batch, logits_processor=processors)
            times[kind].append(time.perf_counter() - start)  # returns CPU tensors: synced
        plain, blocked = statistics.median(times["plain"]), statistics.median(times["blocked"])
        row = dict(batch=batch, prompt_len=prompts.shape[1], new_tokens=new, plain_s=plain)
        row.update(blocked_s=blocked, blocking_overhead=blocked / plain, index_build_s=index_s)
        row.update(tokens_per_s=batch * new / plain, blocked_tokens_per_s=batch * new / blocked)
        row.update(compute_dtype=runfiles.dtype_name(runfiles.net_dtype(net)))
        rows.append(dict(row, generator=f"{type(net).__name__} on {spec['device']}"))
    return dict(rows=rows)


def timed(function, *args):
    """(function(*args), the seconds it took)."""
    start = time.perf_counter()
    return function(*args), time.perf_counter() - start


def time_metrics(spec):
    """evaluate.py's metrics of one decoding mode, each timed (score_continuations, a model pass,
    on a CPU on a sample, scaled: its batches cost alike)."""
    work, t = torch.load(spec["work"]), {}
    tokenizer, rows = hyperfit.load_tokenizer(spec["model"]), work["continuations"].tolist()
    texts = [tokenizer.decode(ids) for ids in rows]
    index, t["training_index_s"] = timed(measures.TrainingIndex, work["index"])
    per_row = [index] * len(rows)  # map(f, rows, per_row): f(row, index) for every row
    t["longest_shared_span_s"] = timed(list, map(measures.longest_shared_span, rows, per_row))[1]
    t["dataset_bleu4_s"] = timed(list, map(measures.dataset_bleu4, rows, per_row))[1]
    t["self_bleu4_s"] = timed(measures.self_bleu4, rows)[1]
    t["self_bleu4_texygen_s"] = timed(measures.self_bleu4_texygen, texts)[1]
    t["simctg_repetition_s"] = timed(measures.simctg_repetition, texts)[1]
    t["unknown_word_share_s"] = timed(list, map(measures.unknown_word_share, texts))[1]
    row = dict(t, metrics_s=sum(t.values()), continuations=len(rows), tokens=len(rows[0]))
    net, _ = hyperfit.load_model(spec["model"], "4bit", device=spec["device"], dtype=spec["dtype"])
    net = engine.scoring_net(net)  # the original model, as evaluate.py scores with it
    n = min(spec.get("score", len(rows)), len(rows))  # a CPU scores 32 and scales
    sample = work["prompts"][:n], work["continuations"][:n]
    score_s = timed(evaluate.score_continuations, net, *sample)[1] * len(rows) / n
    row.update(score_continuations_s=score_s, total_s=row["metrics_s"] + score_s)
    row.update(score_measured_on=n, compute_dtype=runfiles.dtype_name(runfiles.net_dtype(net)))
    return row  # one row; time_generation returns dict(rows=[...]), one per batch size


def build(spec):
    """A random-init paper shape in bf16, built on the device (8B never in fp32); not
    tiny.random_model, which sets the vocabulary to its tokenizer's (22k here, not 128k)."""
    tokenizer = hyperfit.load_tokenizer(spec["tokenizer"])
    ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlamaConfig(**SHAPES[spec["shape"]], **ids, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(spec["device"]):  # random init on a GPU: seconds, even at 8B
        net = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    net.save_pretrained(spec["model"])
    tokenizer.save_pretrained(spec["model"])
    return dict(params=sum(p.numel() for p in net.parameters()), shape=SHAPES[spec["shape"]])


MEASURE = dict(train=time_train, generation=time_generation, evaluation=time_metrics, build=build)
RESULT_TAG = "@bench-result "  # a child's last line of stdout: this tag, then its JSON


def measure(spec, isolate=False, deadline=None):
    """One measurement (isolate: in a fresh process, a clean peak), or skipped if too late."""
    left = None if deadline is None else deadline - time.time()
    if left is not None and left < MIN_START_S:
        return dict(skipped=f"time budget: {max(left, 0):.0f} s left")
    if not isolate:
        torch.set_num_threads(spec["threads"])  # a tiny model runs fastest on one
        try:
            return MEASURE[spec["kind"]](spec)
        except Exception as e:  # an OOM, a missing backend: recorded, and the bench goes on
            return dict(error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}")
    command = [sys.executable, str(ROOT / "bench" / "bench.py"), "--_child", json.dumps(spec)]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=left)
    except subprocess.TimeoutExpired:
        return dict(error=f"stopped after {left:.0f} s: the time budget")
    tagged = [line for line in done.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if tagged:
        return json.loads(tagged[-1][len(RESULT_TAG) :])
    tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
    return dict(error=f"child exited {done.returncode}: {tail[0][:300]}")


def prepare_inputs(tokenizer, texts, sizes, path):
    """The inputs all measurements share, from hyperfit.make_splits: the training batch, the
    paper's 2,000 x 256 training set, held-out prompts; continuations to measure: random ids (the
    text does not change the metrics' speed), a quarter from training (the slow overlap case)."""
    splits = hyperfit.make_splits(tokenizer, texts, sizes["index_len"], sizes["index_seqs"], 0)
    train, n, g = splits["train"], sizes["eval_seqs"], torch.Generator().manual_seed(0)
    continuations = torch.randint(len(tokenizer), (n, sizes["eval_tokens"]), generator=g)
    continuations[: n // 4] = train[: n // 4, : sizes["eval_tokens"]]
    work = dict(index=train, continuations=continuations)
    work.update(train_batch=train[: sizes["batch"], : sizes["seq_len"]])
    work.update(prompts=splits["heldout"][: max(n, *sizes["gen_batches"]), : sizes["prompt_len"]])
    torch.save(work, path)


def table(rows, keys):
    """A Markdown table of `keys` (space-separated) of each row; an error or a skip says so."""
    cell, keys = {True: "met", False: "**not met**", None: "–"}, keys.split()
    lines = ["| " + " | ".join(keys) + " | note |", "|---" * (len(keys) + 1) + "|"]
    for r in rows:
        values = [r.get(k) for k in keys] + [r.get("error") or r.get("skipped") or ""]
        values = [f"{v:.{3 if v < 100 else 0}f}" if isinstance(v, float) else v for v in values]
        values = [cell[v] if v is None or isinstance(v, bool) else v for v in values]
        lines.append("| " + " | ".join(map(str, values)) + " |")
    return lines + [""]


def peer_ratios(kit, peers, model):
    """The kit's default row against the peers that ran: each peer row gets the kit's speed-up
    over it (tokens/s, >1: the kit is faster) and the kit's memory over its (<1: smaller); the
    goals take the faster peer's speed and the lower peer's memory."""
    peers = [r for r in peers if "tokens_per_s" in r]
    if "tokens_per_s" not in kit or not peers:
        return []
    for r in peers:
        r["kit_speed_vs_this"] = kit["tokens_per_s"] / r["tokens_per_s"]
        r["kit_mem_vs_this"] = kit["peak_mem_mb"] / r["peak_mem_mb"]
        r["loss_vs_kit"] = r["last_loss"] / kit["last_loss"]
    speed = kit["tokens_per_s"] / max(r["tokens_per_s"] for r in peers)
    memory = kit["peak_mem_mb"] / min(r["peak_mem_mb"] for r in peers)
    return [("peer_speed", model, speed), ("peer_memory", model, memory)]


def write_results(results, out_dir, started):
    """Ratios to the reference (full_fp32, same model and run: its s/step over the row's, above
    1 = faster; the row's peak over its, below 1 = smaller), goals, <machine>.json and .md."""
    rows = results["train"]
    refs = {r["model"]: r for r in rows if r["config"] == "full_fp32" and "s_per_step" in r}
    for r in rows:
        ref = refs.get(r["model"]) if "s_per_step" in r else None
        r["speed_vs_reference"] = ref["s_per_step"] / r["s_per_step"] if ref else None
        r["mem_vs_reference"] = r["peak_mem_mb"] / ref["peak_mem_mb"] if ref else None
    found, e = [], next(iter(results["evaluation"]), {})  # the goals this run measured
    for model in [m["name"] for m in results["models"]]:
        by_config = {r["config"]: r for r in rows if r["model"] == model}
        kit, gc = by_config.get("4bit_lora", {}), by_config.get("4bit_lora_gc", {})
        found.append(("qlora_memory", model, gc.get("mem_vs_reference")))
        if kit.get("compute_dtype") == "float32":  # the FLOP bound holds at equal precision
            found.append(("step_speed", model, kit.get("speed_vs_reference")))
        gen = [r for r in results["generation"] if r["model"] == model and "batch" in r]
        found.append(("blocking", model, gen[-1]["blocking_overhead"] if gen else None))
        found += peer_ratios(kit, [by_config[c] for c in PEERS if c in by_config], model)
        if model == "llama3.1-8b" and results["device_type"] == "cuda":
            found.append(("peak_8b", model, gc.get("peak_mem_mb", 0) * 2**20 / 1e9 or None))
    found += [("metrics", e.get("model"), e.get("metrics_s"))] if e else []
    for i, (name, model, value) in enumerate(found):
        op, t = re.search(r"([<>]=) ([\d.]+)", GOALS[name]).groups()  # the target, from its words
        met = None if value is None else value <= float(t) if op == "<=" else value >= float(t)
        met = None if results["quick"] else met  # a tiny random model is not the goals' setting
        found[i] = dict(goal=GOALS[name], model=model, measured=value, met=met)
    results.update(goals=found, seconds_total=round(time.time() - started, 1))
    env, z = results["environment"], results["sizes"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    lines = [f"# bench.py on `{results['machine']}`", "", f"    {results['command']}", ""]
    lines += [f"{results['date']}; git {env['git_commit']}; {versions}; CPU {env['cpu']}, flags"]
    lines += [f"{' '.join(env['cpu_flags'])}; {env['torch_threads']} threads; GPU {env['gpu']}\n"]
    peak = "torch.cuda.max_memory_allocated" if env["gpu"] else "VmHWM: peak RSS"
    lines += [f"## Training step: {z['batch']} x {z['seq_len']} tokens, median of {z['steps']} "]
    lines[-1] += f"steps after {z['warmup']} warm-up; peak memory: {peak} during the steps, "
    lines[-1] += "reset after loading. Ratios: to full_fp32 of this model and run (>1: faster)\n"
    keys = "model config compute_dtype s_per_step tokens_per_s peak_mem_mb speed_vs_reference"
    lines += table(rows, keys + " mem_vs_reference label")
    peers = [r for r in rows if r["config"] in PEERS or r["config"] == "4bit_lora"]
    lines += ["## Against the peers: the same 4-bit + LoRA work in transformers' Trainer and "]
    lines[-1] += "TRL's SFTTrainer (kit_*_vs_this: the kit's default over the peer's)\n"
    keys = "model config s_per_step tokens_per_s peak_mem_mb first_loss last_loss"
    lines += table(peers, keys + " kit_speed_vs_this kit_mem_vs_this loss_vs_kit label")
    n = evaluate.Options.block_ngrams
    lines += [f"## Generation: greedy, and with citation blocking ({n}-grams)", ""]
    keys = "model generator compute_dtype batch new_tokens tokens_per_s blocked_tokens_per_s"
    lines += table(results["generation"], keys + " blocking_overhead")
    lines += [f"## Evaluation metrics: {e.get('continuations')} x {e.get('tokens')} tokens", ""]
    lines += table([e], " ".join(k for k in e if k.endswith("_s")))
    lines += ["## Goals", ""] + table(results["goals"], "goal model measured met")
    out_dir.mkdir(parents=True, exist_ok=True)
    runfiles.write_atomic(out_dir / f"{results['machine']}.md", "\n".join(lines))
    runfiles.write_atomic(out_dir / f"{results['machine']}.json", json.dumps(results, indent=1))


def usage_error(message):
    """argparse's errors as the kit's: one line on stderr, exit 2 (main prints it)."""
    raise hyperfit.UsageError(message)


def settings(argv):
    """The command line, checked: bad input stops here, before anything is loaded or written."""
    p, tasks = argparse.ArgumentParser(prog="bench.py"), [*CONFIGS, "generation", "evaluation"]
    p.error = usage_error
    p.add_argument("--model", default="smollm2-135m", help="preset, folder or hub id")
    p.add_argument("--quick", action="store_true", help="tiny random model and sizes, in-process")
    p.add_argument("--shapes", nargs="*", choices=SHAPES, help="(none: the paper's two; tiny: CPU)")
    p.add_argument("--dtype", default="auto", help="auto (HYPERFIT_DTYPE, else bf16 where native)")
    p.add_argument("--only", nargs="+", choices=tasks, help="measure only these")
    p.add_argument("--time-budget", type=float, metavar="S", help="skip what would start later")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, help="(not with --quick)")
    p.add_argument("--out-dir", default=str(ROOT / "results/bench"), help="(results/bench)")
    args = p.parse_args(argv)
    device = runfiles.pick_device()  # the GPU if there is one (CUDA_VISIBLE_DEVICES= : the CPU)
    shapes = ["tinyllama-1.1b", "llama3.1-8b"] if args.shapes == [] else args.shapes or []
    if device.type != "cuda" and set(shapes) - {"tiny"}:
        raise hyperfit.UsageError(f"--shapes {' '.join(shapes)} needs a GPU (tiny: any CPU)")
    if args.time_budget is not None and not args.time_budget > 0:
        raise hyperfit.UsageError(f"--time-budget {args.time_budget}: give seconds, more than 0")
    s = dict(vars(args), device=device, dtype=runfiles.compute_dtype(device, args.dtype))
    s.update(shapes=shapes, sizes=SIZES["quick" if args.quick else device.type])
    s.update(isolate=not args.quick if args.isolate is None else args.isolate)
    s.update(threads=1 if args.quick else torch.get_num_threads())  # tiny models: 1 is fastest
    return dict(s, deadline=time.time() + args.time_budget if args.time_budget else None)


def bench(argv):
    """Measure every model and task, writing the results after each (a run cut short keeps them)."""
    started, s = time.time(), settings(argv)
    runfiles.quiet_libraries()  # no progress bars: our own lines say what is happening
    env = dict(runfiles.environment(), torch_threads=s["threads"])
    # the file stem: device, cores, the CPU kind, compute dtype: the two kinds of one CPU model
    # (with and without AVX512-BF16) time differently even at fp32, so each gets its own file
    short = {name: alias for alias, name in runfiles.DTYPE_ALIASES.items()}  # float32: fp32
    cpu = re.sub(r"@.*|\((r|tm)\)|\bcpu\b|processor", "", env["cpu"], flags=re.IGNORECASE)
    name = f"cuda-{env['gpu']}" if env["gpu"] else f"cpu-{cpu}-{len(os.sched_getaffinity(0))}cores"
    name += "-avx512bf16" * (not env["gpu"] and "avx512_bf16" in runfiles.cpu_flags())
    name += f"-{short[runfiles.dtype_name(s['dtype'])]}" + "-shapes" * bool(s["shapes"])
    results = dict(machine=re.sub(r"[^a-z0-9]+", "-", name.lower() + "-quick" * s["quick"]))
    results.update(device_type=s["device"].type, compute_dtype=runfiles.dtype_name(s["dtype"]))
    results.update(command=shlex.join(["python", "bench/bench.py", *argv]), environment=env)
    results.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), quick=s["quick"])
    results.update(isolation="a process per measurement" if s["isolate"] else "in-process")
    results.update(sizes=s["sizes"], models=[], train=[], generation=[], evaluation=[], goals=[])
    alice = [("alice", ALICE.read_text(encoding="utf-8")[:40_000])]
    texts = alice if s["quick"] else hyperfit.load_texts("data/fiction")
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:  # $TMPDIR: 16 GB free for 8B
        base = dict(device=str(s["device"]), dtype=runfiles.dtype_name(s["dtype"]), **s["sizes"])
        base.update(threads=s["threads"], model=s["model"])
        todo = [(s["model"], base)]  # (name, spec): --model; --quick's tiny random model; shapes
        if s["quick"]:
            tiny_model = tiny.random_model(Path(tmp) / "tiny", texts[0][1])
            todo = [("tiny-random", dict(base, model=tiny_model))]
        if s["shapes"]:  # one BPE tokenizer (tiny.random_model's) for all: ids < every vocab
            vocab = min([SHAPE_TOKENIZER[1]] + [SHAPES[n]["vocab_size"] for n in s["shapes"]])
            text = "".join(text for _, text in texts)[: SHAPE_TOKENIZER[0]]
            base.update(kind="build", tokenizer=tiny.random_model(Path(tmp) / "bpe", text, vocab))
            todo = [(n, dict(base, shape=n, model=str(Path(tmp) / n))) for n in s["shapes"]]
        for i, (model, spec) in enumerate(todo):
            results["models"].append(dict(name=model))
            if spec.get("kind") == "build":  # in a child too: the GPU memory is freed with it
                results["models"][-1].update(measure(spec, s["isolate"], s["deadline"]))
                if "params" not in results["models"][-1]:
                    continue
            spec = dict(spec, name=model, work=str(Path(tmp) / f"{model}.pt"))
            prepare_inputs(hyperfit.load_tokenizer(spec["model"]), texts, s["sizes"], spec["work"])
            configs = SHAPE_CONFIGS.get(model, SHAPE_CONFIGS["tiny"]) if s["shapes"] else CONFIGS
            tasks = s["only"] or [*configs, "generation", "evaluation"]
            for task in [t for t in tasks if t != "evaluation" or i == 0]:  # model-free metrics
                start, kind = time.time(), "train" if task in CONFIGS else task
                result = measure(dict(spec, kind=kind, config=task), s["isolate"], s["deadline"])
                dtype = "float32" if task == "full_fp32" else spec["dtype"]  # unless measured
                tags = dict(model=model, config=task, label=CONFIGS.get(task, [None])[-1])
                tags.update(compute_dtype=dtype, cpu_flags=runfiles.cpu_flags())
                results[kind] += [{**tags, **row} for row in result.get("rows", [result])]
                said = result.get("error") or result.get("skipped") or "done"
                print(f"{model} {task}: {said} ({time.time() - start:.0f} s)", flush=True)
                write_results(results, Path(s["out_dir"]), started)
            if s["shapes"]:  # 16 GB at 8B: free the disk for the next shape
                shutil.rmtree(spec["model"], ignore_errors=True)
    write_results(results, Path(s["out_dir"]), started)
    return results


def main(argv=None):
    """The command line; returns the exit code: 0 done, 2 bad input (one line on stderr)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--_child"]:  # a child process: one measurement, its JSON the last line
        print(RESULT_TAG + json.dumps(measure(json.loads(argv[1]))), flush=True)
        return 0
    threads = torch.get_num_threads()
    try:
        results = bench(argv)
    except hyperfit.UsageError as e:
        print(f"bench.py: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)  # bench sets its own; a caller (a test) gets its back
    print(f"wrote {results['machine']}.json and .md in {results['seconds_total']:.0f} s")
    return 0


if __name__ == "__main__" and "__file__" in globals():  # not when pasted into a notebook
    sys.exit(main())
