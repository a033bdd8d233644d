"""
Generate long continuations of held-out prompts and measure them as the paper does (Carlsson et
al., "The Hyperfitting Phenomenon", ICLR 2025), with the follow-up's controls ("Beyond
Temperature: Hyperfitting as a Late-Stage Geometric Expansion", ICML 2026).

    python evaluate.py results/reference        # every decoding mode of a hyperfitted run
    python evaluate.py --model smollm2-135m     # the original model alone (its two modes)

In a notebook (this file imported, or pasted into a cell after hyperfit.py and measures.py):
    summary = evaluate("results/reference", num_prompts=8)

Writes JSON only, into <run>/eval/ (replaced whole: a new evaluation appears complete, or the old
one stays): summary.json (per mode: every measure's mean and std, the sharpness table, the
entropy-matched temperature, timings, the machine) and generations.jsonl (one record per
continuation: its text, tokens and every per-continuation measure). `python plot.py <run>` renders
them (table.md, figures); `python experiments/paper_comparison.py <run>` puts them beside the
paper's numbers; `python experiments/annotate.py <run>` builds the blind page of the paper's human
study from them. measures.py defines every measure, with its source.

Decoding modes (and one reference row):
    original_greedy            the model before hyperfitting, greedy
    original_top_p             the same, sampled (top-p 0.9, temperature 0.7, top-k 50: the paper's)
    original_entropy_matched   the same, pure temperature sampling at the temperature where its mean
                               predictive entropy on validation text equals the hyperfitted model's
                               (the follow-up's control)
    hyperfitted_greedy         the hyperfitted model (base + LoRA adapter, or fully tuned), greedy
    hyperfitted_blocked        the same with citation blocking: no token may complete an n-gram of
                               the training sequences (the prompt counts); the best remaining token
                               is taken (Carlsson et al.; the paper publishes no code for it)
    human                      not generated: the text that follows each prompt in its book, the
                               same number of tokens, measured like every mode (what the paper's
                               human study compares each mode against)
Every continuation is generated to the full --new-tokens (EOS suppressed); the shorter windows
the paper scores are its prefixes: greedy decoding is deterministic, and a sampled continuation's
first k tokens are exactly what a k-token sample with the same seed and batch gives (the same
random draws in the same order; a test checks it).
"""

import os
import signal
import sys

if __name__ == "__main__" and "__file__" in globals():  # Ctrl-C while the imports below load
    signal.signal(signal.SIGINT, lambda *_: os._exit(print("interrupted", file=sys.stderr) or 130))

import contextlib
import copy
import dataclasses
import json
import math
import shlex
import time
from pathlib import Path

import torch

try:
    import engine
    import hyperfit as hf
    import measures
    import runfiles
except ModuleNotFoundError:  # pasted into a notebook after the other files' cells: names are here
    import types

    engine = hf = measures = runfiles = types.SimpleNamespace(**globals())
UsageError = hf.UsageError  # bad input: one line on stderr, exit 2, nothing written
setting = hf.setting

# -----------------------------------------------------------------------------
# the options of an evaluation (one definition each: the command line and the Python call)

MODES = (
    "original_greedy",
    "original_top_p",
    "original_entropy_matched",
    "hyperfitted_greedy",
    "hyperfitted_blocked",
)
ORIGINAL_ONLY_MODES = ("original_greedy", "original_top_p")  # what a bare model can be evaluated on
HUMAN = "human"  # the reference row: the real continuation of each prompt
# per device: a CPU generates 128 new tokens (the paper's 96-token table and 128-token human
# study), a GPU 256 (all of the paper's lengths); ~300 contexts per study in the paper
DEVICE_DEFAULTS = dict(
    num_prompts=dict(cpu=32, cuda=300),
    new_tokens=dict(cpu=128, cuda=256),
    sharpness_seqs=dict(cpu=16, cuda=128),
)
SCORE_BATCH_SIZE = 8  # sequences per forward pass when scoring (full-vocabulary logits are large)
ENTROPY_SEARCH_RANGE, ENTROPY_SEARCH_TOLERANCE = (0.05, 2.0), 1e-3  # temperature bracket; width
LOGIT_CACHE_BYTES = 2 * 2**30  # keep validation logits across the temperature search if they fit
SPLIT = ("data", "seq_len", "num_train", "num_val", "prompt_len")  # a bare model's data split


@dataclasses.dataclass
class Options:
    """Every option of an evaluation; None: the run's value, or the device's default
    (DEVICE_DEFAULTS), or the preset's split for a bare model."""

    model: str = setting(None, "base model: a preset, folder or hub id (default: the run's)")
    modes: str = setting(None, "comma-separated decoding modes (default: all that apply)")
    num_prompts: int = setting(None, "held-out prompts (default: 32 CPU, 300 GPU)", least=1)
    new_tokens: int = setting(None, "new tokens per prompt (default: 128 CPU, 256 GPU)", least=1)
    sharpness_seqs: int = setting(None, "validation sequences of sharpness (16 / 128)", least=1)
    block_ngrams: int = setting(5, "citation blocking: forbid training n-grams of n", least=1)
    top_p: float = setting(0.9, "original_top_p: nucleus mass (the paper's)", above=0, most=1)
    # below 0.01 sampling is greedy in all but name, and near 1e-38 the scaled fp32 logits overflow
    temperature: float = setting(0.7, "original_top_p: temperature (the paper's)", above=0.01)
    top_k: int = setting(50, "original_top_p: top-k, 0 = off (the paper's)", least=0)
    batch_size: int = setting(128, "continuations generated at once (modes share them)", least=1)
    seed: int = setting(0, "sampling seed", least=0, below=hf.SEED_LIMIT)
    quant: str = setting(None, "base weights (default: the run's)", choices=hf.QUANTS)
    dtype: str = setting(None, "compute dtype (default: the run's)")
    device: str = setting(None, "cpu or cuda (default: cuda if there is one)")
    dense: bool = setting(None, "generate with dense copies of the models (default: on a CPU)")
    out_dir: str = setting(None, "output folder (default: RUN_DIR/eval)")
    mauve_features: str = setting(
        "original",
        "MAUVE's features: the original model's (offline), or gpt2-large, the standard (the hub)",
    )
    data: str = setting(None, "without RUN_DIR: the data (default: the preset's)")
    seq_len: int = setting(None, "without RUN_DIR: tokens per sequence of the split")
    num_train: int = setting(None, "without RUN_DIR: training sequences of the split")
    num_val: int = setting(None, "without RUN_DIR: validation sequences of the split")
    prompt_len: int = setting(None, "without RUN_DIR: tokens per prompt")


