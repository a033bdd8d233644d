"""
Figures and markdown reports for hyperfitting runs, studies and the human-preference study.

    python plot.py results/<run>                       # every figure of one run + report.md
    python plot.py results/a results/b --out cmp.png   # overlay the training curves of runs
    python plot.py results/studies/data-size           # a study's figure + report.md
    python plot.py results/<run> --judgments j1.json j2.json j3.json   # score the human study

Reads what hyperfit.py and evaluate.py write (config.json, metrics.jsonl, eval/summary.json,
eval/generations.jsonl, study.json, eval/annotate_key.json) and writes next to them:
    training_curves.png        loss / entropy / top-1 probability / TTR during training (Fig. 2)
    eval/decoding_comparison.png, eval/ttr_by_position.png
    eval/repetition.html       continuations with repeated n-grams highlighted (paper Fig. 1)
    eval/preference.md/.png    the human study's scores (with --judgments)
    report.md                  links all of the above, eval/table.md, eval/paper_comparison.md
Every input is read and checked before anything is written; bad input is one line and exit 2.

Standalone and torch-free (matplotlib, numpy, krippendorff): it imports no other file of the kit,
and pasted into a notebook cell it only defines its functions. Every figure function returns a
matplotlib Figure: `from plot import plot_training_curves; plot_training_curves("results/x")`.
"""

import argparse
import html
import io
import json
import os
import sys
import warnings
from pathlib import Path

import krippendorff
import matplotlib
import numpy as np
from matplotlib.figure import Figure  # Figure() directly, not pyplot: no GUI window, no leaks
from matplotlib.patches import Patch

DPI = 150
# one colour per decoding mode, used by every figure; original model warm, hyperfitted model cool
MODE_COLORS = {
    "original_greedy": "#d62728",
    "original_top_p": "#ff7f0e",
    "original_entropy_matched": "#bcbd22",
    "hyperfitted_greedy": "#1f77b4",
    "hyperfitted_blocked": "#17becf",
}
MODE_LABELS = {
    "original_greedy": "original greedy",
    "original_top_p": "original top-p",
    "original_entropy_matched": "original, entropy-matched T",
    "hyperfitted_greedy": "hyperfitted greedy",
    "hyperfitted_blocked": "hyperfitted + citation blocking",
}
FALLBACK_COLORS = ["#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#2ca02c"]
# (field in metrics.jsonl, panel title, y-axis label) for the training-curve panels below the loss
TRAINING_PANELS = [
    ("val_entropy", "(b) mean predictive entropy (validation)", "entropy (nats)"),
    ("val_top1_prob", "(c) mean top-1 probability (validation)", "top-1 probability"),
    ("ttr_last96", "(d) type-token ratio of greedy continuations", "TTR (last 96 tokens)"),
]
# (metric key in eval/summary.json, subplot title, y-axis label) for the decoding comparison
COMPARISON_METRICS = [
    ("ttr_first96", "TTR, 96-token continuations ↑", "type-token ratio (0–1)"),
    ("simctg_diversity", "SimCTG diversity ↑", "diversity (0–1)"),
    ("self_bleu4_texygen_first96", "Self-BLEU-4 (Texygen) ↓", "BLEU-4 between generations"),
    ("dataset_bleu4_first96", "Dataset-BLEU-4 (copying) ↓", "BLEU-4 against training data"),
]
TRAINING_FIGSIZE = (7.0, 10.0)
COMPARISON_FIGSIZE = (12.0, 4.5)
TTR_POSITION_FIGSIZE = (8.0, 4.5)
REPETITION_NGRAM = 3


JUDGMENTS_FORMAT = "hyperfit-judgments-1"  # must equal annotation.JUDGMENTS_FORMAT (the page's)
CHOICES = ("left", "equal", "right")
# a judgment from the model's point of view; the order is the ordinal scale of Krippendorff's alpha
HUMAN_BETTER, EQUAL, MODEL_BETTER = 0, 1, 2
N_BOOT = 10_000
CI_LEVEL = 95
PREFERENCE_FIGSIZE = (7.5, 4.8)
# Carlsson et al. (ICLR 2025), human preference: % of judgments with the model text judged better
# than or equal to the human continuation (3 annotators). None = not in the paper.
PAPER_PREFERENCE = [
    (
        "TinyLlama 1.1B",
        {"original_greedy": 4.9, "original_top_p": 21.1, "hyperfitted_greedy": 34.3},
    ),
    ("DeepSeek 7B", {"hyperfitted_greedy": 45.2, "hyperfitted_blocked": 44.1}),
    (
        "Llama 3.1 8B",
        {"original_top_p": 38.5, "hyperfitted_greedy": 42.9, "hyperfitted_blocked": 41.2},
    ),
    ("Llama 3.1 70B", {"original_greedy": 34.4, "hyperfitted_greedy": 52.4}),
]
PAPER_MODES = ("original_greedy", "original_top_p", "hyperfitted_greedy", "hyperfitted_blocked")


STUDY_FIGSIZE = (13.0, 7.5)
STUDY_MARKER = "#555555"  # the paper's statements on the study figures
PAPER_TOP1_CHANGED = 0.30  # shuffling the training data changes ~30 % of top-1 predictions
PAPER_OVERLAP = (2000, 0.02)  # with 2,000 training sequences < 2 % of outputs overlap > 10 tokens
PAPER_TTR_DROPS_AT = 8  # TTR holds down to 16 training sequences and drops at 8 (= the batch)


class PlotInputError(ValueError):
    """Input plot.py cannot use: the CLI prints the one-line message and exits 2, having written
    nothing."""


# -----------------------------------------------------------------------------
# reading run folders


