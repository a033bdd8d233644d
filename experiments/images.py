"""
Hyperfit an image model: the paper's image experiment (Carlsson et al., "The Hyperfitting
Phenomenon", ICLR 2025, arXiv 2412.04318: ImageGPT-Large on CIFAR-10). Fine-tune a pretrained
pixel model to near-zero training loss on a handful of images, then complete the bottom half of
held-out images from their top half: greedy completions of the original model collapse into flat
or repeated rows; do the hyperfitted model's?

    python experiments/images.py                       # offline, on a CPU: digits-igpt, one command
    python experiments/images.py --model imagegpt-large  # the paper's model on CIFAR-10 (hub + GPU)
    python experiments/images.py --model FOLDER --data IMAGES  # a local ImageGPT, folder of images
    python experiments/images.py --evaluate results/<run>         # (re)evaluate an image run only
    python plot.py results/digits-igpt                # training curves, the completion grid, report

In a notebook (this file imported, or pasted into a cell after hyperfit.py's):
    run_dir = images(model="digits-igpt")

How images ride the kit: an image is one line of a .jsonl whose "text" is its pixel tokens as
words ("g0 g16 ..." for the digits' grey levels, "c0 ... c511" for ImageGPT's colour clusters),
and every image model folder holds a tokenizer of those words in the model's id order, with the
start-of-image token <sos> (ImageGPT's last id) put before every image as BOS. One image is one
sequence, so hyperfit.py's whole run path takes them unchanged: data splits, 4-bit + LoRA
training, validation (loss, entropy, top-1, TTR of greedy completions), resume, locks,
checkpoints (`python hyperfit.py --model <image model folder> --data <its .jsonl>` works too).

Presets (each prepared once into $HYPERFIT_CACHE or ~/.cache/hyperfit/<preset>/: the model, its
tokenizer and image processor, the data as token lines):
    digits-igpt      offline: a small ImageGPT (0.11M parameters) pretrained here from scratch on
                     scikit-learn's 8x8 digits (1,400 images; 17 grey levels), hyperfitted on 16 of
                     the 397 digits pretraining never saw; the other held-out digits are completed
    imagegpt-small, imagegpt-medium, imagegpt-large
                     openai/imagegpt-* (the paper's: large) on CIFAR-10 (hf:uoft-cs/cifar10, the
                     first 2,500 training images, turned into 1,024 colour-cluster tokens each by
                     ImageGPT's image processor): needs the hub and a GPU

What the paper does not say, and what the kit does instead: its image sampling settings (the
original_sampled mode samples at temperature 1.0, no top-k or top-p); whether it filtered
CIFAR-10 by class (no filter here); its image training protocol (the hub presets take its text
protocol: 2,000 sequences, batch 8, 20 epochs, hf.Settings). ImageGPT's hub models have as
many positions as pixels (1,024), so a CIFAR sequence is <sos> + the first 1,023 pixels: the last
pixel is never a training target (completions still cover every pixel).

The evaluation writes JSON only, eval/images.json (eval/ is replaced whole): per mode
(original_greedy, original_sampled, hyperfitted_greedy) and for the real images, the measures
below (each defined in its function's docstring), the models' sharpness on held-out images, and
the pixels of the figure's images; plot.py draws eval/completions.png and report.md from it.
"""

import os
import signal
import sys

if __name__ == "__main__" and "__file__" in globals():  # Ctrl-C while the imports below load
    signal.signal(signal.SIGINT, lambda *_: os._exit(print("interrupted", file=sys.stderr) or 130))
if "__file__" in globals():  # the kit's files (hyperfit.py and the rest) are one folder up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import contextlib
import dataclasses
import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
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

# -----------------------------------------------------------------------------
# presets and defaults

DIGITS, DIGITS_SOURCE = "digits-igpt", "sklearn:load_digits"
CIFAR10 = "hf:uoft-cs/cifar10"
DIGIT_LEVELS, DIGIT_SIDE = 17, 8  # load_digits: 8x8 images, grey levels 0..16
DIGITS_PRETRAIN_IMAGES = 1400  # of 1,797; the other 397 are never seen in pretraining
DIGITS_SHAPE = dict(n_embd=64, n_layer=2, n_head=4)  # 0.11M parameters: as good as 0.8M here
# fp32, from scratch: ~1,300 steps, held-out loss ~1.29 nats/pixel in ~2-3 minutes on 2 cores
PRETRAIN = dict(
    epochs=30,
    batch_size=32,
    lr=3e-3,
    betas=(0.9, 0.95),
    weight_decay=0.01,
    warmup_steps=50,
    min_lr_rate=0.1,  # cosine decay to 10 % of the peak
    grad_clip=1.0,
    seed=0,
)
# hyperfitting the digits model: 16 images, 200 steps at a constant 3e-3 (the LoRA plateaus near
# 0.14 nats/pixel); validation at steps 0, 50, 100, 150, 200
DIGITS_RUN = dict(
    num_train=16, num_val=32, num_prompts=32, epochs=100, lr=3e-3, eval_every=50, batch_size=8
)
HUB_IMAGES = 2500  # CIFAR-10 images converted: 2,000 training + 128 validation + held-out
IMAGE_PRESETS = {
    DIGITS: dict(source=DIGITS_SOURCE, data=None, run=DIGITS_RUN, eval_images=None, eval_batch=128),
    **{
        f"imagegpt-{size}": dict(
            source=f"openai/imagegpt-{size}", data=CIFAR10, run={}, eval_images=128, eval_batch=16
        )
        for size in ("small", "medium", "large")
    },
}
LOCAL = dict(data=CIFAR10, run={}, eval_images=128, eval_batch=16)  # a folder or hub id
# eval_images: held-out images completed (None: all); eval_batch: completions generated at once
IMAGE_MODES = ("original_greedy", "original_sampled", "hyperfitted_greedy")
REAL = "real"  # the reference row: the real bottom halves, measured like every mode
SAMPLING_TEMPERATURE = 1.0  # the paper gives no sampling settings for images
SAMPLING_NOTE = "the paper gives no sampling settings for images: temperature 1.0, no top-k/top-p"
CLASSIFIER_NOTE = "RBF SVC (scikit-learn, C=10) trained on the model's labelled pretraining images"
NO_CLASSIFIER = "none offline: ImageGPT's pretraining images (ImageNet) are not here"
FIGURE_IMAGES = 12  # columns of the completion grid
MARKER = "image_model.json"  # in a prepared folder: what it was made from (written last)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
RUN_OPTIONS = ("run_name", "out_dir", "epochs", "lr", "num_train", "num_val", "seed")


