"""The image path (images.py): pixels -> tokens -> pixels, a tiny random ImageGPT saved as a local
folder hyperfitted through the real 4-bit + LoRA run path (the code path the hub presets take),
completions of the right shape, every image measure on hand-made images, the figure, the command
line's one-line refusals, and the digits preset's preparation (with a tiny pretraining)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLUSTERS, PICTURES, SIDE

import engine
import hyperfit
import images
import plot
import runfiles

TINY_IMAGE_RUN = dict(
    num_train=8, num_val=4, num_prompts=4, epochs=6, eval_every=3, lr=1e-2, progress=False
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache of the tests' own (HYPERFIT_CACHE) for the module's preparations."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("cache")
        patch.setenv("HYPERFIT_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def image_run(cache, tmp_path_factory, tiny_imagegpt, picture_folder):
    """The tiny ImageGPT hyperfitted on 8 pictures and evaluated: images.py's one command."""
    out = tmp_path_factory.mktemp("results")
    data = str(picture_folder[0])
    return Path(images.images(tiny_imagegpt, data, out_dir=str(out), **TINY_IMAGE_RUN))


def test_pixels_become_tokens_and_tokens_pixels_again(tiny_imagegpt):
    """ImageGPT's processor takes each pixel's nearest colour cluster, so pictures drawn in the
    clusters' colours come back as the same tokens, and those as the same pixels."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(tiny_imagegpt)
    tokens = np.random.default_rng(0).integers(0, CLUSTERS, size=(5, SIDE * SIDE))
    pictures = images.tokens_to_pixels(images.image_palette(processor), tokens, SIDE)
    assert pictures.shape == (5, SIDE, SIDE, 3) and pictures.dtype == np.uint8
    again = images.pixels_to_tokens(processor, pictures)
    assert np.array_equal(again.numpy(), tokens)
    palette = images.image_palette(processor)
    assert np.array_equal(images.tokens_to_pixels(palette, again, SIDE), pictures)


def test_digits_grey_levels_are_their_tokens():
    from sklearn.datasets import load_digits

    levels = load_digits().images[:50].astype(int)
    processor = images.digits_processor()
    pictures = images.image_palette(processor)[levels]  # level 0 white, 16 black
    assert pictures[0, 0, 0].tolist() == [255, 255, 255]
    tokens = images.pixels_to_tokens(processor, pictures)
    assert np.array_equal(tokens.numpy(), levels.reshape(50, -1))


def test_the_tokenizer_puts_sos_first_as_bos():
    tokenizer = images.image_tokenizer(["c0", "c1", "c2"])
    assert tokenizer("c2 c0 c1")["input_ids"] == [3, 2, 0, 1]
    assert hyperfit.bos_prefix(tokenizer) == [3]
    assert tokenizer.decode([0, 2]) == "c0 c2"


def test_lora_and_the_dense_copy_fit_imagegpt(tiny_imagegpt, cache):
    """add_lora finds ImageGPT's projections (transformer.h.N.attn.c_attn, c_proj, mlp.c_fc,
    c_proj), and the dense copy of a 4-bit + LoRA ImageGPT is the same function: bitsandbytes keeps
    its Conv1D weights as (out, in), transformers' Conv1D as (in, out) (a square c_proj would load
    silently transposed)."""
    folder = images.prepare_model(tiny_imagegpt, progress=False)
    net, _ = hyperfit.load_model(folder, "4bit", device="cpu", dtype="float32")
    net = hyperfit.add_lora(net, r=4, alpha=8, last_layers=1)
    names = {n.split(".lora_")[0] for n, p in net.named_parameters() if p.requires_grad}
    assert len(names) == 4 and all(".h.1." in n for n in names)
    with torch.no_grad():
        for p in (p for p in net.parameters() if p.requires_grad):
            p.normal_(0, 0.1)  # LoRA B starts at zero: give the adapter a real effect
        ids = torch.randint(0, CLUSTERS, (3, SIDE * SIDE))
        expected = net(input_ids=ids).logits
        assert torch.allclose(engine.dense_copy(net)(input_ids=ids).logits, expected, atol=1e-4)
        with net.disable_adapter():
            original = net(input_ids=ids).logits
        assert not torch.allclose(original, expected, atol=1e-3)


def test_a_local_imagegpt_hyperfits_through_the_kit(image_run, tiny_imagegpt):
    """The tiny ImageGPT folder, prepared like a hub model, trains in 4-bit + LoRA in the kit's run
    folder: one image per sequence (<sos> + all but the last pixel, as the model has one position
    per pixel), the top half as the prompt."""
    config = json.loads((image_run / "config.json").read_text())
    args = config["args"]
    assert (args["seq_len"], args["prompt_len"], args["gen_tokens"]) == (16, 9, 7)
    assert args["quant"] == "4bit" and (Path(args["model"]) / images.MARKER).exists()
    assert config["trainable_parameters"] > 0 and (image_run / "adapter").is_dir()
    records = runfiles.read_jsonl(image_run / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 3, 6]
    assert records[-1]["train_loss"] < records[1]["train_loss"]
    report = json.loads((image_run / "eval" / "images.json").read_text())
    assert report["sharpness"]["hyperfitted"]["loss"] != report["sharpness"]["original"]["loss"]


def test_completions_have_the_shape_of_the_bottom_half(image_run, picture_folder):
    report = json.loads((image_run / "eval" / "images.json").read_text())
    assert report["num_images"] == PICTURES - TINY_IMAGE_RUN["num_train"]  # validation + held out
    assert list(report["modes"]) == [*images.IMAGE_MODES, images.REAL]
    figure = report["figure"]["images"]
    assert list(figure) == ["prompt", *images.IMAGE_MODES, images.REAL]
    assert np.asarray(figure["prompt"]).shape == (images.FIGURE_IMAGES, SIDE * SIDE // 2)
    for mode in (*images.IMAGE_MODES, images.REAL):
        shown = np.asarray(figure[mode])
        assert shown.shape == (images.FIGURE_IMAGES, SIDE * SIDE)
        assert np.array_equal(shown[:, : SIDE * SIDE // 2], figure["prompt"])  # the real top half
        assert shown.min() >= 0 and shown.max() < CLUSTERS  # pixels, never <sos>
    real = {tuple(row) for row in picture_folder[1].tolist()}
    assert all(tuple(row) in real for row in figure[images.REAL])
    assert report["modes"][images.REAL]["distance_to_real"] == 0
    assert report["classifier"] == images.NO_CLASSIFIER  # no pretraining images of its own


def test_the_figure_and_report_are_drawn(image_run):
    written = plot.plot_run(image_run)
    assert str(image_run / "eval" / "completions.png") in written
    assert (image_run / "eval" / "completions.png").stat().st_size > 1000
    report = (image_run / "report.md").read_text()
    assert "eval/completions.png" in report and "## Image completions" in report
    assert "| hyperfitted greedy |" in report


def test_resume_of_a_finished_run_evaluates_it_again(image_run, tiny_imagegpt, picture_folder):
    before = json.loads((image_run / "eval" / "images.json").read_text())
    run = dict(TINY_IMAGE_RUN, out_dir=str(image_run.parent))
    images.images(tiny_imagegpt, str(picture_folder[0]), resume=True, **run)
    after = json.loads((image_run / "eval" / "images.json").read_text())
    assert after["modes"] == before["modes"]  # greedy, and sampled with the same seed
    with pytest.raises(hyperfit.UsageError, match="already holds a run"):
        images.images(tiny_imagegpt, str(picture_folder[0]), **run)


def test_each_measure_on_hand_made_images():
    side, half = 4, 8
    one_colour = np.zeros((1, side * side), dtype=int)  # every pixel token 0
    striped = np.array([[1] * 4 + [2] * 4 + [1] * 4 + [2] * 4])  # rows alternate 1, 2
    assert images.token_ttr(one_colour[:, half:]) == 1 / half
    assert images.token_ttr(striped[:, half:]) == 2 / half
    assert images.one_colour_share(one_colour[:, half:]) == 1
    assert images.one_colour_share(striped[:, half:]) == 0
    assert images.repeated_row_share(one_colour, side, side // 2) == 1
    assert images.repeated_row_share(striped, side, side // 2) == 0
    pair = np.concatenate([striped, striped, one_colour])[:, half:]
    assert images.distinct_share(pair) == 2 / 3
    palette = np.array([[255, 255, 255], [0, 0, 0], [255, 255, 255]], dtype=np.uint8)
    white, black = palette[one_colour[:, half:]], palette[striped[:, half:]]  # 1: black, 2: white
    assert images.distance_to_real(white, white) == 0
    assert images.distance_to_real(palette[np.ones((1, 8), int)], white) == 1
    assert images.distance_to_real(black, white) == 0.5  # half its rows black
    assert images.mean_pairwise_distance(np.concatenate([white, white])) == 0
    assert images.mean_pairwise_distance(white) is None  # no pair


def test_classifier_accuracy_counts_the_prompts_classes():
    class Fixed:  # a classifier that answers 3 for every picture
        def predict(self, features):
            return np.full(len(features), 3)

    pictures = np.zeros((4, 2, 2, 3), dtype=np.uint8)
    assert images.classifier_accuracy(Fixed(), pictures, [3, 3, 1, 3]) == 0.75
    assert images.classifier_accuracy(None, pictures, [3, 3, 1, 3]) is None
    assert images.classifier_accuracy(Fixed(), pictures, [3, None, 1, 3]) is None


def test_temperature_sampling_is_seeded():
    scores = torch.randn(3, 10)
    first = images.TemperatureSampler(1.0, seed=5)(None, scores.clone())
    again = images.TemperatureSampler(1.0, seed=5)(None, scores.clone())
    assert torch.equal(first, again)
    assert (torch.isfinite(first).sum(dim=1) == 1).all()  # one token left per row


def test_digits_are_prepared_once_with_a_classifier(tmp_path, monkeypatch):
    """The digits preset (with a one-epoch pretraining of a tiny shape here): 1,400 labelled
    pretraining digits, 397 others to hyperfit on and complete, a model that loads through the
    kit, and a classifier that tells the held-out digits apart."""
    monkeypatch.setenv("HYPERFIT_CACHE", str(tmp_path))
    monkeypatch.setitem(images.PRETRAIN, "epochs", 1)
    monkeypatch.setattr(images, "DIGITS_SHAPE", dict(n_embd=16, n_layer=1, n_head=2))
    folder = Path(images.prepare_model(images.DIGITS, progress=False))
    assert folder == tmp_path / images.DIGITS and (folder / images.MARKER).exists()
    pretrain, held = (runfiles.read_jsonl(folder / f"{n}.jsonl") for n in ("pretrain", "images"))
    assert (len(pretrain), len(held)) == (1400, 397)
    shape = images.image_shape(folder)
    assert (shape["side"], shape["positions"], shape["sos"]) == (8, 65, 17)
    assert images.shape_settings(shape) == dict(seq_len=65, prompt_len=33, gen_tokens=32)
    record = json.loads((folder / "pretrain.json").read_text())
    assert record["steps"] == 44 and record["unseen_loss"] > 0
    classifier = images.train_classifier(folder, shape)
    vocabulary = hyperfit.load_tokenizer(str(folder)).get_vocab()
    tokens = np.array([[vocabulary[w] for w in r["text"].split()] for r in held])
    pictures = images.tokens_to_pixels(shape["palette"], tokens, 8)
    accuracy = images.classifier_accuracy(classifier, pictures, [r["label"] for r in held])
    assert accuracy > 0.9
    assert images.prepare_model(images.DIGITS, progress=False) == str(folder)  # once


def test_resume_without_model_or_data_takes_the_run_s_own(image_run, capsys, tmp_path):
    """images.py --resume takes the run's model and data from its config.json: with --model only
    it tried to download CIFAR-10 (a folder's default data), and without --model it took the
    digits and blamed options never given."""
    out = tmp_path / "out"
    runfiles.shutil.copytree(image_run, out / image_run.name)
    before = json.loads((image_run / "eval" / "images.json").read_text())
    model = json.loads((image_run / "config.json").read_text())["args"]["model"]
    for extra in (["--model", runfiles.absolute_path(model)], []):
        argv = ["--resume", "--run-name", image_run.name, "--out-dir", str(out), *extra]
        code = images.main(argv)
        err = capsys.readouterr().err
        assert code == 0 and "images.py:" not in err, err  # progress bars only
        after = json.loads((out / image_run.name / "eval" / "images.json").read_text())
        assert after["modes"] == before["modes"]


def test_the_command_line_lists_the_presets(capsys):
    with pytest.raises(SystemExit):
        images.build_parser().parse_args(["--help"])
    shown = capsys.readouterr().out
    for preset in ("digits-igpt", "imagegpt-small", "imagegpt-medium", "imagegpt-large"):
        assert preset in shown
    assert "openai/imagegpt-large" in shown


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "0"], "--epochs must be a positive integer"),
        (["--model", "./no-such-folder"], "no such preset or folder"),
        (["--resume", "--overwrite"], "choose one"),
        (["--num-images", "-1"], "--num-images must be a positive integer"),
        # the advice named --num-prompts, an option images.py does not have
        (["--num-val", "4"], "--num-val 4: each run completes its first 32 validation images"),
        (["--evaluate", "results/x", "--epochs", "3"], "--evaluate takes the run's own settings"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, cache, tmp_path):
    code = images.main([*argv, "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and not (cache / images.DIGITS / "config.json").exists()


def test_evaluating_a_folder_that_is_no_image_run_is_refused(tmp_path):
    with pytest.raises(hyperfit.UsageError, match="config.json is missing"):
        images.evaluate_images(tmp_path)
