"""
This run beside the paper's numbers, finding by finding: eval/paper_comparison.md, one row per
finding of the paper (Carlsson et al. 2025) and its follow-up (Beyond Temperature, 2026): the
paper's number (data/paper.json, each with its table or section), this run's under the same
definition, and a one-line verdict. A report about the paper, not part of a run's chain, so it
lives beside the other side experiments; torch-free like plot.py, whose readers it uses.

    python experiments/paper_comparison.py results/reference   # -> eval/paper_comparison.md

Reads the run's metrics.jsonl (the training curve) and eval/summary.json (evaluate.py); run it
before plot.py, whose report.md links the page when it is there. Bad input is one line, exit 2.
"""

import os
import signal
import sys

if __name__ == "__main__" and "__file__" in globals():  # Ctrl-C while the imports below load
    signal.signal(signal.SIGINT, lambda *_: os._exit(print("interrupted", file=sys.stderr) or 130))
if "__file__" in globals():  # the kit's files (plot.py and the rest) are one folder up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
from pathlib import Path

try:
    import plot
except ModuleNotFoundError:  # pasted into a notebook after plot.py's cell: its names are here
    import types

    plot = types.SimpleNamespace(**globals())


def metric(summary, mode, key):
    """A mode's mean of a metric, or None when the mode (or the metric) is missing."""
    return ((summary["modes"].get(mode) or {}).get("metrics", {}).get(key) or {}).get("mean")


def training_row(records, paper):
    """The training curve of the run (its metrics.jsonl), as the paper's Figure 2 describes it."""
    if len(records) < 2:
        return []
    first, last = records[0], records[-1]
    ours = (
        f"train loss {plot.fmt(last['train_loss'])} (mean since the previous validation); val loss "
        f"{plot.fmt(first['val_loss'])} → {plot.fmt(last['val_loss'])}; TTR "
        f"{plot.fmt(first.get('val_greedy_ttr'))} → {plot.fmt(last.get('val_greedy_ttr'))}"
    )
    # "near zero": below a quarter of the original model's loss on the same kind of text
    fitted = last["train_loss"] is not None and last["train_loss"] < 0.25 * first["val_loss"]
    same = (
        fitted
        and last["val_loss"] > first["val_loss"]
        and (last.get("val_greedy_ttr") or 0) > (first.get("val_greedy_ttr") or 0)
    )
    finding = "Training: train loss → ~0, validation loss rises, TTR rises"
    return [
        (finding, paper["training_curve"]["statement"], ours, "same shape" if same else "differs")
    ]


def ttr_row(summary, paper):
    """The paper's TTR of 96-token continuations: hyperfitted above 0.6, originals 0.17-0.57."""
    hyper = metric(summary, "hyperfitted_greedy", "ttr_first96")
    originals = [metric(summary, m, "ttr_first96") for m in ("original_greedy", "original_top_p")]
    (low, high), above = paper["ttr"]["original_range"], paper["ttr"]["hyperfitted_above"]
    verdict = "–"
    if hyper is not None:
        beats = all(o is not None and hyper > o for o in originals)
        side = "above" if hyper > above else "below"
        verdict = f"hyperfitted {side} {above}; above every original: {beats}"
    greedy, top_p = plot.fmt(originals[0]), plot.fmt(originals[1])
    ours = f"hyperfitted greedy {plot.fmt(hyper)}; original greedy {greedy}, top-p {top_p}"
    theirs = f"hyperfitted > {above}; originals {low}–{high} ({paper['ttr']['models']})"
    return ("TTR of 96-token continuations", theirs, ours, verdict)


