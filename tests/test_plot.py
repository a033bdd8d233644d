"""Tests for plot.py on small synthetic run folders (CPU, a few seconds)."""

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "experiments")]
import paper_comparison  # noqa: E402
import plot  # noqa: E402

MODES = [
    "original_greedy",
    "original_top_p",
    "original_entropy_matched",
    "hyperfitted_greedy",
    "hyperfitted_blocked",
]


# -----------------------------------------------------------------------------
# synthetic result files, in the formats hyperfit.py / evaluate.py write


def metrics_records(num_epochs=4, steps_per_epoch=10, scale=1.0):
    """Step 0 (original model) plus one validation per epoch, shaped like hyperfitting."""
    records = []
    for e in range(num_epochs + 1):
        records.append(
            {
                "step": e * steps_per_epoch,
                "epoch": float(e),
                "elapsed_s": 3.0 * e,
                "train_loss": None if e == 0 else scale * 3.0 * math.exp(-1.5 * e),
                "val_loss": scale * (3.0 + 0.4 * e),
                "val_entropy": 3.0 / (1 + e),
                "val_top1_prob": 0.3 + 0.15 * e,
                "val_greedy_ttr": 0.2 + 0.15 * e,
                "lr": 1e-6,
            }
        )
    return records


def write_run(root, name="run", records=None, extra_text="", eval_dir=True):
    """A run folder with config.json, metrics.jsonl and (optionally) eval/summary.json,
    generations.jsonl, table.md. `extra_text` is appended raw to metrics.jsonl (e.g. a
    half-written line)."""
    run = Path(root) / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(
        json.dumps(
            {
                "run_name": name,
                "steps_per_epoch": 10,
                "git_commit": "abcdef1234567",
                "args": {
                    "model": "tiny-test-model",
                    "epochs": 4,
                    "lr": 1e-6,
                    "seq_len": 256,
                    "num_train": 2000,
                },
            }
        )
    )
    records = metrics_records() if records is None else records
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + extra_text)
    if eval_dir:
        (run / "eval").mkdir()
        (run / "eval" / "summary.json").write_text(json.dumps(summary()))
        (run / "eval" / "generations.jsonl").write_text(
            "".join(json.dumps(g) + "\n" for g in generations())
        )
    return run


def summary():
    """A summary.json as evaluate.py writes it (the fields plot.py reads)."""
    modes = {}
    for i, mode in enumerate(MODES + ["human", "some_new_mode"]):
        positions = list(range(32, 257, 16))
        modes[mode] = {
            "n": 8,
            "metrics": {
                "ttr_first96": {"mean": 0.2 + 0.1 * i, "std": 0.05},
                "ttr": {"mean": 0.15 + 0.1 * i, "std": 0.05},
                "simctg_diversity": {"mean": 0.3 + 0.1 * i, "std": None},
                "simctg_rep_2": {"mean": 40.0 - 5 * i, "std": None},
                "self_bleu4_texygen_first96": {"mean": 0.5 - 0.05 * i, "std": 0.02},
                "dataset_bleu4_first96": {"mean": 0.1, "std": 0.01},
                "overlap_gt10_share_first96": {"mean": 0.01, "std": None},
                "unknown_word_share": {"mean": 0.004 * (i + 1), "std": 0.002},
                "original_top1_share": {"mean": 0.5, "std": 0.1},
                "override_beyond_top10_share": {"mean": 0.2, "std": None},
            },
            "ttr_by_position": {
                "window": 32,
                "positions": positions,
                "mean": [0.9 - 0.001 * p * (5 - min(i, 5)) / 5 for p in positions],
                "std": [0.05] * len(positions),
            },
        }
        if mode != "human":
            modes[mode]["metrics"]["mauve"] = {
                "mean": 0.5 + 0.05 * i,
                "std": None,
                "ci": [0.3, 0.9] if i else [0.2, 0.4],  # a resampled interval may miss the value
            }
            modes[mode]["mauve"] = {"samples": 8, "buckets": 2, "bootstrap": 100}
    stats = {"perplexity": 50.0, "entropy": 3.0, "top1": 0.3, "top3": 0.5, "top5": 0.6}
    return {
        "run": "results/x",
        "args": {
            "model": "tiny-test-model",
            "quant": "4bit",
            "num_prompts": 8,
            "new_tokens": 256,
            "sharpness_seqs": 4,
            "split": {"prompt_len": 32, "num_train": 16, "seq_len": 128},
        },
        "command": "python evaluate.py results/x",
        "modes": modes,
        "sharpness": {
            "original": stats,
            "hyperfitted": dict(stats, entropy=1.5, top1=0.6),
            "val_top1_agreement": 0.4,
        },
        "entropy_matched_temperature": {
            "temperature": 0.71,
            "target_entropy": 1.0,
            "achieved_entropy": 1.01,
        },
    }


