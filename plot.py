"""
Figures and a markdown report for hyperfitting runs.

    python plot.py results/<run>                      # every figure for one run + report.md
    python plot.py results/a results/b --out cmp.png  # overlay the training curves of several runs

Reads what hyperfit.py and evaluate.py write into a run folder (config.json, metrics.jsonl,
eval/summary.json, eval/generations.jsonl) and writes next to them:
    training_curves.png        loss / entropy / top-1 probability / TTR during training (paper Fig. 2)
    eval/decoding_comparison.png, eval/ttr_by_position.png
    eval/repetition.html       continuations with repeated n-grams highlighted (paper Fig. 1)
    report.md                  links all of the above plus eval/table.md

From a notebook: `from plot import plot_training_curves; plot_training_curves("results/x")`;
every figure function returns the matplotlib Figure.
"""
import argparse
import html
import json
import sys
import warnings
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure  # Figure() directly, not pyplot: no GUI window, no global figure leak
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
    ("ttr_last96", "TTR (last 96 tokens) ↑", "type-token ratio (0–1)"),
    ("diversity", "diversity ↑", "diversity (0–1)"),
    ("self_bleu4", "self-BLEU-4 ↓", "BLEU-4 between generations"),
    ("dataset_bleu4", "dataset BLEU-4 (copying) ↓", "BLEU-4 against training data"),
]
TRAINING_FIGSIZE = (7.0, 10.0)
COMPARISON_FIGSIZE = (12.0, 4.5)
TTR_POSITION_FIGSIZE = (8.0, 4.5)
REPETITION_NGRAM = 3


# -----------------------------------------------------------------------------
# reading run folders

def _read_jsonl(path):
    """Parsed objects of a .jsonl file; a line that doesn't parse (e.g. half-written by a killed run) is
    skipped with a warning naming the file and line number."""
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
                warnings.warn(f"{path}:{lineno}: skipping unparseable line")
                continue
            records.append(obj)
    return records


def read_metrics(run_dir):
    """The validation records of a run (metrics.jsonl), sorted by step."""
    return sorted(_read_jsonl(Path(run_dir) / "metrics.jsonl"), key=lambda r: r.get("step") or 0)


def _read_config(run_dir):
    path = Path(run_dir) / "config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _load_summary(summary_or_path):
    """Accept the summary dict itself, a path to summary.json, or a run folder."""
    if isinstance(summary_or_path, dict):
        return summary_or_path
    path = Path(summary_or_path)
    if path.is_dir():
        path = path / "eval" / "summary.json" if (path / "eval").is_dir() else path / "summary.json"
    return json.loads(path.read_text(encoding="utf-8"))


def _ordered_modes(modes):
    """Known modes in display order, then unknown ones in the order given."""
    known = [m for m in MODE_COLORS if m in modes]
    return known + [m for m in modes if m not in MODE_COLORS]


def mode_color(mode):
    """Colour of a decoding mode; an unknown mode gets a fallback colour picked from its name, so it is the
    same in every figure and run (Python's hash() is salted per process, the sum of code points isn't)."""
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


def plot_training_curves(runs, x="epoch"):
    """Paper Figure 2: train/val loss (log), entropy, top-1 probability and TTR against epoch (or step).

    `runs` is one run folder or a list of them. One run: train and val loss in two colours, the original
    model's values (step 0) as dashed grey reference lines. Several runs: one colour per run, train loss
    solid and validation loss dashed, legend with the run folder names."""
    runs = [runs] if isinstance(runs, (str, Path)) else list(runs)
    single = len(runs) == 1
    fig = Figure(figsize=TRAINING_FIGSIZE, layout="constrained")
    axes = fig.subplots(1 + len(TRAINING_PANELS), 1, sharex=True)
    axes[0].set_title("(a) train (solid) and validation (dashed) loss" if not single else "(a) loss")
    axes[0].set_ylabel("cross-entropy (nats/token)")
    axes[0].set_yscale("log")
    for ax, (_, title, ylabel) in zip(axes[1:], TRAINING_PANELS):
        ax.set_title(title)
        ax.set_ylabel(ylabel)
    for ax in axes[2:]:
        ax.set_ylim(0, 1.02)  # probabilities and ratios: keep the full 0..1 scale so runs compare at a glance
    axes[-1].set_xlabel("epoch" if x == "epoch" else "optimizer step")

    for i, run in enumerate(runs):
        run, color = Path(run), f"C{i % 10}"
        records, spe = read_metrics(run), _read_config(run).get("steps_per_epoch")
        # (axis, field, style, colour, legend label); a label starting with "_" stays out of the legend
        if single:
            lines = [(axes[0], "train_loss", "-o", "C0", "train loss"),
                     (axes[0], "val_loss", "-o", "C3", "validation loss")]
            lines += [(ax, f, "-o", "C2", "during training") for ax, (f, _, _) in zip(axes[1:], TRAINING_PANELS)]
        else:  # one colour per run; only the train line is labelled so the legend lists each run once
            lines = [(axes[0], "train_loss", "-", color, run.name), (axes[0], "val_loss", "--", color, "_val")]
            lines += [(ax, f, "-", color, "_" + run.name) for ax, (f, _, _) in zip(axes[1:], TRAINING_PANELS)]
        for ax, field, style, c, label in lines:
            xs, ys = _series(records, x, field, spe)
            if xs:
                ax.plot(xs, ys, style, ms=3, color=c, label=label, gid=f"{field}/{run.name}")
        start = next((r for r in records if r.get("step") == 0), None)
        if single and start is not None:  # the original model, before any fine-tuning
            for ax, field in zip(axes, ["val_loss"] + [p[0] for p in TRAINING_PANELS]):
                if start.get(field) is not None:
                    ax.axhline(start[field], ls="--", lw=1, color="grey", label="original model (step 0)")
    for ax in axes if single else axes[:1]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8, title=None if single else "run")
    name = (_read_config(runs[0]).get("run_name") or Path(runs[0]).name) if single else f"{len(runs)} runs"
    fig.suptitle(f"Hyperfitting: {name}")
    return fig