def direction_row(summary, key, finding, paper, expected):
    """A finding stated as a direction ("falls" or "rises") of hyperfitted greedy against both
    original baselines (greedy, top-p)."""
    h, g, p = (
        metric(summary, m, key) for m in ("hyperfitted_greedy", "original_greedy", "original_top_p")
    )
    verdict = "–"
    if None not in (h, g, p):
        observed = "falls" if h < min(g, p) else "rises" if h > max(g, p) else "between them"
        same = "same direction" if observed == expected else "differs"
        verdict = f"{observed} ({h - p:+.2f} vs top-p); {same}"
    ours = f"hyperfitted {plot.fmt(h, 2)}; original greedy {plot.fmt(g, 2)}, top-p {plot.fmt(p, 2)}"
    return (f"{finding}, hyperfitted vs original", paper, ours, verdict)


def diversity_rows(summary, paper):
    """The paper's diversity and memorisation table, on 96-token continuations."""
    share, below = (
        metric(summary, "hyperfitted_greedy", "overlap_gt10_share_first96"),
        paper["overlap"]["below"],
    )
    overlap = "–" if share is None else "within" if share < below else "more copying than the paper"
    rise = f"rises ~{paper['dataset_bleu_rise']['points']:g} point"
    return [
        ttr_row(summary, paper),
        direction_row(
            summary,
            "self_bleu4_texygen_first96",
            "Self-BLEU-4 (Texygen)",
            paper["self_bleu"]["statement"],
            "falls",
        ),
        direction_row(summary, "dataset_bleu4_first96", "Dataset-BLEU-4", rise, "rises"),
        (
            "Dataset overlap: texts sharing > 10 tokens with training",
            f"< {below:.0%} of hyperfitted texts",
            plot.fmt(share),
            overlap,
        ),
    ]


def sharpness_rows(summary, paper):
    """The paper's sharpness table (Llama 3.1 8B) against this run's validation sharpness."""
    sharp, theirs = summary["sharpness"], paper["sharpness"]
    if "hyperfitted" not in sharp:
        return []
    rows = []
    for key, name, digits in (
        ("perplexity", "Perplexity", 1),
        ("entropy", "Entropy (nats)", 2),
        ("top1", "Top-1 probability mass", 3),
    ):
        before, after = theirs[key]
        ours = sharp["original"][key], sharp["hyperfitted"][key]
        same = (after > before) == (ours[1] > ours[0])
        rows.append(
            (
                f"{name}, original → hyperfitted",
                f"{theirs['model']}: {before:g} → {after:g} (×{after / before:.2f})",
                f"{ours[0]:.{digits}f} → {ours[1]:.{digits}f} (×{ours[1] / ours[0]:.2f})",
                "same direction" if same else "opposite direction",
            )
        )
    return rows


def position_row(summary, paper):
    """The paper's TTR-over-position finding (Figure 9)."""
    curves = {
        m: i["ttr_by_position"]
        for m, i in summary["modes"].items()
        if m != "human" and i["ttr_by_position"]["mean"]
    }
    if not curves:
        return []
    ends = {m: (c["mean"][0], c["mean"][-1]) for m, c in curves.items()}
    ours = "; ".join(f"{m} {a:.2f} → {b:.2f}" for m, (a, b) in ends.items())
    falls = all(b <= a for a, b in ends.values())
    hyper = ends.get("hyperfitted_greedy")
    others = [v for m, v in ends.items() if m.startswith("original")]
    higher = hyper is not None and all(hyper[0] > a for a, _ in others)
    slower = hyper is not None and all(hyper[1] / hyper[0] > b / a for a, b in others if a)
    verdict = (
        f"falls for every mode: {falls}; hyperfitted starts higher: {higher}, decays more "
        f"slowly: {slower}"
    )
    finding = "TTR of a 96-token window along the continuation"
    return [(finding, paper["ttr_by_position"]["statement"], ours, verdict)]