def resolve_options(given, device):
    """The Options of one evaluation: the given ones, the per-device defaults filled in, every
    value checked (one line naming the option; nothing is loaded or written yet)."""
    names = [field.name for field in dataclasses.fields(Options)]
    if unknown := sorted(set(given) - set(names)):
        raise UsageError(f"unknown option {unknown[0]!r}; options: {', '.join(names)}")
    if isinstance(given.get("modes"), (list, tuple)):  # a Python call may list them
        given = dict(given, modes=",".join(map(str, given["modes"])))
    options = Options(**{k: v for k, v in given.items() if v is not None})
    kind = "cuda" if device.type == "cuda" else "cpu"
    for name, values in DEVICE_DEFAULTS.items():
        if getattr(options, name) is None:
            setattr(options, name, values[kind])
    for field in dataclasses.fields(Options):  # the seed: MAUVE fails on it only after generating
        runfiles.check_limits(field, getattr(options, field.name))
    o = options
    if o.mauve_features != "original" and not any(
        name in o.mauve_features for name in ("gpt2", "bert")
    ):
        raise UsageError(
            f"--mauve-features {o.mauve_features}: choose original, or a gpt2 or bert "
            "model of the hub (gpt2-large is MAUVE's standard)"
        )
    return options


def check_modes(modes, has_run):
    """The modes to evaluate, in the order given; an unknown, repeated or (without a run)
    hyperfitted mode is refused before any work."""
    default = list(MODES if has_run else ORIGINAL_ONLY_MODES)
    modes = modes.split(",") if modes is not None else default  # a list: resolve_options joins it
    for mode in modes:
        if mode not in MODES:
            raise UsageError(f"--modes: unknown mode {mode!r}; choose from {', '.join(MODES)}")
        if modes.count(mode) > 1:
            raise UsageError(f"--modes names {mode} twice; name each mode once")
        if not has_run and mode not in ORIGINAL_ONLY_MODES:
            raise UsageError(
                f"--modes {mode} needs a hyperfitted run: pass its folder (RUN_DIR), "
                f"or choose from {', '.join(ORIGINAL_ONLY_MODES)}"
            )
    return modes


# -----------------------------------------------------------------------------
# citation blocking


class NGramBlocker:
    """Citation blocking (Carlsson et al. 2025), a transformers logits processor: at every step,
    forbid each token that would make the last `n` tokens (prompt included) an n-gram of the
    training sequences; the best remaining token is then taken. A row whose every token is
    forbidden is left unblocked. `rows` (optional) limits it to those batch rows.

    The index is built once: a dict from each (n-1)-token prefix seen in training (a tuple) to the
    tokens that follow it there. A step costs one dict lookup per row and one indexed assignment,
    whatever the size of the training data."""

    def __init__(self, train_ids, n=5, rows=None):
        if n < 1:
            raise UsageError(f"--block-ngrams must be at least 1, got {n}")
        self.n, self.rows = n, rows
        self.next_tokens = {}
        windows = torch.as_tensor(train_ids).unfold(1, n, 1).reshape(-1, n).unique(dim=0)
        for *prefix, token in windows.tolist():  # each n-gram once (unique), so no duplicate bans
            self.next_tokens.setdefault(tuple(prefix), []).append(token)

    def for_rows(self, rows):
        """The same blocker (the same index, not rebuilt) limited to the batch rows `rows`."""
        blocker = copy.copy(self)
        blocker.rows = rows
        return blocker

    def __call__(self, input_ids, scores):
        length = input_ids.shape[1]
        if length < self.n - 1:
            return scores
        rows, cols = [], []
        prefixes = input_ids[:, length - (self.n - 1) :].tolist()
        for row in self.rows if self.rows is not None else range(len(prefixes)):
            banned = self.next_tokens.get(tuple(prefixes[row]))
            if banned:
                rows += [row] * len(banned)
                cols += banned
        if rows:
            rows = torch.tensor(rows, device=scores.device)
            cols = torch.tensor(cols, device=scores.device)
            kept = scores[rows, cols]
            scores[rows, cols] = -math.inf
            dead = torch.isneginf(scores).all(dim=-1)  # nothing left to take: undo that row's ban
            if dead.any():
                undo = dead[rows]
                scores[rows[undo], cols[undo]] = kept[undo]
        return scores


# -----------------------------------------------------------------------------
# statistics that need a model


@torch.no_grad()
def entropy_matched_temperature(
    net,
    ids,
    target_entropy,
    batch_size=SCORE_BATCH_SIZE,
    bracket=ENTROPY_SEARCH_RANGE,
    tolerance=ENTROPY_SEARCH_TOLERANCE,
    desc=None,
    cache=None,
):
    """The temperature T at which `net`'s mean predictive entropy on `ids` (the quantity of
    engine.token_statistics) equals `target_entropy` (the follow-up paper's control). The
    entropy of softmax(z / T) grows monotonically with T (dH/dT = Var_p(z) / T^3), so bisection
    on T finds it; the upper end of the bracket doubles until it is above the target (up to
    T = 64). The logits are computed once when they fit in LOGIT_CACHE_BYTES, else the model runs
    at every step; `cache`: those logits already computed (engine.token_statistics' `keep`, at
    temperature 1 and `batch_size`). `desc` names a progress bar over the entropy evaluations
    (None: no bar). Returns dict(temperature, target_entropy, achieved_entropy, steps)."""
    from tqdm.auto import tqdm

    net.eval()
    if cache is None and fits_logit_cache(net, ids):
        device = next(net.parameters()).device
        cache = [
            net(input_ids=ids[s : s + batch_size].to(device)).logits[:, :-1].float()
            for s in range(0, len(ids), batch_size)
        ]
    # without a cache every evaluation is a pass of the model: the bar shows each one
    bar = tqdm(desc=desc, disable=desc is None, leave=False, unit="step")

    def entropy(temperature):
        bar.update()
        return mean_entropy(net, ids, cache, temperature, batch_size)

    low, high = bracket
    steps = 0
    while entropy(high) < target_entropy and high < 64:
        high, steps = high * 2, steps + 1
    while high - low > tolerance:
        middle = (low + high) / 2
        low, high = (middle, high) if entropy(middle) < target_entropy else (low, middle)
        steps += 1
    temperature = (low + high) / 2
    achieved = entropy(temperature)
    bar.close()
    return dict(
        temperature=temperature,
        target_entropy=target_entropy,
        achieved_entropy=achieved,
        steps=steps,
    )