def _read_jsonl(path):
    """The JSON objects of a .jsonl file, one per line; a line that does not parse (half-written
    by a killed run) is skipped with a warning naming the file and line. The same behaviour as
    hyperfit.read_jsonl, copied to keep plot.py standalone and torch-free."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                obj = None
            if not isinstance(obj, dict):
                warnings.warn(
                    f"{path}:{lineno}: skipping a line that is not a JSON object", stacklevel=2
                )
                continue
            records.append(obj)
    return records


def _read_json(path, what="rerun the command that writes it"):
    """A JSON object from `path`, or PlotInputError saying what is wrong with it and what to do."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PlotInputError(f"{path} is missing: {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlotInputError(
            f"{path} is not readable JSON ({e.__class__.__name__}): {what}"
        ) from None
    if not isinstance(value, dict):
        raise PlotInputError(f"{path} holds no JSON object: {what}")
    return value


def read_metrics(run_dir):
    """The validation records of a run (metrics.jsonl), sorted by step."""
    return sorted(_read_jsonl(Path(run_dir) / "metrics.jsonl"), key=lambda r: r.get("step") or 0)


def _read_config(run_dir):
    path = Path(run_dir) / "config.json"
    return _read_json(path, "rerun hyperfit.py for this run") if path.exists() else {}


def _load_summary(summary_or_path):
    """Accept the summary dict itself, a path to summary.json, or a run folder."""
    if isinstance(summary_or_path, dict):
        return summary_or_path
    path = Path(summary_or_path)
    if path.is_dir():
        path = path / "eval" / "summary.json" if (path / "eval").is_dir() else path / "summary.json"
    summary = _read_json(path, "rerun evaluate.py for this run")
    if not isinstance(summary.get("modes"), dict):
        raise PlotInputError(f'{path} has no "modes": rerun evaluate.py for this run')
    return summary


def _ordered_modes(modes):
    """Known modes in display order, then unknown ones in the order given."""
    known = [m for m in MODE_COLORS if m in modes]
    return known + [m for m in modes if m not in MODE_COLORS]


def mode_color(mode):
    """Colour of a decoding mode; an unknown mode gets a fallback colour picked from its name, so
    it is the same in every figure and run (Python's hash() is salted per process, the sum of code
    points isn't)."""
    return MODE_COLORS.get(mode) or FALLBACK_COLORS[sum(map(ord, mode)) % len(FALLBACK_COLORS)]


def _mode_label(mode, summary=None):
    label = MODE_LABELS.get(mode, mode.replace("_", " "))
    temperature = ((summary or {}).get("entropy_matched_temperature") or {}).get("temperature")
    if mode == "original_entropy_matched" and temperature is not None:
        label = f"original, entropy-matched T={temperature:.2f}"
    return label


# -----------------------------------------------------------------------------
# figures


def _series(records, x, field, steps_per_epoch=None):
    """(xs, ys) for the records that have `field`; epoch falls back to step / steps_per_epoch."""
    xs, ys = [], []
    for r in records:
        xv = r.get(x)
        if xv is None and x == "epoch" and steps_per_epoch and r.get("step") is not None:
            xv = r["step"] / steps_per_epoch
        if xv is not None and r.get(field) is not None:
            xs.append(xv)
            ys.append(r[field])
    return xs, ys


def _training_axes(fig, single, x):
    """The empty panels of Figure 2: loss (log scale), then TRAINING_PANELS (0..1 where they
    are probabilities or ratios, so runs compare at a glance)."""
    axes = fig.subplots(1 + len(TRAINING_PANELS), 1, sharex=True)
    title = "(a) loss" if single else "(a) train (solid) and validation (dashed) loss"
    axes[0].set(title=title, ylabel="cross-entropy (nats/token)", yscale="log")
    for ax, (_, panel_title, ylabel) in zip(axes[1:], TRAINING_PANELS):
        ax.set(title=panel_title, ylabel=ylabel)
    for ax in axes[2:]:
        ax.set_ylim(0, 1.02)
    axes[-1].set_xlabel("epoch" if x == "epoch" else "optimizer step")
    return axes


def _training_lines(axes, run, color, single):
    """(axis, field, style, colour, legend label) of one run's lines; a label "_..." stays out of
    the legend. One run: train and validation loss in two colours; several: one colour per run,
    only the train line labelled, so the legend lists each run once."""
    panels = [f for f, _, _ in TRAINING_PANELS]
    if single:
        lines = [
            (axes[0], "train_loss", "-o", "C0", "train loss"),
            (axes[0], "val_loss", "-o", "C3", "validation loss"),
        ]
        return lines + [(ax, f, "-o", "C2", "during training") for ax, f in zip(axes[1:], panels)]
    lines = [
        (axes[0], "train_loss", "-", color, run.name),
        (axes[0], "val_loss", "--", color, "_val"),
    ]
    return lines + [(ax, f, "-", color, "_" + run.name) for ax, f in zip(axes[1:], panels)]


def plot_training_curves(runs, x="epoch"):
    """Paper Figure 2: train/val loss (log), entropy, top-1 probability and TTR against epoch (or
    step). `runs` is one run folder or a list of them. One run: the original model's values (step
    0) drawn as dashed grey reference lines; several runs: overlaid, one colour each."""
    runs = [runs] if isinstance(runs, (str, Path)) else list(runs)
    single = len(runs) == 1
    fig = Figure(figsize=TRAINING_FIGSIZE, layout="constrained")
    axes = _training_axes(fig, single, x)
    for i, run in enumerate(map(Path, runs)):
        records, spe = read_metrics(run), _read_config(run).get("steps_per_epoch")
        for ax, field, style, c, label in _training_lines(axes, run, f"C{i % 10}", single):
            xs, ys = _series(records, x, field, spe)
            if xs:
                ax.plot(xs, ys, style, ms=3, color=c, label=label, gid=f"{field}/{run.name}")
        start = next((r for r in records if r.get("step") == 0), None)
        if single and start is not None:  # the original model, before any fine-tuning
            for ax, field in zip(axes, ["val_loss"] + [p[0] for p in TRAINING_PANELS]):
                if start.get(field) is not None:
                    ax.axhline(
                        start[field], ls="--", lw=1, color="grey", label="original model (step 0)"
                    )
    for ax in axes if single else axes[:1]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8, title=None if single else "run")
    name = _read_config(runs[0]).get("run_name") or Path(runs[0]).name
    fig.suptitle(f"Hyperfitting: {name if single else f'{len(runs)} runs'}")
    return fig


def plot_decoding_comparison(summary_or_path):
    """Bars per decoding mode for the paper's table: TTR, Self-BLEU-4 and Dataset-BLEU-4 of 96-token
    continuations, and SimCTG diversity (error bars = std over
    generations where given). Accepts the summary dict, eval/summary.json, or a run folder."""
    summary = _load_summary(summary_or_path)
    modes_info = summary.get("modes", {})
    modes = _ordered_modes(list(modes_info))
    metrics = [
        m
        for m in COMPARISON_METRICS
        if any(m[0] in modes_info[mode].get("metrics", {}) for mode in modes)
    ]
    fig = Figure(figsize=COMPARISON_FIGSIZE, layout="constrained")
    axes = fig.subplots(1, max(len(metrics), 1), squeeze=False)[0]
    for ax, (key, title, ylabel) in zip(axes, metrics):
        for i, mode in enumerate(modes):
            value = modes_info[mode].get("metrics", {}).get(key) or {}
            if value.get("mean") is None:
                continue
            ax.bar(i, value["mean"], yerr=value.get("std"), capsize=3, color=mode_color(mode))
        ax.set_title(title)
        ax.set_xticks([])  # mode names are in the shared legend; they don't fit under the bars
        ax.set_ylabel(ylabel)
    if not metrics:
        axes[0].text(0.5, 0.5, "no comparable metrics in summary", ha="center", va="center")
    handles = [Patch(color=mode_color(m), label=_mode_label(m, summary)) for m in modes]
    fig.legend(
        handles=handles, loc="outside lower center", ncol=min(len(handles), 5) or 1, fontsize=9
    )
    fig.suptitle("Decoding comparison (mean ± std over generations)")
    return fig


def plot_ttr_by_position(summary_or_path):
    """Sliding-window TTR against token position, one line per decoding mode with a ±std band."""
    summary = _load_summary(summary_or_path)
    modes_info = summary.get("modes", {})
    modes = _ordered_modes(list(modes_info))
    fig = Figure(figsize=TTR_POSITION_FIGSIZE, layout="constrained")
    ax = fig.subplots()
    window = None
    for mode in modes:
        curve = modes_info[mode].get("ttr_by_position")
        if not curve or not curve.get("positions"):
            continue
        window = curve.get("window", window)
        pos, mean, std = curve["positions"], curve["mean"], curve.get("std")
        color = mode_color(mode)
        ax.plot(pos, mean, color=color, label=_mode_label(mode, summary))
        if std and all(s is not None for s in std):
            ax.fill_between(
                pos,
                [m - s for m, s in zip(mean, std)],
                [m + s for m, s in zip(mean, std)],
                color=color,
                alpha=0.15,
                lw=0,
            )
    ax.set_xlabel("position in continuation (tokens, end of window)")
    ax.set_ylabel(f"TTR of the last {window} tokens" if window else "windowed TTR")
    ax.set_ylim(0, 1.02)
    ax.set_title("Type-token ratio along the continuation (lower = looping)")
    if ax.lines:
        ax.legend(loc="best", fontsize=8)
    return fig