def generations():
    """Two prompts x two modes; prompt 0 / original_greedy repeats the 3-gram (1,2,3)."""
    out = []
    for prompt_id in range(2):
        for mode, ids in [
            ("original_greedy", [1, 2, 3, 4, 1, 2, 3]),
            ("hyperfitted_greedy", [5, 6, 7, 8, 9, 10, 11]),
        ]:
            tokens = [f" w{t}" for t in ids]
            tokens[0] = " <b>&"  # must be HTML-escaped
            out.append(
                {
                    "mode": mode,
                    "prompt_id": prompt_id,
                    "prompt_text": f"Prompt {prompt_id} text",
                    "text": "".join(tokens),
                    "tokens": tokens,
                    "token_ids": ids,
                    "ttr_first96": 0.5,
                }
            )
    return out


def png_size(path):
    """(width, height) in pixels of a PNG that must decode."""
    image = mpimg.imread(path)
    return image.shape[1], image.shape[0]


def expected_size(figsize):
    return round(figsize[0] * plot.DPI), round(figsize[1] * plot.DPI)


# -----------------------------------------------------------------------------
# figures


@pytest.fixture(scope="module")
def plotted_run(tmp_path_factory):
    """One full run folder drawn once by plot_run (with SVGs); shared: rendering is slow."""
    run = write_run(tmp_path_factory.mktemp("plotted"))
    compared = paper_comparison.write_comparison(run)  # the side page report.md links
    return run, [compared] + plot.plot_run(run, svg=True)


def test_plot_run_writes_every_figure_with_expected_size(plotted_run):
    run, written = plotted_run
    expected = {
        run / "training_curves.png": plot.TRAINING_FIGSIZE,
        run / "eval" / "decoding_comparison.png": plot.COMPARISON_FIGSIZE,
        run / "eval" / "ttr_by_position.png": plot.TTR_POSITION_FIGSIZE,
        run / "eval" / "quality.png": plot.QUALITY_FIGSIZE,
    }
    for path, figsize in expected.items():
        assert str(path) in written
        assert png_size(path) == expected_size(figsize)
        assert path.with_suffix(".svg").read_text().lstrip().startswith("<?xml")
    assert str(run / "eval" / "repetition.html") in written and str(run / "report.md") in written
    for page in ("table.md", "paper_comparison.md"):  # plot.py's and the paper comparison's
        assert str(run / "eval" / page) in written
    page = (run / "eval" / "paper_comparison.md").read_text()
    assert "| finding | paper | this run | verdict |" in page


