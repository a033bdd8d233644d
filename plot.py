"""
A run's figures and Markdown files, rendered from the JSON that hyperfit.py and evaluate.py
write (and the human study's page key, from experiments/annotate.py); the studies and the human
study's scores draw their own (experiments/). Standalone and torch-free (matplotlib, numpy): it
imports no other file of the kit, and pasted into a notebook cell it only defines its functions.

    python plot.py results/<run>                       # every figure and page of one run
    python plot.py results/a results/b --out cmp.png   # overlay the training curves of runs

Reads config.json, steps.jsonl, metrics.jsonl, eval/summary.json, eval/generations.jsonl and
human_study/annotate_key.json, and writes next to them:
    training_curves.png        loss / entropy / top-1 probability / TTR during training (Fig. 2)
    eval/table.md              the paper's tables, one row per decoding mode (and the human text)
    eval/decoding_comparison.png, eval/ttr_by_position.png, eval/quality.png
    eval/repetition.html       continuations with repeated n-grams highlighted (paper Fig. 1)
    report.md                  links all of the above, and eval/paper_comparison.md when
                               experiments/paper_comparison.py wrote it (the run beside the paper)
Every input is read and every file rendered before the first one is written; bad input is one
line and exit 2. Every figure function returns a matplotlib Figure:
`from plot import plot_training_curves; plot_training_curves("results/x")`.
"""

import os
import signal
import sys

if __name__ == "__main__" and "__file__" in globals():  # Ctrl-C while the imports below load
    signal.signal(signal.SIGINT, lambda *_: os._exit(print("interrupted", file=sys.stderr) or 130))

import argparse
import hashlib
import html
import io
import json
import warnings
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure  # Figure() directly, not pyplot: no GUI window, no leaks
from matplotlib.patches import Patch

DPI = 150
MODE_COLORS = {
    "original_greedy": "#d62728",
    "original_top_p": "#ff7f0e",
    "original_entropy_matched": "#bcbd22",
    "hyperfitted_greedy": "#1f77b4",
    "hyperfitted_blocked": "#17becf",
    "human": "#2ca02c",
}
MODE_LABELS = {
    "original_greedy": "original greedy",
    "original_top_p": "original top-p",
    "original_entropy_matched": "original, entropy-matched T",
    "hyperfitted_greedy": "hyperfitted greedy",
    "hyperfitted_blocked": "hyperfitted + citation blocking",
    "human": "human text",
    "original_sampled": "original sampled",  # images.py's modes
}
FALLBACK_COLORS = ["#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#2ca02c"]
TRAINING_PANELS = [
    ("val_entropy", "(b) mean predictive entropy (validation)", "entropy (nats)"),
    ("val_top1_prob", "(c) mean top-1 probability (validation)", "top-1 probability"),
    ("val_greedy_ttr", "(d) type-token ratio of greedy continuations", "TTR (last 96 tokens)"),
]
COMPARISON_METRICS = [
    ("ttr_first96", "TTR, 96-token continuations ↑", "type-token ratio (0–1)"),
    ("simctg_diversity", "SimCTG diversity ↑", "diversity (0–1)"),
    ("self_bleu4_texygen_first96", "Self-BLEU-4 (Texygen) ↓", "BLEU-4 between generations"),
    ("dataset_bleu4_first96", "Dataset-BLEU-4 (copying) ↓", "BLEU-4 against training data"),
]
TRAINING_FIGSIZE = (7.0, 10.0)
COMPARISON_FIGSIZE = (12.0, 4.5)
TTR_POSITION_FIGSIZE = (8.0, 4.5)
QUALITY_FIGSIZE = (11.0, 5.0)
REPETITION_NGRAM = 3
PAPER_FILE = "data/paper.json"  # the paper's numbers, with their sources
TABLES_FILE = "data/tables.json"  # which measures each table shows: [measure, header, digits]
STYLE_FILE = "data/repetition.css"  # repetition.html's style


class PlotInputError(ValueError):
    """Input plot.py cannot use: the CLI prints the one-line message and exits 2, having written
    nothing."""