# -----------------------------------------------------------------------------
# repetition HTML (paper Figure 1)


def repeated_ngram_mask(token_ids, n=REPETITION_NGRAM):
    """For each token: True if the n-gram of tokens ending at it already occurred earlier in the
    sequence."""
    seen, mask = set(), []
    for i in range(len(token_ids)):
        if i < n - 1:
            mask.append(False)
            continue
        gram = tuple(token_ids[i - n + 1 : i + 1])
        mask.append(gram in seen)
        seen.add(gram)
    return mask


HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
.grid { display: grid; gap: 1em; overflow-x: auto; }
.col { border: 1px solid #ddd; border-radius: 6px; padding: 0.6em; }
.col h3 { margin: 0 0 0.4em 0; font-size: 0.95em; border-left: 6px solid; padding-left: 0.4em; }
.text, .prompt { white-space: pre-wrap; font-family: Georgia, serif; line-height: 1.45; }
.prompt { color: #555; background: #f6f6f6; padding: 0.6em; border-radius: 6px; }
.rep { background: #f4a3a3; color: #700; }
.legend span { padding: 0 0.4em; }
"""


def repetition_html(generations_path, num_prompts=4, n=REPETITION_NGRAM):
    """A self-contained HTML page (returned as text): for the first `num_prompts` prompts, the
    continuation of every decoding mode side by side, with each token whose n-gram (of token ids)
    already occurred earlier shaded red."""
    generations = _read_jsonl(generations_path)
    by_prompt = {}  # prompt_id -> {mode: generation}, first occurrence wins
    for g in (g for g in generations if g.get("mode")):
        by_prompt.setdefault(g.get("prompt_id"), {}).setdefault(g.get("mode"), g)
    esc = html.escape
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        "<title>Repetition in continuations</title>"
        f"<style>{HTML_STYLE}</style></head><body>",
        "<h1>Repetition in continuations</h1>",
        f"<p class='legend'>Legend: <span class='tok rep'>repeated</span> = the {n}-gram of tokens "
        "ending here already occurred earlier in the same continuation; "
        "<span class='tok'>plain</span> = new.</p>",
    ]
    for prompt_id in list(by_prompt)[:num_prompts]:
        gens = by_prompt[prompt_id]
        prompt_text = next(
            (g.get("prompt_text") for g in gens.values() if g.get("prompt_text")), ""
        )
        # the end of the prompt is what the continuation follows on from
        prompt_tail = prompt_text if len(prompt_text) <= 600 else "…" + prompt_text[-600:]
        modes = _ordered_modes(list(gens))
        parts.append(
            f"<h2>Prompt {esc(str(prompt_id))}</h2><div class='prompt'>{esc(prompt_tail)}</div>"
            "<div class='grid' style='grid-template-columns: "
            f"repeat({len(modes)}, minmax(14em, 1fr))'>"
        )
        for mode in modes:
            g = gens[mode]
            tokens = g.get("tokens")
            ids = (
                g.get("token_ids") or tokens
            )  # token strings still work as ids for the n-gram check
            if tokens and ids and len(ids) == len(tokens):
                spans = "".join(
                    f"<span class='tok{' rep' if r else ''}'>{esc(t)}</span>"
                    for t, r in zip(tokens, repeated_ngram_mask(ids, n))
                )
            else:
                spans = esc(g.get("text", ""))  # no per-token info: show the text uncoloured
            ttr = g.get("ttr_first96")
            ttr = f" · TTR<sub>96</sub> = {ttr:.2f}" if ttr is not None else ""
            parts.append(
                f"<div class='col'><h3 style='border-color:{mode_color(mode)}'>"
                f"{esc(_mode_label(mode))}{ttr}</h3><div class='text'>{spans}</div></div>"
            )
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


# -----------------------------------------------------------------------------
# studies (evaluate.py --study): metrics against data size, and what the data order changes


def _study_series(rows, key):
    xs = [r["num_train"] for r in rows if r.get(key) is not None]
    return xs, [r[key] for r in rows if r.get(key) is not None]


def _data_size_axes(fig):
    axes = fig.subplots(2, 3).ravel()
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training sequences")
        ax.grid(alpha=0.3)
    return axes


def plot_data_size_study(study):
    """The data-size study: per number of training sequences (log x) the TTR of 96-token greedy
    continuations (with and without citation blocking, the original model as reference), the
    final losses, memorisation (overlap, Dataset-BLEU), Self-BLEU and sharpness; the paper's
    statements marked in grey."""
    rows = sorted(study["rows"], key=lambda r: r["num_train"])
    fig = Figure(figsize=STUDY_FIGSIZE, layout="constrained")
    ttr, loss, overlap, dataset, self_bleu, sharp = _data_size_axes(fig)
    for key, color, label in [
        ("hyperfitted_greedy.ttr_first96", MODE_COLORS["hyperfitted_greedy"], "hyperfitted greedy"),
        (
            "hyperfitted_blocked.ttr_first96",
            MODE_COLORS["hyperfitted_blocked"],
            "+ citation blocking",
        ),
        ("original_greedy.ttr_first96", MODE_COLORS["original_greedy"], "original greedy"),
    ]:
        ttr.plot(*_study_series(rows, key), "-o", color=color, label=label)
    ttr.axvline(
        PAPER_TTR_DROPS_AT, ls=":", color=STUDY_MARKER, label="paper: TTR drops at 8 (= batch)"
    )
    ttr.set(title="(a) TTR of 96-token continuations", ylabel="TTR", ylim=(0, 1.02))
    loss.plot(
        *_study_series(rows, "final_train_loss"), "-o", color="C0", label="train (the final model)"
    )
    loss.plot(*_study_series(rows, "val_loss"), "--o", color="C3", label="validation")
    loss.set(title="(b) loss at the end of training", ylabel="nats / token", yscale="log")
    overlap.plot(
        *_study_series(rows, "hyperfitted_greedy.overlap_gt10_share_first96"),
        "-o",
        color="C1",
        label="hyperfitted greedy",
    )
    overlap.plot(*PAPER_OVERLAP, "v", color=STUDY_MARKER, ms=9, label="paper at 2,000: < 2 %")
    overlap.set(
        title="(c) overlap > 10 tokens with training",
        ylabel="share",
        ylim=(-0.02, 1.02),
    )
    dataset.plot(*_study_series(rows, "hyperfitted_greedy.dataset_bleu4_first96"), "-o", color="C1")
    dataset.set(title="(d) Dataset-BLEU-4 (copying)", ylabel="BLEU-4 vs training sequences")
    self_bleu.plot(
        *_study_series(rows, "hyperfitted_greedy.self_bleu4_texygen_first96"), "-o", color="C4"
    )
    self_bleu.set(title="(e) Self-BLEU-4 (Texygen) ↓", ylabel="BLEU-4 between continuations")
    sharp.plot(*_study_series(rows, "val_entropy"), "-o", color="C2", label="entropy (nats)")
    sharp.plot(*_study_series(rows, "val_top1_prob"), "--o", color="C5", label="top-1 probability")
    sharp.set(title="(f) sharpness on validation text", ylabel="nats / probability")
    for ax in (ttr, loss, overlap, sharp):
        ax.legend(fontsize=8)
    fig.suptitle("How much data hyperfitting needs (" + _study_subtitle(study) + ")")
    return fig


def plot_shuffle_study(study):
    """The shuffle study: the share of validation positions whose top-1 prediction differs
    between runs trained on the same data in another order (the paper: ~30 %), and each run's TTR
    and top-1 agreement with the original model."""
    comparison = study.get("comparison", {})
    fig = Figure(figsize=(11.0, 4.5), layout="constrained")
    differ, runs = fig.subplots(1, 2)
    pairs = comparison.get("pairs", [])
    differ.bar(
        [" vs ".join(p["runs"]) for p in pairs], [p["top1_differs"] for p in pairs], color="C0"
    )
    differ.axhline(PAPER_TOP1_CHANGED, ls="--", color=STUDY_MARKER, label="paper: ~30 %")
    differ.set(
        title="(a) top-1 predictions that differ between orders",
        ylabel="share of validation positions",
        ylim=(0, 1),
    )
    differ.legend(fontsize=8)
    names = [r["run"] for r in study["rows"]]
    agreement = comparison.get("top1_agreement_with_original", {})
    x = np.arange(len(names))
    runs.bar(
        x - 0.2,
        [r.get("hyperfitted_greedy.ttr_first96") or 0 for r in study["rows"]],
        0.4,
        label="TTR, 96-token greedy continuations",
        color=MODE_COLORS["hyperfitted_greedy"],
    )
    runs.bar(
        x + 0.2,
        [agreement.get(n, 0) for n in names],
        0.4,
        label="top-1 agreement with the original",
        color="C7",
    )
    runs.set_xticks(x, names)
    runs.set(title="(b) each data order", ylim=(0, 1.02))
    runs.legend(fontsize=8)
    fig.suptitle("What the data order changes (" + _study_subtitle(study) + ")")
    return fig


def _study_subtitle(study):
    t = study.get("training", {})
    return f"{t.get('model')}, {t.get('seq_len')}-token sequences, epochs as the preset"


def plot_study(study_or_dir):
    """The figure of a study: accepts study.json's dict or the study folder."""
    study = study_or_dir if isinstance(study_or_dir, dict) else _read_study(study_or_dir)
    return (
        plot_data_size_study(study) if study["study"] == "data_size" else plot_shuffle_study(study)
    )


def _read_study(study_dir):
    study = _read_json(Path(study_dir) / "study.json", "rerun python evaluate.py --study ...")
    if study.get("study") not in ("data_size", "shuffle") or not isinstance(
        study.get("rows"), list
    ):
        raise PlotInputError(
            f"{study_dir}/study.json is not a study of evaluate.py --study; rerun it"
        )
    return study


STUDY_COLUMNS = [
    ("num_train", "sequences", "{}"),
    ("order_seed", "order seed", "{}"),
    ("steps", "steps", "{}"),
    ("final_train_loss", "final train loss", "{:.3f}"),
    ("val_loss", "val loss", "{:.3f}"),
    ("val_entropy", "entropy", "{:.2f}"),
    ("val_top1_prob", "top-1 prob", "{:.3f}"),
    ("hyperfitted_greedy.ttr_first96", "TTR greedy", "{:.3f}"),
    ("hyperfitted_blocked.ttr_first96", "TTR blocked", "{:.3f}"),
    ("hyperfitted_greedy.overlap_gt10_share_first96", "overlap > 10", "{:.3f}"),
    ("hyperfitted_greedy.dataset_bleu4_first96", "Dataset-BLEU", "{:.2f}"),
    ("hyperfitted_greedy.self_bleu4_texygen_first96", "Self-BLEU", "{:.2f}"),
    ("wall_s", "wall s", "{:.0f}"),
]


def study_report(study, figure_name):
    """The study's report.md: the command, the paper's statement, the table, the figure, the
    runs."""
    lines = [
        f"# Study: {study['study'].replace('_', ' ')}",
        "",
        f"Made by `{study['command']}`.",
        "",
        f"The paper: {study['paper']}.",
        "",
        f"![study]({figure_name})",
        "",
        "| run | " + " | ".join(c[1] for c in STUDY_COLUMNS) + " |",
        "|---" * (len(STUDY_COLUMNS) + 1) + "|",
    ]
    for row in study["rows"]:
        cells = ["–" if row.get(k) is None else f.format(row[k]) for k, _, f in STUDY_COLUMNS]
        lines.append(f"| [{row['run']}]({row['run']}/report.md) | " + " | ".join(cells) + " |")
    comparison = study.get("comparison")
    if comparison:
        lines += [
            "",
            "Top-1 predictions on validation text that differ between data orders (paper: ~30 %):",
            "",
        ]
        lines += [
            f"- {' vs '.join(p['runs'])}: {p['top1_differs']:.3f}" for p in comparison["pairs"]
        ]
        lines += [
            f"- {name}: same top-1 as the original model at {share:.3f} of positions"
            for name, share in comparison["top1_agreement_with_original"].items()
        ]
    t, e = study["training"], study["evaluation"]
    lines += [
        "",
        f"Training: {json.dumps(t)}. Evaluation: {json.dumps(e)}. TTR, overlap, Dataset-BLEU and "
        "Self-BLEU score the 96-token greedy continuations of the same prompts in every run (the "
        "paper's diversity table); final train loss = the trained model's loss on its own "
        "training sequences; val loss, entropy, top-1 prob = the end of training on validation "
        "text; wall s = training + evaluation.",
        "",
    ]
    return "\n".join(lines)


def write_study(study_dir, svg=False):
    """Check study.json and its runs, then write each run's figures and report.md (which the
    study's report links) and the study's figure and report.md. A run folder that is not there
    (study.json copied alone) is left out: study.json holds the numbers the study needs."""
    study_dir = Path(study_dir)
    study = _read_study(study_dir)
    runs = [study_dir / row["run"] for row in study["rows"] if (study_dir / row["run"]).exists()]
    _check_runs(runs)
    figure = plot_study(study)
    report = study_report(study, "study.png")
    written = [path for run in runs for path in plot_run(run, svg=svg)]
    written += _save(figure, study_dir / "study.png", svg)
    _write_atomic(study_dir / "report.md", report.encode("utf-8"))
    return written + [str(study_dir / "report.md")]


# -----------------------------------------------------------------------------
# the human-preference study: scoring the judgments downloaded from eval/annotate.html
# (Carlsson et al. 2025: the share of judgments where the model's continuation was judged better
# than or equal to the real human continuation of the same context)


class JudgmentError(ValueError):
    """Bad judgment input. The message is one line: what was wrong and what to do (the CLI prints it
    and exits 2, having written nothing)."""


# -----------------------------------------------------------------------------
# reading and checking judgment files


def _check_key(key):
    """Raise JudgmentError unless `key` looks like annotate_key.json."""
    items = key.get("items") if isinstance(key, dict) else None
    if not isinstance(key, dict) or not isinstance(key.get("page_id"), str) or not items:
        raise JudgmentError(
            "the annotation key has no page_id or no items; pass eval/annotate_key.json as "
            "written by evaluate.py"
        )
    for item_id, item in items.items():
        if not isinstance(item, dict) or item.get("model_side") not in ("left", "right"):
            raise JudgmentError(
                f"the annotation key's item {item_id!r} has no model_side left/right; "
                "rewrite the page and key with evaluate.py"
            )


def _load_json(path):
    """The parsed JSON of a judgments file, or JudgmentError saying why it can't be read."""
    if not path.is_file():
        problem = "is a folder" if path.is_dir() else "does not exist"
        raise JudgmentError(
            f"{path} {problem}; pass the judgments files downloaded from annotate.html"
        )
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise JudgmentError(f"{path} is empty; download the judgments from annotate.html again")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise JudgmentError(
            f"{path} is not JSON ({error.msg}, line {error.lineno}); pass the "
            "judgments-<page id>-<name>.json files downloaded from annotate.html"
        ) from None


def _check_judgment(path, key, judgment):
    """Raise JudgmentError unless `judgment` answers an item of this key with a known choice."""
    item_id = judgment.get("item_id") if isinstance(judgment, dict) else None
    if not isinstance(item_id, str) or item_id not in key["items"]:
        raise JudgmentError(
            f"{path} judges item {item_id!r}, which is not on this run's annotation page; "
            "pass only files downloaded from this run's annotate.html, unedited"
        )
    if judgment.get("choice") not in CHOICES:
        raise JudgmentError(
            f"{path}: item {judgment['item_id']} has choice {judgment.get('choice')!r}, expected "
            f"one of {', '.join(CHOICES)}; download the judgments from annotate.html again"
        )


def _read_judgment_file(key, path):
    """One judgments file, checked against the key: {"path", "annotator", "exported",
    "judgments" (latest answer per item, in the order judged), "num_judged", "num_items"}."""
    data = _load_json(path)
    if not isinstance(data, dict) or data.get("format") != JUDGMENTS_FORMAT:
        raise JudgmentError(
            f"{path} is not a judgments file (its format is not {JUDGMENTS_FORMAT!r}); pass the "
            "files downloaded with the annotation page's 'Download judgments' button"
        )
    if data.get("page_id") != key["page_id"]:
        raise JudgmentError(
            f"{path} was made on another annotation page (page id {data.get('page_id')}, this "
            f"run's page is {key['page_id']}); score it against the run whose "
            "eval/annotate_key.json has that page id"
        )
    judgments = data.get("judgments")
    if not isinstance(judgments, list) or not judgments:
        raise JudgmentError(
            f"{path} holds no judgments; the annotator has to judge at least one item on "
            "annotate.html before downloading"
        )
    annotator = data.get("annotator")
    if not isinstance(annotator, str) or not annotator.strip():
        raise JudgmentError(
            f"{path} has no annotator name; enter a name on annotate.html and download again"
        )
    latest = {}
    for judgment in judgments:
        _check_judgment(path, key, judgment)
        latest.pop(judgment["item_id"], None)  # a later answer to the same item replaces it
        latest[judgment["item_id"]] = {
            "item_id": judgment["item_id"],
            "choice": judgment["choice"],
            "time": str(judgment.get("time", "")),
            "note": str(judgment.get("note", "")),
        }
    return {
        "path": str(path),
        "annotator": annotator.strip(),
        "exported": str(data.get("exported", "")),
        "judgments": list(latest.values()),
        "num_judged": len(latest),
        "num_items": len(key["items"]),
        "summary": f"{annotator.strip()}: judged {len(latest)} of {len(key['items'])} items",
    }


def read_judgments(key, paths):
    """The judgment files at `paths`, each checked against `key` (the dict in annotate_key.json).

    Returns one dict per annotator: {"path", "annotator", "exported", "judgments", "num_judged",
    "num_items", "summary" ("ana: judged 40 of 128 items"), "replaces"}, with the latest answer
    per item. A half-finished session is accepted
    ("judged k of N items"). Two files by the same annotator name: only the later export counts
    (by the file's "exported" time, then by the order given), the earlier one is listed under
    "replaces" and a warning names both. Raises JudgmentError (one line, naming the file) for a
    file that is missing, empty, not JSON, not a judgments file, from another page, with unknown
    items or choices, or with zero judgments."""
    _check_key(key)
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise JudgmentError(
            "no judgments files given; pass the judgments-*.json files from annotate.html"
        )
    sets = [_read_judgment_file(key, Path(path)) for path in paths]
    by_annotator = {}
    for _, judgment_set in sorted(enumerate(sets), key=lambda p: (p[1]["exported"], p[0])):
        earlier = by_annotator.get(judgment_set["annotator"])
        judgment_set["replaces"] = []
        if earlier is not None:
            warnings.warn(
                f"{earlier['path']} and {judgment_set['path']} are both by annotator "
                f"{judgment_set['annotator']!r}; only the later export, {judgment_set['path']}, "
                "counts",
                stacklevel=2,
            )
            judgment_set["replaces"] = earlier["replaces"] + [earlier["path"]]
        by_annotator[judgment_set["annotator"]] = judgment_set
    kept = {id(judgment_set) for judgment_set in by_annotator.values()}
    return [judgment_set for judgment_set in sets if id(judgment_set) in kept]


# -----------------------------------------------------------------------------
# scoring


def _code(choice, model_side):
    """A judgment from the model's point of view: MODEL_BETTER, EQUAL or HUMAN_BETTER."""
    if choice == "equal":
        return EQUAL
    return MODEL_BETTER if choice == model_side else HUMAN_BETTER


def _records(key, judgment_sets):
    """One (mode, prompt_id, annotator index, item_id, code) per judgment."""
    records = []
    for rater, judgment_set in enumerate(judgment_sets):
        for judgment in judgment_set["judgments"]:
            item = key["items"][judgment["item_id"]]
            code = _code(judgment["choice"], item["model_side"])
            records.append((item["mode"], item["prompt_id"], rater, judgment["item_id"], code))
    return records


def _bootstrap_weights(num_prompts, n_boot, seed):
    """n_boot x num_prompts matrix: how often each prompt is drawn in each bootstrap resample
    (num_prompts draws with replacement). A prompt's judgments count that many times."""
    draws = np.random.default_rng(seed).integers(0, num_prompts, size=(n_boot, num_prompts))
    flat = draws + num_prompts * np.arange(n_boot)[:, None]
    counts = np.bincount(flat.ravel(), minlength=n_boot * num_prompts)
    return counts.reshape(n_boot, num_prompts).astype(np.float64)


def _percentile_ci(values):
    """The central CI_LEVEL % percentile interval of bootstrap values (NaN = a resample without
    data for it, skipped)."""
    tail = (100 - CI_LEVEL) / 2
    low, high = np.nanpercentile(values, [tail, 100 - tail])
    return [float(low), float(high)]


def _mode_scores(records, prompt_ids, weights):
    """Per mode: the paper's score with its bootstrap replicates, and the shares of each outcome."""
    prompt_index = {prompt_id: i for i, prompt_id in enumerate(prompt_ids)}
    results, replicates = {}, {}
    for mode in _ordered_modes({r[0] for r in records}):
        codes = np.array([r[4] for r in records if r[0] == mode])
        where = np.array([prompt_index[r[1]] for r in records if r[0] == mode])
        judged = np.bincount(where, minlength=len(prompt_ids)).astype(np.float64)
        not_worse = np.bincount(where, weights=codes >= EQUAL, minlength=len(prompt_ids))
        with np.errstate(invalid="ignore", divide="ignore"):  # resamples without this mode: NaN
            replicates[mode] = 100 * (weights @ not_worse) / (weights @ judged)
        results[mode] = {
            "n": int(codes.size),
            "prompts": int(np.count_nonzero(judged)),
            "score": float(100 * np.mean(codes >= EQUAL)),
            "ci": _percentile_ci(replicates[mode]),
            "model_better": float(100 * np.mean(codes == MODEL_BETTER)),
            "equal": float(100 * np.mean(codes == EQUAL)),
            "human_better": float(100 * np.mean(codes == HUMAN_BETTER)),
        }
    return results, replicates


def _differences(results, replicates):
    """score_a - score_b for every pair of modes (a later in display order), with the paired
    bootstrap CI: both scores of a replicate come from the same resampled prompts."""
    modes = list(results)
    differences = []
    for i, mode_b in enumerate(modes):
        for mode_a in modes[i + 1 :]:
            differences.append(
                {
                    "a": mode_a,
                    "b": mode_b,
                    "difference": results[mode_a]["score"] - results[mode_b]["score"],
                    "ci": _percentile_ci(replicates[mode_a] - replicates[mode_b]),
                }
            )
    return differences


def _agreement(records, num_raters):
    """Krippendorff's alpha (krippendorff package, ordinal: human better < equal < model better) on
    the items judged by two or more annotators; annotators are rows, items columns, NaN = not
    judged. Returns {"alpha", "reason" (why alpha is None), "items", "annotators"}."""
    raters_of = {}
    for _, _, rater, item_id, _ in records:
        raters_of.setdefault(item_id, set()).add(rater)
    shared = sorted(item_id for item_id, raters in raters_of.items() if len(raters) >= 2)
    raters = sorted({rater for item_id in shared for rater in raters_of[item_id]})
    result = {"alpha": None, "reason": None, "items": len(shared), "annotators": len(raters)}
    if not shared:
        reason = "only one annotator" if num_raters < 2 else "no item was judged by two annotators"
        result["reason"] = f"{reason}, so there is no agreement to measure"
        return result
    data = np.full((len(raters), len(shared)), np.nan)
    row, column = {r: i for i, r in enumerate(raters)}, {s: j for j, s in enumerate(shared)}
    for _, _, rater, item_id, code in records:
        if item_id in column:
            data[row[rater], column[item_id]] = code
    # the fixed value domain keeps the three categories even when the data miss one of them
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        alpha = krippendorff.alpha(
            reliability_data=data,
            level_of_measurement="ordinal",
            value_domain=[HUMAN_BETTER, EQUAL, MODEL_BETTER],
        )
    if not np.isfinite(alpha):
        result["reason"] = "every shared judgment has the same value, so alpha is undefined"
        return result
    result["alpha"] = float(alpha)
    return result


def score_preference(key, judgment_sets, n_boot=N_BOOT, seed=0):
    """Scores of the human-preference study from read_judgments' output.

    Per mode (scores["modes"][mode]): "score" = % of judgments where the model text was judged
    better than or equal to the human text (the paper's definition), "ci" = 95 % percentile
    bootstrap interval over prompts (resampled with replacement, all judgments of a prompt kept
    together), "model_better" / "equal" / "human_better" shares (%), "n" judgments, "prompts".
    scores["differences"]: score_a - score_b per pair of modes with a paired bootstrap CI (the same
    resampled prompts for both). scores["agreement"]: Krippendorff's alpha (ordinal, krippendorff
    package) over items judged by >= 2 annotators, or None with a "reason". Also "counts" and
    "annotators" (judged k of N per annotator). Deterministic for a seed."""
    _check_key(key)
    records = _records(key, judgment_sets)
    if not records:
        raise JudgmentError("no judgments to score; pass files with at least one judgment")
    prompt_ids = sorted({r[1] for r in records}, key=str)
    weights = _bootstrap_weights(len(prompt_ids), n_boot, seed)
    results, replicates = _mode_scores(records, prompt_ids, weights)
    num_items = len(key["items"])
    return {
        "page_id": key["page_id"],
        "modes": results,
        "unjudged_modes": _ordered_modes(
            {item["mode"] for item in key["items"].values()} - set(results)
        ),
        "differences": _differences(results, replicates),
        "agreement": _agreement(records, len(judgment_sets)),
        "counts": {
            "annotators": len(judgment_sets),
            "judgments": len(records),
            "items_judged": len({r[3] for r in records}),
            "num_items": num_items,
            "prompts": len(prompt_ids),
        },
        "annotators": [
            {
                "annotator": s["annotator"],
                "judged": len(s["judgments"]),
                "num_items": num_items,
                "path": s.get("path"),
                "replaces": s.get("replaces", []),
            }
            for s in judgment_sets
        ],
        "n_boot": n_boot,
        "seed": seed,
    }


# -----------------------------------------------------------------------------
# report: markdown table and figure


def _fmt_ci(ci, signed=False):
    sign = "+" if signed else ""
    return f"{ci[0]:{sign}.1f} to {ci[1]:{sign}.1f}"


def _paper_lines():
    """The paper's human-preference numbers as a markdown table, with how to read them."""
    intro = (
        "Carlsson et al. (ICLR 2025), human preference: % of judgments in which the model's "
        "continuation was judged better than or equal to the human one (3 annotators)."
    )
    how_to_read = (
        "These come from larger models, longer texts and other annotators: compare the ordering "
        "of the modes and the size of the gaps between them with yours (hyperfitted above greedy "
        "and top-p), not the absolute percentages."
    )
    header = "| model (paper) | " + " | ".join(_mode_label(m) for m in PAPER_MODES) + " |"
    lines = ["## The paper's numbers", "", intro, "", header, "|---" * (len(PAPER_MODES) + 1) + "|"]
    for model, numbers in PAPER_PREFERENCE:
        cells = [f"{numbers[m]:.1f}" if m in numbers else "–" for m in PAPER_MODES]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return lines + ["", how_to_read]


def _agreement_line(agreement):
    if agreement["alpha"] is None:
        return f"Krippendorff's alpha: not computed ({agreement['reason']})."
    return (
        f"Krippendorff's alpha (ordinal: human better < equal < model better): "
        f"{agreement['alpha']:.3f}, over {agreement['items']} items judged by two or more of "
        f"{agreement['annotators']} annotators (1 = perfect agreement, 0 = chance level)."
    )


def _mode_rows(scores):
    rows = [
        (
            f"| mode | score (% model ≥ human) | {CI_LEVEL} % CI | model better | equal | "
            "human better | judgments | prompts |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, m in scores["modes"].items():
        rows.append(
            f"| {_mode_label(mode)} | **{m['score']:.1f}** | {_fmt_ci(m['ci'])} | "
            f"{m['model_better']:.1f} | {m['equal']:.1f} | {m['human_better']:.1f} | {m['n']} | "
            f"{m['prompts']} |"
        )
    for mode in scores.get("unjudged_modes", []):
        rows.append(f"| {_mode_label(mode)} | no judgments yet | | | | | 0 | 0 |")
    return rows


def _difference_rows(scores):
    if not scores["differences"]:
        return ["Only one mode was judged: no differences between modes."]
    rows = [
        f"| A − B | difference (points) | {CI_LEVEL} % CI (paired) |",
        "|---|---|---|",
    ]
    for d in scores["differences"]:
        rows.append(
            f"| {_mode_label(d['a'])} − {_mode_label(d['b'])} | {d['difference']:+.1f} | "
            f"{_fmt_ci(d['ci'], signed=True)} |"
        )
    rows += ["", "A CI that excludes 0 means the two modes differ beyond resampling noise."]
    return rows


def _annotator_lines(scores):
    lines = []
    for a in scores["annotators"]:
        line = f"- annotator {a['annotator']}: {a['judged']} of {a['num_items']} items judged"
        if a.get("replaces"):
            line += f" (an earlier file, {', '.join(a['replaces'])}, was replaced by this one)"
        lines.append(line)
    return lines


def preference_table(scores):
    """eval/preference.md: the paper's score per mode (with CI and outcome shares), the differences
    between modes, Krippendorff's alpha, each annotator's completeness and the paper's numbers."""
    counts = scores["counts"]
    overview = (
        f"{counts['annotators']} annotator(s), {counts['judgments']} judgments of "
        f"{counts['items_judged']} of {counts['num_items']} items ({counts['prompts']} prompts) "
        f"on annotation page {scores['page_id']}. Each item put a model continuation beside the "
        "real human continuation of the same context, blind and in random order."
    )
    definition = (
        "Score = % of judgments in which the model's continuation was judged better than or "
        "equal to the human one (the paper's definition). CI: percentile bootstrap over "
        f"prompts ({scores['n_boot']} resamples; all judgments of a prompt stay together)."
    )
    lines = [
        "# Human preference: model vs. human continuation",
        "",
        overview,
        "",
        definition,
        "",
        *_mode_rows(scores),
        "",
        "## Differences between modes",
        "",
        *_difference_rows(scores),
        "",
        "## Agreement between annotators",
        "",
        _agreement_line(scores["agreement"]),
        "",
        "## Annotators",
        "",
        *_annotator_lines(scores),
        "",
        *_paper_lines(),
    ]
    return "\n".join(lines) + "\n"


def plot_preference(scores):
    """Bar chart of the paper's score per judged mode, with the 95 % bootstrap CI as error bars
    (y axis 0-100 %). Returns the matplotlib Figure."""
    modes = list(scores["modes"])
    values = np.array([scores["modes"][m]["score"] for m in modes])
    cis = np.array([scores["modes"][m]["ci"] for m in modes]).reshape(-1, 2)
    fig = Figure(figsize=PREFERENCE_FIGSIZE)
    ax = fig.add_subplot()
    positions = np.arange(len(modes))
    ax.bar(
        positions,
        values,
        yerr=np.vstack([values - cis[:, 0], cis[:, 1] - values]),
        capsize=6,
        error_kw={"clip_on": False},  # a CI reaching 100 % keeps its cap visible
        color=[mode_color(m) for m in modes],
        label="score (bars)",
    )
    for x, value in zip(positions, values):  # beside the error bar, so the two never overlap
        ax.text(
            x + 0.04,
            value + 1,
            f"{value:.1f} %",
            ha="left",
            va="bottom",
            fontsize=9,
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1},
        )
    ax.set_xticks(
        positions, [f"{_mode_label(m)}\nn = {scores['modes'][m]['n']}" for m in modes], fontsize=9
    )
    ax.set_ylim(0, 100)
    ax.set_ylabel("model judged ≥ human (%)")
    ax.set_title("Human preference: model vs. human continuation")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.text(
        0.01,
        0.01,
        f"% of judgments where the model text was judged better than or equal to the human text; "
        f"error bars: {CI_LEVEL} % percentile bootstrap CI over prompts. "
        f"{scores['counts']['annotators']} annotator(s), "
        f"{scores['counts']['judgments']} judgments.",
        fontsize=7,
        color="#555555",
        wrap=True,
    )
    fig.subplots_adjust(bottom=0.2, top=0.9, left=0.1, right=0.98)
    return fig


# -----------------------------------------------------------------------------
# one call for a run folder


def _judgment_files(judgment_paths):
    """The files behind `judgment_paths`: a folder stands for its judgments-*.json files."""
    if isinstance(judgment_paths, (str, os.PathLike)):
        judgment_paths = [judgment_paths]
    files = []
    for path in map(Path, judgment_paths):
        if path.is_dir():
            found = sorted(path.glob("judgments-*.json"))
            if not found:
                raise JudgmentError(
                    f"{path} holds no judgments-*.json files; pass the files downloaded from "
                    "annotate.html or the folder they are in"
                )
            files += found
        else:
            files.append(path)
    return files


def _read_key(key_path):
    if not key_path.is_file():
        raise JudgmentError(
            f"{key_path} does not exist; run evaluate.py on this run first (it writes the "
            "annotation page annotate.html and its key)"
        )
    try:
        return json.loads(key_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise JudgmentError(
            f"{key_path} is not valid JSON; rerun evaluate.py to write the annotation page and key"
        ) from None


def write_preference(run_dir, judgment_paths):
    """Score the judgments files (or folders of them) of a run and write <run>/eval/preference.md
    and <run>/eval/preference.png. Reads <run>/eval/annotate_key.json (written with the page by
    evaluate.py). Every file is read and checked, and the figure rendered, before anything is
    written; each output is written to a temporary name and renamed. Returns the written paths.
    Raises JudgmentError (one line) for a missing key or any bad judgments file."""
    eval_dir = Path(run_dir) / "eval"
    key = _read_key(eval_dir / "annotate_key.json")
    _check_key(key)
    judgment_sets = read_judgments(key, _judgment_files(judgment_paths))
    scores = score_preference(key, judgment_sets)
    table = preference_table(scores)
    png = io.BytesIO()
    plot_preference(scores).savefig(png, format="png", dpi=DPI)
    table_path, figure_path = eval_dir / "preference.md", eval_dir / "preference.png"
    _write_atomic(figure_path, png.getvalue())
    _write_atomic(table_path, table.encode("utf-8"))
    return [str(table_path), str(figure_path)]


# -----------------------------------------------------------------------------
# report and the whole run


def _fmt(v):
    return "–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


EVAL_LINKS = [
    ("eval/paper_comparison.md", "This run beside the paper's numbers, finding by finding"),
    ("eval/repetition.html", "Repeated n-grams highlighted (paper Fig. 1)"),
    (
        "eval/annotate.html",
        "The blind A/B page for the paper's human study (open it from disk; "
        "score the downloaded files with `python plot.py <run> --judgments <files>`)",
    ),
]


def run_report(run):
    """report.md of a run: key numbers (original model vs end of training), every figure, links to
    the evaluation's pages, and eval/table.md and eval/preference.md when they exist."""
    run = Path(run)
    config, records = _read_config(run), read_metrics(run)
    args = config.get("args", {})
    lines = [f"# Hyperfitting run `{config.get('run_name') or run.name}`", ""]
    setup = [
        f"{k} `{args[k]}`"
        for k in ("model", "epochs", "lr", "num_train", "seq_len", "batch_size")
        if k in args
    ]
    if config.get("git_commit"):
        setup.append(f"commit `{config['git_commit'][:10]}`")
    if config.get("compute_dtype"):
        setup.append(f"compute `{config['compute_dtype']}` on `{config.get('device')}`")
    lines += [", ".join(setup), ""] if setup else []
    if records:
        first, last = records[0], records[-1]
        lines += [
            f"| metric | start (step {first.get('step')}) | end (step {last.get('step')}) |",
            "|---|---|---|",
        ]
        for field, name in [
            ("val_loss", "validation loss"),
            ("val_entropy", "entropy (nats)"),
            ("val_top1_prob", "top-1 probability"),
            ("ttr_last96", "TTR (last 96)"),
        ]:
            lines.append(f"| {name} | {_fmt(first.get(field))} | {_fmt(last.get(field))} |")
        lines.append("")
    known = [
        "training_curves.png",
        "eval/decoding_comparison.png",
        "eval/ttr_by_position.png",
        "eval/preference.png",
    ]
    others = sorted(str(p.relative_to(run)) for p in [*run.glob("*.png"), *run.glob("eval/*.png")])
    figures = [f for f in known if (run / f).exists()] + [f for f in others if f not in known]
    if figures:
        lines += ["## Figures", ""] + [
            f"![{Path(f).stem.replace('_', ' ')}]({f})\n" for f in figures
        ]
    lines += [
        f"- {text}: [{path}]({path})" for path, text in EVAL_LINKS if (run / path).exists()
    ] + [""]
    for path, title in (
        ("eval/table.md", "Evaluation"),
        ("eval/preference.md", "Human preference"),
    ):
        if (run / path).exists():
            text = (
                (run / path).read_text(encoding="utf-8").strip().split("\n", 1)[-1]
            )  # its own title off
            lines += [f"## {title}", "", text.strip(), ""]
    return "\n".join(lines)


def _write_atomic(path, data):
    """Write bytes to a temporary name beside `path` and rename: no half-written file, ever."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _png(fig, fmt="png"):
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=DPI)  # no bbox_inches="tight": the PNG is figsize x dpi
    return buffer.getvalue()


def _save(fig, path, svg=False):
    """Write the figure as PNG (and SVG); return the written paths."""
    path = Path(path)
    outputs = {path: _png(fig)} | ({path.with_suffix(".svg"): _png(fig, "svg")} if svg else {})
    for target, data in outputs.items():
        _write_atomic(target, data)
    return [str(p) for p in outputs]


def plot_run(run_dir, svg=False, x="epoch"):
    """Everything available for one run: training curves always, the evaluation's figures and
    repetition page when eval/ has them, then report.md. Every input is read and every figure drawn
    before the first file is written. Returns the written paths."""
    run, eval_dir = Path(run_dir), Path(run_dir) / "eval"
    figures = {run / "training_curves.png": plot_training_curves(run, x=x)}
    pages = {}
    if (eval_dir / "summary.json").exists():
        summary = _load_summary(eval_dir / "summary.json")
        figures[eval_dir / "decoding_comparison.png"] = plot_decoding_comparison(summary)
        figures[eval_dir / "ttr_by_position.png"] = plot_ttr_by_position(summary)
    if (eval_dir / "generations.jsonl").exists():
        pages[eval_dir / "repetition.html"] = repetition_html(eval_dir / "generations.jsonl")
    rendered = {path: _png(fig) for path, fig in figures.items()}
    svgs = (
        {path.with_suffix(".svg"): _png(fig, "svg") for path, fig in figures.items()} if svg else {}
    )
    for path, data in {**rendered, **svgs}.items():
        _write_atomic(path, data)
    for path, text in pages.items():
        _write_atomic(path, text.encode("utf-8"))
    _write_atomic(run / "report.md", run_report(run).encode("utf-8"))
    return [str(p) for p in [*rendered, *svgs, *pages]] + [str(run / "report.md")]


def _problem(run):
    """Why `run` can't be plotted (one sentence), or None. Reads every input plot_run reads."""
    run = Path(run)
    if not run.is_dir():
        return f"{run} is not a folder — pass a run folder (results/<run>) written by hyperfit.py"
    if (run / "study.json").exists():
        return None
    if not (run / "metrics.jsonl").exists():
        return f"{run} has no metrics.jsonl — run hyperfit.py first or pass a run folder"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the error line below says it all
        if not read_metrics(run):
            return f"{run}/metrics.jsonl has no readable lines — rerun hyperfit.py for it"
    try:
        _read_config(run)
        if (run / "eval" / "summary.json").exists():
            _load_summary(run / "eval" / "summary.json")
    except PlotInputError as e:
        return str(e)
    return None


def build_parser():
    parser = argparse.ArgumentParser(
        description="Plot hyperfitting results.\n"
        "  one RUN:    training_curves.png, eval/*.png, eval/repetition.html (if evaluate.py ran)\n"
        "              and report.md, all written inside the run folder\n"
        "  several:    their training curves overlaid in one figure (--out)\n"
        "  a STUDY:    (evaluate.py --study) study.png and report.md in the study folder\n"
        "  --judgments: score the human study of one RUN: eval/preference.md and .png",
        epilog="examples:\n  python plot.py results/tinyllama\n"
        "  python plot.py results/a results/b --out results/a_vs_b.png --x step\n"
        "  python plot.py results/studies/data-size\n"
        "  python plot.py results/reference --judgments ana.json ben.json cleo.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="run folder(s) containing metrics.jsonl, or a study folder",
    )
    parser.add_argument(
        "--out",
        default="results/compare_training_curves.png",
        help="PNG for the overlay of several runs (default: %(default)s; unused for one run)",
    )
    parser.add_argument(
        "--x", choices=["epoch", "step"], default="epoch", help="x axis of the training curves"
    )
    parser.add_argument("--svg", action="store_true", help="also write an SVG next to every PNG")
    parser.add_argument(
        "--judgments",
        nargs="+",
        metavar="FILE",
        help="judgments files (or folders of them) downloaded from the run's eval/annotate.html",
    )
    return parser


def main(argv=None):
    """The command line: returns the exit code (0 done, 2 bad input, one line on stderr)."""
    args = build_parser().parse_args(argv)
    matplotlib.use("Agg")  # a script never needs a window
    try:
        written = _plot(args)
    except (PlotInputError, JudgmentError) as e:
        print(f"plot.py: {e}", file=sys.stderr)
        return 2
    print("\n".join(written))
    return 0


def _check_runs(runs):
    """Raise PlotInputError for the first run that can't be plotted: every input is checked
    before anything is written."""
    for run in runs:
        if (problem := _problem(run)) is not None:
            raise PlotInputError(problem)


def _plot(args):
    _check_runs(args.runs)
    if args.judgments:
        if len(args.runs) != 1:
            raise PlotInputError("--judgments scores one run: pass its folder alone")
        written = write_preference(args.runs[0], args.judgments)
        return written + plot_run(args.runs[0], svg=args.svg, x=args.x)
    if len(args.runs) == 1 and (Path(args.runs[0]) / "study.json").exists():
        return write_study(args.runs[0], svg=args.svg)
    if len(args.runs) == 1:
        return plot_run(args.runs[0], svg=args.svg, x=args.x)
    return _save(plot_training_curves(args.runs, x=args.x), args.out, args.svg)


if __name__ == "__main__" and "__file__" in globals():  # not when pasted into a notebook cell
    warnings.formatwarning = lambda msg, *a, **k: f"plot.py: warning: {msg}\n"  # one line
    sys.exit(main())
