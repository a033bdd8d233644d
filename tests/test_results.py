"""The committed reference run's claims (README, "The reference run"), checked on its committed
generations: the permutation tests in summary.json are what measures.mode_differences gives on
generations.jsonl, every difference the README calls out passes a paired permutation test at
p < 0.05 (on the very measure it shows), and what it calls no difference does not."""

import json
from pathlib import Path

import pytest

import measures

ROOT = Path(__file__).resolve().parents[1]
EVAL = ROOT / "results" / "reference" / "eval"
# (a, b, measure, what the README says: True = a difference (p < 0.05), False = none found)
CLAIMS = [
    # "Greedy text stops looping: TTR 0.15 -> 0.54 (p < 0.001), and 84 % -> 16 % ... word loop"
    ("hyperfitted_greedy", "original_greedy", "ttr", True),
    ("hyperfitted_greedy", "original_greedy", "ttr_first96", True),
    ("hyperfitted_greedy", "original_greedy", "word_loop", True),
    # "more varied than top-p sampling (0.30) and than sampling at its own entropy (0.29)"
    ("hyperfitted_greedy", "original_top_p", "ttr", True),
    ("hyperfitted_greedy", "original_entropy_matched", "ttr", True),
    # "Citation blocking keeps it (0.55)"
    ("hyperfitted_blocked", "hyperfitted_greedy", "ttr", False),
    # "no test separates it from the original greedy or the human text" (unknown words)
    ("hyperfitted_greedy", "original_greedy", "unknown_word_share", False),
    ("hyperfitted_greedy", "human", "unknown_word_share", False),
    # "nearer human perplexity under the original model (17.6 vs 47.6 and 1.5)"
    ("hyperfitted_greedy", "human", "ppl_original", True),
    ("hyperfitted_greedy", "original_greedy", "ppl_original", True),
    # "repeats itself across prompts more (Self-BLEU 22 vs top-p's 8.5)"
    ("hyperfitted_greedy", "original_top_p", "self_bleu4_texygen", True),
]


@pytest.fixture(scope="module")
def generations():
    return [json.loads(line) for line in (EVAL / "generations.jsonl").read_text().splitlines()]


def values(generations, mode, measure):
    """The measure of each prompt's continuation in `mode`, in prompt order."""
    rows = sorted((r for r in generations if r["mode"] == mode), key=lambda r: r["prompt_id"])
    return [r[measure] for r in rows]


def test_the_committed_permutation_tests_are_the_generations(generations):
    summary = json.loads((EVAL / "summary.json").read_text())
    assert measures.mode_differences(generations) == summary["differences"]


@pytest.mark.parametrize("a, b, measure, differs", CLAIMS)
def test_each_difference_the_readme_names_passes_a_permutation_test(
    generations, a, b, measure, differs
):
    x, y = values(generations, a, measure), values(generations, b, measure)
    assert len(x) == len(y) == 32
    p = measures.paired_permutation_p(x, y)
    assert (p < measures.ALPHA) == differs, f"{a} vs {b} on {measure}: p = {p:.4f}"
    if measure == "ttr" and differs and "original" in b:
        assert p < 0.001  # the README says p < 0.001 for these


# the README's table of the reference run: its rows, and each column's measure and format
README_ROWS = [
    "original greedy",
    "original top-p",
    "original, entropy-matched",
    "**hyperfitted greedy**",
]
README_ROWS += ["hyperfitted + citation blocking", "human"]
README_COLUMNS = [  # (measure, digits, scale)
    ("ttr", 3, 1),
    ("self_bleu4_texygen", 1, 1),
    ("word_loop", 2, 1),
    ("unknown_word_share", 2, 100),
    ("intrusion", 2, 1),
    ("ppl_original", 1, 1),
]


def test_the_readme_table_is_the_summary_s():
    summary = json.loads((EVAL / "summary.json").read_text())
    modes = list(summary["modes"])  # the README's rows, in the evaluation's order
    lines = (ROOT / "README.md").read_text().splitlines()
    rows = [next(line for line in lines if line.startswith(f"| {name}")) for name in README_ROWS]
    for mode, row in zip(modes, rows):
        metrics = summary["modes"][mode]["metrics"]
        cells = [cell.strip() for cell in row.strip("|").split("|")][1:]
        for cell, (measure, digits, scale) in zip(cells, README_COLUMNS, strict=True):
            m = metrics[measure]
            low, high = (f"{x * scale:.{digits}f}" for x in m["ci"])
            assert cell == f"{m['mean'] * scale:.{digits}f} [{low}, {high}]", (mode, measure)