# -----------------------------------------------------------------------------
# reading run folders


def kit_root():
    """The kit's folder (data/paper.json lives there), or the working directory when the code was
    pasted into a notebook cell."""
    file = globals().get("__file__")
    return Path(file).resolve().parent if file else Path.cwd()


def read_paper():
    """The paper's numbers (data/paper.json)."""
    return _read_json(kit_root() / PAPER_FILE, "restore data/paper.json from the kit")


def read_tables():
    """The tables' layout (data/tables.json)."""
    return _read_json(kit_root() / TABLES_FILE, "restore data/tables.json from the kit")


def read_style():
    """repetition.html's style sheet (data/repetition.css)."""
    path = kit_root() / STYLE_FILE
    if not path.is_file():
        raise PlotInputError(f"{path} is missing: restore data/repetition.css from the kit")
    return path.read_text(encoding="utf-8")


def plain(text):
    """A name shown in a figure, never read as mathtext: run names may hold '$'."""
    return str(text).replace("$", r"\$")


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
# figures of a run


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
        (axes[0], "train_loss", "-", color, plain(run.name)),
        (axes[0], "val_loss", "--", color, "_val"),
    ]
    return lines + [(ax, f, "-", color, "_" + plain(run.name)) for ax, f in zip(axes[1:], panels)]


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
        steps = _read_jsonl(run / "steps.jsonl") if (run / "steps.jsonl").exists() else []
        for ax, field, style, c, label in _training_lines(axes, run, f"C{i % 10}", single):
            # the training loss at every step where the run logged it (steps.jsonl)
            xs, ys = _series(steps if field == "train_loss" and steps else records, x, field, spe)
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
    fig.suptitle(f"Hyperfitting: {plain(name) if single else f'{len(runs)} runs'}")
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


def _quality_point(ax, m, keys, scale, style, label):
    """One mode's point on a quality panel, with its 95 % intervals over prompts as bars."""
    (x, y), cis = [m.get(k, {}).get("mean") for k in keys], [m.get(k, {}).get("ci") for k in keys]
    if x is None or y is None:
        return
    xerr = [[x - cis[0][0]], [cis[0][1] - x]] if cis[0] else None
    yerr = [[(y - cis[1][0]) * scale], [(cis[1][1] - y) * scale]] if cis[1] else None
    ax.errorbar(x, y * scale, xerr=xerr, yerr=yerr, color=style["color"], lw=1, capsize=2)
    ax.scatter(x, y * scale, label=label, **style)


def plot_quality(summary_or_path):
    """Diversity against quality, one point per mode (95 % intervals over prompts) and the human
    text as its own point: (a) TTR of the continuations against their share of unknown words,
    (b) TTR against their perplexity under the original model (log): human text is not the
    least surprising text (Holtzman et al. 2020), so nearer the human text's is better. More
    varied is better only where the words stay real and the text stays human-like."""
    summary = _load_summary(summary_or_path)
    fig = Figure(figsize=QUALITY_FIGSIZE, layout="constrained")
    words, surprise = fig.subplots(1, 2)
    for mode in _ordered_modes(list(summary["modes"])):
        m, label = summary["modes"][mode]["metrics"], _mode_label(mode, summary)
        style = dict(color=mode_color(mode), marker="*" if mode == "human" else "o")
        style["s"] = 160 if mode == "human" else 60
        _quality_point(words, m, ("ttr", "unknown_word_share"), 100, style, label)
        _quality_point(surprise, m, ("ttr", "ppl_original"), 1, style, "_" + label)
    human = summary["modes"].get("human", {}).get("metrics", {})
    for ax, key, scale in ((words, "unknown_word_share", 100), (surprise, "ppl_original", 1)):
        if human.get(key, {}).get("mean") is not None:
            ax.axhline(human[key]["mean"] * scale, ls=":", color=MODE_COLORS["human"])
    words.set(
        title="(a) diversity vs unknown words (dotted: the human text's)",
        xlabel="TTR (whole continuation) →",
        ylabel="unknown words (% of words) ↓",
    )
    surprise.set(
        title="(b) diversity vs perplexity under the original model",
        xlabel="TTR (whole continuation) →",
        ylabel="perplexity (original model; dotted: the human text's)",
        yscale="log",
    )
    fig.legend(*words.get_legend_handles_labels(), loc="outside lower center", ncol=4, fontsize=8)
    fig.suptitle("More varied, or better? (one point per decoding mode, 95 % intervals)")
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
        f"<style>\n{read_style()}</style></head><body>",
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
# table.md: the paper's tables, rows = decoding modes