def blocking_rows(summary, paper):
    """Citation blocking barely hurts (the paper: human preference)."""
    greedy = metric(summary, "hyperfitted_greedy", "ttr_first96")
    blocked = metric(summary, "hyperfitted_blocked", "ttr_first96")
    if greedy is None or blocked is None:
        return []
    overlap = [
        metric(summary, m, "overlap_gt10_share")
        for m in ("hyperfitted_greedy", "hyperfitted_blocked")
    ]
    ours = (
        f"TTR {greedy:.3f} → {blocked:.3f}; overlap > 10 tokens {plot.fmt(overlap[0])} → "
        f"{plot.fmt(overlap[1])} (preference: the human study, annotate.py)"
    )
    verdict = (
        f"TTR {'kept' if blocked > 0.9 * greedy else 'lost'} ({(blocked - greedy) / greedy:+.0%})"
    )
    finding = "Citation blocking (no 5-gram of the training data) barely hurts"
    return [(finding, paper["citation_blocking"]["statement"], ours, verdict)]


def follow_up_rows(summary, paper):
    """Beyond Temperature: the entropy-matched control and the rank analysis."""
    rows, theirs = [], paper["entropy_matched"]
    matched = summary.get("entropy_matched_temperature")
    pair = ("original_entropy_matched", "hyperfitted_greedy")
    ttr, rep2 = (
        [metric(summary, m, "ttr_first96") for m in pair],
        [metric(summary, m, "simctg_rep_2") for m in pair],
    )
    if matched and None not in ttr and None not in rep2:
        rows.append(
            (
                "Entropy-matched sampling (the original at the hyperfitted entropy) is not as "
                "diverse",
                f"{theirs['model']}: T = {theirs['temperature']}; TTR {theirs['ttr']} vs "
                f"{theirs['ttr_hyperfitted']} hyperfitted; rep-2 {theirs['rep2']} vs "
                f"{theirs['rep2_hyperfitted']}",
                f"T = {matched['temperature']:.2f}; TTR {ttr[0]:.3f} vs {ttr[1]:.3f}; "
                f"rep-2 {rep2[0] / 100:.3f} vs {rep2[1] / 100:.3f}",
                "same" if ttr[1] > ttr[0] and rep2[1] < rep2[0] else "differs",
            )
        )
    for key, finding, share in (
        (
            "original_top1_share",
            "Hyperfitted greedy tokens that are also the original's top-1",
            "top1_agreement",
        ),
        (
            "override_beyond_top10_share",
            "Overrides the original ranked below its top 10",
            "overrides_beyond_top10",
        ),
    ):
        ours, expected = metric(summary, "hyperfitted_greedy", key), paper[share]["share"]
        if ours is not None:
            shown = f"~{expected:.0%}" if share == "top1_agreement" else f"{expected:.1%}"
            rows.append((finding, shown, f"{ours:.1%}", f"{(ours - expected) * 100:+.1f} points"))
    return rows


def quality_rows(summary, paper):
    """Better, not only more varied: MAUVE against the human text (the follow-up's number), and
    the share of unknown words beside the human text's (the kit's check; not in the paper)."""
    greedy, top_p, human = ("hyperfitted_greedy", "original_top_p", "human")
    rows, (low, high) = [], paper["mauve"]["range"]
    ours = metric(summary, greedy, "mauve")
    if ours is not None:
        ci = summary["modes"][greedy]["metrics"]["mauve"].get("ci") or [ours, ours]
        n = summary["modes"][greedy]["mauve"]["samples"]
        verdict = "within" if low <= ours <= high else "below" if ours < low else "above"
        rows.append(
            (
                "MAUVE of hyperfitted greedy text against the human text",
                f"{low}–{high} (follow-up)",
                f"{ours:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] from {n} texts; top-p "
                f"{plot.fmt(metric(summary, top_p, 'mauve'))}",
                f"{verdict} the follow-up's range (indicative at {n} samples)",
            )
        )
    share, theirs = (
        metric(summary, greedy, "unknown_word_share"),
        metric(summary, human, "unknown_word_share"),
    )
    if share is not None and theirs is not None:
        rows.append(
            (
                "Unknown words (wordfreq) in hyperfitted greedy text, against the human text's",
                "– (the paper reports human preference; the kit's check of real words)",
                f"{share:.2%} vs human {theirs:.2%}; top-p "
                f"{plot.fmt(metric(summary, top_p, 'unknown_word_share'), 4)}",
                "at most the human text's"
                if share <= theirs
                else f"{share / max(theirs, 1e-9):.1f}× the human text's",
            )
        )
    return rows


