"""Shared fixtures: tiny random Llamas with their own tiny tokenizers (tiny.random_model), saved
as ordinary Hugging Face folders, so every test runs the kit's real loading path (4-bit + LoRA) in
seconds; and the settings of a tiny run."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "experiments")]  # the kit, and its side experiments

import hyperfit  # noqa: E402
import tiny  # noqa: E402

ALICE = ROOT / "data" / "fiction" / "carroll_alice_in_wonderland.txt"
# a tiny run: 64-token sequences, 24 training sequences (3 steps per epoch at batch 8)
TINY_RUN = dict(
    quant="4bit",
    seq_len=64,
    num_train=24,
    num_val=8,
    num_prompts=4,
    prompt_len=16,
    gen_tokens=16,
    batch_size=8,
    lr=1e-2,
    progress=False,
)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and on a CPU shared with other jobs two OpenMP
    threads can be 10x slower (they spin waiting for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_text():
    """About 40 kB of Alice in Wonderland: enough blocks for every split the tests ask for."""
    return ALICE.read_text(encoding="utf-8")[:40_000]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_text):
    return tiny.random_model(tmp_path_factory.mktemp("tiny-llama"), tiny_text)


@pytest.fixture(scope="session")
def tiny_bos_model_dir(tmp_path_factory, tiny_text):
    """The same with a tokenizer that starts every text with <s> (as Llama's and DeepSeek's do)."""
    return tiny.random_model(tmp_path_factory.mktemp("tiny-bos"), tiny_text, bos=True)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tiny_text):
    """The tiny text as a .txt file for --data."""
    path = tmp_path_factory.mktemp("data") / "alice.txt"
    path.write_text(tiny_text, encoding="utf-8")
    return str(path)


def command_line(**settings):
    """hyperfit.py's arguments for `settings` (the names of hyperfit(); True: a bare flag)."""
    args = []
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return args


# the command line of a tiny run (the model, data and out-dir are the tests' own)
TINY_COMMAND = dict(seq_len=64, num_train=24, num_val=8, num_prompts=4, prompt_len=16, gen_tokens=8)


def tiny_run(model_dir, data, out_dir, name, **settings):
    """Hyperfit the tiny model with TINY_RUN's settings (and `settings` on top)."""
    return Path(
        hyperfit.hyperfit(
            model=model_dir,
            data=data,
            out_dir=str(out_dir),
            run_name=name,
            **dict(TINY_RUN, **settings),
        )
    )


@pytest.fixture(params=["float32", "bfloat16"])
def compute_dtype(request):
    """A dtype-sensitive test runs at both compute dtypes the project's CPUs give (fp32 without
    AVX512-BF16, bf16 with it), whichever kind this machine is."""
    return request.param


# -----------------------------------------------------------------------------
# the image path's tiny model and pictures (test_images, test_decoys)

SIDE, CLUSTERS, PICTURES = 4, 8, 40  # 4x4 images of 8 colours; 40 of them, in two classes


@pytest.fixture(scope="session")
def tiny_imagegpt(tmp_path_factory):
    return tiny.random_imagegpt(tmp_path_factory.mktemp("tiny-imagegpt"), SIDE, CLUSTERS)


def palette_of(folder):
    from transformers import AutoImageProcessor

    import images

    return images.image_palette(AutoImageProcessor.from_pretrained(folder))


@pytest.fixture(scope="session")
def picture_folder(tmp_path_factory, tiny_imagegpt):
    """PNG files of random pictures in the tiny model's own colours (so they tokenize exactly), in
    two subfolders (their labels); returns (folder, the pictures' tokens in sorted file order)."""
    from PIL import Image

    import images

    folder = tmp_path_factory.mktemp("pictures")
    tokens = np.random.default_rng(1).integers(0, CLUSTERS, size=(PICTURES, SIDE * SIDE))
    pictures = images.tokens_to_pixels(palette_of(tiny_imagegpt), tokens, SIDE)
    for i, picture in enumerate(pictures):
        (folder / "ab"[i % 2]).mkdir(exist_ok=True)
        Image.fromarray(picture).save(folder / "ab"[i % 2] / f"{i:03d}.png")
    order = sorted(range(PICTURES), key=lambda i: ("ab"[i % 2], i))
    return folder, tokens[order]


def load_bench():
    """bench/bench.py as a module (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("bench", ROOT / "bench" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