# -----------------------------------------------------------------------------
# one command: prepare the model and its images, hyperfit, evaluate


def images(
    model=None,
    data=None,
    *,
    resume=False,
    overwrite=False,
    num_images=None,
    progress=True,
    **settings,
):
    """Prepare `model` (a preset, an ImageGPT folder or hub id; default DIGITS, and with resume
    the run's own) once, hyperfit it on its images with hf.hyperfit, then evaluate completions of
    held-out images (evaluate_images). data: a folder of images, hf:<dataset>, or a .jsonl of
    token lines (default: the preset's, and with resume the run's own).
    settings: any of hf.Settings (the command line passes RUN_OPTIONS); the preset's
    values and the image shape's seq_len, prompt_len and gen_tokens fill the rest. Returns the
    run folder. Raises UsageError on bad input, before any preparation where it can tell."""
    given = {k: v for k, v in settings.items() if v is not None}
    name = given.get("run_name") or runfiles.default_run_name(model or DIGITS, hf.PRESETS)
    given["run_name"] = name
    if resume:
        model, data = own_sources(model, data, given)
    model = model or DIGITS
    preset = preset_of(model)
    own = {} if resume else preset["run"]  # a resumed run keeps its own settings (hf.hyperfit)
    check_request(model, {**own, **given}, resume, overwrite)
    folder = prepare_model(model, progress)
    shape = image_shape(folder)
    data_file = prepare_data(folder, data or preset["data"], shape, progress)  # None: its own
    run = {**({} if resume else shape_settings(shape)), **own, **given}
    run_dir = hf.hyperfit(
        folder, data=data_file, resume=resume, overwrite=overwrite, progress=progress, **run
    )
    evaluate_images(run_dir, num_images, progress=progress)
    return run_dir


def own_sources(model, data, given):
    """With --resume: the run's own model and data (its config.json's: the prepared folder and
    its token lines) where not given. The defaults would be another run's (the digits, blamed on
    options never given) or a download (a preset's CIFAR-10)."""
    config = hf.run_folder_of(given) / "config.json"
    if not config.is_file():
        return model, data  # check_request says what is wrong with the folder
    args = runfiles.read_json(config, "the run is damaged: --overwrite it").get("args")
    args = args if isinstance(args, dict) else {}
    model = model or (args.get("model") and runfiles.absolute_path(args["model"]))
    return model, data or (args.get("data") and runfiles.absolute_path(args["data"]))


def preset_of(model):
    """The preset `model` names or was prepared from (a prepared folder's image_model.json says),
    else LOCAL: what an ImageGPT folder or hub id takes."""
    marker = Path(str(model)) / MARKER
    name = json.loads(marker.read_text()).get("model") if marker.is_file() else model
    return IMAGE_PRESETS.get(name, LOCAL)


def check_request(model, given, resume, overwrite):
    """The run's settings and folder, checked before anything is prepared (pretraining takes
    minutes): the counts, the learning rate and seed, the run name, and a folder that already
    holds a run (refused without --resume or --overwrite)."""
    if resume and overwrite:
        raise UsageError("--resume continues a run and --overwrite replaces it: choose one")
    path_like = str(model).startswith((".", "/", "~")) or str(model).count("/") != 1
    if model not in IMAGE_PRESETS and not os.path.isdir(str(model)) and path_like:  # nor a hub id
        raise UsageError(
            f"--model {model}: no such preset or folder; presets: {', '.join(IMAGE_PRESETS)}"
        )
    own = dict(vars(hf.defaults_for(str(model))), **given)
    if own["num_prompts"] > own["num_val"]:  # hf's message names --num-prompts: not ours
        raise UsageError(
            f"--num-val {own['num_val']}: each run completes its first {own['num_prompts']} "
            f"validation images while it trains; give --num-val {own['num_prompts']} or more"
        )
    hf.new_settings(dict(given, model=str(model)))
    run_dir = hf.run_folder_of(given)
    runfiles.check_writable_run_dir(run_dir)
    if resume or run_dir.exists():
        runfiles.check_run_dir(run_dir, resume, overwrite)