def cell(value, digits):
    """A table cell: mean [95 % interval over prompts] where there is one, else mean ± std (std
    None: a set-level number). digits 100: a share shown in % with two decimals."""
    if value is None or value.get("mean") is None:
        return "–"
    scale, digits = (100, 2) if digits == 100 else (1, digits)
    text = f"{value['mean'] * scale:.{digits}f}"
    if value.get("ci"):
        low, high = (v * scale for v in value["ci"])
        return text + f" [{low:.{digits}f}, {high:.{digits}f}]"
    return text + (f" ± {value['std'] * scale:.{digits}f}" if value.get("std") is not None else "")


def format_table(summary):
    """table.md: rows = decoding modes and the human text, columns = measures (mean [95 % interval
    over prompts], else mean ± std; set-level measures alone), then sharpness on validation text
    and the entropy match."""
    args, mauve = (
        summary["args"],
        next((i["mauve"] for i in summary["modes"].values() if "mauve" in i), None),
    )
    lines = [
        f"# Evaluation of `{summary['run']}`",
        "",
        f"Model `{args['model']}` ({args['quant']}), {args['num_prompts']} held-out prompts of "
        f"{args['split']['prompt_len']} tokens, {args['new_tokens']} new tokens each; `human` is "
        "the text that follows each prompt in its book, the same number of tokens. [low, high]: "
        "the 95 % interval over prompts (bootstrap; distinct-n: jackknife). Definitions: "
        "measures.py. Command:",
        "",
        f"    {summary['command']}",
        "",
    ]
    if mauve:
        lines += [
            f"MAUVE: {mauve['samples']} continuations per mode against as many human ones, "
            f"{mauve['buckets']} buckets, features from `{args.get('mauve_features', 'original')}`"
            "; indicative below a few thousand samples "
            f"(CI: {mauve['bootstrap']} prompt resamples).",
            "",
        ]
    for section in read_tables()["evaluation"]:
        title, columns = section["title"], section["columns"]
        lines += [
            f"## {title.format(n=args['new_tokens'])}",
            "",
            "| mode | " + " | ".join(c[1] for c in columns) + " |",
            "|---|" + "---|" * len(columns),
        ]
        for mode, info in summary["modes"].items():
            cells = [cell(info["metrics"].get(k), d) for k, _, d in columns]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += difference_lines(summary) + sharpness_lines(summary)
    return "\n".join(lines)


def difference_lines(summary):
    """The differences between modes this many prompts can tell apart: each pair and measure of
    summary.json's differences whose paired permutation test gives p < 0.05, and a count of the
    rest (which the report never calls a difference)."""
    rows = summary.get("differences") or []
    if not rows:
        return []
    n = summary["args"]["num_prompts"]
    lines = [
        "## Differences that pass a permutation test",
        "",
        f"Paired sign-flip permutation test over the {n} prompts (10,000 permutations), p < 0.05;"
        " only these are differences at this sample size.",
        "",
        "| mode | vs | measure | difference | p |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['a']} | {r['b']} | {r['metric']} | {r['diff']:+.4g} | {r['p']:.4f} |"
        for r in rows
        if r["significant"]
    ]
    rest = sum(not r["significant"] for r in rows)
    return lines + ["", f"{rest} other pairs and measures do not pass (p ≥ 0.05).", ""]