def protocol_note(summary):
    """How this run's protocol differs from the paper's (said once, on top)."""
    split = summary["args"]["split"]
    return (
        f"This run: `{summary['args']['model']}` hyperfitted with LoRA on {split['num_train']} "
        f"sequences × {split['seq_len']} tokens; the paper: full fine-tunes of 1.1B–70B models "
        "on 2,000 × 256 tokens for 20 epochs (the follow-up: TinyLlama, also with LoRA). "
        "Magnitudes depend on model and data size; the directions are what compare. With a "
        "small training set, memorisation (overlap, Dataset-BLEU) is expected to exceed the "
        "paper's."
    )


def paper_comparison(summary, records, paper):
    """paper_comparison.md: one row per finding of the paper (and its follow-up): the paper's
    number (data/paper.json), this run's number under the same definition, and a one-line
    verdict. `records`: the run's metrics.jsonl (the training curve)."""
    rows = (
        training_row(records, paper)
        + diversity_rows(summary, paper)
        + sharpness_rows(summary, paper)
        + position_row(summary, paper)
        + blocking_rows(summary, paper)
        + follow_up_rows(summary, paper)
        + quality_rows(summary, paper)
    )
    preference = "; ".join(
        f"{entry['model']}: "
        + ", ".join(f"{plot._mode_label(m)} {v}" for m, v in entry.items() if m != "model")
        for entry in paper["human_preference"]["models"]
    )
    lines = [
        f"# `{summary['run']}` beside the paper",
        "",
        protocol_note(summary),
        "",
        "Paper numbers: the kit's `data/paper.json` (Carlsson et al. 2025; Beyond Temperature, "
        "2026), each with its source. Definitions: measures.py; the 96-token rows score the "
        "first 96 new tokens.",
        "",
        "| finding | paper | this run | verdict |",
        "|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    lines += [
        "",
        f"Human preference ({paper['human_preference']['definition']}): {preference}. This "
        "run's: `python experiments/annotate.py <run>` builds the blind page; its scores land in "
        "`human_study/preference.md`.",
        "",
    ]
    return "\n".join(lines)


def write_comparison(run_dir):
    """Write <run_dir>/eval/paper_comparison.md (whole or not at all) and return its path; a run
    without an evaluation or with unreadable files is a plot.PlotInputError (one line)."""
    run = Path(run_dir)
    if (problem := plot._problem(run)) is not None:  # not a run folder, unreadable files
        raise plot.PlotInputError(problem)
    if not (run / "eval" / "summary.json").is_file():
        raise plot.PlotInputError(
            f"{run} has no eval/summary.json: run python evaluate.py {run} first"
        )
    summary = plot._load_summary(run / "eval" / "summary.json")
    page = paper_comparison(summary, plot.read_metrics(run), plot.read_paper())
    path = run / "eval" / "paper_comparison.md"
    plot._write_atomic(path, page.encode("utf-8"))
    return str(path)


def main(argv=None):
    """The command line: returns the exit code (0 done, 2 bad input); errors are one line."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = argparse.ArgumentParser(
        description="eval/paper_comparison.md: a run beside the paper's numbers, finding by "
        "finding (data/paper.json)."
    )
    parser.add_argument("run_dir", metavar="RUN", help="a run folder evaluated by evaluate.py")
    parser.error = lambda message: parser.exit(2, f"paper_comparison.py: {message}\n")
    try:
        print(write_comparison(parser.parse_args(argv).run_dir))
    except plot.PlotInputError as e:
        print(f"paper_comparison.py: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only folder, a full disk: the page is whole or absent
        print(f"paper_comparison.py: cannot write {e.filename} ({e.strerror})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("paper_comparison.py: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__" and "__file__" in globals():  # not when pasted into a notebook cell
    sys.exit(main())