def shape_settings(shape):
    """seq_len, prompt_len and gen_tokens for a model's images: one image per sequence (<sos> and
    its pixels; <sos> and all but the last pixel where the model has as many positions as pixels,
    as ImageGPT's hub models do), the prompt <sos> + the top half, the rest generated."""
    pixels = shape["side"] ** 2
    seq_len = min(1 + pixels, shape["positions"])
    return dict(seq_len=seq_len, prompt_len=1 + pixels // 2, gen_tokens=seq_len - 1 - pixels // 2)


# -----------------------------------------------------------------------------
# image model folders: a preset's cache, ImageGPT from the hub or a local folder


def cache_root():
    return Path(os.environ.get("HYPERFIT_CACHE", Path.home() / ".cache" / "hyperfit"))


def prepare_model(model, progress=True):
    """The prepared folder of `model`: a preset's (prepared once into the cache), an ImageGPT
    folder or hub id (copied once into the cache with its tokenizer), or a folder prepared
    before (it holds image_model.json), used as it is."""
    if model not in IMAGE_PRESETS and (Path(str(model)) / MARKER).exists():
        return str(Path(model).resolve())
    if model in IMAGE_PRESETS:
        source, folder = IMAGE_PRESETS[model]["source"], cache_root() / model
    elif os.path.isdir(str(model)):
        source = str(Path(model).resolve())
        digest = hashlib.sha256(source.encode()).hexdigest()[:8]
        folder = cache_root() / f"{Path(source).name}-{digest}"
    else:
        source, folder = str(model), cache_root() / str(model).replace("/", "--")
    if (folder / MARKER).exists():
        return str(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # what a killed preparation left
    if progress:
        print(f"preparing {model} into {folder} (once)", flush=True)
    try:
        if source == DIGITS_SOURCE:
            prepare_digits(tmp, progress)
        else:
            prepare_pretrained(source, tmp)
        runfiles.write_atomic(tmp / MARKER, json.dumps(dict(model=str(model), source=source)))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # atomic: a half-prepared folder is never taken for a ready one
    return str(folder)


def prepare_pretrained(source, folder):
    """Copy the ImageGPT model and image processor of `source` (a hub id or a local folder: the
    same code path) into `folder` with a tokenizer of its colour clusters."""
    from transformers import AutoConfig, AutoImageProcessor, ImageGPTForCausalImageModeling

    runfiles.quiet_libraries()
    try:
        config = AutoConfig.from_pretrained(source)
        if config.model_type != "imagegpt":
            raise UsageError(f"--model {source} is a {config.model_type} model, not an ImageGPT")
        processor = AutoImageProcessor.from_pretrained(source)
        net = ImageGPTForCausalImageModeling.from_pretrained(source)
    except UsageError:
        raise
    except Exception as e:  # a missing or damaged file, the network
        raise runfiles.load_error(source, e) from None
    if getattr(processor, "clusters", None) is None:
        raise UsageError(f"--model {source} has no ImageGPT image processor (colour clusters)")
    net.save_pretrained(folder)
    processor.save_pretrained(folder)
    words = [f"c{i}" for i in range(len(processor.clusters))]
    image_tokenizer(words).save_pretrained(folder)


def image_tokenizer(words):
    """A tokenizer whose words are the pixel tokens `words` in the model's id order, then <sos>
    (ImageGPT's start of image, its last id), which starts every image as BOS (so
    hf.bos_prefix finds it) and pads (never seen: the kit always passes attention masks).
    tokenizers' WordLevel needs an unknown token: <sos> (images.py checks its data's words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocabulary = {word: i for i, word in enumerate([*words, "<sos>"])}
    word_level = Tokenizer(models.WordLevel(vocabulary, unk_token="<sos>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    sos = [("<sos>", len(words))]
    word_level.post_processor = processors.TemplateProcessing(single="<sos> $A", special_tokens=sos)
    return PreTrainedTokenizerFast(
        tokenizer_object=word_level, bos_token="<sos>", pad_token="<sos>", unk_token="<sos>"
    )


def image_shape(folder):
    """What the image model in `folder` works on: dict(side (pixels per row), positions (its
    context), palette (uint8 [tokens, 3]: the RGB colour of each pixel token, from the image
    processor's clusters in [-1, 1]), sos (the start-of-image id)). Checks that they fit."""
    from transformers import AutoConfig, AutoImageProcessor

    runfiles.quiet_libraries()
    try:
        config = AutoConfig.from_pretrained(folder)
        processor = AutoImageProcessor.from_pretrained(folder)
    except Exception as e:  # a damaged cache
        raise runfiles.load_error(folder, e) from None
    clusters = np.asarray(processor.clusters, dtype=np.float64)
    side = processor.size["height"]
    if side != processor.size["width"] or side % 2 or config.vocab_size != len(clusters) + 1:
        raise UsageError(
            f"{folder}: expected square images with an even side and one token per colour "
            f"cluster plus <sos>; found {processor.size} and {config.vocab_size} tokens for "
            f"{len(clusters)} clusters"
        )
    if side * side > config.n_positions:
        raise UsageError(
            f"{folder}: {side}x{side} pixels exceed its {config.n_positions} positions"
        )
    palette = image_palette(processor)
    return dict(side=side, positions=config.n_positions, palette=palette, sos=len(clusters))


# -----------------------------------------------------------------------------
# the digits: scikit-learn's load_digits, a small ImageGPT pretrained on them here


def digits_processor():
    """ImageGPT's image processor with the digits' 17 grey levels as its colour clusters (level 0,
    the background, white; 16 black): it turns an 8x8 digit into its grey levels exactly."""
    from transformers import ImageGPTImageProcessor

    grey = np.linspace(1.0, -1.0, DIGIT_LEVELS)  # clusters live in [-1, 1]
    side = dict(height=DIGIT_SIDE, width=DIGIT_SIDE)
    return ImageGPTImageProcessor(clusters=np.stack([grey] * 3, axis=1), size=side)


def prepare_digits(folder, progress=True):
    """The digits-igpt folder: load_digits (1,797 images) shuffled once, 1,400 to pretrain on
    (pretrain.jsonl, labelled: also the classifier's training set) and 397 never seen in
    pretraining (images.jsonl: the images to hyperfit on and complete); a small ImageGPT
    pretrained from scratch on the 1,400 (pretrain_digits), its tokenizer and image processor."""
    from sklearn.datasets import load_digits

    runfiles.quiet_libraries()
    digits = load_digits()
    order = np.random.default_rng(PRETRAIN["seed"]).permutation(len(digits.images))
    processor, words = digits_processor(), [f"g{i}" for i in range(DIGIT_LEVELS)]
    palette = image_palette(processor)
    pictures = [palette[level.astype(int)] for level in digits.images]  # RGB, ink black
    tokens = pixels_to_tokens(processor, pictures)
    if not np.array_equal(tokens.numpy(), digits.images.reshape(len(pictures), -1)):
        raise RuntimeError("the image processor did not return the digits' grey levels")
    Path(folder).mkdir(parents=True)
    split = DIGITS_PRETRAIN_IMAGES
    for name, part in (("pretrain", order[:split]), ("images", order[split:])):
        lines = [
            dict(text=" ".join(words[t] for t in tokens[i].tolist()), label=int(digits.target[i]))
            for i in part
        ]
        write_lines(Path(folder) / f"{name}.jsonl", lines)
    ids = torch.cat([torch.full((len(tokens), 1), DIGIT_LEVELS), tokens], dim=1)  # <sos> first
    net, record = pretrain_digits(ids[order[:split]], ids[order[split:]], progress)
    net.save_pretrained(folder)
    processor.save_pretrained(folder)
    image_tokenizer(words).save_pretrained(folder)
    runfiles.write_atomic(Path(folder) / "pretrain.json", json.dumps(record, indent=2) + "\n")


def pretrain_digits(train_ids, unseen_ids, progress=True):
    """A small ImageGPT (DIGITS_SHAPE, no dropout) trained from scratch in fp32 on `train_ids`
    ([n, 65]: <sos> + 64 grey levels): AdamW (PRETRAIN), linear warmup then cosine decay to 10 %
    of the peak (transformers' schedule), gradient clipping, the kit's loss (hyperfit's
    plain_loss_sum, per pixel). Returns (net, what was done: settings, time, the loss per epoch
    and the final loss on `unseen_ids`, digits pretraining never saw)."""
    from transformers import (
        ImageGPTConfig,
        ImageGPTForCausalImageModeling,
        get_cosine_with_min_lr_schedule_with_warmup,
    )

    p, started = PRETRAIN, time.time()
    torch.manual_seed(p["seed"])
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config = ImageGPTConfig(
        vocab_size=DIGIT_LEVELS + 1, n_positions=train_ids.shape[1], **DIGITS_SHAPE, **no_dropout
    )
    net = ImageGPTForCausalImageModeling(config)
    optimizer = torch.optim.AdamW(
        net.parameters(), lr=p["lr"], betas=p["betas"], weight_decay=p["weight_decay"]
    )
    steps = p["epochs"] * math.ceil(len(train_ids) / p["batch_size"])
    schedule = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, p["warmup_steps"], steps, min_lr_rate=p["min_lr_rate"]
    )
    history = []
    for epoch in range(p["epochs"]):
        total = 0.0
        for batch in hf.global_batches(len(train_ids), p["batch_size"], p["seed"], epoch):
            ids = train_ids[batch]
            loss = hf.plain_loss_sum(net, ids, hf.token_loss_sum) / ids[:, 1:].numel()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), p["grad_clip"])
            optimizer.step()
            schedule.step()
            total += loss.item() * len(ids)
        history.append(round(total / len(train_ids), 4))
        if progress and (epoch + 1) % 5 == 0:
            elapsed = time.time() - started
            epochs, loss = f"{epoch + 1}/{p['epochs']}", history[-1]
            print(f"  pretraining epoch {epochs}: loss {loss:.3f} ({elapsed:.0f}s)", flush=True)
    net.eval()
    unseen = engine.token_statistics(net, unseen_ids, batch_size=128)["loss"]
    parameters = sum(p.numel() for p in net.parameters())
    record = dict(shape=DIGITS_SHAPE, parameters=parameters, steps=steps, settings=p)
    record.update(seconds=round(time.time() - started, 1), torch_threads=torch.get_num_threads())
    return net, dict(record, train_loss_per_epoch=history, unseen_loss=round(unseen, 4))


# -----------------------------------------------------------------------------
# images as tokens: pixels -> tokens (ImageGPT's image processor) -> pixels (its palette)


def image_palette(processor):
    """The RGB colour (uint8) of each pixel token: the processor's clusters, from [-1, 1]."""
    clusters = np.asarray(processor.clusters, dtype=np.float64)
    return np.rint((clusters + 1) * 127.5).clip(0, 255).astype(np.uint8)


def pixels_to_tokens(processor, pictures, chunk=256):
    """Pictures (PIL images or uint8 [H, W, 3] arrays) -> LongTensor [n, side * side] of pixel
    tokens: ImageGPT's image processor resizes each to its size and takes, for every pixel,
    the nearest colour cluster (Chen et al. 2020), in raster order."""
    from PIL import Image

    pictures = [p if isinstance(p, Image.Image) else Image.fromarray(p) for p in pictures]
    parts = [
        processor([p.convert("RGB") for p in pictures[i : i + chunk]], return_tensors="pt")
        for i in range(0, len(pictures), chunk)
    ]
    return torch.cat([part["input_ids"] for part in parts]).long()


def tokens_to_pixels(palette, tokens, side):
    """Pixel tokens [n, side * side] -> uint8 RGB pictures [n, side, side, 3]."""
    tokens = np.asarray(tokens)
    return palette[tokens].reshape(len(tokens), side, side, palette.shape[1])


def prepare_data(folder, data, shape, progress=True):
    """The .jsonl of token lines to hyperfit on: the digits' own (data None), a .jsonl given
    (checked), or `data` (a folder of images or hf:<dataset>) converted once by the model's image
    processor into <folder>/data-<hash>.jsonl (its first HUB_IMAGES images)."""
    if data is None:
        data = str(Path(folder) / "images.jsonl")
        if not Path(data).exists():
            raise UsageError(f"--data: {folder} holds no images of its own; give --data")
    if not str(data).startswith("hf:") and Path(data).is_file():
        check_image_lines(data, folder, shape)
        return str(Path(data).resolve())
    source = str(data) if str(data).startswith("hf:") else str(Path(data).resolve())
    key = hashlib.sha256(f"{source}|{HUB_IMAGES}".encode()).hexdigest()[:12]
    target = Path(folder) / f"data-{key}.jsonl"
    if not target.exists():
        from transformers import AutoImageProcessor

        if progress:
            print(f"converting up to {HUB_IMAGES} images of {source} into {target} (once)")
        pictures, labels, names = read_pictures(source, HUB_IMAGES)
        processor = AutoImageProcessor.from_pretrained(folder)
        tokens = pixels_to_tokens(processor, pictures)
        words = hf.load_tokenizer(folder).convert_ids_to_tokens
        lines = [
            dict(text=" ".join(words(row.tolist())), label=label, id=name)
            for row, label, name in zip(tokens, labels, names)
        ]
        write_lines(target, lines)
    return str(target)


def read_pictures(source, limit):
    """Up to `limit` pictures of `source` with their labels (None where there are none) and names:
    hf:<dataset> (the datasets package: its train split, its first Image column, its first
    ClassLabel column), or a folder of image files (sorted; a subfolder's name is the label)."""
    from PIL import Image

    if source.startswith("hf:"):
        try:
            from datasets import load_dataset

            rows = load_dataset(source[3:], split="train")
        except Exception as e:  # not installed, the network, no such dataset
            raise UsageError(
                f"could not load {source} ({e.__class__.__name__}: {str(e)[:120]}); install "
                "datasets and check the network, or pass a folder of images"
            ) from None
        kinds = {name: type(feature).__name__ for name, feature in rows.features.items()}
        image = next((k for k, kind in kinds.items() if kind == "Image"), None)
        label = next((k for k, kind in kinds.items() if kind == "ClassLabel"), None)
        if image is None:
            raise UsageError(f"--data {source} has no image column")
        rows = rows.select(range(min(limit, len(rows))))
        labels = rows[label] if label else [None] * len(rows)
        return rows[image], labels, [f"{source}#{i}" for i in range(len(rows))]
    root = Path(source)
    if not root.is_dir():
        raise UsageError(f"--data {source}: no such folder, .jsonl file or hf:<dataset>")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise UsageError(f"--data {source}: the folder holds no {'/'.join(IMAGE_SUFFIXES)} files")
    pictures = []
    for file in files:
        try:
            pictures.append(Image.open(file).convert("RGB"))
        except OSError as e:
            raise UsageError(f"--data: cannot read {file} as an image ({e})") from None
    labels = [str(f.parent.relative_to(root)) if f.parent != root else None for f in files]
    return pictures, labels, [str(f.relative_to(root)) for f in files]


def check_image_lines(data, folder, shape):
    """Every line of a token .jsonl must be one image of this model: side * side known words."""
    vocabulary = set(hf.load_tokenizer(folder).get_vocab()) - {"<sos>"}
    for name, text in hf.load_texts(str(data)):
        words = text.split()
        if len(words) != shape["side"] ** 2 or not set(words) <= vocabulary:
            raise UsageError(
                f"--data {name} is not a {shape['side']}x{shape['side']} image of this model's "
                f"pixel tokens ({len(words)} words; theirs are like {sorted(vocabulary)[0]})"
            )


def write_lines(path, records):
    """A .jsonl file, written atomically."""
    runfiles.write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


# -----------------------------------------------------------------------------
# measures of completed images (each a pure function of token or pixel arrays)


def token_ttr(completions):
    """Mean type-token ratio of the completions (int array [n, pixels]): distinct pixel tokens /
    pixel tokens of each completion, averaged. The paper's TTR (Carlsson et al. 2025, there of
    the last 96 words) over a completed bottom half: low when it repeats a few colours."""
    return float(np.mean([measures.type_token_ratio(row.tolist()) for row in completions]))


def one_colour_share(completions):
    """Share of completions whose every pixel is the same token: the completion is one colour."""
    return float(np.mean([len(np.unique(row)) == 1 for row in completions]))


def repeated_row_share(images, side, first_row):
    """Share of images (tokens [n, side * side]) in which a completed row (rows `first_row`..)
    repeats the row above it exactly; the first completed row is compared with the prompt's last:
    the image form of a loop."""
    rows = np.asarray(images).reshape(len(images), side, side)[:, first_row - 1 :]
    return float((rows[:, 1:] == rows[:, :-1]).all(axis=2).any(axis=1).mean())


def distinct_share(completions):
    """Distinct completions / completions: 1 when no two prompts got the same bottom half."""
    return len({row.tobytes() for row in np.ascontiguousarray(completions)}) / len(completions)


def pixel_distance(a, b):
    """Mean absolute difference per pixel and channel of uint8 RGB pixels, as a fraction of the
    full range: 0 identical, 1 black against white (for digits, grey levels apart / 16)."""
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean() / 255)


