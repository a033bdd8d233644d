"""
How fast and how small the kit runs, measured on whatever device this is (in the spirit of
nanoGPT's bench.py: one flat script, the defaults are the constants below).

    python bench.py              # the bundled SmolLM2-135M: batch 8 x 128 tokens on CPU, 8 x 256 on a GPU
    python bench.py --quick      # smoke test on a tiny random model (well under a minute)
    python bench.py --shapes     # GPU, no download: random-init TinyLlama-1.1B and Llama-3.1-8B shapes
    ./gpu_check.sh               # the GPU check on a fresh CUDA machine (calls bench.py --shapes)

It measures
  1. a training step (same model, same batch, after warm-up, median of several steps): seconds/step,
     tokens/s and peak memory of the paper's loop (fp32 full fine-tune, AdamW: the reference) and of the
     kit's ways to train (4-bit NF4 + LoRA, + gradient checkpointing, 8-bit + LoRA, unquantized + LoRA),
     each as a ratio to the reference measured in the same run;
  2. greedy generation tokens/s at batch 1 and 16, with and without citation blocking over a
     2000 x 256-token training index (evaluate.NGramBlocker);
  3. the time evaluate.py's metrics take over 300 continuations of 256 tokens;
and writes results/bench/<device>.json and <device>.md (--shapes and --quick add -shapes / -quick).

Each measurement that loads a model runs in its own subprocess (this script re-invoked with --_child),
so a configuration's peak memory is its own: the peak RSS of the training steps on CPU (VmHWM, reset
after loading), torch.cuda.max_memory_allocated on a GPU. --quick runs them in this process instead.
"""
import argparse
import datetime
import gc
import inspect
import itertools
import json
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import hyperfit
from hyperfit import UsageError

HERE = Path(__file__).resolve().parent

# -----------------------------------------------------------------------------
# defaults (per device type where CPU and GPU differ)

BATCH_SIZE = 8                          # sequences per training step (the paper's batch)
SEQ_LEN = dict(cuda=256, cpu=128)       # tokens per sequence: the paper's 256; 128 on CPU, as the issue asks
WARMUP_STEPS = dict(cuda=2, cpu=1)      # the first step allocates AdamW state and warms caches: not timed
MEASURE_STEPS = dict(cuda=5, cpu=5)     # timed steps; we report the median
REFERENCE_LR, LORA_LR = 1e-6, 1e-4      # the paper's full fine-tune lr, the kit's LoRA lr (timing ignores them)
GEN_BATCH_SIZES = (1, 16)
GEN_TOKENS = dict(cuda=64, cpu=128)     # new tokens per generation timing
GEN_REPEATS = 2                         # plain and blocked runs interleave, so drift hits both alike
PROMPT_LEN = 32                         # the paper's prompts
INDEX_SEQS, INDEX_LEN = 2000, 256       # the citation-blocking / memorisation index: the paper's training set
BLOCK_NGRAMS = 5                        # the paper's citation blocking n
EVAL_CONTINUATIONS, EVAL_TOKENS = 300, 256
PPL_SAMPLE = dict(cuda=None, cpu=32)    # ppl_original is a forward pass of the model: on CPU, time it on 32
                                        # continuations (evaluate.py's CPU default) and scale to all of them
# --quick: the tiny random Llama of tests/conftest.py and small everything
QUICK = dict(seq_len=32, warmup=1, steps=2, gen_tokens=8, gen_repeats=1, prompt_len=8, index_seqs=64,
             index_len=64, eval_continuations=30, eval_tokens=64)
QUICK_TEXT_CHARS = 40_000               # of Alice in Wonderland, as the test fixtures use

# training configurations, in the order they run; the first is the reference the others are divided by
CONFIGS = {
    "full_fp32": dict(quant="none", lora=False, gc=False,
                      label="paper's loop: fp32 full fine-tune, AdamW (reference)"),
    "4bit_lora": dict(quant="4bit", lora=True, gc=False, label="kit default: 4-bit NF4 + LoRA"),
    "4bit_lora_gc": dict(quant="4bit", lora=True, gc=True, label="4-bit NF4 + LoRA + gradient checkpointing"),
    "8bit_lora": dict(quant="8bit", lora=True, gc=False, label="8-bit + LoRA"),
    "none_lora": dict(quant="none", lora=True, gc=False, label="unquantized + LoRA"),
    # opt-in: the kit default with bf16 compute forced, for CPUs where compute_dtype_for picks fp32
    # (there a bf16 matmul is ~16x slower, so this row alone can take many minutes)
    "4bit_lora_bf16": dict(quant="4bit", lora=True, gc=False, force_bf16=True,
                           label="4-bit NF4 + LoRA, bf16 compute forced"),
}
DEFAULT_CONFIGS = ("full_fp32", "4bit_lora", "4bit_lora_gc", "8bit_lora", "none_lora")
SHAPE_CONFIGS = ("4bit_lora", "4bit_lora_gc", "8bit_lora", "none_lora", "full_fp32")  # goals first: a time
                                                                                       # budget cuts the tail
# exact shapes of the paper's models (their config.json), built with random weights: no download
SHAPES = {
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
                           rope=dict(rope_type="default", rope_theta=10000.0)),
    "llama3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
                        rope=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                  high_freq_factor=4.0, original_max_position_embeddings=8192)),
    # a 2-layer stand-in that runs the same path anywhere in seconds (tests, and checking the script on CPU)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, rms_norm_eps=1e-5,
                 rope=dict(rope_type="default", rope_theta=10000.0)),
}
GPU_SHAPES = ("tinyllama-1.1b", "llama3.1-8b")
SHAPE_TOKENIZER_VOCAB = 32000           # byte-level BPE trained on data/ (TinyLlama's vocabulary size)
SHAPE_TOKENIZER_CHARS = 2_000_000       # of text to train it on (~3 s)