def plot_decoding_comparison(summary_or_path):
    """Bars per decoding mode for TTR, diversity, self-BLEU-4 and dataset BLEU-4 (error bars = std over
    generations where given). Accepts the summary dict, eval/summary.json, or a run folder."""
    summary = _load_summary(summary_or_path)
    modes_info = summary.get("modes", {})
    modes = _ordered_modes(list(modes_info))
    metrics = [m for m in COMPARISON_METRICS if any(m[0] in modes_info[mode].get("metrics", {}) for mode in modes)]
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
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5) or 1, fontsize=9)
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
            ax.fill_between(pos, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=color, alpha=0.15, lw=0)
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
    """For each token: True if the n-gram of tokens ending at it already occurred earlier in the sequence."""
    seen, mask = set(), []
    for i in range(len(token_ids)):
        if i < n - 1:
            mask.append(False)
            continue
        gram = tuple(token_ids[i - n + 1:i + 1])
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


def write_repetition_html(generations_path, out_path, num_prompts=4, n=REPETITION_NGRAM):
    """Self-contained HTML page: for the first `num_prompts` prompts, the continuation of every decoding mode
    side by side, with each token whose n-gram (of token ids) already occurred earlier shaded red."""
    generations = _read_jsonl(generations_path)
    by_prompt = {}  # prompt_id -> {mode: generation}, first occurrence wins
    for g in (g for g in generations if g.get("mode")):
        by_prompt.setdefault(g.get("prompt_id"), {}).setdefault(g.get("mode"), g)
    esc = html.escape
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Repetition in continuations</title>"
             f"<style>{HTML_STYLE}</style></head><body>",
             "<h1>Repetition in continuations</h1>",
             f"<p class='legend'>Legend: <span class='tok rep'>repeated</span> = the {n}-gram of tokens ending "
             f"here already occurred earlier in the same continuation; <span class='tok'>plain</span> = new.</p>"]
    for prompt_id in list(by_prompt)[:num_prompts]:
        gens = by_prompt[prompt_id]
        prompt_text = next((g.get("prompt_text") for g in gens.values() if g.get("prompt_text")), "")
        # the end of the prompt is what the continuation follows on from
        prompt_tail = prompt_text if len(prompt_text) <= 600 else "…" + prompt_text[-600:]
        modes = _ordered_modes(list(gens))
        parts.append(f"<h2>Prompt {esc(str(prompt_id))}</h2><div class='prompt'>{esc(prompt_tail)}</div>"
                     f"<div class='grid' style='grid-template-columns: repeat({len(modes)}, minmax(14em, 1fr))'>")
        for mode in modes:
            g = gens[mode]
            tokens = g.get("tokens")
            ids = g.get("token_ids") or tokens  # token strings still work as ids for the n-gram check
            if tokens and ids and len(ids) == len(tokens):
                spans = "".join(f"<span class='tok{' rep' if r else ''}'>{esc(t)}</span>"
                                for t, r in zip(tokens, repeated_ngram_mask(ids, n)))
            else:
                spans = esc(g.get("text", ""))  # no per-token info: show the text uncoloured
            ttr = f" · TTR<sub>96</sub> = {g['ttr_last96']:.2f}" if g.get("ttr_last96") is not None else ""
            parts.append(f"<div class='col'><h3 style='border-color:{mode_color(mode)}'>"
                         f"{esc(_mode_label(mode))}{ttr}</h3><div class='text'>{spans}</div></div>")
        parts.append("</div>")
    parts.append("</body></html>")
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text("\n".join(parts), encoding="utf-8")
    return str(out_path)


# -----------------------------------------------------------------------------
# report and the whole run