def fits_logit_cache(net, ids):
    """Whether the float logits of `ids` under `net` fit in LOGIT_CACHE_BYTES."""
    vocab = net.config.get_text_config().vocab_size
    return ids.shape[0] * (ids.shape[1] - 1) * vocab * 4 <= LOGIT_CACHE_BYTES


def mean_entropy(net, ids, cache, temperature, batch_size):
    """Mean predictive entropy (nats) at `temperature`, from cached logits when there are some."""
    if cache is None:
        return engine.token_statistics(net, ids, batch_size, temperature=temperature)["entropy"]
    total = count = 0
    for logits in cache:
        logp = torch.log_softmax(logits / temperature, dim=-1)
        total += -(logp.exp() * logp).sum().item()
        count += logp.shape[0] * logp.shape[1]
    return total / count


@torch.no_grad()
def score_continuations(net, prompt_ids, continuation_ids, batch_size=SCORE_BATCH_SIZE):
    """Each continuation under `net` (the original model): its perplexity given its prompt (exp of
    the mean negative log-likelihood of the continuation's tokens), and the rank of each of its
    tokens among net's predictions for that position (1 = net's top-1; a tie counts for the
    token). Returns (perplexities: list of floats, ranks: list of lists of ints)."""
    device = next(net.parameters()).device
    net.eval()
    sequences = torch.cat([prompt_ids, continuation_ids], dim=1)
    first = prompt_ids.shape[1]  # logits at position t predict token t + 1
    perplexities, ranks = [], []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size].to(device)
        logits = net(input_ids=batch).logits[:, first - 1 : -1].float()
        targets = batch[:, first:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        perplexities += nll.mean(dim=1).exp().tolist()
        chosen = logits.gather(-1, targets.unsqueeze(-1))
        ranks += (1 + (logits > chosen).sum(-1)).tolist()
    return perplexities, ranks


class OwnTokenScores:
    """A generation observer (engine.generate's `observer`): from the raw logits of each step it
    keeps, for every row, the log-probability and the rank of the token the row takes, so the
    original model's view of its own continuations (score_continuations' two numbers) comes from
    the pass that generated them, not a second one. Equal to score_continuations up to float
    rounding: cached and full-sequence passes add in another order (a test checks it)."""

    def __init__(self):
        self.logits, self.logprobs, self.ranks = None, [], []

    def __call__(self, input_ids, scores):
        if self.logits is not None:  # the token taken after the previous step is known now
            self.record(input_ids[:, -1])
        self.logits = scores.float().clone()
        return scores

    def record(self, tokens):
        tokens = tokens.to(self.logits.device).unsqueeze(-1)
        chosen = self.logits.gather(-1, tokens)
        self.logprobs.append(torch.log_softmax(self.logits, -1).gather(-1, tokens).squeeze(-1))
        self.ranks.append(1 + (self.logits > chosen).sum(-1))

    def finish(self, continuations):
        """(perplexities, ranks) of the rows, as score_continuations returns them."""
        self.record(continuations[:, -1])
        logprobs, ranks = torch.stack(self.logprobs, 1).cpu(), torch.stack(self.ranks, 1).cpu()
        self.logits, self.logprobs, self.ranks = None, [], []
        return (-logprobs.mean(1)).exp().tolist(), ranks.tolist()


# -----------------------------------------------------------------------------
# what to evaluate: the run's model, adapter and exact data split


def resolve_setup(run_dir, options):
    """What evaluate() works on, checked before anything is loaded or written: dict(run_name,
    model, quant, dtype, adapter (folder or None), tuned_model (the model/ folder of a full
    fine-tune, --lora-r 0, or None), split (data, seq_len, num_train, num_val, seed,
    prompt_len), train_fingerprint (None without a run), run_dir). A run brings its own split; a
    bare model (`options.model` alone) takes its preset's, with the options' values on top."""
    split = {k: getattr(options, k) for k in SPLIT if getattr(options, k) is not None}
    if run_dir is None:
        if options.model is None:
            raise UsageError(
                "give a run folder (RUN_DIR) to evaluate a hyperfitted model, or "
                "--model to evaluate an original model alone"
            )
        defaults = hf.defaults_for(options.model)
        split = {**{k: getattr(defaults, k) for k in (*SPLIT, "seed")}, **split}
        split["data"] = runfiles.portable_path(options.data) if options.data else split["data"]
        settings = dataclasses.replace(defaults, **{k: v for k, v in split.items()}, run_name="x")
        hf.check_settings(dataclasses.replace(settings, num_prompts=1))
        name = f"{runfiles.default_run_name(options.model, hf.PRESETS)}-original"
        return dict(
            run_name=name,
            model=options.model,
            quant=options.quant or defaults.quant,
            dtype=options.dtype or defaults.dtype,
            adapter=None,
            tuned_model=None,
            split=split,
            train_fingerprint=None,
            run_dir=None,
        )
    if split:
        raise UsageError(
            f"--{next(iter(split)).replace('_', '-')} applies only without a run "
            f"folder: {run_dir} is evaluated on its own data split"
        )
    run, what = Path(run_dir), "pass a run folder written by hyperfit.py (results/<run-name>)"
    config = runfiles.read_json(run / "config.json", what)
    args = config.get("args")
    if not isinstance(args, dict) or any(k not in args for k in ("model", "quant", "seed", *SPLIT)):
        raise UsageError(f'{run}/config.json has no complete "args": {what}')
    trained = check_run_trained(run, run_dir, args)
    full = args.get("lora_r") == 0  # a full fine-tune: its model/ folder is a model of its own
    if options.model is not None and options.model != args["model"]:
        raise UsageError(
            f"--model {options.model} differs from the base model {args['model']} "
            f"that {run_dir} was trained on; drop --model"
        )
    return dict(
        run_name=config.get("run_name", run.name),
        model=args["model"],
        quant=options.quant or args["quant"],
        dtype=options.dtype or args.get("dtype", "auto"),
        adapter=None if full else str(trained),
        tuned_model=str(trained) if full else None,
        train_fingerprint=config.get("train_fingerprint"),
        split={k: args[k] for k in (*SPLIT, "seed")},
        run_dir=str(run),
    )


def check_run_trained(run, run_dir, args):
    """The trained weights of a finished text run: its adapter/ folder, or its model/ folder after
    a full fine-tune (--lora-r 0); else a UsageError that says what to do.
    An image run (images.py's: its model folder holds image_model.json, its evaluation is
    eval/images.json) is evaluated by images.py, which measures images, not text."""
    image_marker = Path(runfiles.absolute_path(args["model"])) / "image_model.json"
    if image_marker.exists() or (run / "eval" / "images.json").exists():
        raise UsageError(
            f"{run_dir} is an image run: evaluate it with "
            f"python experiments/images.py --evaluate {run_dir}"
        )
    marker = runfiles.trained_marker(run, args.get("lora_r"))
    if not marker.exists():
        raise UsageError(
            f"{run_dir} has no {marker.relative_to(run)} (the run did not finish, or lost that "
            "file): finish or repair it with "
            f"python hyperfit.py --run-name {run.name} --out-dir {run.parent} --resume,"
            " or pass --model alone to evaluate the original model"
        )
    runfiles.read_json(marker, f"the run's {marker.parent.name} is damaged; redo the run")
    return marker.parent


def load_eval_data(tokenizer, setup, options):
    """Rebuild the run's exact data split (a changed dataset is an error, not a silently different
    test) and take from it: the training sequences, the prompts (validation blocks first, then
    held-out ones: text training never saw), where each prompt came from, the human continuation
    of each prompt (the next new_tokens tokens of its text; fewer where its text ends), and the
    validation sequences of the sharpness table."""
    s, o = setup["split"], options
    splits = hf.rebuild_splits(tokenizer, s, setup["train_fingerprint"])
    held_out = torch.cat([splits["val"], splits["heldout"]])
    if o.num_prompts > len(held_out):
        raise UsageError(
            f"--num-prompts {o.num_prompts}: only {len(held_out)} held-out blocks of "
            f"{s['seq_len']} tokens exist (validation + held-out); ask for at most "
            f"{len(held_out)} or give more --data"
        )
    if o.block_ngrams > s["seq_len"]:
        raise UsageError(
            f"--block-ngrams {o.block_ngrams} is longer than the training sequences "
            f"({s['seq_len']} tokens); choose at most {s['seq_len']} (the paper: 5)"
        )
    sources = (splits["sources"]["val"] + splits["sources"]["heldout"])[: o.num_prompts]
    text_in_prompt = s["prompt_len"] - len(hf.bos_prefix(tokenizer))
    human = [
        splits["documents"][name][offset + text_in_prompt :][: o.new_tokens]
        for name, offset in sources
    ]
    training_text = tokenizer.batch_decode(splits["train"])
    scripts = sorted(measures.scripts(training_text))
    books = {name: tokenizer.decode(splits["documents"][name]) for name in dict(sources)}
    return dict(
        training_names=measures.names_of("\n".join(training_text)),  # for intrusions
        source_texts=[books[name] for name, _ in sources],
        train=splits["train"],
        prompts=held_out[: o.num_prompts, : s["prompt_len"]],
        scripts=scripts,
        prompt_sources=[f"{name}@{offset}" for name, offset in sources],
        human=human,
        sharpness=splits["val"][: o.sharpness_seqs],
    )


class Nets:
    """The original and the hyperfitted model of an evaluation. On a CPU (dense=None or True):
    two dense copies, the LoRA merged into one (bitsandbytes dequantizes at every step on a CPU:
    a copy generates ~3x faster). On a GPU (or dense=False): the one quantized net with its
    adapter, switched off for the original (peft's disable_adapter), which costs no second copy
    of the base model. After a full fine-tune (`tuned`, the hyperfitted model of its own, beside
    the original `net`): both as loaded, unquantized already."""

    def __init__(self, net, dense, tuned=None):
        has_adapter = hasattr(net, "peft_config")
        self.has_hyperfitted = has_adapter or tuned is not None
        self.net = None if dense or tuned is not None else net
        self.dense = dict(original=net, hyperfitted=tuned) if tuned is not None else {}
        if dense and tuned is None:
            self.dense["hyperfitted"] = engine.dense_copy(net) if has_adapter else None
            with net.disable_adapter() if has_adapter else contextlib.nullcontext():
                self.dense["original"] = engine.dense_copy(net)

    @contextlib.contextmanager
    def use(self, which):
        """`with nets.use("original") as net:` - the net to call for `which`."""
        if self.net is None:
            yield self.dense[which]
        elif which == "original" and self.has_hyperfitted:
            with self.net.disable_adapter():
                yield self.net
        else:
            yield self.net

    @staticmethod
    def mode_model(mode):
        return "hyperfitted" if mode.startswith("hyperfitted") else "original"


def load_nets(setup, device, dense, tokenizer=None):
    """Load the run's base model and adapter (or fully tuned model) once; `dense` None means:
    dense copies on a CPU. `tokenizer`: evaluate()'s, so it is not loaded a second time."""
    loads = [(setup["model"], setup["quant"], setup["adapter"])]
    if setup["tuned_model"]:  # a full fine-tune: the hyperfitted model is a model of its own
        loads.append((setup["tuned_model"], "none", None))
    dtype = setup["dtype"]
    nets = [hf.load_model(m, q, a, device, dtype, tokenizer)[0].eval() for m, q, a in loads]
    dense = (runfiles.pick_device(device).type == "cpu") if dense is None else dense
    return Nets(nets[0], dense, *nets[1:])


# -----------------------------------------------------------------------------
# the evaluation: sharpness, generation in every mode, measures


def measure_sharpness(nets, data, modes, progress, timing):
    """The sharpness table on validation text (each model), the share of validation positions
    where both models rank the same token first, and the entropy-matched temperature; their
    seconds go into `timing` (sharpness_s, temperature_s)."""
    sharpness, top1, clock, cache = {}, {}, time.time(), None
    for which in ("original", "hyperfitted") if nets.has_hyperfitted else ("original",):
        desc = f"sharpness: {which}" if progress else None
        with nets.use(which) as net:
            # the temperature search needs the original's logits on the same text: keep them
            if which == "original" and "original_entropy_matched" in modes:
                cache = [] if fits_logit_cache(net, data["sharpness"]) else None
            keep = cache if which == "original" else None
            stats = engine.token_statistics(
                net, data["sharpness"], SCORE_BATCH_SIZE, top1=True, desc=desc, keep=keep
            )
        top1[which] = stats.pop("top1_ids")
        sharpness[which] = stats
    if nets.has_hyperfitted:
        sharpness["val_top1_agreement"] = (
            (top1["original"] == top1["hyperfitted"]).float().mean().item()
        )
    timing["sharpness_s"], clock = time.time() - clock, time.time()
    matched = None
    if "original_entropy_matched" in modes:
        desc = "entropy-matched temperature" if progress else None
        with nets.use("original") as net:
            matched = entropy_matched_temperature(
                net, data["sharpness"], sharpness["hyperfitted"]["entropy"], desc=desc, cache=cache
            )
    timing["temperature_s"] = time.time() - clock
    return sharpness, matched


class RowSampler:
    """A logits processor that samples the next token of the batch rows `rows` (a range) as
    transformers' sampling does (temperature, then top-k, then top-p, then a draw from the
    softmax) and leaves the other rows alone: a sampled row's scores become -inf but for the drawn
    token, which greedy decoding then takes. So greedy, sampled and citation-blocked modes of one
    model share a batch, and a CPU step costs about the same for 96 rows as for 32 separately
    (the weights are read once). Draws come from its own generator, seeded: the first k tokens
    of a sampled continuation are exactly a k-token sample."""

    def __init__(self, rows, temperature, top_p, top_k, seed):
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.rows = rows
        self.warpers = [TemperatureLogitsWarper(temperature)]
        self.warpers += [TopKLogitsWarper(top_k)] if top_k else []
        self.warpers += [TopPLogitsWarper(top_p)] if top_p < 1 else []
        self.generator = torch.Generator().manual_seed(seed % hf.SEED_LIMIT)

    def __call__(self, input_ids, scores):
        part = scores[self.rows.start : self.rows.stop]  # a view: edits reach `scores`
        warped = part.clone()
        for warp in self.warpers:
            warped = warp(input_ids[self.rows.start : self.rows.stop], warped)
        probs = torch.softmax(warped.float(), dim=-1).cpu()
        tokens = torch.multinomial(probs, 1, generator=self.generator).to(scores.device)
        part.fill_(-math.inf)
        part.scatter_(1, tokens, 0.0)
        return scores


def mode_processor(mode, rows, options, matched, blocker, seed):
    """The logits processor that turns greedy decoding into `mode` on the batch rows `rows`."""
    if mode == "original_top_p":
        return RowSampler(rows, options["temperature"], options["top_p"], options["top_k"], seed)
    if mode == "original_entropy_matched":  # pure temperature sampling
        return RowSampler(rows, matched["temperature"], 1.0, 0, seed)
    if mode == "hyperfitted_blocked":
        return blocker.for_rows(rows)
    return None  # greedy


def chunk_processors(chunk, options, matched, blocker, start):
    """The logits processors of one batch of (mode, prompt) rows that starts at row `start`."""
    processors = []
    for mode in dict.fromkeys(mode for mode, _ in chunk):  # the batch's modes, in order
        span = [j for j, (m, _) in enumerate(chunk) if m == mode]
        seed = options["seed"] * 1_000_003 + MODES.index(mode) * 10_007 + start
        rows = range(span[0], span[-1] + 1)
        processor = mode_processor(mode, rows, options, matched, blocker, seed)
        processors += [processor] if processor is not None else []
    return processors


def generate_modes(nets, data, modes, options, matched, progress):
    """Every mode's continuations of the prompts (LongTensor [P, new_tokens] each), the original
    model's (perplexities, ranks) of its own continuations (OwnTokenScores), and the seconds each
    model took. The modes of one model share batches of options["batch_size"] rows (mode after
    mode, prompt after prompt): same prompts, batch size and seed -> same continuations."""
    prompts, new_tokens = data["prompts"], options["new_tokens"]
    blocker = None
    if "hyperfitted_blocked" in modes:
        blocker = NGramBlocker(data["train"], options["block_ngrams"])
    outputs, scores, timing = {m: [] for m in modes}, {m: [] for m in modes}, {}
    for which in ("original", "hyperfitted"):
        group = [mode for mode in modes if Nets.mode_model(mode) == which]
        rows = [(mode, i) for mode in group for i in range(len(prompts))]
        clock = time.time()
        for start in range(0, len(rows), options["batch_size"]):
            chunk = rows[start : start + options["batch_size"]]
            processors = chunk_processors(chunk, options, matched, blocker, start)
            desc = f"{which}: {', '.join(group)}" if progress else None
            observer = OwnTokenScores()  # each model's view of its own tokens, read while writing
            with nets.use(which) as net:
                out = engine.generate(
                    net,
                    prompts[[i for _, i in chunk]],
                    new_tokens,
                    batch_size=len(chunk),
                    logits_processor=processors,
                    observer=observer,
                    desc=desc,
                )
            own = zip(*observer.finish(out))
            for (mode, _), row, score in zip(chunk, out, own):
                outputs[mode].append(row)
                scores[mode].append(score)
        if group:
            timing[f"generate_{which}_s"] = time.time() - clock
        if group and progress:
            print(
                f"{which} model: {len(rows)} continuations x {new_tokens} tokens in "
                f"{timing[f'generate_{which}_s']:.0f}s",
                flush=True,
            )
    own = {m: tuple(map(list, zip(*scores[m]))) for m in modes}
    return {mode: torch.stack(outputs[mode]) for mode in modes}, own, timing


def score_rows(nets, which, prompts, rows):
    """(perplexities, ranks) of the continuations `rows` (lists of ids; the human row's may
    differ in length) under the `which` model, scored in groups of equal length."""
    perplexities, ranks = [None] * len(rows), [[] for _ in rows]
    for length in sorted({len(ids) for ids in rows} - {0}):
        chosen = [i for i, ids in enumerate(rows) if len(ids) == length]
        with nets.use(which) as net:
            continuation = torch.tensor([rows[i] for i in chosen], dtype=torch.long)
            scored = score_continuations(net, prompts[chosen], continuation)
        for i, perplexity, rank in zip(chosen, *scored):
            perplexities[i], ranks[i] = perplexity, rank
    return perplexities, ranks


def shown(items, desc, progress):
    """`items` under a tqdm bar named `desc` (no bar without `progress`): a phase that takes
    minutes on a CPU shows it is moving, not hung."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=not progress, leave=False)


@torch.no_grad()
def continuation_features(nets, rows, batch_size=SCORE_BATCH_SIZE):
    """MAUVE's features of each continuation (its token ids alone): the original model's last
    hidden state at the final token, as mauve-text's featurizer takes it from GPT-2."""
    features = [None] * len(rows)
    with nets.use("original") as net:
        device = next(net.parameters()).device
        for length in sorted({len(ids) for ids in rows} - {0}):
            chosen = [i for i, ids in enumerate(rows) if len(ids) == length]
            for start in range(0, len(chosen), batch_size):
                part = chosen[start : start + batch_size]
                ids = torch.tensor([rows[i] for i in part], dtype=torch.long, device=device)
                hidden = net(input_ids=ids, output_hidden_states=True).hidden_states[-1][:, -1]
                for i, row in zip(part, hidden.float().cpu().numpy()):
                    features[i] = row
    return features


def check_mauve_featurizer(options, human):
    """Load the hub featurizer that mauve_scores will use (options.mauve_features) now, when MAUVE
    will be computed over `human` (the human continuations): offline or without that model, it
    failed with tracebacks after every continuation was generated. A failure is a UsageError.
    With HF_HUB_OFFLINE set, only the hub cache is read (no network retries)."""
    enough = sum(1 for ids in human if ids) >= measures.MAUVE_MIN_SAMPLES
    if options.mauve_features == "original" or not enough:
        return
    from transformers import AutoModel, AutoTokenizer

    name, offline = options.mauve_features, os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    runfiles.quiet_libraries()
    try:  # what mauve's get_model loads; the files stay in the cache for it
        AutoTokenizer.from_pretrained(name, local_files_only=offline)
        AutoModel.from_pretrained(name, local_files_only=offline)  # dropped: mauve loads its own
    except Exception as e:  # offline, not cached, no such model on the hub
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UsageError(
            f"cannot load {name} for MAUVE's features ({why}); use --mauve-features original, "
            "or connect to the hub"
        ) from None


def mauve_scores(nets, rows_of, texts_of, options, progress, timing):
    """MAUVE of every mode against the human continuations (measures.mauve_score), over the
    prompts whose human continuation is there; the features as options.mauve_features says.
    Their seconds go into `timing` (mauve_features_s, mauve_s)."""
    import numpy as np

    keep, clock = [i for i, ids in enumerate(rows_of[HUMAN]) if ids], time.time()
    if len(keep) < measures.MAUVE_MIN_SAMPLES:  # below it MAUVE cannot tell texts apart
        timing.update(mauve_features_s=0.0, mauve_s=0.0)
        return {}
    if options.mauve_features == "original":
        features = {
            mode: continuation_features(nets, rows_of[mode])
            for mode in shown(rows_of, "MAUVE features", progress)
        }
    else:  # mauve-text's own featurizer (gpt2 or bert models, from the hub)
        from mauve.compute_mauve import get_features_from_input

        device_id = 0 if torch.cuda.is_available() and options.device != "cpu" else -1
        features = {
            mode: list(
                get_features_from_input(
                    None, None, texts, options.mauve_features, 1024, device_id, mode, batch_size=8
                )
            )
            for mode, texts in shown(texts_of.items(), "MAUVE features", progress)
        }
    timing["mauve_features_s"], clock = time.time() - clock, time.time()
    human = np.stack([features[HUMAN][i] for i in keep])
    scores = {
        mode: measures.mauve_score(human, np.stack([features[mode][i] for i in keep]), options.seed)
        for mode in shown([m for m in rows_of if m != HUMAN], "MAUVE", progress)
    }
    timing["mauve_s"] = time.time() - clock
    return scores


def measure_modes(nets, data, continuations, own_scores, tokenizer, options, progress, timing):
    """Every mode's records and summary, and the human row's. Each model's scores of its own
    continuations come from generating them (own_scores); the other continuations (and the human
    ones) it scores here. MAUVE of each mode against the human continuations goes into its
    summary. The seconds of each phase go into `timing` (scoring_s, measuring_s, mauve_*)."""
    rows_of = {mode: rows.tolist() for mode, rows in continuations.items()} | {HUMAN: data["human"]}
    scores_of, clock = {mode: {} for mode in rows_of}, time.time()
    models = ("original", "hyperfitted") if nets.has_hyperfitted else ("original",)
    for mode, which in shown([(m, w) for m in rows_of for w in models], "scoring", progress):
        own = own_scores.get(mode) if mode != HUMAN and Nets.mode_model(mode) == which else None
        scores_of[mode][which] = own or score_rows(nets, which, data["prompts"], rows_of[mode])
    timing["scoring_s"], clock = time.time() - clock, time.time()
    index = measures.TrainingIndex(data["train"])
    records, summary_modes = [], {}
    for mode in shown(rows_of, "measuring", progress):
        rows, scores = rows_of[mode], scores_of[mode]
        mode_records = measures.measure_mode(mode, data, rows, index, tokenizer, scores)
        records += mode_records
        summary_modes[mode] = measures.summarize_mode(mode_records)
    timing["measuring_s"] = time.time() - clock
    texts_of = {mode: [r["text"] for r in records if r["mode"] == mode] for mode in rows_of}
    for mode, result in mauve_scores(nets, rows_of, texts_of, options, progress, timing).items():
        summary_modes[mode]["metrics"]["mauve"] = dict(
            mean=result.pop("mauve"), std=None, ci=result.pop("ci")
        )
        summary_modes[mode]["mauve"] = result
    return records, summary_modes


def evaluate(run_dir=None, progress=True, **options):
    """Evaluate a hyperfitted run (`run_dir`) or an original model (`model` alone) and write
    summary.json and generations.jsonl to `out_dir` (default <run_dir>/eval, or
    results/<model>-original/eval), replacing an earlier evaluation there whole. Returns the
    summary dict. `options`: any field of Options by name (`python evaluate.py --help`). Raises
    UsageError on bad input, before anything is written."""
    started = time.time()
    device = runfiles.pick_device(options.get("device"))
    options = resolve_options(options, device)
    modes = check_modes(options.modes, run_dir is not None)
    setup = resolve_setup(run_dir, options)
    out_dir = check_out_dir(setup, options.out_dir)
    length, model = setup["split"]["prompt_len"] + options.new_tokens, setup["model"]
    runfiles.check_context(engine.resolve_model_source(model, hf.PRESETS), model, length)
    if progress:
        print(f"reading the tokenizer and the data split of {setup['run_name']} ...", flush=True)
    clock = time.time()
    tokenizer = hf.load_tokenizer(setup["model"])
    data = load_eval_data(tokenizer, setup, options)
    check_mauve_featurizer(options, data["human"])  # before the generation it would come after
    data_s = round(time.time() - clock, 1)
    with run_lock(setup, out_dir):
        summary, records = run_evaluation(setup, data, modes, options, tokenizer, device, progress)
        total_s = round(time.time() - started, 1)
        summary["timing_s"] = dict(data_s=data_s, **summary["timing_s"], total_s=total_s)
        write_evaluation(out_dir, summary, records)
    return summary


def check_out_dir(setup, out_dir):
    """Where the evaluation goes: <run>/eval by default. A folder of its own is replaced whole, so
    it must be a new folder, an empty one, or an earlier evaluation: not a link (its target lies
    beyond the run), holding nothing but the kit's files of an evaluation (runfiles.EVAL_FILES),
    and outside the run an evaluation's summary.json or generations.jsonl; and it may not lie
    inside another run's folder."""
    run = setup["run_dir"]
    default = (
        Path(run) / "eval"
        if run
        else Path(runfiles.absolute_path(hf.Settings.out_dir)) / setup["run_name"] / "eval"
    )
    out_dir = Path(os.path.abspath(Path(out_dir).expanduser() if out_dir else default))
    out_dir = out_dir.parent.resolve() / out_dir.name  # the folder itself: a link stays a link
    if not out_dir.name:  # the root
        raise UsageError(f"--out-dir {out_dir}: an evaluation needs a folder of its own")
    runfiles.recover_eval_folder(out_dir)  # a kill's .eval.old is the last whole one
    inside = run is not None and out_dir.is_relative_to(Path(run).resolve())
    for folder in [out_dir, *out_dir.parents]:
        if (folder / "config.json").exists() and runfiles.is_run_folder(folder):
            if run is None or folder != Path(run).resolve():
                raise UsageError(
                    f"--out-dir {out_dir} lies inside the run {folder}: evaluate "
                    "into a folder of its own, or into this run's eval/"
                )
    for folder in out_dir.parents:  # an evaluation's folder holds no folder of another
        if (folder / "summary.json").exists() or (
            inside and folder == Path(run).resolve() / "eval"
        ):
            raise UsageError(
                f"--out-dir {out_dir} lies inside the evaluation folder {folder}: evaluate into "
                "a folder of its own"
            )
    why = runfiles.foreign_entry(out_dir, runfiles.EVAL_FILES)
    names = {p.name for p in out_dir.iterdir()} if out_dir.is_dir() and not why else set()
    if not why and names and not inside and not {"summary.json", "generations.jsonl"} & names:
        why = "holds no summary.json"
    if why:
        raise UsageError(
            f"--out-dir {out_dir} is not an evaluation folder ({why}): an evaluation replaces "
            "its folder whole; move that away or choose a new folder"
        )
    writable = next(p for p in [out_dir, *out_dir.parents] if p.exists())
    if not (writable.is_dir() and os.access(writable, os.W_OK)):
        raise UsageError(
            f"cannot write to {out_dir} ({writable} is not writable); choose another --out-dir"
        )
    return out_dir


def run_lock(setup, out_dir):
    """The run folder's lock while the evaluation writes into it (a run still training, or a
    second evaluation, is refused); an --out-dir elsewhere is locked in a folder beside it
    (.<name>/: the out-dir itself is replaced whole), which must hold no one else's files."""
    run, command = setup["run_dir"], "evaluate.py " + " ".join(sys.argv[1:])
    if run is not None and out_dir.is_relative_to(Path(run).resolve()):
        return runfiles.RunLock(run, command)
    folder = out_dir.parent / f".{out_dir.name}"
    no_lock_yet = not (folder / runfiles.LOCK_FILE).exists()
    ours = no_lock_yet or runfiles.RunLock.held_by(folder, "evaluate.py")
    if runfiles.foreign_entry(folder, {runfiles.LOCK_FILE}) or not ours:
        raise UsageError(
            f"{folder} is not the kit's lock folder: move it away or choose another --out-dir"
        )
    return runfiles.RunLock(folder, command)


def run_evaluation(setup, data, modes, options, tokenizer, device, progress):
    """Load the models, measure sharpness, generate every mode, measure every continuation.
    Returns (summary without its total time, generation records)."""
    timing, clock = {}, time.time()
    if progress:  # loading a model prints nothing of its own for up to minutes
        adapter = " and its adapter" if setup["adapter"] else ""
        adapter = f" and {setup['tuned_model']}" if setup["tuned_model"] else adapter
        print(f"loading {setup['model']}{adapter} on {device} ...", flush=True)
    nets = load_nets(setup, device, options.dense, tokenizer)
    timing["load_s"] = time.time() - clock
    if progress:
        print(f"sharpness on {len(data['sharpness'])} validation sequences ...", flush=True)
    sharpness, matched = measure_sharpness(nets, data, modes, progress, timing)
    continuations, own_scores, generation_timing = generate_modes(
        nets, data, modes, dataclasses.asdict(options), matched, progress
    )
    timing.update(generation_timing)
    if progress:
        print("scoring and measuring every continuation ...", flush=True)
    records, summary_modes = measure_modes(
        nets, data, continuations, own_scores, tokenizer, options, progress, timing
    )
    args = dict(
        dataclasses.asdict(options), modes=modes, device=str(device), dense=nets.net is None
    )
    args.update(
        run_dir=setup["run_dir"] and runfiles.portable_path(setup["run_dir"]),
        model=setup["model"],
        quant=setup["quant"],
        dtype=setup["dtype"],
        out_dir=None,
        split=dict(
            setup["split"],
            data=runfiles.portable_path(runfiles.absolute_path(setup["split"]["data"])),
        ),
    )
    for name in SPLIT:  # a run's split is args["split"]; the options' copy would only repeat it
        args.pop(name)
    matched = matched and {
        k: matched[k] for k in ("temperature", "target_entropy", "achieved_entropy")
    }
    summary = dict(
        run=setup["run_name"],
        args=args,
        command=command_line(args),
        modes=summary_modes,
        differences=measures.mode_differences(records),  # paired permutation tests over prompts
        sharpness=sharpness,
        entropy_matched_temperature=matched,
        timing_s={k: round(v, 1) for k, v in timing.items()},
        environment=runfiles.environment(),
    )
    return summary, records


def write_evaluation(out_dir, summary, records):
    """summary.json and generations.jsonl as the whole of `out_dir` (runfiles.write_folder): a
    reader sees the old evaluation or the new one, never a mix; whatever else the old folder held
    (figures, tables made from it) goes with it."""
    summary["args"]["out_dir"] = runfiles.portable_path(out_dir)
    files = {
        "generations.jsonl": "".join(json.dumps(r) + "\n" for r in records),
        "summary.json": json.dumps(summary, indent=2) + "\n",
    }
    failure = "the earlier evaluation is intact: free some space and run it again"
    runfiles.write_folder(out_dir, files, failure, owned=runfiles.EVAL_FILES)


def command_line(args):
    """The evaluate.py command line that reproduces these arguments (for table.md and README):
    every option of Options as evaluated, but the output folder, where it was written."""
    words = ["python", "evaluate.py"] + ([args["run_dir"]] if args["run_dir"] else [])
    values = dict(args, **({} if args["run_dir"] else args["split"]))  # a bare model's split
    for field in dataclasses.fields(Options):
        value, flag = values.get(field.name), "--" + field.name.replace("_", "-")
        if value is None or field.name == "out_dir" or (field.name == "model" and args["run_dir"]):
            continue
        if field.type is bool:
            words.append(flag if value else flag.replace("--", "--no-"))
        else:
            words += [flag, ",".join(value) if field.name == "modes" else str(value)]
    return shlex.join(words)


# -----------------------------------------------------------------------------
# the quick check of an install: the whole chain in about two minutes (python hyperfit.py --quick)

# 16 steps on 16 x 64 tokens (the loss is ~0.2 by then); validation at steps 0 and 16 (greedy TTR
# on 4 prompts: the evaluation measures it on 8); then greedy text of both models, 48 tokens each:
# under 2 minutes on 2 CPU cores of either kind measured, model loading included (README)
QUICK_TRAINING = dict(run_name="quick", seq_len=64, num_train=16, epochs=8, lr=2e-3, num_val=8)
QUICK_TRAINING.update(num_prompts=4, gen_tokens=48, eval_every=16)
QUICK_EVALUATION = dict(
    modes="original_greedy,hyperfitted_greedy", num_prompts=8, new_tokens=48, sharpness_seqs=2
)


def quick_signs(run_dir, summary):
    """The paper's signature, direction by direction, on a quick run: (what, holds, numbers)."""
    steps = runfiles.read_jsonl(Path(run_dir) / "steps.jsonl")
    records = runfiles.read_jsonl(Path(run_dir) / "metrics.jsonl")
    (first, last), ttr = (records[0], records[-1]), {}
    for mode, info in summary["modes"].items():
        ttr[mode] = info["metrics"]["ttr"]["mean"]
    loss, val = (steps[0]["train_loss"], steps[-1]["train_loss"]), "val_loss"
    entropy, greedy = "val_entropy", (ttr["original_greedy"], ttr["hyperfitted_greedy"])
    return [
        ("training loss falls hard", loss[1] < 0.5 * loss[0], loss),
        ("validation loss rises", last[val] > first[val], (first[val], last[val])),
        ("entropy falls", last[entropy] < first[entropy], (first[entropy], last[entropy])),
        ("greedy TTR rises (original -> hyperfitted)", greedy[1] > greedy[0], greedy),
    ]


def quick_check(model=None, out_dir=None, progress=True, resume=False, overwrite=False, **settings):
    """Check an install in about two minutes: hyperfit `model` (the bundled one) on a tiny plan
    (QUICK_TRAINING, replacing an earlier quick run), evaluate greedy text of both models, plot,
    and print each direction of the paper's signature with a check mark. Returns 0 when the
    chain ran (the signs are printed, not enforced: 16 steps only show the direction)."""
    import plot

    if resume:
        raise UsageError("--quick starts a fresh quick run each time: drop --resume")
    started, given = time.time(), {k: v for k, v in settings.items() if v is not None}
    training = dict(QUICK_TRAINING, **given, out_dir=out_dir, progress=progress)
    again = runfiles.is_run_folder(hf.run_folder_of(dict(training, model=model)))
    run_dir = hf.hyperfit(model, overwrite=again, **training)  # replaces only an earlier one
    summary = evaluate(run_dir, progress=progress, **QUICK_EVALUATION)
    plot.plot_run(run_dir)
    signs = quick_signs(run_dir, summary)
    for what, holds, (before, after) in signs:
        print(f"{'✓' if holds else '✗'} {what}: {before:.3f} -> {after:.3f}")
    held, took = sum(holds for _, holds, _ in signs), time.time() - started
    folder = os.path.relpath(run_dir)
    print(f"quick check: {held}/{len(signs)} signs as in the paper, {took:.0f} s; see {folder}")
    return 0


# -----------------------------------------------------------------------------
# command line


def build_parser():
    p = runfiles.Parser(
        description="Generate continuations of held-out prompts with the original and the "
        "hyperfitted model and measure them as the paper does: RUN_DIR/eval/summary.json and "
        "generations.jsonl (plot.py renders them; annotate.py builds the human study's page).",
        epilog=f"modes: {', '.join(MODES)} (without RUN_DIR: {', '.join(ORIGINAL_ONLY_MODES)})",
    )
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a run folder of hyperfit.py")
    runfiles.add_arguments(p, Options)
    return p


def main(argv=None):
    """The command line: returns the exit code (0 done, 2 bad input, 130 interrupted); errors
    are one line on stderr."""
    for signum in (signal.SIGINT, signal.SIGTERM):  # both unwind: the lock and temporary files go
        signal.signal(signum, signal.default_int_handler)
    try:
        args = vars(build_parser().parse_args(argv))
        summary = evaluate(**args)
    except UsageError as e:
        print(f"evaluate.py: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "evaluate.py: interrupted; the earlier evaluation, if any, is intact", file=sys.stderr
        )
        return 130
    next_step = f"python plot.py {args['run_dir']}"  # it draws a run; a bare model has no curves
    if not args["run_dir"]:
        next_step = "compare its summary.json with a run's: python plot.py draws runs only"
    print(
        f"done in {summary['timing_s']['total_s']:.0f}s: {summary['args']['out_dir']} "
        f"(next: {next_step})"
    )
    return 0


if __name__ == "__main__" and "__file__" in globals():  # not when pasted into a notebook cell
    sys.exit(main())