def sharpness_lines(summary):
    sharpness, args, columns = summary["sharpness"], summary["args"], read_tables()["sharpness"]
    lines = [
        f"## Sharpness on {args['sharpness_seqs']} validation sequences",
        "",
        "| model | " + " | ".join(c[1] for c in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for name in ("original", "hyperfitted"):
        if name in sharpness:
            cells = [f"{sharpness[name][k]:.{d}f}" for k, _, d in columns]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    if "val_top1_agreement" in sharpness:
        lines += [
            "Same top-1 token as the original model on validation text: "
            f"{sharpness['val_top1_agreement']:.3f} of positions",
            "",
        ]
    matched = summary.get("entropy_matched_temperature")
    if matched:
        lines += [
            f"Entropy-matched temperature: T = {matched['temperature']:.3f} (original model "
            f"entropy {matched['achieved_entropy']:.3f} nats; hyperfitted "
            f"{matched['target_entropy']:.3f} nats)",
            "",
        ]
    return lines


# -----------------------------------------------------------------------------
# image runs (images.py's eval/images.json): the completion grid and its measures


def plot_completions(report):
    """The paper's image figure: a column per held-out image; rows its prompt (the top half), each
    mode's completion of the bottom half (below the red line) and the real image."""
    grid = report["figure"]
    side, palette = grid["side"], np.asarray(grid["palette"], dtype=np.uint8)
    rows, columns = list(grid["images"]), len(grid["images"]["real"])
    fig = Figure(figsize=(0.75 * columns + 1.8, 0.8 * len(rows) + 0.6), layout="constrained")
    for ax_row, row in zip(fig.subplots(len(rows), columns, squeeze=False), rows):
        for ax, ids in zip(ax_row, grid["images"][row]):
            pixels = palette[np.asarray(ids)].reshape(-1, side, palette.shape[1])
            ax.imshow(pixels, extent=(0, side, len(pixels), 0), interpolation="nearest")
            ax.set(xlim=(0, side), ylim=(side, 0), xticks=[], yticks=[], facecolor="#d9d9d9")
            if row != "real":
                ax.axhline(grid["prompt_pixels"] / side, color="red", lw=0.8)
        ax_row[0].set_ylabel(_mode_label(row), rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"Completions of held-out images from their top half: {plain(report.get('run'))}")
    return fig


def image_section(run):
    """report.md's section of an image run: eval/images.json's measures, a row per mode and one
    for the real images."""
    report = _read_json(Path(run) / "eval" / "images.json")
    measures, sampling = list(report["modes"]["real"]), report["sampling"]["note"]
    lines = ["## Image completions", "", f"{report['num_images']} held-out images completed from"]
    lines[-1] += f" their top half. Sampling: {sampling}. Classifier: {report['classifier']}."
    lines += ["", "| | " + " | ".join(m.replace("_", " ") for m in measures) + " |"]
    lines += ["|---" * (1 + len(measures)) + "|"] + [
        f"| {_mode_label(mode)} | " + " | ".join(fmt(values.get(m)) for m in measures) + " |"
        for mode, values in report["modes"].items()
    ]
    return lines + [""]


# -----------------------------------------------------------------------------
# report.md and the whole run


def fmt(value, digits=3):
    return "–" if value is None else f"{value:.{digits}f}"


def _fmt(v):
    return "–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


EVAL_LINKS = [
    ("eval/paper_comparison.md", "This run beside the paper's numbers, finding by finding"),
    ("eval/repetition.html", "Repeated n-grams highlighted (paper Fig. 1)"),
    (
        "human_study/annotate.html",
        "The blind A/B page of the paper's human study (open it from "
        "disk; score the downloaded files with "
        "`python experiments/annotate.py <run> --judgments <files>`)",
    ),
    ("human_study/preference.md", "The human study's scores"),
]


def run_report(run, human_study):
    """report.md of a run: key numbers (original model vs end of training), every figure, links to
    the evaluation's pages, and eval/table.md. `human_study`: whether human_study/ was built from
    this evaluation (else it is named as stale, not linked)."""
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
            ("val_greedy_ttr", "TTR (last 96)"),
        ]:
            lines.append(f"| {name} | {_fmt(first.get(field))} | {_fmt(last.get(field))} |")
        lines.append("")
    known = [
        "training_curves.png",
        "eval/decoding_comparison.png",
        "eval/ttr_by_position.png",
        "eval/quality.png",
        "eval/completions.png",
        "human_study/preference.png",
    ]
    figures = [
        f for f in known if (run / f).exists() and (human_study or not f.startswith("human"))
    ]
    lines += ["## Figures", ""] + [f"![{Path(f).stem.replace('_', ' ')}]({f})\n" for f in figures]
    links = [
        (p, t)
        for p, t in EVAL_LINKS
        if (run / p).exists() and (human_study or not p.startswith("human"))
    ]
    lines += [f"- {text}: [{path}]({path})" for path, text in links] + [""]
    if not human_study and (run / "human_study").exists():
        lines += [
            "human_study/ was built from an earlier evaluation: rebuild its page with "
            "`python experiments/annotate.py <run> --overwrite`.",
            "",
        ]
    lines += image_section(run) if (run / "eval" / "images.json").exists() else []
    if (run / "eval" / "table.md").exists():
        table = (run / "eval" / "table.md").read_text(encoding="utf-8").strip().split("\n", 1)[-1]
        lines += ["## Evaluation", "", table.strip(), ""]  # its own title off
    return "\n".join(lines)


def _write_atomic(path, data):
    """Write bytes to a temporary name beside `path` and rename: no half-written file, ever. On
    any failure the temporary file goes too, and an OSError names `path` (a full disk's error
    names no file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    except BaseException:  # Ctrl-C mid-write: no leftover either
        tmp.unlink(missing_ok=True)
        raise


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
    """Everything available for one run: training curves always; the evaluation's tables, figures
    and repetition page when eval/ has them; the human study's scores when human_study/ holds
    them for this evaluation; then report.md. Every input is read and every file rendered before
    the first file is written. Returns the written paths."""
    run, eval_dir = Path(run_dir), Path(run_dir) / "eval"
    figures = {run / "training_curves.png": plot_training_curves(run, x=x)}
    pages = {}
    if (eval_dir / "summary.json").exists():
        summary = _load_summary(eval_dir / "summary.json")
        figures[eval_dir / "decoding_comparison.png"] = plot_decoding_comparison(summary)
        figures[eval_dir / "ttr_by_position.png"] = plot_ttr_by_position(summary)
        figures[eval_dir / "quality.png"] = plot_quality(summary)
        pages[eval_dir / "table.md"] = format_table(summary)
        pages[eval_dir / "repetition.html"] = repetition_html(eval_dir / "generations.jsonl")
    if (eval_dir / "images.json").exists():  # an image run (images.py)
        images = _read_json(eval_dir / "images.json")
        figures[eval_dir / "completions.png"] = plot_completions(images)
    current = current_human_study(run)
    rendered = {path: _png(fig) for path, fig in figures.items()}
    rendered |= (
        {path.with_suffix(".svg"): _png(fig, "svg") for path, fig in figures.items()} if svg else {}
    )
    rendered |= {path: text.encode("utf-8") for path, text in pages.items()}
    for path, data in rendered.items():
        _write_atomic(path, data)
    _write_atomic(run / "report.md", run_report(run, current is not None).encode("utf-8"))
    return [str(p) for p in rendered] + [str(run / "report.md")]


def current_human_study(run):
    """The key of the run's human-study page if it was built from the run's present evaluation
    (its digest of eval/generations.jsonl matches), else None."""
    key_path, generations = (
        Path(run) / "human_study" / "annotate_key.json",
        Path(run) / "eval" / "generations.jsonl",
    )
    if not key_path.exists() or not generations.exists():
        return None
    key = _read_json(
        key_path, "rebuild the page with python experiments/annotate.py RUN --overwrite"
    )
    digest = hashlib.sha256(generations.read_bytes()).hexdigest()[:16]
    return key if key.get("evaluation") == digest and isinstance(key.get("page_id"), str) else None


# the names runfiles.EVAL_FILES lists (a test keeps the two equal): only these may be put back
_EVAL_FILES = {"summary.json", "generations.jsonl", "images.json", "table.md"}
_EVAL_FILES |= {"paper_comparison.md", "repetition.html"}
_EVAL_FILES |= {
    f"{name}.{ext}"
    for name in ("decoding_comparison", "ttr_by_position", "quality", "completions")
    for ext in ("png", "svg")
}


def _recover_eval(run):
    """Put back eval/ from .eval.old, which a kill between the two renames of evaluate.py's
    runfiles.write_folder leaves (else the run would look unevaluated, and the next evaluation
    would delete it): only a folder of the kit's plain files holding the evaluation's summary
    (runfiles.recover_folder's rule; plot.py imports no other file of the kit)."""
    eval_dir, old = run / "eval", run / ".eval.old"
    if eval_dir.exists() or eval_dir.is_symlink() or old.is_symlink() or not old.is_dir():
        return
    entries = list(old.iterdir())
    plain = all(e.is_file() and not e.is_symlink() and e.name in _EVAL_FILES for e in entries)
    if plain and {"summary.json", "images.json"} & {e.name for e in entries}:
        old.rename(eval_dir)


def _problem(run):
    """Why `run` can't be plotted (one sentence), or None. Reads every input plot_run reads."""
    run = Path(run)
    if not run.is_dir():
        return f"{run} is not a folder — pass a run folder (results/<run>) written by hyperfit.py"
    _recover_eval(run)
    if (run / "study.json").exists():
        return (
            f"{run} is a study: python experiments/studies.py <study> draws it (and reruns "
            "nothing finished)"
        )
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
        if (run / "eval" / "images.json").exists():
            _read_json(
                run / "eval" / "images.json", "rerun python experiments/images.py --evaluate <run>"
            )
    except PlotInputError as e:
        return str(e)
    return None


def build_parser():
    parser = argparse.ArgumentParser(
        description="Plot hyperfitting results.\n"
        "  one RUN:    training_curves.png; with an evaluation, eval/table.md, eval/*.png\n"
        "              and eval/repetition.html; report.md (linking eval/paper_comparison.md),\n"
        "              linking the human study's page and scores (annotate.py) when current\n"
        "  several:    their training curves overlaid in one figure (--out)\n"
        "(a study's figure and report: studies.py draws them)",
        epilog="examples:\n  python plot.py results/tinyllama\n"
        "  python plot.py results/a results/b --out results/a_vs_b.png --x step",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.error = lambda message: parser.exit(2, f"plot.py: {message} (see --help)\n")
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s)")
    parser.add_argument(
        "--out",
        default="results/compare_training_curves.png",
        help="PNG for the overlay of several runs (default: %(default)s)",
    )
    parser.add_argument(
        "--x", choices=["epoch", "step"], default="epoch", help="x axis of the training curves"
    )
    parser.add_argument("--svg", action="store_true", help="also write an SVG next to every PNG")
    return parser


def main(argv=None):
    """The command line: returns the exit code (0 done, 2 bad input, one line on stderr)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    matplotlib.use("Agg")  # a script never needs a window
    try:
        written = _plot(build_parser().parse_args(argv))
    except PlotInputError as e:
        print(f"plot.py: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only folder, a full disk: what was written before is whole
        print(
            f"plot.py: cannot write {e.filename} ({e.strerror}); check the folder", file=sys.stderr
        )
        return 2
    except KeyboardInterrupt:
        print("plot.py: interrupted; every file written so far is whole", file=sys.stderr)
        return 130
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
    if len(args.runs) == 1:
        return plot_run(args.runs[0], svg=args.svg, x=args.x)
    return _save(plot_training_curves(args.runs, x=args.x), args.out, args.svg)


if __name__ == "__main__" and "__file__" in globals():  # not when pasted into a notebook cell
    warnings.formatwarning = lambda msg, *a, **k: f"plot.py: warning: {msg}\n"  # one line
    sys.exit(main())