# the goals
GOAL_KIT_SPEEDUP = 1.8                  # CPU, bundled model: kit step >= 1.8x faster than the reference
GOAL_GC_MEMORY = 0.5                    # ... and with gradient checkpointing, peak memory <= 0.5x the reference
GOAL_BLOCKING_OVERHEAD = 1.05           # citation blocking at batch 16
GOAL_METRICS_S = 30.0                   # evaluate.py's metrics over 300 x 256 tokens, on CPU
GOAL_PEAK_GB = {"llama3.1-8b": 12.0, "tinyllama-1.1b": 4.0}  # QLoRA step at 8 x 256 on a GPU

PEAK_MEMORY = dict(  # what peak_mem_mb measures
    cuda="torch.cuda.max_memory_allocated during the training steps (warm-up included; reset after loading)",
    cpu="peak RSS (VmHWM) of the process during the training steps (warm-up included; reset after loading)")
MIN_CHILD_S = 20                        # with --time-budget: don't start a measurement with less left
RESULT_TAG = "@bench-result "           # a child's last stdout line: this tag, then its JSON


# -----------------------------------------------------------------------------
# memory and device helpers


def reset_peak_memory(device):
    """Start a fresh peak: on CUDA the allocator's statistics; on Linux, writing 5 to
    /proc/self/clear_refs resets VmHWM (peak RSS) to the current RSS. Returns what the peak measures."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return PEAK_MEMORY["cuda"]
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return PEAK_MEMORY["cpu"]
    except OSError:
        return "max RSS of the whole process, loading included (ru_maxrss: could not reset it)"


def _proc_status_mb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise OSError(field)


def peak_memory_mb(device):
    """Peak memory since the last reset_peak_memory, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        return _proc_status_mb("VmHWM")
    except OSError:  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def current_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        return _proc_status_mb("VmRSS")
    except OSError:
        return None