def _fmt(v):
    return "–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def write_report(run_dir):
    """results/<run>/report.md: key numbers (original model vs end of training), every figure present,
    and the evaluation table eval/table.md if it exists."""
    run = Path(run_dir)
    config, records = _read_config(run), read_metrics(run)
    args = config.get("args", {})
    lines = [f"# Hyperfitting run `{config.get('run_name') or run.name}`", ""]
    keys = ("model", "epochs", "lr", "num_train", "seq_len", "batch_size")
    setup = [f"{k} `{args[k]}`" for k in keys if k in args]
    if config.get("git_commit"):
        setup.append(f"commit `{config['git_commit'][:10]}`")
    if setup:
        lines += [", ".join(setup), ""]
    if records:
        first, last = records[0], records[-1]
        lines += [f"| metric | start (step {first.get('step')}) | end (step {last.get('step')}) |",
                  "|---|---|---|"]
        for field, name in [("val_loss", "validation loss"), ("val_entropy", "entropy (nats)"),
                            ("val_top1_prob", "top-1 probability"), ("ttr_last96", "TTR (last 96)")]:
            if field in first or field in last:
                lines.append(f"| {name} | {_fmt(first.get(field))} | {_fmt(last.get(field))} |")
        lines.append("")
    known = ["training_curves.png", "eval/decoding_comparison.png", "eval/ttr_by_position.png"]
    others = sorted(str(p.relative_to(run)) for p in [*run.glob("*.png"), *run.glob("eval/*.png")])
    figures = [f for f in known if (run / f).exists()] + [f for f in others if f not in known]
    if figures:
        lines += ["## Figures", ""] + [f"![{Path(f).stem.replace('_', ' ')}]({f})\n" for f in figures]
    if (run / "eval" / "repetition.html").exists():
        lines += ["Repeated n-grams highlighted (paper Fig. 1): [eval/repetition.html](eval/repetition.html)", ""]
    if (run / "eval" / "table.md").exists():
        lines += ["## Evaluation", "", (run / "eval" / "table.md").read_text(encoding="utf-8").strip(), ""]
    path = run / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return str(path)


def _save(fig, path, svg=False):
    """Write the figure as PNG (and SVG); return the written paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": the PNG is exactly figsize × dpi
    written = [str(path)]
    if svg:
        fig.savefig(path.with_suffix(".svg"))
        written.append(str(path.with_suffix(".svg")))
    return written


def plot_run(run_dir, svg=False, x="epoch"):
    """Everything available for one run: training curves always, evaluation figures and the repetition HTML
    when eval/ has them, then report.md. Returns the written paths."""
    run = Path(run_dir)
    written = _save(plot_training_curves(run, x=x), run / "training_curves.png", svg)
    eval_dir = run / "eval"
    if (eval_dir / "summary.json").exists():
        summary = _load_summary(eval_dir / "summary.json")
        written += _save(plot_decoding_comparison(summary), eval_dir / "decoding_comparison.png", svg)
        written += _save(plot_ttr_by_position(summary), eval_dir / "ttr_by_position.png", svg)
    if (eval_dir / "generations.jsonl").exists():
        written.append(write_repetition_html(eval_dir / "generations.jsonl", eval_dir / "repetition.html"))
    written.append(write_report(run))
    return written


def _problem(run):
    """Why `run` can't be plotted (one sentence), or None."""
    run = Path(run)
    if not run.is_dir():
        return f"{run} is not a folder — pass a run folder such as results/<run> written by hyperfit.py"
    if not (run / "metrics.jsonl").exists():
        return f"{run} has no metrics.jsonl — run hyperfit.py first or pass a run folder"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the error line below says it all
        if not read_metrics(run):
            return f"{run}/metrics.jsonl has no readable lines — rerun hyperfit.py or pass another run folder"
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Plot hyperfitting results.\n"
                    "  one RUN:  training_curves.png, eval/*.png and eval/repetition.html (if evaluate.py ran)\n"
                    "            and report.md, all written inside the run folder\n"
                    "  several:  their training curves overlaid in one figure (--out)",
        epilog="examples:\n  python plot.py results/tinyllama\n"
               "  python plot.py results/a results/b --out results/a_vs_b.png --x step",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s) containing metrics.jsonl")
    parser.add_argument("--out", default="results/compare_training_curves.png",
                        help="PNG for the overlay of several runs (default: %(default)s; unused for one run)")
    parser.add_argument("--x", choices=["epoch", "step"], default="epoch",
                        help="x axis of the training curves (default: %(default)s)")
    parser.add_argument("--svg", action="store_true", help="also write an SVG next to every PNG")
    args = parser.parse_args(argv)
    matplotlib.use("Agg")  # a script never needs a window
    for run in args.runs:  # check every run before writing anything
        if (problem := _problem(run)) is not None:
            print(f"plot.py: {problem}", file=sys.stderr)
            return 2
    if len(args.runs) == 1:
        written = plot_run(args.runs[0], svg=args.svg, x=args.x)
    else:
        written = _save(plot_training_curves(args.runs, x=args.x), args.out, args.svg)
    print("\n".join(written))
    return 0


if __name__ == "__main__":
    warnings.formatwarning = lambda msg, *a, **k: f"plot.py: warning: {msg}\n"  # one line, no source echo
    sys.exit(main())