def distance_to_real(completed, real):
    """pixel_distance between the completed and the real bottom halves (RGB [n, pixels, 3])."""
    return pixel_distance(completed, real)


def mean_pairwise_distance(completed):
    """Mean pixel_distance between the completions of two different prompts (RGB [n, pixels, 3]),
    over all pairs: diversity across completions; near 0 when every prompt gets the same one."""
    flat = completed.reshape(len(completed), -1).astype(np.float64)
    total = sum(np.abs(flat[i + 1 :] - flat[i]).mean(axis=1).sum() for i in range(len(flat)))
    return float(total / (len(flat) * (len(flat) - 1) / 2) / 255) if len(flat) > 1 else None


def classifier_accuracy(classifier, pictures, labels):
    """Share of completed images (RGB [n, side, side, 3], prompt and completion) that a classifier
    trained on real images assigns to the class of the image the prompt came from: does the
    completion still look like what its top half began? None without a classifier or labels."""
    if classifier is None or any(label is None for label in labels):
        return None
    predicted = classifier.predict(pictures.reshape(len(pictures), -1) / 255.0)
    return float(np.mean(predicted == np.asarray(labels)))


def measure_images(tokens, real, labels, shape, classifier):
    """Every measure of completed images (tokens [n, side * side]: the real top half and the
    completed bottom half) against the real images; the real images give the reference row."""
    palette, side, half = shape["palette"], shape["side"], shape["side"] ** 2 // 2
    completions = tokens[:, half:]
    completed, truth = palette[completions], palette[real[:, half:]]
    return dict(
        token_ttr=token_ttr(completions),
        one_colour=one_colour_share(completions),
        repeated_row=repeated_row_share(tokens, side, side // 2),
        distinct=distinct_share(completions),
        pairwise_distance=mean_pairwise_distance(completed),
        distance_to_real=distance_to_real(completed, truth),
        classifier_accuracy=classifier_accuracy(
            classifier, tokens_to_pixels(palette, tokens, side), labels
        ),
    )


def train_classifier(folder, shape):
    """An RBF support-vector classifier (scikit-learn's SVC, C=10) on the labelled images the
    model was pretrained on (pretrain.jsonl: the digits' 1,400), pixels scaled to [0, 1]; None
    where the folder has none (ImageGPT's pretraining images, ImageNet, are not here)."""
    path = Path(folder) / "pretrain.jsonl"
    if not path.exists():
        return None
    from sklearn.svm import SVC

    vocabulary = hf.load_tokenizer(folder).get_vocab()
    records = runfiles.read_jsonl(path)
    tokens = np.array([[vocabulary[w] for w in r["text"].split()] for r in records])
    features = shape["palette"][tokens].reshape(len(tokens), -1) / 255.0
    return SVC(C=10, gamma="scale").fit(features, [r["label"] for r in records])


# -----------------------------------------------------------------------------
# the evaluation: complete held-out bottom halves in every mode, measure, write eval/images.json


class TemperatureSampler:
    """A logits processor that draws the next token from softmax(scores / temperature), seeded,
    and leaves only it possible: engine.generate's greedy step then takes it (pure temperature
    sampling, transformers' do_sample without top-k or top-p)."""

    def __init__(self, temperature, seed):
        self.temperature, self.seed, self.generator = temperature, seed, None

    def __call__(self, input_ids, scores):
        if self.generator is None:
            self.generator = torch.Generator(scores.device).manual_seed(self.seed)
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        drawn = torch.multinomial(probs, 1, generator=self.generator)
        return torch.full_like(scores, -math.inf).scatter(-1, drawn, 0.0)


@contextlib.contextmanager
def model_of(net, which):
    """The original (adapter off) or the hyperfitted net to generate with: a dense copy on a CPU,
    the 4-bit net itself on a GPU (engine.scoring_net)."""
    with net.disable_adapter() if which == "original" else contextlib.nullcontext():
        yield engine.scoring_net(net)


def evaluation_data(config, tokenizer, num_images, most=None):
    """The run's exact split rebuilt (a changed dataset is an error) and, from its validation and
    held-out images (never trained on), the first `num_images` (None: all, or at most `most`):
    real (tokens [n, pixels], whole images), blocks (the run's sequences of them), labels."""
    args = config["args"]
    splits = hf.rebuild_splits(tokenizer, args, config.get("train_fingerprint"))
    sources = splits["sources"]["val"] + splits["sources"]["heldout"]
    blocks = torch.cat([splits["val"], splits["heldout"]])
    n = num_images or min(most or len(sources), len(sources))
    if n > len(sources):
        raise UsageError(f"--num-images {n}: the run has {len(sources)} held-out images")
    lines = Path(runfiles.absolute_path(args["data"])).read_text(encoding="utf-8").splitlines()
    labels = {  # load_texts names an image <file>:<line>
        f"{Path(args['data']).name}:{number}": json.loads(line).get("label")
        for number, line in enumerate(lines, 1)
        if line.strip()
    }
    real = torch.tensor([splits["documents"][name] for name, _ in sources[:n]])
    return dict(real=real, blocks=blocks[:n], labels=[labels.get(name) for name, _ in sources[:n]])


def complete_all(net, data, new_tokens, batch_size, seed, progress):
    """Every mode's completions (tokens [n, new_tokens]) of data["prompts"], both models'
    sharpness on the held-out sequences (engine.token_statistics) and each model's time."""
    completions, sharpness, timing = {}, {}, {}
    for which in ("original", "hyperfitted"):
        clock = time.time()
        with model_of(net, which) as scorer:
            for mode in (m for m in IMAGE_MODES if m.startswith(which)):
                sampled = mode.endswith("sampled")
                processors = [TemperatureSampler(SAMPLING_TEMPERATURE, seed)] if sampled else []
                desc = mode if progress else None
                completions[mode] = engine.generate(
                    scorer, data["prompts"], new_tokens, batch_size, processors, desc=desc
                )
            sharpness[which] = engine.token_statistics(scorer, data["blocks"], batch_size)
        timing[f"{which}_s"] = round(time.time() - clock, 1)
    return completions, sharpness, timing


def evaluate_images(run_dir, num_images=None, seed=0, progress=True):
    """Complete the bottom half of held-out images (the run's validation and held-out images, the
    first `num_images`; None: the preset's eval_images) from their top half with the original
    model (greedy, and sampled at SAMPLING_TEMPERATURE) and the hyperfitted one (greedy), measure
    every mode and the real images (measure_images) and write <run_dir>/eval/images.json.
    Returns the report."""
    started, run = time.time(), Path(run_dir)
    what = "pass a finished image run of images.py or hyperfit.py (results/<run>)"
    config = runfiles.read_json(run / "config.json", what)
    args = config.get("args") or {}
    folder = args.get("model")
    if not folder or not (Path(folder) / MARKER).exists():
        raise UsageError(f"{run} is not an image run (its model has no {MARKER}): {what}")
    if args.get("lora_r") == 0:
        raise UsageError(f"{run} is a full fine-tune (lora_r 0): images.py evaluates LoRA runs")
    marker = runfiles.trained_marker(run, args.get("lora_r"))
    if not marker.exists():
        raise UsageError(f"{run} has no adapter/ (the run did not finish): finish it with --resume")
    if why := runfiles.foreign_entry(run / "eval", runfiles.EVAL_FILES):  # replaced whole
        raise UsageError(f"{run / 'eval'} {why}: move that away, then evaluate again")
    shape, tokenizer = image_shape(folder), hf.load_tokenizer(folder)
    preset = preset_of(folder)
    data = evaluation_data(config, tokenizer, num_images, preset["eval_images"])
    half, sos = shape["side"] ** 2 // 2, shape["sos"]
    data["prompts"] = torch.cat(
        [torch.full((len(data["real"]), 1), sos), data["real"][:, :half]], 1
    )
    with runfiles.RunLock(run, "images.py --evaluate " + str(run_dir)):
        clock = time.time()
        net, _ = hf.load_model(folder, args["quant"], str(marker.parent), dtype=args["dtype"])
        timing = dict(load_s=round(time.time() - clock, 1))
        completions, sharpness, generation = complete_all(
            net, data, half, preset["eval_batch"], seed, progress
        )
        report = image_report(config, shape, data, completions, train_classifier(folder, shape))
        report.update(sharpness=sharpness, seed=seed, batch_size=preset["eval_batch"])
        report["timing_s"] = dict(timing, **generation, total_s=round(time.time() - started, 1))
        write_report(run / "eval", report)
    return report


def image_report(config, shape, data, completions, classifier):
    """images.json without its timings: the setup, every mode's measures and the real images',
    and the figure's images (the first FIGURE_IMAGES prompts: tokens, with the palette)."""
    real, half = data["real"].numpy(), shape["side"] ** 2 // 2
    completed = {m: np.concatenate([real[:, :half], c.numpy()], 1) for m, c in completions.items()}
    completed[REAL] = real  # measured like every mode: the reference row
    measures = {
        m: measure_images(v, real, data["labels"], shape, classifier) for m, v in completed.items()
    }
    figure = dict(side=shape["side"], prompt_pixels=half, palette=shape["palette"].tolist())
    shown = {m: v[:FIGURE_IMAGES].tolist() for m, v in completed.items()}
    figure["images"] = dict(prompt=real[:FIGURE_IMAGES, :half].tolist(), **shown)
    pretraining = Path(config["args"]["model"]) / "pretrain.json"
    return dict(
        run=config.get("run_name"),
        model=config["args"]["model"],
        data=config["args"]["data"],
        num_images=len(real),
        sampling=dict(temperature=SAMPLING_TEMPERATURE, top_k=None, top_p=None, note=SAMPLING_NOTE),
        classifier=CLASSIFIER_NOTE if classifier is not None else NO_CLASSIFIER,
        modes=measures,
        figure=figure,
        pretraining=runfiles.read_json(pretraining, "") if pretraining.exists() else None,
        environment=runfiles.environment(),
    )


def write_report(out_dir, report):
    """eval/images.json as the whole of eval/ (runfiles.write_folder, as evaluate.py writes
    eval/): a reader (or a kill) sees the old evaluation or the new one, never a mix."""
    files = {"images.json": json.dumps(report, indent=1) + "\n"}
    failure = "the earlier evaluation is intact"
    runfiles.write_folder(out_dir, files, failure, owned=runfiles.EVAL_FILES)


# -----------------------------------------------------------------------------
# command line


def build_parser():
    presets = "; ".join(
        f"{k} = {v['source']} (data: {v['data'] or 'its own'})" for k, v in IMAGE_PRESETS.items()
    )
    p = runfiles.Parser(
        description="Hyperfit an image model (4-bit + LoRA) on a few images, then complete the "
        "bottom half of held-out images from their top half: <out-dir>/<run-name>/ and its "
        "eval/images.json (python plot.py <run> draws the completion grid). Offline by "
        f"default: {DIGITS}, pretrained here on scikit-learn's digits once.",
        epilog=f"presets: {presets}",
    )
    model = f"a preset, an ImageGPT folder or hub id (default: {DIGITS}; --resume: the run's own)"
    p.add_argument("--model", help=model)
    data = f"default: the preset's; {CIFAR10} for ImageGPT; --resume: the run's own"
    p.add_argument("--data", help=f"a folder of images, hf:<dataset> or a token .jsonl ({data})")
    count = "default: all for digits, 128 for ImageGPT"
    p.add_argument("--num-images", type=int, help=f"held-out images to complete ({count})")
    p.add_argument("--evaluate", metavar="RUN", help="only (re)evaluate this finished image run")
    fields = {field.name: field for field in dataclasses.fields(hf.Settings)}
    for name in RUN_OPTIONS:
        flag, help = "--" + name.replace("_", "-"), fields[name].metadata["help"]
        p.add_argument(flag, type=fields[name].type, metavar=name.upper(), help=help)
    resume = "continue the run from its checkpoint (or a finished run), then evaluate"
    p.add_argument("--resume", action="store_true", help=resume)
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    return p


def main(argv=None):
    """The command line: returns the exit code (0 done, 2 bad input, 1 numbers broke, 130
    interrupted); errors are one line on stderr."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C from here: KeyboardInterrupt
    try:
        args = vars(build_parser().parse_args(argv))
        runfiles.check_positive_int("num_images", args["num_images"], optional=True)
        if args["evaluate"]:
            return evaluate_command(args)
        run = os.path.relpath(images(**{k: v for k, v in args.items() if k != "evaluate"}))
    except tuple(runfiles.EXIT_CODES) as e:
        print(f"images.py: {e}", file=sys.stderr)
        return next(code for kind, code in runfiles.EXIT_CODES.items() if isinstance(e, kind))
    except KeyboardInterrupt:
        print("images.py: aborted; a run keeps its last checkpoint (--resume)", file=sys.stderr)
        return 130
    print(f"done: {run}/eval/images.json  (next: python plot.py {run})")
    return 0


def evaluate_command(args):
    """--evaluate RUN: evaluate a finished image run; any training option is refused."""
    extra = [k for k, v in args.items() if v and k not in ("evaluate", "num_images", "model")]
    extra += ["model"] if args["model"] not in (None, DIGITS) else []
    if extra:
        flags = ", ".join("--" + name.replace("_", "-") for name in extra)
        raise UsageError(f"--evaluate takes the run's own settings: drop {flags}")
    evaluate_images(args["evaluate"], args["num_images"])
    print(f"done: {args['evaluate']}/eval/images.json  (next: python plot.py {args['evaluate']})")
    return 0


if __name__ == "__main__" and "__file__" in globals():  # not when pasted into a notebook cell
    sys.exit(main())