def slug(text):
    text = re.sub(r"\((r|tm)\)|\bcpu\b|\bprocessor\b|@.*", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def device_name(device):
    """cuda-<GPU name> or cpu-<CPU model>-<n>cores, for the results file name."""
    if device.type == "cuda":
        return "cuda-" + slug(torch.cuda.get_device_name(device))
    model = "unknown"
    try:
        model = next(line.split(":", 1)[1] for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        model = platform.processor() or platform.machine() or model
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu-{slug(model)}-{cores}cores"


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


# -----------------------------------------------------------------------------
# the measurements; each runs in a child process (or in this one with --quick) and returns a dict


def train_step(net, optimizer, ids):
    """One optimizer step exactly as hyperfit.py takes it: token-mean cross-entropy in fp32, AdamW."""
    logits = net(input_ids=ids).logits[:, :-1].float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()  # .item() waits for the device, so wall time covers the whole step


def bench_train(spec):
    """Load the model as `spec["config"]` says, then time warm-up + measured steps on one fixed batch."""
    config, device = CONFIGS[spec["config"]], torch.device(spec["device"])
    ids = torch.load(spec["work"])["train_batch"].to(device)
    # forcing bf16 on a CPU that lacks it: load_model asks compute_dtype_for, so we answer for it
    kit_dtype_for = hyperfit.compute_dtype_for
    if config.get("force_bf16"):
        hyperfit.compute_dtype_for = lambda device: torch.bfloat16
    try:
        torch.manual_seed(0)
        net, _ = hyperfit.load_model(spec["model"], config["quant"], device=device)
        if config["lora"]:
            net = hyperfit.add_lora(net, gradient_checkpointing=config["gc"])
            compute_dtype, lr = hyperfit.compute_dtype_for(device), LORA_LR
        else:
            net = net.float()  # the paper's loop: every weight in fp32, every weight trained
            compute_dtype, lr = torch.float32, REFERENCE_LR
    finally:
        hyperfit.compute_dtype_for = kit_dtype_for
    net.train()
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    row = dict(model=spec["model_name"], config=spec["config"], label=config["label"], quant=config["quant"],
               lora=config["lora"], gradient_checkpointing=config["gc"], compute_dtype=dtype_name(compute_dtype),
               batch=ids.shape[0], seq_len=ids.shape[1], warmup_steps=spec["warmup"], measured_steps=spec["steps"],
               trainable_params=sum(p.numel() for p in trainable),
               load_peak_mb=round(peak_memory_mb(device), 1), loaded_mem_mb=current_memory_mb(device))
    row["peak_mem_kind"] = reset_peak_memory(device)
    times, losses = [], []
    try:
        for step in range(spec["warmup"] + spec["steps"]):
            start = time.perf_counter()
            losses.append(train_step(net, optimizer, ids))
            if step >= spec["warmup"]:
                times.append(time.perf_counter() - start)
    except torch.cuda.OutOfMemoryError as e:  # the reference at 8B: record how far it got
        return dict(row, error=f"out of memory at step {len(losses) + 1}: {str(e).splitlines()[0][:200]}",
                    peak_mem_mb=round(peak_memory_mb(device), 1))
    s_per_step = statistics.median(times)
    return dict(row, s_per_step=s_per_step, s_per_step_all=[round(t, 4) for t in times],
                tokens_per_s=ids.numel() / s_per_step, peak_mem_mb=round(peak_memory_mb(device), 1),
                first_loss=losses[0], last_loss=losses[-1])


def banned_step_share(blocker, prompts, continuations):
    """Share of generated steps at which the blocker banned at least one token (its prefix was indexed)."""
    n, hits, total = blocker.n, 0, 0
    for row in torch.cat([prompts, continuations], dim=1).tolist():
        for t in range(prompts.shape[1], len(row)):
            total += 1
            hits += tuple(row[t - (n - 1):t]) in blocker.next_tokens
    return hits / total if total else 0.0


def generation_model(spec, device):
    """What evaluate.py generates with: on CPU a dense fp32 copy of the 4-bit + LoRA model (~3x faster
    there), on a GPU the 4-bit model with a LoRA adapter attached as PeftModel.from_pretrained attaches
    it: bf16 embeddings, not add_lora's training preparation (which upcasts them to fp32)."""
    net, _ = hyperfit.load_model(spec["model"], "4bit", device=device)
    if device.type == "cpu":
        dense = hyperfit.dense_copy(hyperfit.add_lora(net))
        del net
        gc.collect()
        return dense
    from peft import LoraConfig, get_peft_model
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(hyperfit.LORA_TARGETS),
                      task_type="CAUSAL_LM")  # add_lora's adapter: every attention and MLP projection
    return get_peft_model(net, lora).eval()


def bench_generation(spec):
    """Greedy tokens/s at each batch size, plain and with citation blocking, interleaved runs."""
    from evaluate import NGramBlocker, generate
    device = torch.device(spec["device"])
    work = torch.load(spec["work"])
    model = generation_model(spec, device)
    start = time.perf_counter()
    blocker = NGramBlocker(work["index_ids"], BLOCK_NGRAMS)
    index_s = time.perf_counter() - start
    rows = []
    for batch in GEN_BATCH_SIZES:
        prompts = work["prompts"][:batch]
        for processors in (None, [blocker]):  # warm-up: kernels, allocator, the cache's first growth
            generate(model, prompts, 4, batch_size=batch, logits_processor=processors)
        times = dict(plain=[], blocked=[])
        for _ in range(spec["repeats"]):
            for kind, processors in (("plain", None), ("blocked", [blocker])):
                start = time.perf_counter()
                out = generate(model, prompts, spec["new_tokens"], batch_size=batch, logits_processor=processors)
                times[kind].append(time.perf_counter() - start)  # generate returns CPU tensors: synced
        plain, blocked = statistics.median(times["plain"]), statistics.median(times["blocked"])
        tokens = batch * spec["new_tokens"]
        rows.append(dict(model=spec["model_name"], batch=batch, prompt_len=prompts.shape[1],
                         new_tokens=spec["new_tokens"], repeats=spec["repeats"],
                         generator="dense fp32 copy of 4-bit + LoRA" if device.type == "cpu" else "4-bit + LoRA",
                         plain_s=plain, blocked_s=blocked, tokens_per_s=tokens / plain,
                         blocked_tokens_per_s=tokens / blocked, blocking_overhead=blocked / plain,
                         banned_step_share=banned_step_share(blocker, prompts, out),
                         index=f"{len(work['index_ids'])} x {work['index_ids'].shape[1]} tokens",
                         index_build_s=index_s))
    return dict(rows=rows)


def bench_evaluation(spec):
    """Every metric evaluate.py computes for a mode, over spec's continuations: the training index,
    ppl_original (a forward pass of the original model) and the token-level metrics of
    measure_generations + summarize_mode (TTR, rep-n, diversity, distinct-n, Self-BLEU, Dataset-BLEU,
    loops, longest training overlap)."""
    from transformers import AutoTokenizer

    from evaluate import TrainingIndex, continuation_perplexity, measure_generations, summarize_mode
    device = torch.device(spec["device"])
    work = torch.load(spec["work"])
    tokenizer = AutoTokenizer.from_pretrained(hyperfit.resolve_model_source(spec["model"]))
    net, _ = hyperfit.load_model(spec["model"], "4bit", device=device)
    original = hyperfit.dense_copy(net) if device.type == "cpu" else net.eval()  # as evaluate.load_models
    prompts, continuations = work["eval_prompts"], work["eval_continuations"]
    clock = time.perf_counter()
    index = TrainingIndex(work["index_ids"])
    index_s = time.perf_counter() - clock
    sample = PPL_SAMPLE[device.type if device.type == "cuda" else "cpu"] or len(continuations)
    sample = min(sample, len(continuations))
    clock = time.perf_counter()
    ppl = continuation_perplexity(original, prompts[:sample], continuations[:sample])
    ppl_s = (time.perf_counter() - clock) * len(continuations) / sample  # batches of equal size: linear
    ppl = (ppl * (len(continuations) // sample + 1))[:len(continuations)]  # values only feed the records
    clock = time.perf_counter()
    records = measure_generations("bench", prompts, continuations, index, tokenizer, ppl,
                                  [f"heldout#{i}" for i in range(len(prompts))])
    summarize_mode(records, continuations.shape[1])
    metrics_s = time.perf_counter() - clock
    return dict(model=spec["model_name"], continuations=len(continuations), tokens=continuations.shape[1],
                content=work["eval_content"], index=f"{len(work['index_ids'])} x {work['index_ids'].shape[1]} tokens",
                index_build_s=index_s, token_metrics_s=metrics_s, ppl_original_s=ppl_s,
                metrics_without_model_s=index_s + metrics_s, total_s=index_s + metrics_s + ppl_s,
                ppl_device=str(device), ppl_measured_on=sample)


def bench_build_shape(spec):
    """Save a random-init model with the exact shape of `spec["shape"]` (bf16) next to its tokenizer,
    so load_model can load it like any checkpoint: 4-bit, 8-bit or unquantized. Built on the device."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    shape = dict(SHAPES[spec["shape"]])
    rope = dict(shape.pop("rope"))
    if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:  # transformers >= 5
        shape["rope_parameters"] = rope
    else:
        shape["rope_theta"] = rope.pop("rope_theta")
        shape["rope_scaling"] = rope if rope["rope_type"] != "default" else None
    config = LlamaConfig(**shape, eos_token_id=spec["eos_token_id"], pad_token_id=spec["eos_token_id"],
                         bos_token_id=None, tie_word_embeddings=False)
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(spec["device"]):  # random init on the GPU: seconds, even for 8B
        net = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in net.parameters())
    net.save_pretrained(spec["folder"])
    return dict(params=params, build_s=time.perf_counter() - start)


CHILDREN = dict(train=bench_train, generation=bench_generation, evaluation=bench_evaluation, build=bench_build_shape)


def quiet():
    """No progress bars or deprecation chatter from the libraries: our own lines say what is happening."""
    import warnings

    from transformers.utils import logging as transformers_logging
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*use_reentrant.*")


def child_main(spec_json):
    """Entry point of a child process: run one measurement and print its JSON on the last line."""
    quiet()
    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    try:
        result = CHILDREN[spec["kind"]](spec)
    except Exception as e:  # reported, not raised: the bench goes on with the next measurement
        import traceback
        traceback.print_exc()
        result = dict(error=f"{e.__class__.__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_child(spec, isolate, timeout=None, verbose=False):
    """Run one measurement in a fresh process (isolate) or in this one. Failures come back as {"error"}."""
    if not isolate:
        gc.collect()
        try:
            return CHILDREN[spec["kind"]](spec)
        except UsageError:
            raise
        except Exception as e:
            if verbose:
                raise
            return dict(error=f"{e.__class__.__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
    command = [sys.executable, str(Path(__file__).resolve()), "--_child", json.dumps(spec)]
    try:
        done = subprocess.run(command, cwd=HERE, stdout=subprocess.PIPE, text=True, timeout=timeout,
                              stderr=None if verbose else subprocess.PIPE)
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {timeout:.0f} s")
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = [line for line in (done.stderr or "").splitlines() if line.strip()][-1:]
    return dict(error=f"child exited {done.returncode}" + (f": {tail[0][:300]}" if tail else ""))


# -----------------------------------------------------------------------------
# inputs: models, tokens


def shape_tokenizer(texts, vocab_size, folder):
    """A byte-level BPE tokenizer trained on our own text, so shape models need nothing downloaded:
    the data is real text, only the ids differ from the real model's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["".join(text for _, text in texts)[:SHAPE_TOKENIZER_CHARS]], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<eos>")
    tokenizer.save_pretrained(folder)
    return tokenizer


def prepare_work(tokenizer, texts, sizes, path):
    """Cut the text into blocks with the kit's make_splits and save every input the measurements share:
    the training batch (the same for every configuration), the index (the paper's 2000 x 256 training
    set), prompts from held-out blocks, and 300 continuations to measure: half held-out text, a quarter
    training sequences verbatim (a memorising model; the slowest case for the overlap search), a quarter
    text that falls into a loop (a looping model)."""
    n_eval = sizes["eval_continuations"]
    n_copied = n_loops = n_eval // 4
    n_text = n_eval - n_copied - n_loops
    n_prompts = max(n_eval, max(GEN_BATCH_SIZES))
    for name in ("seq_len", "prompt_len", "eval_tokens"):
        if sizes[name] > sizes["index_len"]:
            raise UsageError(f"--{name.replace('_', '-')} {sizes[name]} exceeds the {sizes['index_len']}-token blocks")
    if sizes["batch"] > sizes["index_seqs"]:
        raise UsageError(f"--batch-size {sizes['batch']} exceeds --index-seqs {sizes['index_seqs']}")
    splits = hyperfit.make_splits(tokenizer, texts, sizes["index_len"], sizes["index_seqs"], 0, seed=0)
    train, heldout = splits["train"], splits["heldout"]
    if len(heldout) < n_prompts + n_text + n_loops:
        raise UsageError(f"the data gives {len(heldout)} held-out blocks of {sizes['index_len']} tokens; "
                         f"{n_prompts + n_text + n_loops} are needed: give more --data or lower --eval-continuations")
    length = sizes["eval_tokens"]
    text = heldout[n_prompts:n_prompts + n_text, :length]
    copied = train[:n_copied, :length]
    generator = torch.Generator().manual_seed(0)
    loops = []
    for row in heldout[n_prompts + n_text:n_prompts + n_text + n_loops]:
        period = int(torch.randint(2, 25, (1,), generator=generator))
        head = length // 2
        unit = row[head - period:head]
        loops.append(torch.cat([row[:head], unit.repeat(length // period + 1)])[:length])
    continuations = torch.cat([text, copied, torch.stack(loops)]) if loops else torch.cat([text, copied])
    work = dict(train_batch=train[:sizes["batch"], :sizes["seq_len"]],
                index_ids=train, prompts=heldout[:n_prompts, :sizes["prompt_len"]],
                eval_prompts=heldout[:n_eval, :sizes["prompt_len"]], eval_continuations=continuations,
                eval_content=f"{n_text} held-out text blocks, {n_copied} training sequences verbatim, "
                             f"{n_loops} text-then-loop sequences")
    torch.save(work, path)
    return work


# -----------------------------------------------------------------------------
# ratios, goals, output


def add_ratios(train_rows):
    """speed_vs_reference = reference s/step / s/step (above 1: faster); mem_vs_reference = peak / reference
    peak (below 1: smaller). The reference is full_fp32 of the same model in the same run."""
    for row in train_rows:
        ref = next((r for r in train_rows if r["model"] == row["model"] and r["config"] == "full_fp32"
                    and r.get("s_per_step")), None)
        ok = ref is not None and row.get("s_per_step")
        row["speed_vs_reference"] = ref["s_per_step"] / row["s_per_step"] if ok else None
        row["mem_vs_reference"] = row["peak_mem_mb"] / ref["peak_mem_mb"] if ok else None


def find(rows, **match):
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def goals_for(results):
    """The issue's goals that this run measured: {name: {target, measured, met, note}}. met is None when
    not measured, or in --quick mode (a tiny random model is not the goal's setting)."""
    goals, train, mode = {}, results["train"], results["mode"]

    def goal(name, target, measured, met, note):
        goals[name] = dict(target=target, measured=measured, met=None if measured is None else bool(met), note=note)

    if results["device_type"] == "cpu" and mode != "shapes":
        model = results["models"][0]["name"]
        kit, gc_row = find(train, model=model, config="4bit_lora"), find(train, model=model, config="4bit_lora_gc")
        speed = kit and kit.get("speed_vs_reference")
        goal("cpu_kit_step_speedup", f">= {GOAL_KIT_SPEEDUP}x the fp32 full fine-tune (4bit_lora)", speed,
             speed is not None and speed >= GOAL_KIT_SPEEDUP,
             f"{model}, batch {kit and kit['batch']} x {kit and kit['seq_len']}, compute {kit and kit['compute_dtype']}")
        memory = gc_row and gc_row.get("mem_vs_reference")
        goal("cpu_gc_peak_memory_ratio", f"<= {GOAL_GC_MEMORY}x the reference's peak (4bit_lora_gc)", memory,
             memory is not None and memory <= GOAL_GC_MEMORY, gc_row and gc_row.get("peak_mem_kind"))
    for model in results["models"]:
        row = find(results["generation"], model=model["name"], batch=16)
        overhead = row and row.get("blocking_overhead")
        name = "blocking_overhead_b16" + ("" if len(results["models"]) == 1 else f"[{model['name']}]")
        goal(name, f"<= {GOAL_BLOCKING_OVERHEAD}x plain greedy at batch 16", overhead,
             overhead is not None and overhead <= GOAL_BLOCKING_OVERHEAD,
             row and f"{row['new_tokens']} new tokens, banned at {row['banned_step_share']:.0%} of steps")
    evaluation = results["evaluation"]
    if evaluation and evaluation.get("metrics_without_model_s") is not None:
        goal("metrics_300x256_s", f"<= {GOAL_METRICS_S:.0f} s on CPU for {EVAL_CONTINUATIONS} x {EVAL_TOKENS} tokens",
             evaluation["metrics_without_model_s"],
             evaluation["metrics_without_model_s"] <= GOAL_METRICS_S  # token metrics always run on the CPU
             and evaluation["continuations"] >= EVAL_CONTINUATIONS and evaluation["tokens"] >= EVAL_TOKENS,
             f"{evaluation['continuations']} x {evaluation['tokens']} tokens: training index + every token-level "
             f"metric; ppl_original is a forward pass of the model ({ppl_text(evaluation)}), not counted; "
             f"with it {evaluation['total_s']:.1f} s")
    for model, limit_gb in GOAL_PEAK_GB.items():
        row = find(train, model=model, config="4bit_lora_gc")
        if row is None or results["device_type"] != "cuda":
            continue
        peak = row.get("peak_mem_mb")
        plain = find(train, model=model, config="4bit_lora")
        goal(f"{model}_qlora_peak_gb", f"< {limit_gb:.0f} GB (1e9 bytes) allocated, QLoRA step at "
             f"{row['batch']} x {row['seq_len']}", None if peak is None or row.get("error") else peak * 2**20 / 1e9,
             peak is not None and peak * 2**20 < limit_gb * 1e9,
             "QLoRA = 4-bit NF4 + LoRA + gradient checkpointing (Dettmers et al. 2023); without checkpointing: "
             + (f"{plain['peak_mem_mb'] * 2**20 / 1e9:.2f} GB" if plain and plain.get("peak_mem_mb") else "n/a"))
    if results["quick"]:
        for value in goals.values():
            value["met"] = None
            value["note"] = "--quick: tiny random model, not the goal's setting. " + (value["note"] or "")
    return goals


def ppl_text(e):
    scaled = e["ppl_measured_on"] < e["continuations"]
    return (f"{e['ppl_original_s']:.1f} s on {e['ppl_device']}" +
            (f", timed on {e['ppl_measured_on']} continuations and scaled" if scaled else ""))


def fmt(value, digits=2, suffix=""):
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def format_markdown(results):
    lines = [f"# bench.py on `{results['device']}`", "",
             f"{results['date']} · torch {results['torch']} · transformers {results['transformers']} · "
             f"peft {results['peft']} · bitsandbytes {results['bitsandbytes']} · {results['cpu_threads']} CPU threads",
             "", f"    {results['command']}", ""]
    train = results["train"]
    if train:
        first = next((r for r in train if r.get("measured_steps")), train[0])
        lines += [f"## Training step: batch {first.get('batch')} x {first.get('seq_len')} tokens, median of "
                  f"{first.get('measured_steps')} steps after {first.get('warmup_steps')} warm-up", "",
                  "Peak memory: " + results["peak_memory"] + ". Ratios are to `full_fp32` of the same model "
                  "in this run (speed above 1 = faster, memory below 1 = smaller).", "",
                  "| model | config | compute | s/step | tokens/s | peak MiB | speed vs ref | memory vs ref |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in train:
            if r.get("s_per_step") is None:
                lines.append(f"| {r['model']} | {r['config']} | {r.get('compute_dtype', '–')} | "
                             f"{r.get('error') or r.get('skipped')} | | {fmt(r.get('peak_mem_mb'), 0)} | | |")
                continue
            lines.append(f"| {r['model']} | {r['config']} | {r['compute_dtype']} | {r['s_per_step']:.3f} | "
                         f"{r['tokens_per_s']:.0f} | {r['peak_mem_mb']:.0f} | {fmt(r['speed_vs_reference'], 2, 'x')} | "
                         f"{fmt(r['mem_vs_reference'], 2, 'x')} |")
        lines += ["", "Configs: " + "; ".join(f"`{name}` = {CONFIGS[name]['label']}" for name in
                                               dict.fromkeys(r["config"] for r in train)), ""]
    if results["generation"]:
        g = results["generation"][0]
        lines += [f"## Generation: greedy, {g['prompt_len']}-token prompts, {g['new_tokens']} new tokens, "
                  f"{g['generator']}; citation blocking ({BLOCK_NGRAMS}-grams) over a {g['index']} index", "",
                  "| model | batch | tokens/s | tokens/s blocked | blocking overhead | steps with a ban |",
                  "|---|---|---|---|---|---|"]
        for r in results["generation"]:
            if r.get("error") or r.get("skipped"):
                lines.append(f"| {r['model']} | {r.get('error') or r.get('skipped')} | | | | |")
                continue
            lines.append(f"| {r['model']} | {r['batch']} | {r['tokens_per_s']:.1f} | {r['blocked_tokens_per_s']:.1f} | "
                         f"{r['blocking_overhead']:.3f}x | {r['banned_step_share']:.0%} |")
        lines.append("")
    e = results["evaluation"]
    if e:
        if e.get("total_s") is None:
            lines += ["## Evaluation", "", str(e.get("error") or e.get("skipped")), ""]
        else:
            lines += [f"## Evaluation: every metric of evaluate.py over {e['continuations']} continuations of "
                      f"{e['tokens']} tokens ({e['content']}), training index {e['index']}", "",
                      "| index | token metrics | index + token metrics | ppl_original (model) | total |",
                      "|---|---|---|---|---|",
                      f"| {e['index_build_s']:.1f} s | {e['token_metrics_s']:.1f} s | {e['metrics_without_model_s']:.1f} s | "
                      f"{ppl_text(e)} | {e['total_s']:.1f} s |", ""]
    if results["goals"]:
        lines += ["## Goals", "", "| goal | target | measured | met |", "|---|---|---|---|"]
        for name, g in results["goals"].items():
            met = {True: "yes", False: "**no**", None: "–"}[g["met"]]
            lines.append(f"| {name} | {g['target']} | {fmt(g['measured'], 2)} | {met} |")
        lines += [""] + [f"- {name}: {g['note']}" for name, g in results["goals"].items() if g["note"]] + [""]
    return "\n".join(lines)


def write_results(results, out_dir, started):
    """Ratios, goals, then <device>.json and <device>.md, each written to a temporary name and renamed."""
    add_ratios(results["train"])
    results["goals"] = goals_for(results)
    results["seconds_total"] = round(time.time() - started, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(results, indent=2) + "\n"), (".md", format_markdown(results))):
        path = out_dir / (results["file_stem"] + suffix)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)


# -----------------------------------------------------------------------------
# the bench


def bench(args, argv):
    started = time.time()
    quiet()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dev = "cuda" if device.type == "cuda" else "cpu"  # which column of the per-device defaults
    quick = args.quick
    shapes = [s for s in (args.shapes or "").split(",") if s]
    for shape in shapes:
        if shape not in SHAPES:
            raise UsageError(f"--shapes {shape}: choose from {', '.join(SHAPES)}")
        if shape != "tiny" and device.type != "cuda" and not args.device:
            raise UsageError(f"--shapes {shape} is a GPU measurement and no GPU is visible; pass --device cpu to run "
                             "it on the CPU anyway (slow), or --shapes tiny to check the path")
    configs = args.configs.split(",") if args.configs else list(SHAPE_CONFIGS if shapes else DEFAULT_CONFIGS)
    for name in configs:
        if name not in CONFIGS:
            raise UsageError(f"--configs {name}: choose from {', '.join(CONFIGS)}")
    sections = args.sections.split(",")
    for name in sections:
        if name not in ("train", "generation", "evaluation"):
            raise UsageError(f"--sections {name}: choose from train, generation, evaluation")
    q = QUICK if quick else {}
    sizes = dict(batch=args.batch_size, seq_len=args.seq_len or q.get("seq_len", SEQ_LEN[dev]),
                 prompt_len=q.get("prompt_len", PROMPT_LEN), index_seqs=args.index_seqs or q.get("index_seqs", INDEX_SEQS),
                 index_len=q.get("index_len", INDEX_LEN),
                 eval_continuations=args.eval_continuations or q.get("eval_continuations", EVAL_CONTINUATIONS),
                 eval_tokens=q.get("eval_tokens", EVAL_TOKENS))
    warmup = args.warmup if args.warmup is not None else q.get("warmup", WARMUP_STEPS[dev])
    steps = args.steps or q.get("steps", MEASURE_STEPS[dev])
    new_tokens = args.gen_tokens or q.get("gen_tokens", GEN_TOKENS[dev])
    repeats = args.gen_repeats or q.get("gen_repeats", GEN_REPEATS)
    if min(sizes["batch"], steps, new_tokens, repeats, sizes["seq_len"]) < 1 or warmup < 0:
        raise UsageError("--batch-size, --steps, --gen-tokens, --gen-repeats and --seq-len must be positive")
    isolate = args.isolate if args.isolate is not None else not quick
    # a tiny model runs fastest on one thread; two OpenMP threads on a shared CPU spin-wait for each other
    threads = args.threads or (1 if quick else torch.get_num_threads())
    torch.set_num_threads(threads)
    evaluation = None
    if "evaluation" in sections:
        try:
            import sacrebleu  # noqa: F401  (evaluate.py's BLEU)
        except ImportError:
            sections.remove("evaluation")
            evaluation = dict(skipped="sacrebleu (evaluate.py's BLEU) is not installed here")
            print(f"bench.py: evaluation skipped: {evaluation['skipped']}", file=sys.stderr)
    deadline = started + args.time_budget if args.time_budget else None

    mode = "shapes" if shapes else "quick" if quick else "model"
    name = device_name(device) + {"shapes": "-shapes", "quick": "-quick", "model": ""}[mode]
    env = hyperfit.environment()
    results = dict(device=device_name(device), device_type=device.type, mode=mode, quick=quick, file_stem=name,
                   **env["versions"], python=env["python"], git_commit=env["git_commit"],
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   command=shlex.join(["python", "bench.py"] + list(argv)), cpu_threads=threads,
                   isolation="one subprocess per measurement" if isolate else "in-process (--quick: peaks less clean)",
                   peak_memory=PEAK_MEMORY[dev],
                   models=[], train=[], generation=[], evaluation=evaluation, goals={})
    if device.type == "cuda":
        results["gpu_memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 1e9, 1)
    out_dir = Path(args.out_dir)

    def remaining():
        return None if deadline is None else deadline - time.time()

    def measure(spec, label):
        left = remaining()
        if left is not None and left < MIN_CHILD_S:
            print(f"  {label}: skipped (time budget)", flush=True)
            return dict(skipped="time budget")
        clock = time.time()
        result = run_child(spec, isolate, timeout=left, verbose=args.verbose)
        status = result.get("error") or result.get("skipped") or "ok"
        print(f"  {label}: {status} ({time.time() - clock:.0f} s)", flush=True)
        return result

    texts = ([("alice", (HERE / "data" / "fiction" / "carroll_alice_in_wonderland.txt")
               .read_text(encoding="utf-8")[:QUICK_TEXT_CHARS])] if quick and not args.data
             else hyperfit.load_texts(args.data or hyperfit.DEFAULT_DATA))
    with tempfile.TemporaryDirectory(prefix="bench-", dir=args.tmp_dir) as tmp:
        tmp = Path(tmp)
        shape_tok = None
        for index, model_name in enumerate(shapes or ["tiny-random" if quick else args.model]):
            print(f"{model_name} on {device}:", flush=True)
            folder = tmp / model_name
            model_info = dict(name=model_name)
            results["models"].append(model_info)
            if shapes:
                from transformers import AutoTokenizer
                if shape_tok is None:  # one tokenizer for every shape: the smallest vocabulary fits them all
                    vocab = min([SHAPE_TOKENIZER_VOCAB] + [SHAPES[s]["vocab_size"] for s in shapes])
                    shape_tok = shape_tokenizer(texts, vocab, tmp / "tokenizer")
                shape_tok.save_pretrained(folder)
                model_info.update(kind="random-init shape, bf16 checkpoint",
                                  shape={k: v for k, v in SHAPES[model_name].items()})
                built = measure(dict(kind="build", shape=model_name, folder=str(folder), device=str(device),
                                     eos_token_id=shape_tok.eos_token_id, threads=threads), "build")
                model_info.update(built)
                if built.get("error") or built.get("skipped"):
                    shutil.rmtree(folder, ignore_errors=True)
                    continue
                source, tokenizer = str(folder), AutoTokenizer.from_pretrained(folder)
            elif quick:
                sys.path.insert(0, str(HERE / "tests"))
                from conftest import build_tiny_model
                from transformers import AutoTokenizer
                source = build_tiny_model(folder, texts[0][1])
                tokenizer = AutoTokenizer.from_pretrained(source)
                model_info.update(kind="tiny random Llama of tests/conftest.py (2 layers, hidden 64)")
            else:
                from transformers import AutoTokenizer
                source = model_name
                tokenizer = AutoTokenizer.from_pretrained(hyperfit.resolve_model_source(model_name))
                model_info.update(kind="pretrained", source=hyperfit.resolve_model_source(model_name))
            work_path = tmp / f"work-{model_name}.pt"
            prepare_work(tokenizer, texts, sizes, work_path)
            base = dict(model=source, model_name=model_name, device=str(device), work=str(work_path), threads=threads)

            # the order of work: on shapes, generation right after the QLoRA configs (the goals), so a time
            # budget cuts the least useful rows (8-bit, unquantized, the fp32 reference that OOMs at 8B)
            tasks = [("train", config) for config in configs] if "train" in sections else []
            first = len(tasks) if not shapes else len(list(itertools.takewhile(lambda t: t[1].startswith("4bit"), tasks)))
            tasks[first:first] = [(kind, None) for kind in ("generation", "evaluation") if kind in sections
                                  and not (kind == "evaluation" and index > 0)]  # token metrics: once
            for kind, config in tasks:
                if kind == "train":
                    row = measure(dict(base, kind="train", config=config, warmup=warmup, steps=steps),
                                  f"train {config}")
                    row = dict(dict(model=model_name, config=config, label=CONFIGS[config]["label"]), **row)
                    if row.get("s_per_step"):
                        print(f"    {row['s_per_step']:.3f} s/step, {row['tokens_per_s']:.0f} tokens/s, "
                              f"peak {row['peak_mem_mb']:.0f} MiB, compute {row['compute_dtype']}", flush=True)
                        if config == "full_fp32":
                            model_info.setdefault("params", row["trainable_params"])
                    results["train"].append(row)
                elif kind == "generation":
                    done = measure(dict(base, kind="generation", new_tokens=new_tokens, repeats=repeats),
                                   "generation")
                    for row in done.get("rows") or [dict(model=model_name, **done)]:
                        results["generation"].append(row)
                        if row.get("blocking_overhead"):
                            print(f"    batch {row['batch']}: {row['tokens_per_s']:.1f} tokens/s, blocked "
                                  f"{row['blocked_tokens_per_s']:.1f} ({row['blocking_overhead']:.3f}x)", flush=True)
                else:
                    e = results["evaluation"] = dict(dict(model=model_name),
                                                     **measure(dict(base, kind="evaluation"), "evaluation"))
                    if e.get("total_s") is not None:
                        print(f"    index + token metrics {e['metrics_without_model_s']:.1f} s, ppl_original "
                              f"{e['ppl_original_s']:.1f} s", flush=True)
                write_results(results, out_dir, started)  # after every measurement: a cut run keeps its rows
            if shapes:
                shutil.rmtree(folder, ignore_errors=True)  # 16 GB for the 8B shape: free the disk
    write_results(results, out_dir, started)
    return results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(
        description="Benchmark the kit: training step (speed, peak memory) of the paper's fp32 full fine-tune and\n"
                    "the kit's quantized LoRA configurations, greedy generation with and without citation\n"
                    "blocking, and evaluate.py's metrics. Writes <out-dir>/<device>.json and <device>.md.",
        epilog="configs:\n" + "".join(f"  {k:15s} {v['label']}\n" for k, v in CONFIGS.items()) +
               f"shapes: {', '.join(SHAPES)} (random weights, exact shapes, no download)\n"
               "examples:\n  python bench.py                      # full benchmark, bundled SmolLM2-135M\n"
               "  python bench.py --quick              # smoke test, tiny random model\n"
               "  python bench.py --shapes             # GPU: TinyLlama-1.1B and Llama-3.1-8B shapes\n"
               "  python bench.py --configs full_fp32,4bit_lora_bf16 --sections train",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="preset, local HF folder or hub id (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: tiny random model, {QUICK['steps']} steps, {QUICK['gen_tokens']} new tokens, "
                        f"{QUICK['eval_continuations']} x {QUICK['eval_tokens']} tokens of metrics, in-process")
    p.add_argument("--shapes", nargs="?", const=",".join(GPU_SHAPES), metavar="NAMES",
                   help=f"random-init models of these shapes instead of --model (default when given without "
                        f"NAMES: {','.join(GPU_SHAPES)}; 'tiny' checks the path anywhere)")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--configs", help=f"comma-separated training configs (default: {','.join(DEFAULT_CONFIGS)}; "
                                     "with --shapes the same, goals first)")
    p.add_argument("--sections", default="train,generation,evaluation", help="what to measure (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="training sequences per step (default: %(default)s)")
    p.add_argument("--seq-len", type=int, help=f"training tokens per sequence (default: {SEQ_LEN['cpu']} on CPU, "
                                               f"{SEQ_LEN['cuda']} on a GPU)")
    p.add_argument("--warmup", type=int, help=f"untimed steps first (default: {WARMUP_STEPS['cpu']} CPU, {WARMUP_STEPS['cuda']} GPU)")
    p.add_argument("--steps", type=int, help=f"timed steps, median reported (default: {MEASURE_STEPS['cpu']})")
    p.add_argument("--gen-tokens", type=int, help=f"new tokens per generation (default: {GEN_TOKENS['cpu']} CPU, "
                                                  f"{GEN_TOKENS['cuda']} GPU)")
    p.add_argument("--gen-repeats", type=int, help=f"timed generations per mode and batch size (default: {GEN_REPEATS})")
    p.add_argument("--index-seqs", type=int, help=f"training sequences in the citation-blocking index (default: {INDEX_SEQS})")
    p.add_argument("--eval-continuations", type=int, help=f"continuations to measure (default: {EVAL_CONTINUATIONS})")
    p.add_argument("--data", help="text to tokenize for every input (default: data/fiction)")
    p.add_argument("--out-dir", default=str(HERE / "results" / "bench"), help="where the JSON and Markdown go "
                                                                             "(default: results/bench)")
    p.add_argument("--tmp-dir", help="for shape checkpoints (the 8B one takes 16 GB; default: the system's)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, i.e. the cores; 1 with --quick)")
    p.add_argument("--time-budget", type=float, help="seconds; measurements that would start later are skipped "
                                                     "and recorded as such")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="one subprocess per measurement, for clean peak memory (default: on, off with --quick)")
    p.add_argument("-v", "--verbose", action="store_true", help="show the children's stderr; raise errors")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        child_main(args._child)
        return None
    threads = torch.get_num_threads()
    try:
        results = bench(args, argv)
    except UsageError as e:
        print(f"bench.py: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        torch.set_num_threads(threads)  # bench sets it; a caller (a test) gets its own back
    print()
    print(format_markdown(results))
    print(f"wrote {os.path.relpath(Path(args.out_dir) / results['file_stem'])}.json and .md "
          f"in {results['seconds_total']:.0f} s")
    return results


if __name__ == "__main__":
    main()