def test_the_paper_comparison_is_its_own_command_and_one_line_without_an_evaluation(tmp_path):
    run = write_run(tmp_path)
    assert str(run / "eval" / "paper_comparison.md") not in plot.plot_run(run)  # not plot's
    script = ROOT / "experiments" / "paper_comparison.py"
    done = subprocess.run([sys.executable, str(script), str(run)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == str(run / "eval/paper_comparison.md")
    shutil.rmtree(run / "eval")
    again = subprocess.run([sys.executable, str(script), str(run)], capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr.count("\n") == 1
    assert "run python evaluate.py" in again.stderr and not (run / "eval").exists()


def test_training_curves_single_run_panels_and_reference_lines(tmp_path):
    run = write_run(tmp_path, eval_dir=False)
    fig = plot.plot_training_curves(run)
    loss_ax, entropy_ax, top1_ax, ttr_ax = fig.axes
    assert loss_ax.get_yscale() == "log"
    assert "epoch" in ttr_ax.get_xlabel() and "nats" in entropy_ax.get_ylabel()
    train_line = next(line for line in loss_ax.lines if line.get_gid() == "train_loss/run")
    assert list(train_line.get_xdata()) == [
        1.0,
        2.0,
        3.0,
        4.0,
    ]  # step 0 has train_loss null: skipped
    # step-0 values as dashed horizontal reference lines
    refs = [line for line in entropy_ax.lines if line.get_linestyle() == "--"]
    assert len(refs) == 1 and list(refs[0].get_ydata()) == [3.0, 3.0]
    assert [line.get_linestyle() for line in top1_ax.lines].count("--") == 1
    steps = plot.plot_training_curves(run, x="step").axes[0]
    assert (
        max(next(line for line in steps.lines if line.get_gid() == "train_loss/run").get_xdata())
        == 40
    )


def test_overlay_of_three_runs_has_one_train_line_per_run(tmp_path):
    runs = [
        write_run(tmp_path, f"run{i}", metrics_records(scale=1 + i), eval_dir=False)
        for i in range(3)
    ]
    fig = plot.plot_training_curves([str(r) for r in runs])
    loss_ax = fig.axes[0]
    train = [line for line in loss_ax.lines if str(line.get_gid()).startswith("train_loss/")]
    assert sorted(line.get_gid() for line in train) == [
        "train_loss/run0",
        "train_loss/run1",
        "train_loss/run2",
    ]
    assert len({line.get_color() for line in train}) == 3 and all(
        line.get_linestyle() == "-" for line in train
    )
    val = [line for line in loss_ax.lines if str(line.get_gid()).startswith("val_loss/")]
    assert len(val) == 3 and all(line.get_linestyle() == "--" for line in val)
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == ["run0", "run1", "run2"]


def test_decoding_comparison_bars_and_colours(tmp_path):
    fig = plot.plot_decoding_comparison(summary())
    assert len(fig.axes) == 4
    ttr_ax = fig.axes[0]
    assert len(ttr_ax.patches) == 7  # one bar per mode, the human text, and the unknown mode
    colors = [matplotlib.colors.to_hex(p.get_facecolor()) for p in ttr_ax.patches]
    modes = [*MODES, "human"]  # display order, consistent colours
    assert colors[:6] == [plot.MODE_COLORS[m] for m in modes]
    assert colors[6] in plot.FALLBACK_COLORS
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert (
        labels[2] == "original, entropy-matched T=0.71"
        and labels[4] == "hyperfitted + citation blocking"
    )
    # summary path and a summary with some metrics missing work too
    path = tmp_path / "summary.json"
    partial = summary()
    for info in partial["modes"].values():
        del info["metrics"]["dataset_bleu4_first96"]
    path.write_text(json.dumps(partial))
    assert len(plot.plot_decoding_comparison(path).axes) == 3


def test_ttr_by_position_one_line_per_mode():
    fig = plot.plot_ttr_by_position(summary())
    ax = fig.axes[0]
    assert (
        len(ax.lines) == 7 and len(ax.collections) == 7
    )  # line + std band per mode and the human text
    assert (
        matplotlib.colors.to_hex(ax.lines[3].get_color()) == plot.MODE_COLORS["hyperfitted_greedy"]
    )
    assert "32" in ax.get_ylabel()


# -----------------------------------------------------------------------------
# repetition HTML


def test_repeated_ngram_mask_flags_only_the_repeat():
    assert plot.repeated_ngram_mask([1, 2, 3, 4, 1, 2, 3], 3) == [False] * 6 + [True]
    assert plot.repeated_ngram_mask([1, 2, 3, 4, 1, 2, 3], 4) == [False] * 7
    assert plot.repeated_ngram_mask([7, 7, 7, 7], 2) == [False, False, True, True]
    assert plot.repeated_ngram_mask([], 3) == []


def test_repetition_html_marks_repeated_tokens(tmp_path):
    run = write_run(tmp_path)
    page = plot.repetition_html(run / "eval" / "generations.jsonl", num_prompts=1)
    assert page.count("<h2>") == 1  # num_prompts respected
    assert "<span class='tok rep'> w3</span>" in page  # the repeated 3-gram (1,2,3) ends here
    assert page.count("<span class='tok rep'>") == 2  # that token + the legend example
    for fresh in [" w4", " w2", " w11"]:
        assert f"<span class='tok'>{fresh}</span>" in page
    assert "<b>&" not in page and "&lt;b&gt;&amp;" in page  # escaped
    assert (
        "http://" not in page and "https://" not in page and "<script" not in page
    )  # self-contained
    assert page.index("original greedy") < page.index("hyperfitted greedy")
    assert (ROOT / "data" / "repetition.css").read_text() in page  # its style, from data/


def test_a_missing_style_sheet_is_one_line(tmp_path, monkeypatch):
    run = write_run(tmp_path)
    monkeypatch.setattr(plot, "STYLE_FILE", "data/no-such.css")
    with pytest.raises(plot.PlotInputError, match="restore data/repetition.css from the kit"):
        plot.repetition_html(run / "eval" / "generations.jsonl")


# -----------------------------------------------------------------------------
# robustness, report, CLI


def test_half_written_last_line_is_skipped_with_warning(tmp_path):
    run = write_run(tmp_path, extra_text='{"step": 50, "epoch": 5.0, "val_lo', eval_dir=False)
    with pytest.warns(UserWarning, match=r"metrics\.jsonl:6"):
        records = plot.read_metrics(run)
    assert len(records) == 5 and records[-1]["step"] == 40
    with pytest.warns(UserWarning):  # the figure is drawn from the 5 good lines
        fig = plot.plot_training_curves(run)
    assert (
        len(
            next(line for line in fig.axes[0].lines if line.get_gid() == "val_loss/run").get_xdata()
        )
        == 5
    )


def test_old_metrics_without_some_fields_still_plot(tmp_path):
    records = [
        {"step": r["step"], "epoch": r["epoch"], "val_loss": r["val_loss"]}
        for r in metrics_records()
    ]
    run = write_run(tmp_path, records=records, eval_dir=False)
    fig = plot.plot_training_curves(run)
    assert (
        len(
            next(line for line in fig.axes[0].lines if line.get_gid() == "val_loss/run").get_xdata()
        )
        == 5
    )


def test_report_links_figures_and_embeds_table(plotted_run):
    run, _ = plotted_run
    report = (run / "report.md").read_text()
    for link in [
        "(training_curves.png)",
        "(eval/decoding_comparison.png)",
        "(eval/ttr_by_position.png)",
        "(eval/repetition.html)",
        "(eval/quality.png)",
        "(eval/paper_comparison.md)",
    ]:
        assert link in report
    assert "| hyperfitted_greedy | 0.500 ± 0.050 |" in report  # eval/table.md embedded
    assert "| human | 0.700 ± 0.050 |" in report and "unknown words" in report
    assert "| validation loss | 3 | 4.6 |" in report  # first vs last val_loss
    assert "tiny-test-model" in report


def run_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, str(ROOT / "plot.py"), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    good = write_run(tmp_path, "good", eval_dir=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "metrics.jsonl").write_text('{not json\n{"step": 0, "val\n')
    before = sorted(tmp_path.rglob("*"))
    # as a real process: exit status and the exact stderr (warnings must not add lines)
    for args, message in [
        (["missing"], "missing is not a folder"),
        ([good, garbage, "--out", tmp_path / "cmp.png"], "no readable lines"),
    ]:
        result = run_cli(*args, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("plot.py: ") and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    # the remaining case in-process (each subprocess costs a matplotlib import)
    assert plot.main([str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "empty has no metrics.jsonl — run hyperfit.py first" in err
    assert sorted(tmp_path.rglob("*")) == before


def test_cli_overlay_and_single_run(tmp_path, capsys):
    runs = [write_run(tmp_path, f"r{i}", eval_dir=False) for i in range(2)]
    result = run_cli(*runs, "--x", "step", "--svg", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "results" / "compare_training_curves.png"
    assert (
        png_size(out) == expected_size(plot.TRAINING_FIGSIZE) and out.with_suffix(".svg").exists()
    )
    assert str(out.relative_to(tmp_path)) in result.stdout
    assert not (
        runs[0] / "training_curves.png"
    ).exists()  # overlay only, nothing in the run folders
    assert plot.main([str(runs[0])]) == 0  # one run: plot_run
    assert (runs[0] / "training_curves.png").exists() and (runs[0] / "report.md").exists()
    assert str(runs[0] / "report.md") in capsys.readouterr().out
    with pytest.raises(SystemExit):
        plot.main(["--help"])
    assert "--svg" in capsys.readouterr().out


def test_a_truncated_summary_is_one_line_and_nothing_is_written(tmp_path, capsys):
    """Every input is read before the first file is written: a broken eval/summary.json must not
    leave a new training_curves.png behind."""
    run = write_run(tmp_path)
    (run / "eval" / "summary.json").write_text('{"run": "x", "modes": {"orig')
    before = sorted(run.rglob("*"))
    assert plot.main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "summary.json is not readable JSON" in err
    assert sorted(run.rglob("*")) == before


def human_study(run, evaluation):
    """A human_study/ folder as annotate.py writes it, built from the evaluation `evaluation`."""
    study = run / "human_study"
    study.mkdir()
    key = {
        "page_id": "0123456789abcdef",
        "seed": 0,
        "evaluation": evaluation,
        "items": {"i001": {"mode": "original_greedy", "prompt_id": 0, "model_side": "left"}},
    }
    (study / "annotate_key.json").write_text(json.dumps(key))
    (study / "annotate.html").write_text("<html></html>")
    scores = {
        "page_id": "0123456789abcdef",
        "n_boot": 10,
        "differences": [],
        "unjudged_modes": [],
        "modes": {
            "original_greedy": {
                "score": 75.0,
                "ci": [50.0, 100.0],
                "model_better": 50.0,
                "equal": 25.0,
                "human_better": 25.0,
                "n": 4,
                "prompts": 4,
            }
        },
        "agreement": {"alpha": None, "reason": "only one annotator", "items": 0, "annotators": 0},
        "counts": {
            "annotators": 1,
            "judgments": 4,
            "items_judged": 4,
            "num_items": 4,
            "prompts": 4,
        },
        "annotators": [{"annotator": "ana", "judged": 4, "num_items": 4, "replaces": []}],
    }
    (study / "preference.json").write_text(json.dumps(scores))
    (study / "preference.md").write_text("# Human preference")  # annotate.py renders it
    return study


def test_the_human_study_of_this_evaluation_is_rendered_and_linked(tmp_path):
    run = write_run(tmp_path)
    digest = hashlib.sha256((run / "eval" / "generations.jsonl").read_bytes()).hexdigest()[:16]
    human_study(run, digest)
    plot.plot_run(run)
    report = (run / "report.md").read_text()
    assert "(human_study/annotate.html)" in report and "(human_study/preference.md)" in report


def test_a_human_study_of_an_earlier_evaluation_is_not_presented_as_current(tmp_path):
    run = write_run(tmp_path)
    study = human_study(run, "0000000000000000")  # another evaluation's page
    written = plot.plot_run(run)
    assert not any(str(study) in p for p in written)
    report = (run / "report.md").read_text()
    assert "human_study/" not in report.replace("human_study/ was built", "")
    assert "earlier evaluation" in report


def test_a_run_name_is_never_read_as_mathtext(tmp_path):
    """A run named with TeX's dollar signs draws as text (matplotlib would parse '$...$')."""
    for name in ("a$^$", "x$\\frac{1}{0}$"):
        run = write_run(tmp_path, name, eval_dir=False)
        fig = plot.plot_training_curves(run)
        fig.canvas.draw()  # mathtext would raise here
        assert name in fig._suptitle.get_text().replace("\\$", "$")
    overlay = plot.plot_training_curves([tmp_path / "a$^$", tmp_path / "x$\\frac{1}{0}$"])
    overlay.canvas.draw()


def test_a_study_folder_points_to_studies_py(tmp_path, capsys):
    folder = tmp_path / "data-size"
    folder.mkdir()
    (folder / "study.json").write_text("{}")
    assert plot.main([str(folder)]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and "is a study: python experiments/studies.py <study> draws it" in err
    )
