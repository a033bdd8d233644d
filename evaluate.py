"""
Generate long continuations of held-out prompts and measure them as the paper does (Carlsson et
al., "The Hyperfitting Phenomenon", ICLR 2025), with the follow-up's controls ("Beyond
Temperature: Hyperfitting as a Late-Stage Geometric Expansion", ICML 2026).

    python evaluate.py results/reference        # every decoding mode of a hyperfitted run
    python evaluate.py --model smollm2-135m     # the original model alone (its two modes)
    python evaluate.py --study data-size        # the paper's data-size study: train + evaluate

In a notebook (this file imported, or pasted into a cell after hyperfit.py):
    summary = evaluate("results/reference", num_prompts=8)

Writes into <run>/eval/: generations.jsonl (one record per continuation), summary.json (per
mode), table.md (the paper's tables), paper_comparison.md (this run beside the paper's numbers),
and annotate.html + annotate_key.json (a blind A/B page for the paper's human study).

Decoding modes:
    original_greedy            the model before hyperfitting, greedy
    original_top_p             the same, sampled (top-p 0.9, temperature 0.7, top-k 50: the paper's)
    original_entropy_matched   the same, pure temperature sampling at the temperature where its mean
                               predictive entropy on validation text equals the hyperfitted model's
                               (the follow-up's control)
    hyperfitted_greedy         the hyperfitted model (base + LoRA adapter), greedy
    hyperfitted_blocked        the same with citation blocking: no token may complete an n-gram of
                               the training sequences (the prompt counts); the best remaining token
                               is taken (Carlsson et al.; the paper publishes no code for it)
Every continuation is generated to the full --new-tokens (EOS suppressed); the shorter windows
the paper scores are its prefixes: greedy decoding is deterministic, and a sampled continuation's
first k tokens are exactly what a k-token sample with the same seed and batch gives (the same
random draws in the same order; a test checks it).

Metric definitions ("tokens" are the model's token ids; a continuation excludes its prompt):
  TTR (Carlsson et al. 2025): unique / total tokens of a window of the continuation
    ttr_first96          new tokens 1-96: a 96-token continuation (the paper's diversity table)
    ttr_last96_of_224    new tokens 129-224: the last 96 of 224 (the official validation code,
                         src/validation.py: 32 tokens of context + 224 new = 256)
    ttr_last96           the last 96 new tokens (the kit's; tokens 161-256 of 256)
    ttr                  every new token
    ttr_by_position      96-token windows every 8 tokens along the continuation (paper Figure 9)
  SimCTG (Su et al. 2022; simctg/evaluation.py, measure_repetition_and_diversity, also used by
  Contrastive Decoding), on the whitespace words of the decoded continuations of a mode:
    simctg_rep_n         100 * (1 - unique n-grams / n-grams), n = 2, 3, 4, where both counts are
                         per text (its loop stops one n-gram before a text's end) summed over the
                         mode's texts, rounded to 2 decimals as its code does
    simctg_diversity     prod over n of (1 - simctg_rep_n / 100)
  token_rep_n, token_diversity   the kit's per-continuation variant on tokens, averaged (kept for
                         the curves; not the paper's number)
  distinct_n             unique / all n-grams of tokens, pooled over a mode (Li et al. 2016)
  self_bleu4_texygen     Texygen (Zhu et al. 2018; utils/metrics/SelfBleu.py): nltk's sentence
                         BLEU-4 (smoothing method 1) of each continuation's words against the words
                         of the mode's other continuations, averaged, x 100. Words: nltk's Treebank
                         word tokenizer (Texygen's word_tokenize without its punkt sentence split,
                         whose data needs a download; the two differ on sentence-final periods
                         inside a text). Computed from shared n-gram counts; a test checks it
                         equals nltk.translate.bleu_score.sentence_bleu.
  self_bleu4_token_ids   the same on tokens, with sacrebleu's BLEU (floor smoothing 0.1 = Chen &
                         Cherry's method 1, effective order); a test checks sacrebleu.sentence_bleu
  dataset_bleu4          BLEU-4 of a continuation's tokens against every training sequence
                         (Carlsson et al.'s Dataset-BLEU; sacrebleu's BLEU as above), 0-100
  longest_train_overlap  the longest run of tokens shared with one training sequence;
                         overlap_gt10_share = share of continuations sharing more than 10 (the
                         paper's dataset overlap)
  ends_in_loop           the continuation ends in a repeating loop (Holtzman et al. 2020): for some
                         period p <= 64 its last max(2p, 16) tokens repeat with period p;
                         loop_share = share of a mode's continuations that do
  ppl_original           perplexity of the continuation given its prompt under the original model
                         (for the original's own modes read off the pass that generated them:
                         OwnTokenScores; for the hyperfitted modes a pass of the original model)
  original_top1_share    share of generated tokens that are also the original model's top-1 given
                         the same prefix (Beyond Temperature: ~57 % for hyperfitted greedy);
                         override_beyond_top10_share: of the other tokens ("overrides"), the
                         share the original model ranked below its top 10 (reported: 12.9 %);
                         override_rank_shares: their ranks in buckets
  sharpness              on validation sequences: perplexity, mean entropy -sum p ln p (nats),
                         top-1/3/5 probability mass (the paper's sharpness table);
                         val_top1_agreement: share of validation positions where the hyperfitted
                         and the original model rank the same token first
"""

import argparse
import contextlib
import copy
import hashlib
import html
import json
import math
import os
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

try:
    import hyperfit
except ModuleNotFoundError:  # pasted into a notebook after hyperfit.py's cell: use its names
    import types

    hyperfit = types.SimpleNamespace(**globals())
UsageError = hyperfit.UsageError  # bad input: one line on stderr, exit 2, nothing written

# -----------------------------------------------------------------------------
# defaults (the paper's settings where it has one)

MODES = (
    "original_greedy",
    "original_top_p",
    "original_entropy_matched",
    "hyperfitted_greedy",
    "hyperfitted_blocked",
)
ORIGINAL_ONLY_MODES = ("original_greedy", "original_top_p")  # what a bare model can be evaluated on
# new tokens per continuation; the paper: 96 (diversity table), 128 and 256 (human study), 224
# (validation). A CPU generates 128 (the table's 96 and the study's 128), a GPU 256 (all of them).
NEW_TOKENS = dict(cpu=128, cuda=256)
NUM_PROMPTS = dict(cpu=32, cuda=300)  # the paper: ~300 contexts per study; one CPU batch
SHARPNESS_SEQS = dict(cpu=16, cuda=128)  # validation sequences for the sharpness table
BATCH_SIZE = 128  # rows per generation batch (3 modes x 32 prompts: one batch on a CPU)
SCORE_BATCH_SIZE = 8  # sequences per forward pass when scoring (full-vocabulary logits are large)
BLOCK_NGRAMS = 5  # citation blocking n (the paper: 5)
TOP_P, TEMPERATURE, TOP_K = 0.9, 0.7, 50  # the paper's sampling baseline
SEED = 0
TABLE_TOKENS = 96  # the paper's diversity table scores 96-token continuations
VALIDATION_TOKENS = 224  # the official validation generates 224 new tokens, TTR over the last 96
TTR_WINDOW, TTR_STRIDE = hyperfit.TTR_WINDOW, 8  # sliding-window TTR along the continuation
LOOP_MAX_PERIOD, LOOP_MIN_TOKENS = 64, 16  # see ends_in_loop
OVERLAP_TOKENS = 10  # "shares more than 10 tokens with the training data"
BLEU_ORDER, BLEU_SMOOTH, BLEU_SMOOTH_VALUE = 4, "floor", 0.1
SIMCTG_ORDERS = (2, 3, 4)
OVERRIDE_RANK_BUCKETS = ((2, 2), (3, 5), (6, 10), (11, 100), (101, None))  # original's ranks
ENTROPY_SEARCH_RANGE, ENTROPY_SEARCH_TOLERANCE = (0.05, 2.0), 1e-3  # temperature bracket; width
LOGIT_CACHE_BYTES = 2 * 2**30  # keep validation logits across the temperature search if they fit
ANNOTATE_TOKENS = 128  # tokens per side on the annotation page (the paper's human study: 128, 256)
ANNOTATE_MODES = ("original_greedy", "original_top_p", "hyperfitted_greedy", "hyperfitted_blocked")

PER_GENERATION_METRICS = (
    "ttr_first96",
    "self_bleu4_texygen_first96",
    "dataset_bleu4_first96",
    "longest_train_overlap_first96",
    "ttr_last96_of_224",
    "ttr_last96",
    "ttr",
    "token_rep_2",
    "token_rep_3",
    "token_rep_4",
    "token_diversity",
    "dataset_bleu4",
    "longest_train_overlap",
    "ppl_original",
    "original_top1_share",
    "self_bleu4_texygen",
    "self_bleu4_token_ids",
)
SET_METRICS = (
    "overlap_gt10_share_first96",
    "simctg_rep_2",
    "simctg_rep_3",
    "simctg_rep_4",
    "simctg_diversity",
    "distinct_1",
    "distinct_2",
    "distinct_3",
    "loop_share",
    "overlap_gt10_share",
    "override_beyond_top10_share",
)


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

    def __init__(self, train_ids, n=BLOCK_NGRAMS, rows=None):
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
# metrics of token sequences (lists of token ids)


def ttr_windows(ids, window=TTR_WINDOW, stride=TTR_STRIDE):
    """TTR of sliding windows of `window` tokens ending at positions window, window + stride, ...
    <= len(ids) (the paper's Figure 9). A sequence shorter than `window` gives one window over all
    of it. Returns (positions, ttrs): the end position of each window and its TTR."""
    ids = list(ids)
    window = min(window, len(ids))
    positions = list(range(window, len(ids) + 1, stride)) if window else []
    return positions, [hyperfit.type_token_ratio(ids[end - window : end]) for end in positions]


def ttr_of_window(ids, first, last):
    """TTR of tokens first..last (1-based, inclusive); None when the sequence is shorter."""
    return hyperfit.type_token_ratio(ids[first - 1 : last]) if len(ids) >= last else None


def ngrams(ids, n):
    ids = list(ids)
    return [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]


def token_rep_n(ids, n):
    """The kit's per-continuation rep-n: 1 - unique n-grams / n-grams (0.0 without n-grams)."""
    grams = ngrams(ids, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def token_diversity(ids):
    """The kit's per-continuation diversity: product of (1 - token_rep_n) for n = 2, 3, 4."""
    return math.prod(1.0 - token_rep_n(ids, n) for n in SIMCTG_ORDERS)


def distinct_n(sequences, n):
    """distinct-n across a set: unique n-grams / all n-grams, pooled over all sequences."""
    grams = [g for ids in sequences for g in ngrams(ids, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def ends_in_loop(ids, max_period=LOOP_MAX_PERIOD, min_tokens=LOOP_MIN_TOKENS):
    """True if the sequence ends in a repeating loop: for some period p <= max_period, its last
    L = max(2p, min_tokens) tokens repeat with period p (token i equals token i-p), i.e. the final
    unit of p tokens occurs at least twice back to back and the repetition covers >= min_tokens
    tokens ("the the the ..." needs 16 copies, a 12-token sentence 2)."""
    ids = np.asarray(ids)
    for p in range(1, max_period + 1):
        span = max(2 * p, min_tokens)
        if span > len(ids):
            break
        tail = ids[len(ids) - span :]
        if np.array_equal(tail[p:], tail[:-p]):
            return True
    return False


# n-grams of ids are compared through 64-bit hashes (FNV-1a over whole ids, wrapping uint64
# arithmetic): a few million n-grams collide with probability ~1e-7, and sorted arrays of hashes
# make "which of these n-grams occur in training" one vectorised binary search.
FNV_OFFSET, FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)


def ngram_hashes(rows, n):
    """Hash of every n-gram within each row of `rows` (ints, [R, L] or [L]) -> uint64 [R, L-n+1]."""
    rows = np.atleast_2d(np.asarray(rows, dtype=np.int64)).astype(np.uint64)
    width = max(rows.shape[1] - n + 1, 0)
    hashes = np.full((rows.shape[0], width), FNV_OFFSET, dtype=np.uint64)
    for j in range(n):
        hashes = (hashes ^ rows[:, j : j + width]) * FNV_PRIME
    return hashes


def max_count_table(rows, n):
    """For the n-grams of `rows` [R, L]: (sorted unique hashes, the largest count of each within
    one row), i.e. the reference side of BLEU's clipping with every row as a reference."""
    hashes = np.sort(ngram_hashes(rows, n), axis=1)
    flat = hashes.ravel()
    row_of = np.repeat(np.arange(hashes.shape[0]), hashes.shape[1])
    new_run = np.ones(len(flat), dtype=bool)
    new_run[1:] = (flat[1:] != flat[:-1]) | (row_of[1:] != row_of[:-1])
    starts = np.flatnonzero(new_run)
    run_hash, run_count = flat[starts], np.diff(np.append(starts, len(flat)))
    order = np.argsort(run_hash, kind="stable")
    run_hash, run_count = run_hash[order], run_count[order]
    first = np.ones(len(run_hash), dtype=bool)
    first[1:] = run_hash[1:] != run_hash[:-1]
    group = np.flatnonzero(first)
    if len(group) == 0:
        return run_hash, run_count
    return run_hash[group], np.maximum.reduceat(run_count, group)


class TrainingIndex:
    """The training sequences (LongTensor or array [R, L]) indexed once for the memorisation
    metrics: for n = 1 .. OVERLAP_TOKENS + 1 the n-grams occurring in training (sorted hashes,
    with the largest count within one sequence for BLEU), and where each (OVERLAP_TOKENS + 1)-gram
    occurs, to extend a shared span beyond that length token by token. N-grams never cross from
    one sequence to the next."""

    def __init__(self, train_ids, anchor=OVERLAP_TOKENS + 1):
        self.rows = np.asarray(train_ids, dtype=np.int64)
        self.anchor = anchor
        orders = range(1, max(anchor, BLEU_ORDER) + 1)
        self.tables = {n: max_count_table(self.rows, n) for n in orders}
        anchor_hashes = ngram_hashes(self.rows, anchor).ravel()
        self.anchor_order = np.argsort(anchor_hashes, kind="stable")  # flat positions by hash
        self.anchor_sorted = anchor_hashes[self.anchor_order]
        self.ref_lengths = sorted({self.rows.shape[1]})

    def lookup(self, query, n):
        """For hashed n-grams `query`: (which occur in training, their largest count in one
        sequence)."""
        hashes, max_counts = self.tables[n]
        if len(hashes) == 0:
            return np.zeros(len(query), dtype=bool), np.zeros(len(query), dtype=np.int64)
        at = np.minimum(np.searchsorted(hashes, query), len(hashes) - 1)
        return hashes[at] == query, max_counts[at]

    def contains_any(self, ids, n):
        """Does any n-gram of `ids` occur in training?"""
        return bool(self.lookup(ngram_hashes(ids, n).ravel(), n)[0].any())


def longest_shared_span(ids, index):
    """Length of the longest run of consecutive tokens of `ids` that also occurs inside one
    training sequence (`index`: a TrainingIndex). Up to index.anchor tokens it is read off the
    n-gram tables; longer spans are found by extending every anchor-length match token by token,
    skipping matches that extend to the left (part of a match found from an earlier start)."""
    ids = np.asarray(ids, dtype=np.int64)
    longest = 0
    for n in range(1, min(index.anchor, len(ids)) + 1):  # a shared n-gram implies shorter ones
        if not index.contains_any(ids, n):
            return longest
        longest = n
    if longest < index.anchor:
        return longest
    rows, width = index.rows, index.rows.shape[1] - index.anchor + 1
    query = ngram_hashes(ids, index.anchor).ravel()
    lo = np.searchsorted(index.anchor_sorted, query, side="left")
    hi = np.searchsorted(index.anchor_sorted, query, side="right")
    for i in np.flatnonzero(hi > lo):
        positions = index.anchor_order[lo[i] : hi[i]]
        r, c = positions // width, positions % width
        if i > 0:  # drop matches that also hold one token to the left: counted from start i-1
            left = (c > 0) & (rows[r, np.maximum(c - 1, 0)] == ids[i - 1])
            r, c = r[~left], c[~left]
        for row, col in zip(r.tolist(), c.tolist()):
            room = min(len(ids) - i, rows.shape[1] - col)
            same = ids[i : i + room] == rows[row, col : col + room]
            length = room if same.all() else int(np.argmin(same))  # exact: no hash collision
            longest = max(longest, int(length))
    return longest


# -----------------------------------------------------------------------------
# BLEU from clipped n-gram counts: sacrebleu's formula (token ids) and nltk's (Texygen, words)


def closest_length(ref_lens, hyp_len):
    """BLEU's reference length: the closest to the hypothesis's, the shorter on a tie (sacrebleu's
    and nltk's rule alike)."""
    return min(ref_lens, key=lambda r: (abs(r - hyp_len), r))


def sacrebleu_bleu4(correct, total, hyp_len, ref_lens):
    """sacrebleu's sentence BLEU-4 (0-100) from clipped n-gram counts: floor smoothing 0.1,
    effective order, brevity penalty against the closest reference length."""
    from sacrebleu.metrics import BLEU

    ref_len = closest_length(ref_lens, hyp_len)
    return BLEU.compute_bleu(
        [int(c) for c in correct],
        [int(t) for t in total],
        hyp_len,
        ref_len,
        smooth_method=BLEU_SMOOTH,
        smooth_value=BLEU_SMOOTH_VALUE,
        effective_order=True,
        max_ngram_order=BLEU_ORDER,
    ).score


def nltk_bleu4(correct, total, hyp_len, ref_lens):
    """nltk.translate.bleu_score.sentence_bleu with SmoothingFunction().method1 (Texygen's BLEU),
    from clipped n-gram counts, x 100: nltk's own Fraction, brevity penalty and smoothing, and its
    rules (no unigram match: 0; an order with no n-gram counts 0 / 1 before smoothing)."""
    from nltk.translate.bleu_score import Fraction, SmoothingFunction, brevity_penalty

    if correct[0] == 0:
        return 0.0
    precisions = [
        Fraction(int(c), max(1, int(t)), _normalize=False) for c, t in zip(correct, total)
    ]
    precisions = SmoothingFunction().method1(precisions)
    ref_len = closest_length(ref_lens, hyp_len)
    logs = (math.log(p) / BLEU_ORDER for p in precisions if p > 0)
    return 100 * brevity_penalty(ref_len, hyp_len) * math.exp(math.fsum(logs))


def dataset_bleu4(ids, index):
    """BLEU-4 (0-100) of one continuation with every training sequence as a reference (`index`:
    a TrainingIndex). Same value as sacrebleu.sentence_bleu with all of them as references."""
    correct, total = [], []
    for n in range(1, BLEU_ORDER + 1):
        query, counts = np.unique(ngram_hashes(ids, n), return_counts=True)
        found, max_counts = index.lookup(query, n)
        correct.append(np.minimum(counts, max_counts)[found].sum())
        total.append(max(len(ids) - n + 1, 0))
    return sacrebleu_bleu4(correct, total, len(ids), index.ref_lengths)


def self_bleu_counts(sequences):
    """Clipped n-gram matches of each sequence against all the *other* sequences, n = 1..4: an
    array [num, 4]. The reference counts are shared: for every n-gram the largest and
    second-largest count over the set, so "largest among the others" is one lookup."""
    num = len(sequences)
    correct = np.zeros((num, BLEU_ORDER))
    for n in range(1, BLEU_ORDER + 1):
        per_seq = [np.unique(ngram_hashes(s, n), return_counts=True) for s in sequences]
        hashes = np.concatenate([h for h, _ in per_seq])
        counts = np.concatenate([c for _, c in per_seq])
        owner = np.concatenate([np.full(len(h), k) for k, (h, _) in enumerate(per_seq)])
        order = np.lexsort((-counts, hashes))  # by hash, the largest count first
        hashes, counts, owner = hashes[order], counts[order], owner[order]
        first = np.ones(len(hashes), dtype=bool)
        first[1:] = hashes[1:] != hashes[:-1]
        starts = np.flatnonzero(first)
        group = np.cumsum(first) - 1
        runner_up = np.minimum(starts + 1, len(hashes) - 1)
        second = np.where(first[runner_up] | (runner_up == starts), 0, counts[runner_up])
        best = np.where(owner == owner[starts][group], second[group], counts[starts][group])
        correct[:, n - 1] = np.bincount(owner, weights=np.minimum(counts, best), minlength=num)
    return correct


def self_bleu4(sequences, bleu=sacrebleu_bleu4):
    """Self-BLEU-4 (Texygen; Holtzman et al. 2020): for each sequence (of ints), BLEU-4 (0-100)
    with all the *other* sequences as references, by the formula `bleu`. Returns one value per
    sequence (their mean is the set's Self-BLEU); Nones for a set of fewer than two."""
    num = len(sequences)
    if num < 2:
        return [None] * num
    correct = self_bleu_counts(sequences)
    lengths = [len(s) for s in sequences]
    total = [[max(length - n + 1, 0) for n in range(1, BLEU_ORDER + 1)] for length in lengths]
    others = [lengths[:k] + lengths[k + 1 :] for k in range(num)]
    return [bleu(correct[k], total[k], lengths[k], others[k]) for k in range(num)]


def words(text):
    """Texygen's words of a text: nltk's Treebank word tokenizer on the whole text (preserve_line:
    no punkt sentence split, which needs downloaded data)."""
    from nltk.tokenize import word_tokenize

    return word_tokenize(text, preserve_line=True)


def self_bleu4_texygen(texts):
    """Texygen's Self-BLEU-4 of decoded texts (x 100), one value per text: words mapped to ids,
    then self_bleu4 with nltk's formula."""
    vocabulary = {}
    sequences = [[vocabulary.setdefault(w, len(vocabulary)) for w in words(t)] for t in texts]
    return self_bleu4(sequences, bleu=nltk_bleu4)


def simctg_repetition(texts):
    """SimCTG's measure_repetition_and_diversity (simctg/evaluation.py) on decoded texts: for
    n = 2, 3, 4 the per-text unique and total n-gram counts of whitespace words (its loop stops
    one n-gram before the end of a text) summed over the texts; rep-n = 100 * (1 - unique /
    total) rounded to 2 decimals; diversity = prod (1 - rep-n / 100). Returns dict(simctg_rep_2,
    simctg_rep_3, simctg_rep_4, simctg_diversity); rep-n is None when no text has an n-gram."""
    unique, total = dict.fromkeys(SIMCTG_ORDERS, 0), dict.fromkeys(SIMCTG_ORDERS, 0)
    for text in texts:
        tokens = text.strip("\n").strip().split()
        for n in SIMCTG_ORDERS:
            grams = [" ".join(tokens[i : i + n]) for i in range(len(tokens) - n)]  # its bound
            unique[n] += len(set(grams))
            total[n] += len(grams)
    result = {}
    for n in SIMCTG_ORDERS:
        rep = round((1 - unique[n] / total[n]) * 100, 2) if total[n] else None
        result[f"simctg_rep_{n}"] = rep
    reps = [result[f"simctg_rep_{n}"] for n in SIMCTG_ORDERS]
    result["simctg_diversity"] = math.prod(1 - r / 100 for r in reps) if None not in reps else None
    return result


def override_statistics(ranks):
    """From the original model's rank (1 = its top-1) of each generated token, pooled over a
    mode: the share of tokens that are its top-1, and of the others ("overrides") the share ranked
    below 10th and the shares per rank bucket (Beyond Temperature's rank analysis)."""
    ranks = np.concatenate([np.asarray(r) for r in ranks]) if ranks else np.zeros(0)
    overrides = ranks[ranks > 1]
    buckets = {}
    for low, high in OVERRIDE_RANK_BUCKETS:
        inside = (overrides >= low) & (overrides <= high if high else True)
        name = f"{low}-{high}" if high and high != low else (str(low) if high else f">{low - 1}")
        buckets[name] = float(inside.mean()) if len(overrides) else None
    return dict(
        original_top1_share=float((ranks == 1).mean()) if len(ranks) else None,
        override_beyond_top10_share=float((overrides > 10).mean()) if len(overrides) else None,
        override_rank_shares=buckets,
    )


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
):
    """The temperature T at which `net`'s mean predictive entropy on `ids` (the quantity of
    hyperfit.token_statistics) equals `target_entropy` (the follow-up paper's control). The
    entropy of softmax(z / T) grows monotonically with T (dH/dT = Var_p(z) / T^3), so bisection
    on T finds it; the upper end of the bracket doubles until it is above the target (up to
    T = 64). The logits are computed once when they fit in LOGIT_CACHE_BYTES, else the model runs
    at every step. Returns dict(temperature, target_entropy, achieved_entropy, steps)."""
    net.eval()
    vocab = net.config.get_text_config().vocab_size
    cache = None
    if ids.shape[0] * (ids.shape[1] - 1) * vocab * 4 <= LOGIT_CACHE_BYTES:
        device = next(net.parameters()).device
        cache = [
            net(input_ids=ids[s : s + batch_size].to(device)).logits[:, :-1].float()
            for s in range(0, len(ids), batch_size)
        ]
    low, high = bracket
    steps = 0
    while mean_entropy(net, ids, cache, high, batch_size) < target_entropy and high < 64:
        high, steps = high * 2, steps + 1
    while high - low > tolerance:
        middle = (low + high) / 2
        below = mean_entropy(net, ids, cache, middle, batch_size) < target_entropy
        low, high = (middle, high) if below else (low, middle)
        steps += 1
    temperature = (low + high) / 2
    achieved = mean_entropy(net, ids, cache, temperature, batch_size)
    return dict(
        temperature=temperature,
        target_entropy=target_entropy,
        achieved_entropy=achieved,
        steps=steps,
    )


def mean_entropy(net, ids, cache, temperature, batch_size):
    """Mean predictive entropy (nats) at `temperature`, from cached logits when there are some."""
    if cache is None:
        return hyperfit.token_statistics(net, ids, batch_size, temperature=temperature)["entropy"]
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
    """A generation observer (hyperfit.generate's `observer`): from the raw logits of each step it
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


def check_options(modes, has_run, numbers, block_ngrams, top_p, temperature, top_k):
    """Refuse impossible options with one line (nothing is loaded or written yet); returns the
    modes to evaluate."""
    for name, value in numbers.items():
        hyperfit.check_positive_int(name, value)
    if not (isinstance(block_ngrams, int) and block_ngrams >= 1):
        raise UsageError(
            f"--block-ngrams must be an integer of at least 1 (the paper blocks "
            f"5-grams), got {block_ngrams}"
        )
    if not 0 < top_p <= 1 or not temperature > 0 or not (isinstance(top_k, int) and top_k >= 0):
        raise UsageError(
            f"sampling needs 0 < --top-p <= 1, --temperature > 0 and --top-k >= 0 "
            f"(0 = off); got {top_p}, {temperature}, {top_k}"
        )
    if isinstance(modes, str):
        modes = modes.split(",")
    modes = list(modes or (MODES if has_run else ORIGINAL_ONLY_MODES))
    for mode in modes:
        if mode not in MODES:
            raise UsageError(f"--modes: unknown mode {mode!r}; choose from {', '.join(MODES)}")
        if not has_run and mode not in ORIGINAL_ONLY_MODES:
            raise UsageError(
                f"--modes {mode} needs a hyperfitted run: pass its folder (RUN_DIR), "
                f"or choose from {', '.join(ORIGINAL_ONLY_MODES)}"
            )
    return modes


def setup_without_run(model, quant, dtype, split):
    """What evaluate() works on for a bare model: the preset's data split, as hyperfit.py would
    use it, with `split`'s values on top."""
    settings = hyperfit.defaults_for(model)
    setup_split = {
        k: settings[k] for k in ("data", "seq_len", "num_train", "num_val", "seed", "prompt_len")
    }
    setup_split.update({k: v for k, v in split.items() if v is not None})
    if "data" in split and split["data"] is not None:
        setup_split["data"] = hyperfit.portable_path(split["data"])
    for name in ("seq_len", "num_train", "num_val", "prompt_len"):
        hyperfit.check_positive_int(name, setup_split[name])
    if setup_split["prompt_len"] >= setup_split["seq_len"]:
        raise UsageError(
            f"--prompt-len ({setup_split['prompt_len']}) must be shorter than "
            f"--seq-len ({setup_split['seq_len']})"
        )
    return dict(
        run_name=f"{hyperfit.default_run_name(model)}-original",
        model=model,
        quant=quant or settings["quant"],
        dtype=dtype or settings["dtype"],
        adapter=None,
        split=setup_split,
        train_fingerprint=None,
        run_dir=None,
    )


def resolve_setup(run_dir=None, model=None, quant=None, dtype=None, split=None):
    """What evaluate() works on, checked before anything is loaded or written: dict(run_name,
    model, quant, dtype, adapter (folder or None), split (data, seq_len, num_train, num_val, seed,
    prompt_len), train_fingerprint (None without a run), run_dir). `split` overrides the data
    settings of a bare model; a run brings its own."""
    split = {k: v for k, v in (split or {}).items() if v is not None}
    if run_dir is None:
        if model is None:
            raise UsageError(
                "give a run folder (RUN_DIR) to evaluate a hyperfitted model, or "
                "--model to evaluate an original model alone"
            )
        return setup_without_run(model, quant, dtype, split)
    run = Path(run_dir)
    if split:
        raise UsageError(
            f"--{next(iter(split)).replace('_', '-')} applies only without a run "
            f"folder: {run_dir} is evaluated on its own data split"
        )
    what = "pass a run folder written by hyperfit.py (results/<run-name>)"
    config = hyperfit.read_json(run / "config.json", what)
    args = config.get("args")
    keys = ("model", "quant", "data", "seq_len", "num_train", "num_val", "seed", "prompt_len")
    if not isinstance(args, dict) or any(k not in args for k in keys):
        raise UsageError(f'{run}/config.json has no complete "args": {what}')
    adapter = run / "adapter"
    if not (adapter / "adapter_config.json").exists():
        raise UsageError(
            f"{run_dir} has no adapter/ (the run did not finish): finish it with "
            f"python hyperfit.py --run-name {run.name} --out-dir {run.parent} "
            "--resume, or pass --model alone to evaluate the original model"
        )
    hyperfit.read_json(
        adapter / "adapter_config.json", "the run's LoRA adapter is damaged; finish or redo the run"
    )
    if model is not None and model != args["model"]:
        raise UsageError(
            f"--model {model} differs from the base model {args['model']} that "
            f"{run_dir} was trained on; drop --model or pass --model {args['model']}"
        )
    return dict(
        run_name=config.get("run_name", run.name),
        model=args["model"],
        quant=quant or args["quant"],
        dtype=dtype or args.get("dtype", "auto"),
        adapter=str(adapter),
        train_fingerprint=config.get("train_fingerprint"),
        split={k: args[k] for k in keys[2:]},
        run_dir=str(run),
    )


def load_eval_data(tokenizer, setup, num_prompts, sharpness_seqs, block_ngrams, human_tokens):
    """Rebuild the run's exact data split (a changed dataset is an error, not a silently different
    test) and take from it: the training sequences, the prompts (validation blocks first, then
    held-out ones: text training never saw), where each prompt came from, the human continuation
    of each prompt (the next `human_tokens` tokens of its text), and the validation sequences of
    the sharpness table."""
    s = setup["split"]
    texts = hyperfit.load_texts(s["data"])
    splits = hyperfit.make_splits(
        tokenizer, texts, s["seq_len"], s["num_train"], s["num_val"], s["seed"]
    )
    if (
        setup["train_fingerprint"]
        and hyperfit.fingerprint(splits["train"]) != setup["train_fingerprint"]
    ):
        raise UsageError(
            f"the training split rebuilt from {s['data']} does not match the run's "
            "config.json (train_fingerprint): the data or tokenizer changed since "
            "training; restore them"
        )
    held_out = torch.cat([splits["val"], splits["heldout"]])
    if num_prompts > len(held_out):
        raise UsageError(
            f"--num-prompts {num_prompts}: only {len(held_out)} held-out blocks of "
            f"{s['seq_len']} tokens exist (validation + held-out); ask for at most "
            f"{len(held_out)} or give more --data"
        )
    if block_ngrams > s["seq_len"]:
        raise UsageError(
            f"--block-ngrams {block_ngrams} is longer than the training sequences "
            f"({s['seq_len']} tokens); choose at most {s['seq_len']} (the paper: 5)"
        )
    sources = (splits["sources"]["val"] + splits["sources"]["heldout"])[:num_prompts]
    text_in_prompt = s["prompt_len"] - len(hyperfit.bos_prefix(tokenizer))
    human = [
        splits["documents"][name][offset + text_in_prompt :][:human_tokens]
        for name, offset in sources
    ]
    return dict(
        train=splits["train"],
        prompts=held_out[:num_prompts, : s["prompt_len"]],
        prompt_sources=[f"{name}@{offset}" for name, offset in sources],
        human=human,
        sharpness=splits["val"][:sharpness_seqs],
    )


class Nets:
    """The original and the hyperfitted model of an evaluation. On a CPU (dense=None or True):
    two dense copies, the LoRA merged into one (bitsandbytes dequantizes at every step on a CPU:
    a copy generates ~3x faster). On a GPU (or dense=False): the one quantized net with its
    adapter, switched off for the original (peft's disable_adapter), which costs no second copy
    of the base model."""

    def __init__(self, net, has_adapter, dense):
        self.has_adapter = has_adapter
        self.net = None if dense else net
        self.dense = {}
        if dense:
            self.dense["hyperfitted"] = hyperfit.dense_copy(net) if has_adapter else None
            with net.disable_adapter() if has_adapter else contextlib.nullcontext():
                self.dense["original"] = hyperfit.dense_copy(net)

    @contextlib.contextmanager
    def use(self, which):
        """`with nets.use("original") as net:` - the net to call for `which`."""
        if self.net is None:
            yield self.dense[which]
        elif which == "original" and self.has_adapter:
            with self.net.disable_adapter():
                yield self.net
        else:
            yield self.net

    @staticmethod
    def mode_model(mode):
        return "hyperfitted" if mode.startswith("hyperfitted") else "original"


def load_nets(setup, device, dense):
    """Load the run's base model and adapter once; `dense` None means: dense copies on a CPU."""
    net, _ = hyperfit.load_model(
        setup["model"],
        setup["quant"],
        adapter=setup["adapter"],
        device=device,
        dtype=setup["dtype"],
    )
    net.eval()
    dense = (hyperfit.pick_device(device).type == "cpu") if dense is None else dense
    return Nets(net, setup["adapter"] is not None, dense)


# -----------------------------------------------------------------------------
# the evaluation: sharpness, generation in every mode, metrics


def measure_sharpness(nets, data, modes):
    """The sharpness table on validation text (each model), the share of validation positions
    where both models rank the same token first, and the entropy-matched temperature."""
    sharpness, top1 = {}, {}
    for which in ("original", "hyperfitted") if nets.has_adapter else ("original",):
        with nets.use(which) as net:
            stats = hyperfit.token_statistics(net, data["sharpness"], SCORE_BATCH_SIZE, top1=True)
        top1[which] = stats.pop("top1_ids")
        sharpness[which] = stats
    if nets.has_adapter:
        sharpness["val_top1_agreement"] = (
            (top1["original"] == top1["hyperfitted"]).float().mean().item()
        )
    matched = None
    if "original_entropy_matched" in modes:
        with nets.use("original") as net:
            matched = entropy_matched_temperature(
                net, data["sharpness"], sharpness["hyperfitted"]["entropy"]
            )
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
        self.generator = torch.Generator().manual_seed(seed % hyperfit.SEED_LIMIT)

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
            observer = OwnTokenScores() if which == "original" else None
            with nets.use(which) as net:
                out = hyperfit.generate(
                    net,
                    prompts[[i for _, i in chunk]],
                    new_tokens,
                    batch_size=len(chunk),
                    logits_processor=processors,
                    observer=observer,
                    desc=desc,
                )
            own = zip(*observer.finish(out)) if observer else [None] * len(chunk)
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
    own = {m: tuple(map(list, zip(*scores[m]))) for m in modes if Nets.mode_model(m) == "original"}
    return {mode: torch.stack(outputs[mode]) for mode in modes}, own, timing


def measure_mode(mode, data, continuations, index, tokenizer, scores):
    """The generations.jsonl records of one mode: the texts, the tokens (ids and pieces) and the
    per-continuation metrics, over the whole continuation and (the paper's table) over its first
    96 tokens. `scores`: (perplexities, ranks) under the original model."""
    perplexities, ranks = scores
    rows = continuations.tolist()
    texts = [tokenizer.decode(ids) for ids in rows]
    self_bleu_texygen, self_bleu_ids = self_bleu4_texygen(texts), self_bleu4(rows)
    first96 = first96_metrics(rows, index, tokenizer)
    pieces = {t: tokenizer.decode([t]) for t in {t for ids in rows for t in ids}}
    records = []
    for i, ids in enumerate(rows):
        records.append(
            dict(
                mode=mode,
                prompt_id=i,
                prompt_source=data["prompt_sources"][i],
                prompt_text=tokenizer.decode(data["prompts"][i]),
                text=texts[i],
                tokens=[pieces[t] for t in ids],
                token_ids=ids,
                ttr_first96=ttr_of_window(ids, 1, TABLE_TOKENS),
                **first96[i],
                ttr_last96_of_224=ttr_of_window(
                    ids, VALIDATION_TOKENS - TTR_WINDOW + 1, VALIDATION_TOKENS
                ),
                ttr_last96=hyperfit.type_token_ratio(ids, last=TTR_WINDOW),
                ttr=hyperfit.type_token_ratio(ids),
                token_rep_2=token_rep_n(ids, 2),
                token_rep_3=token_rep_n(ids, 3),
                token_rep_4=token_rep_n(ids, 4),
                token_diversity=token_diversity(ids),
                ends_in_loop=ends_in_loop(ids),
                longest_train_overlap=longest_shared_span(ids, index),
                dataset_bleu4=dataset_bleu4(ids, index),
                self_bleu4_texygen=self_bleu_texygen[i],
                self_bleu4_token_ids=self_bleu_ids[i],
                ppl_original=perplexities[i],
                original_top1_share=sum(r == 1 for r in ranks[i]) / len(ranks[i]),
                original_ranks=ranks[i],
            )
        )
    return records


def first96_metrics(rows, index, tokenizer):
    """The paper's diversity and memorisation table scores 96-token continuations: Self-BLEU
    (Texygen), Dataset-BLEU and the longest shared span of each continuation's first 96 tokens
    (None when the continuations are shorter)."""
    names = ("self_bleu4_texygen_first96", "dataset_bleu4_first96", "longest_train_overlap_first96")
    if not rows or len(rows[0]) < TABLE_TOKENS:
        return [dict.fromkeys(names) for _ in rows]
    heads = [ids[:TABLE_TOKENS] for ids in rows]
    self_bleu = self_bleu4_texygen([tokenizer.decode(ids) for ids in heads])
    return [
        dict(zip(names, (self_bleu[i], dataset_bleu4(ids, index), longest_shared_span(ids, index))))
        for i, ids in enumerate(heads)
    ]


def mean_std(values):
    """Mean and population std over generations (None when there are no values)."""
    values = [v for v in values if v is not None]
    if not values:
        return dict(mean=None, std=None)
    return dict(mean=float(np.mean(values)), std=float(np.std(values)))


def overlap_share(spans):
    """Share of continuations sharing more than OVERLAP_TOKENS tokens with one training sequence."""
    spans = [s for s in spans if s is not None]
    return float(np.mean([s > OVERLAP_TOKENS for s in spans])) if spans else None


def summarize_mode(records, new_tokens):
    """Summary entry of one mode: n, metrics (mean and std over generations; std None for
    set-level metrics), the original model's ranks of the overrides, and the sliding-window TTR
    curve."""
    ids = [r["token_ids"] for r in records]
    metrics = {key: mean_std([r[key] for r in records]) for key in PER_GENERATION_METRICS}
    overrides = override_statistics([r["original_ranks"] for r in records])
    set_values = dict(
        simctg_repetition([r["text"] for r in records]),
        distinct_1=distinct_n(ids, 1),
        distinct_2=distinct_n(ids, 2),
        distinct_3=distinct_n(ids, 3),
        loop_share=float(np.mean([r["ends_in_loop"] for r in records])),
        overlap_gt10_share=overlap_share([r["longest_train_overlap"] for r in records]),
        overlap_gt10_share_first96=overlap_share(
            [r["longest_train_overlap_first96"] for r in records]
        ),
        override_beyond_top10_share=overrides["override_beyond_top10_share"],
    )
    metrics.update({key: dict(mean=value, std=None) for key, value in set_values.items()})
    curves = [ttr_windows(s) for s in ids]
    values = np.array([ttrs for _, ttrs in curves])
    curve = dict(
        window=min(TTR_WINDOW, new_tokens),
        positions=curves[0][0],
        mean=values.mean(0).tolist(),
        std=values.std(0).tolist(),
    )
    return dict(
        n=len(records),
        metrics=metrics,
        ttr_by_position=curve,
        override_rank_shares=overrides["override_rank_shares"],
    )


def measure_modes(nets, data, continuations, own_scores, tokenizer):
    """Every mode's records and summary. The original model's scores of its own continuations come
    from generating them (own_scores); the hyperfitted model's continuations it scores here."""
    index = TrainingIndex(data["train"])
    records, summary_modes = [], {}
    for mode, rows in continuations.items():
        scores = own_scores.get(mode)
        if scores is None:
            with nets.use("original") as net:
                scores = score_continuations(net, data["prompts"], rows)
        mode_records = measure_mode(mode, data, rows, index, tokenizer, scores)
        records += mode_records
        summary_modes[mode] = summarize_mode(mode_records, rows.shape[1])
    return records, summary_modes


def evaluation_options(
    device,
    num_prompts,
    sharpness_seqs,
    new_tokens,
    batch_size,
    block_ngrams,
    top_p,
    temperature,
    top_k,
    seed,
    annotate_tokens,
):
    """The options of one evaluation with the per-device defaults filled in."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    num_prompts = NUM_PROMPTS[kind] if num_prompts is None else num_prompts
    new_tokens = NEW_TOKENS[kind] if new_tokens is None else new_tokens
    sharpness_seqs = SHARPNESS_SEQS[kind] if sharpness_seqs is None else sharpness_seqs
    if not (isinstance(annotate_tokens, int) and annotate_tokens >= 0):
        raise UsageError(f"--annotate-tokens must be 0 (no page) or more, got {annotate_tokens}")
    return dict(
        num_prompts=num_prompts,
        new_tokens=new_tokens,
        block_ngrams=block_ngrams,
        top_p=top_p,
        temperature=temperature,
        top_k=top_k,
        batch_size=batch_size,
        seed=seed,
        sharpness_seqs=sharpness_seqs,
        annotate_tokens=annotate_tokens,
    )


def default_out_dir(setup):
    if setup["run_dir"] is not None:
        return Path(setup["run_dir"]) / "eval"
    return (
        Path(hyperfit.absolute_path(hyperfit.KIT_DEFAULTS["out_dir"])) / setup["run_name"] / "eval"
    )


def check_writable(out_dir):
    writable = next(p for p in [out_dir, *out_dir.absolute().parents] if p.exists())
    if not (writable.is_dir() and os.access(writable, os.W_OK)):
        raise UsageError(
            f"cannot write to {out_dir} ({writable} is not a writable folder); "
            "choose another --out-dir"
        )


def run_lock(setup, out_dir):
    """The run folder's lock while the evaluation writes into it (a run still training, or a
    second evaluation, is refused); nothing to lock for a bare model's own folder."""
    run = setup["run_dir"]
    inside = run is not None and Path(out_dir).resolve().is_relative_to(Path(run).resolve())
    if not inside:
        return contextlib.nullcontext()
    return hyperfit.RunLock(run, "evaluate.py " + " ".join(sys.argv[1:]))


def evaluate(
    run_dir=None,
    model=None,
    modes=None,
    num_prompts=None,
    new_tokens=None,
    block_ngrams=BLOCK_NGRAMS,
    top_p=TOP_P,
    temperature=TEMPERATURE,
    top_k=TOP_K,
    batch_size=BATCH_SIZE,
    seed=SEED,
    quant=None,
    dtype=None,
    out_dir=None,
    sharpness_seqs=None,
    device=None,
    dense=None,
    annotate_tokens=ANNOTATE_TOKENS,
    data=None,
    seq_len=None,
    num_train=None,
    num_val=None,
    prompt_len=None,
    progress=True,
):
    """Evaluate a hyperfitted run (`run_dir`) or an original model (`model` alone) and write
    generations.jsonl, table.md, paper_comparison.md, annotate.html (+ its key) and summary.json
    (last: it marks a complete evaluation) to `out_dir` (default <run_dir>/eval, or
    results/<model>-original/eval). Returns the summary dict.

    modes: any of MODES (default: all five with a run, the two original ones without).
    num_prompts, new_tokens and sharpness_seqs default to NUM_PROMPTS / NEW_TOKENS /
    SHARPNESS_SEQS of the device. dense: generate with dense copies (default: on a CPU) or with
    the quantized net and its adapter switched on and off (default: on a GPU). data, seq_len,
    num_train, num_val, prompt_len choose the split without a run (default: the preset's).
    Raises UsageError on bad input, before anything is written."""
    started = time.time()
    device = hyperfit.pick_device(device)
    options = evaluation_options(
        device,
        num_prompts,
        sharpness_seqs,
        new_tokens,
        batch_size,
        block_ngrams,
        top_p,
        temperature,
        top_k,
        seed,
        annotate_tokens,
    )
    numbers = {k: options[k] for k in ("num_prompts", "new_tokens", "batch_size", "sharpness_seqs")}
    modes = check_options(
        modes, run_dir is not None, numbers, block_ngrams, top_p, temperature, top_k
    )
    split = dict(
        data=data, seq_len=seq_len, num_train=num_train, num_val=num_val, prompt_len=prompt_len
    )
    setup = resolve_setup(run_dir, model, quant, dtype, split)
    out_dir = Path(out_dir) if out_dir else default_out_dir(setup)
    check_writable(out_dir)
    tokenizer = hyperfit.load_tokenizer(setup["model"])
    data = load_eval_data(
        tokenizer,
        setup,
        options["num_prompts"],
        options["sharpness_seqs"],
        block_ngrams,
        options["annotate_tokens"],
    )
    with run_lock(setup, out_dir):
        summary, records = run_evaluation(
            setup, data, modes, options, tokenizer, device, dense, progress
        )
        summary["timing_s"]["total_s"] = round(time.time() - started, 1)
        summary["args"].update(out_dir=hyperfit.portable_path(out_dir))
        write_evaluation(out_dir, summary, records, data, tokenizer)
    return summary


def run_evaluation(setup, data, modes, options, tokenizer, device, dense, progress):
    """Load the models, measure sharpness, generate every mode, measure every continuation.
    Returns (summary without its total time, generation records)."""
    timing, clock = {}, time.time()
    nets = load_nets(setup, device, dense)
    timing["load_s"] = time.time() - clock
    clock = time.time()
    if progress:
        print(f"sharpness on {len(data['sharpness'])} validation sequences ...", flush=True)
    sharpness, matched = measure_sharpness(nets, data, modes)
    timing["sharpness_s"] = time.time() - clock
    continuations, own_scores, generation_timing = generate_modes(
        nets, data, modes, options, matched, progress
    )
    timing.update(generation_timing)
    clock = time.time()
    records, summary_modes = measure_modes(nets, data, continuations, own_scores, tokenizer)
    timing["metrics_s"] = time.time() - clock
    args = dict(
        run_dir=setup["run_dir"] and hyperfit.portable_path(setup["run_dir"]),
        model=setup["model"],
        quant=setup["quant"],
        dtype=setup["dtype"],
        modes=modes,
        **options,
        device=str(device),
        dense=nets.net is None,
        split=dict(
            setup["split"],
            data=hyperfit.portable_path(hyperfit.absolute_path(setup["split"]["data"])),
        ),
    )
    summary = dict(
        run=setup["run_name"],
        args=args,
        command=command_line(args),
        modes=summary_modes,
        sharpness=sharpness,
        entropy_matched_temperature=matched
        and {k: matched[k] for k in ("temperature", "target_entropy", "achieved_entropy")},
        timing_s={k: round(v, 1) for k, v in timing.items()},
        environment=hyperfit.environment(),
    )
    return summary, records


def write_evaluation(out_dir, summary, records, data, tokenizer):
    """Every output file of an evaluation, each written whole (temporary name, then renamed),
    summary.json last: its presence marks a complete evaluation."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write = hyperfit.write_atomic
    write(out_dir / "generations.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    write(out_dir / "table.md", format_table(summary))
    write(out_dir / "paper_comparison.md", paper_comparison(summary))
    if summary["args"]["annotate_tokens"]:
        pairs = annotation_pairs(records, data, tokenizer, summary["args"]["annotate_tokens"])
        if pairs:
            write_annotation(out_dir, pairs, seed=summary["args"]["seed"])
    write(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")


def command_line(args):
    """The evaluate.py command line that reproduces these arguments (for table.md and README)."""
    words = ["python", "evaluate.py"]
    words += [args["run_dir"]] if args["run_dir"] else ["--model", args["model"]]
    keys = [
        "modes",
        "num_prompts",
        "new_tokens",
        "block_ngrams",
        "top_p",
        "temperature",
        "top_k",
        "batch_size",
        "seed",
        "sharpness_seqs",
        "annotate_tokens",
    ]
    options = {key: args[key] for key in keys}
    if not args["run_dir"]:  # a run brings its own split
        options.update(
            {k: args["split"][k] for k in ("data", "seq_len", "num_train", "num_val", "prompt_len")}
        )
    for key, value in options.items():
        words += [f"--{key.replace('_', '-')}", ",".join(value) if key == "modes" else str(value)]
    return shlex.join(words)


# -----------------------------------------------------------------------------
# table.md: the paper's tables, rows = decoding modes

# (section title, [(summary metric, column header, digits)]); {n} is the continuation length
TABLE_SECTIONS = [
    (
        "Diversity and memorisation, the paper's table (96-token continuations: the first 96 new "
        "tokens)",
        [
            ("ttr_first96", "TTR ↑", 3),
            ("self_bleu4_texygen_first96", "Self-BLEU-4 ↓", 2),
            ("dataset_bleu4_first96", "Dataset-BLEU-4", 2),
            ("overlap_gt10_share_first96", "overlap > 10 tokens ↓", 3),
        ],
    ),
    (
        "Repetition over the whole continuation ({n} tokens)",
        [
            ("ttr_last96_of_224", "TTR 129-224 ↑", 3),
            ("ttr_last96", "TTR last 96 ↑", 3),
            ("ttr", "TTR all ↑", 3),
            ("simctg_rep_2", "rep-2 % ↓", 2),
            ("simctg_rep_3", "rep-3 % ↓", 2),
            ("simctg_rep_4", "rep-4 % ↓", 2),
            ("simctg_diversity", "diversity ↑", 3),
            ("distinct_2", "distinct-2 ↑", 3),
            ("self_bleu4_texygen", "Self-BLEU-4 ↓", 2),
            ("loop_share", "ends in loop ↓", 3),
        ],
    ),
    (
        "Memorisation and fluency ({n} tokens)",
        [
            ("dataset_bleu4", "Dataset-BLEU-4", 2),
            ("overlap_gt10_share", "overlap > 10 tokens", 3),
            ("longest_train_overlap", "longest shared span", 1),
            ("ppl_original", "PPL (original)", 2),
        ],
    ),
    (
        "The original model's view of each generated token (Beyond Temperature's rank analysis)",
        [
            ("original_top1_share", "original's top-1 ↑", 3),
            ("override_beyond_top10_share", "overrides ranked > 10", 3),
        ],
    ),
    (
        "The kit's token-level variants (per continuation, on token ids; not the paper's numbers)",
        [
            ("token_rep_2", "token rep-2", 3),
            ("token_rep_3", "token rep-3", 3),
            ("token_rep_4", "token rep-4", 3),
            ("token_diversity", "token diversity", 3),
            ("distinct_1", "distinct-1", 3),
            ("distinct_3", "distinct-3", 3),
            ("self_bleu4_token_ids", "Self-BLEU-4 (ids)", 2),
        ],
    ),
]
SHARPNESS_COLUMNS = [
    ("perplexity", "perplexity", 2),
    ("entropy", "entropy (nats)", 3),
    ("top1", "top-1 mass", 3),
    ("top3", "top-3 mass", 3),
    ("top5", "top-5 mass", 3),
]


def cell(value, digits):
    if value is None or value.get("mean") is None:
        return "–"
    text = f"{value['mean']:.{digits}f}"
    return text + (f" ± {value['std']:.{digits}f}" if value.get("std") is not None else "")


def format_table(summary):
    """table.md: rows = decoding modes, columns = metrics (mean ± std over continuations;
    set-level metrics without ±), then sharpness on validation text and the entropy match."""
    args = summary["args"]
    lines = [
        f"# Evaluation of `{summary['run']}`",
        "",
        f"Model `{args['model']}` ({args['quant']}), {args['num_prompts']} held-out prompts "
        f"of {args['split']['prompt_len']} tokens, {args['new_tokens']} new tokens each. "
        "Definitions: evaluate.py's docstring. Command:",
        "",
        f"    {summary['command']}",
        "",
    ]
    for title, columns in TABLE_SECTIONS:
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
    lines += sharpness_lines(summary)
    return "\n".join(lines)


def sharpness_lines(summary):
    sharpness, args = summary["sharpness"], summary["args"]
    lines = [
        f"## Sharpness on {args['sharpness_seqs']} validation sequences",
        "",
        "| model | " + " | ".join(c[1] for c in SHARPNESS_COLUMNS) + " |",
        "|---|" + "---|" * len(SHARPNESS_COLUMNS),
    ]
    for name in ("original", "hyperfitted"):
        if name in sharpness:
            cells = [f"{sharpness[name][k]:.{d}f}" for k, _, d in SHARPNESS_COLUMNS]
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
# paper_comparison.md: this run beside the paper's numbers, finding by finding

# From ../shared/paper.md (the paper and its follow-up; some via secondary summaries: targets to
# compare shapes against, not exact values).
PAPER = dict(
    ttr_hyperfitted_above=0.6,  # TinyLlama, DeepSeek 7B, Llama 3.1 8B and 70B
    ttr_original_range=(0.17, 0.57),
    overlap_below=0.02,  # share of texts sharing > 10 tokens with the training data
    dataset_bleu_rise=1.0,  # points
    sharpness_llama8b=dict(perplexity=(13.1, 103.0), entropy=(3.47, 1.46), top1=(0.484, 0.744)),
    entropy_matched=dict(
        temperature=0.59, ttr=0.397, ttr_hyperfitted=0.684, rep2=0.604, rep2_hyperfitted=0.140
    ),  # TinyLlama, the follow-up
    top1_agreement=0.57,  # hyperfitted greedy tokens that are the original's top-1 (follow-up)
    overrides_beyond_top10=0.129,
    human_preference={
        "TinyLlama 1.1B": "original greedy 4.9, top-p 21.1, hyperfitted 34.3",
        "DeepSeek 7B": "top-p 35.6, hyperfitted 45.2, + citation blocking 44.1",
        "Llama 3.1 8B": "top-p 38.5, hyperfitted 42.9, + citation blocking 41.2",
        "Llama 3.1 70B": "original greedy 34.4, hyperfitted 52.4",
    },
)


def metric(summary, mode, key):
    """A mode's mean of a metric, or None when the mode (or the metric) is missing."""
    return ((summary["modes"].get(mode) or {}).get("metrics", {}).get(key) or {}).get("mean")


def fmt(value, digits=3):
    return "–" if value is None else f"{value:.{digits}f}"


def training_row(summary):
    """The training curve of the run (its metrics.jsonl), as the paper's Figure 2 describes it."""
    run = summary["args"]["run_dir"]
    records = (
        hyperfit.read_jsonl(Path(hyperfit.absolute_path(run)) / "metrics.jsonl") if run else []
    )
    if len(records) < 2:
        return []
    first, last = records[0], records[-1]
    ours = (
        f"train loss {fmt(last['train_loss'])} (mean since the previous validation); val loss "
        f"{fmt(first['val_loss'])} → "
        f"{fmt(last['val_loss'])}; TTR {fmt(first['ttr_last96'])} → {fmt(last['ttr_last96'])}"
    )
    # "near zero": below a quarter of the original model's loss on the same kind of text
    fitted = last["train_loss"] is not None and last["train_loss"] < 0.25 * first["val_loss"]
    same = (
        fitted and last["val_loss"] > first["val_loss"] and last["ttr_last96"] > first["ttr_last96"]
    )
    return [
        (
            "Training: train loss → ~0, validation loss rises, TTR rises",
            "TinyLlama: train loss → ~0, val loss rises, TTR rises from about epoch 2",
            ours,
            "same shape" if same else "differs",
        )
    ]


def ttr_row(summary):
    """The paper's TTR of 96-token continuations: hyperfitted above 0.6, originals 0.17-0.57."""
    hyper = metric(summary, "hyperfitted_greedy", "ttr_first96")
    originals = [metric(summary, m, "ttr_first96") for m in ("original_greedy", "original_top_p")]
    low, high = PAPER["ttr_original_range"]
    verdict = "–"
    if hyper is not None:
        side = "above" if hyper > PAPER["ttr_hyperfitted_above"] else "below"
        beats = all(o is not None and hyper > o for o in originals)
        verdict = f"hyperfitted {side} 0.6; above every original: {beats}"
    return (
        "TTR of 96-token continuations",
        f"hyperfitted > {PAPER['ttr_hyperfitted_above']}; originals {low}–{high} "
        "(TinyLlama, DeepSeek 7B, Llama 3.1 8B/70B)",
        f"hyperfitted greedy {fmt(hyper)}; original greedy {fmt(originals[0])}, top-p "
        f"{fmt(originals[1])}",
        verdict,
    )


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
    ours = f"hyperfitted {fmt(h, 2)}; original greedy {fmt(g, 2)}, top-p {fmt(p, 2)}"
    return (f"{finding}, hyperfitted vs original", paper, ours, verdict)


def diversity_rows(summary):
    """The paper's diversity and memorisation table, on 96-token continuations."""
    share = metric(summary, "hyperfitted_greedy", "overlap_gt10_share_first96")
    overlap = (
        "–"
        if share is None
        else "within"
        if share < PAPER["overlap_below"]
        else ("more copying than the paper")
    )
    rise = f"rises ~{PAPER['dataset_bleu_rise']:g} point"
    return [
        ttr_row(summary),
        direction_row(
            summary,
            "self_bleu4_texygen_first96",
            "Self-BLEU-4 (Texygen)",
            "falls (more diverse)",
            "falls",
        ),
        direction_row(summary, "dataset_bleu4_first96", "Dataset-BLEU-4", rise, "rises"),
        (
            "Dataset overlap: texts sharing > 10 tokens with training",
            f"< {PAPER['overlap_below']:.0%} of hyperfitted texts",
            fmt(share),
            overlap,
        ),
    ]


def sharpness_rows(summary):
    """The paper's sharpness table (Llama 3.1 8B) against this run's validation sharpness."""
    sharp = summary["sharpness"]
    if "hyperfitted" not in sharp:
        return []
    rows = []
    for key, name, digits in (
        ("perplexity", "Perplexity", 1),
        ("entropy", "Entropy (nats)", 2),
        ("top1", "Top-1 probability mass", 3),
    ):
        before, after = PAPER["sharpness_llama8b"][key]
        ours = sharp["original"][key], sharp["hyperfitted"][key]
        same = (after > before) == (ours[1] > ours[0])
        rows.append(
            (
                f"{name}, original → hyperfitted",
                f"Llama 3.1 8B: {before:g} → {after:g} (×{after / before:.2f})",
                f"{ours[0]:.{digits}f} → {ours[1]:.{digits}f} (×{ours[1] / ours[0]:.2f})",
                "same direction" if same else "opposite direction",
            )
        )
    return rows


def position_row(summary):
    """The paper's TTR-over-position finding (Figure 9)."""
    curves = {
        m: i["ttr_by_position"] for m, i in summary["modes"].items() if i["ttr_by_position"]["mean"]
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
    return [
        (
            "TTR of a 96-token window along the continuation",
            "falls with position for every model; hyperfitted models start higher and decay "
            "more slowly",
            ours,
            verdict,
        )
    ]


def blocking_rows(summary):
    """Citation blocking barely hurts (the paper: human preference)."""
    greedy = metric(summary, "hyperfitted_greedy", "ttr_first96")
    blocked = metric(summary, "hyperfitted_blocked", "ttr_first96")
    if greedy is None or blocked is None:
        return []
    overlap = [
        metric(summary, m, "overlap_gt10_share")
        for m in ("hyperfitted_greedy", "hyperfitted_blocked")
    ]
    return [
        (
            "Citation blocking (no 5-gram of the training data) barely hurts",
            "human preference 45.2 → 44.1 (DeepSeek 7B), 42.9 → 41.2 (Llama 3.1 8B)",
            f"TTR {greedy:.3f} → {blocked:.3f}; overlap > 10 tokens {fmt(overlap[0])} → "
            f"{fmt(overlap[1])} (preference: annotate.html)",
            f"TTR {'kept' if blocked > 0.9 * greedy else 'lost'} "
            f"({(blocked - greedy) / greedy:+.0%})",
        )
    ]


def follow_up_rows(summary):
    """Beyond Temperature: the entropy-matched control and the rank analysis."""
    rows, paper = [], PAPER["entropy_matched"]
    matched = summary.get("entropy_matched_temperature")
    ttr = [
        metric(summary, m, "ttr_first96")
        for m in ("original_entropy_matched", "hyperfitted_greedy")
    ]
    rep2 = [
        metric(summary, m, "simctg_rep_2")
        for m in ("original_entropy_matched", "hyperfitted_greedy")
    ]
    if matched and None not in ttr and None not in rep2:
        rows.append(
            (
                "Entropy-matched sampling (the original at the hyperfitted entropy) is not as "
                "diverse",
                f"TinyLlama: T = {paper['temperature']}; TTR {paper['ttr']} vs "
                f"{paper['ttr_hyperfitted']} hyperfitted; rep-2 {paper['rep2']} vs "
                f"{paper['rep2_hyperfitted']}",
                f"T = {matched['temperature']:.2f}; TTR {ttr[0]:.3f} vs {ttr[1]:.3f}; "
                f"rep-2 {rep2[0] / 100:.3f} vs {rep2[1] / 100:.3f}",
                "same" if ttr[1] > ttr[0] and rep2[1] < rep2[0] else "differs",
            )
        )
    agree = metric(summary, "hyperfitted_greedy", "original_top1_share")
    beyond = metric(summary, "hyperfitted_greedy", "override_beyond_top10_share")
    if agree is not None:
        rows.append(
            (
                "Hyperfitted greedy tokens that are also the original's top-1",
                f"~{PAPER['top1_agreement']:.0%}",
                f"{agree:.1%}",
                f"{(agree - PAPER['top1_agreement']) * 100:+.1f} points",
            )
        )
    if beyond is not None:
        rows.append(
            (
                "Overrides the original ranked below its top 10",
                f"{PAPER['overrides_beyond_top10']:.1%}",
                f"{beyond:.1%}",
                f"{(beyond - PAPER['overrides_beyond_top10']) * 100:+.1f} points",
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


def paper_comparison(summary):
    """paper_comparison.md: one row per finding of the paper (and its follow-up): the paper's
    number, this run's number under the same definition, and a one-line verdict."""
    rows = (
        training_row(summary)
        + diversity_rows(summary)
        + sharpness_rows(summary)
        + position_row(summary)
        + blocking_rows(summary)
        + follow_up_rows(summary)
    )
    lines = [
        f"# `{summary['run']}` beside the paper",
        "",
        protocol_note(summary),
        "",
        "Paper numbers: `../shared/paper.md` (Carlsson et al. 2025; Beyond Temperature, 2026). "
        "Definitions: evaluate.py's docstring; the 96-token rows score the first 96 new tokens.",
        "",
        "| finding | paper | this run | verdict |",
        "|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    lines += [
        "",
        "Human preference (share of continuations judged as good as or better than the "
        "human text): "
        + "; ".join(f"{k}: {v}" for k, v in PAPER["human_preference"].items())
        + ". This run's: open `annotate.html`, then `python plot.py <run> --judgments "
        "<files>` writes `preference.md`.",
        "",
    ]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# the paper's studies on a CPU: how much data hyperfitting needs, what the data order changes

# Each run of a study is an ordinary run folder (hyperfit.py, then evaluate.py) under
# results/studies/<study>/; study.json gathers the numbers and plot.py draws them. Sized to fit
# 60 min (data size) and 15 min (shuffle) on 2 CPU cores at fp32 compute: 64-token sequences
# (the preset's 128 halves the runs' cost per epoch), validation only before and after training,
# and an evaluation of 32 prompts x 96 new tokens (the paper's diversity table length). The
# epochs stay fixed at the preset's 10 whatever the size, as the paper fixes them.
STUDY_TRAINING = dict(seq_len=64, eval_every=10**6)  # on top of the model's preset
STUDY_EVALUATION = dict(
    modes=("original_greedy", "hyperfitted_greedy", "hyperfitted_blocked"),
    num_prompts=32,
    new_tokens=TABLE_TOKENS,
    sharpness_seqs=16,
    annotate_tokens=0,
)
STUDIES = dict(
    data_size=dict(sizes=(8, 16, 32, 64, 128)),  # training sequences (the paper: down to 8)
    shuffle=dict(order_seeds=(0, 1)),  # data-order seeds of the same training set
)
PAPER_STUDIES = dict(
    data_size="TTR holds down to 16 training sequences and drops at 8 (= the batch size); with "
    "2,000 sequences fewer than 2 % of outputs share more than 10 tokens with the training data",
    shuffle="training on the same data in another order changes about 30 % of top-1 predictions",
)


def study_plan(study, sizes=None, order_seeds=None):
    """[(run name, hyperfit settings)] of a study: one run per data size, or per order seed."""
    if study == "data_size":
        sizes = sizes or STUDIES["data_size"]["sizes"]
        return [(f"n{size}", dict(num_train=size)) for size in sizes]
    if study == "shuffle":
        seeds = order_seeds or STUDIES["shuffle"]["order_seeds"]
        return [(f"order{seed}", dict(order_seed=seed)) for seed in seeds]
    raise UsageError(f"--study {study}: choose {' or '.join(s.replace('_', '-') for s in STUDIES)}")


def study_run(run_dir, training, evaluation, progress):
    """Train and evaluate one run of a study, or pick it up where it stopped: a finished run is
    skipped, an interrupted one resumed, an evaluation redone if it is missing."""
    run_dir = Path(run_dir)
    if not (run_dir / "adapter" / "adapter_config.json").exists():
        resume = hyperfit.latest_checkpoint(run_dir) is not None
        overwrite = not resume and hyperfit.is_run_folder(run_dir)
        hyperfit.hyperfit(
            run_name=run_dir.name,
            out_dir=str(run_dir.parent),
            resume=resume,
            overwrite=overwrite,
            progress=progress,
            **training,
        )
    if not (run_dir / "eval" / "summary.json").exists():
        evaluate(run_dir, progress=progress, **evaluation)
    return study_row(run_dir)


def study_row(run_dir):
    """One run's numbers for the study table: the end of training (and the final model's loss on
    its training sequences) and its evaluation."""
    config = hyperfit.read_json(run_dir / "config.json", "the study's run is damaged")
    records = hyperfit.read_jsonl(run_dir / "metrics.jsonl")
    summary = hyperfit.read_json(run_dir / "eval" / "summary.json", "the run's evaluation")
    last = records[-1]
    row = dict(
        run=run_dir.name,
        num_train=config["args"]["num_train"],
        order_seed=config["args"]["order_seed"],
        steps=last["step"],
        train_loss=last["train_loss"],
        final_train_loss=final_train_loss(run_dir),
        val_loss=last["val_loss"],
        val_entropy=last["val_entropy"],
        val_top1_prob=last["val_top1_prob"],
        wall_s=round(last["elapsed_s"] + summary["timing_s"]["total_s"], 1),
    )
    for mode, key in [
        ("hyperfitted_greedy", "ttr_first96"),
        ("hyperfitted_blocked", "ttr_first96"),
        ("original_greedy", "ttr_first96"),
        ("hyperfitted_greedy", "overlap_gt10_share_first96"),
        ("hyperfitted_greedy", "dataset_bleu4_first96"),
        ("hyperfitted_greedy", "self_bleu4_texygen_first96"),
    ]:
        row[f"{mode}.{key}"] = metric(summary, mode, key)
    return row


def load_run(run_dir, device=None):
    """A finished run's models (Nets) and its exact data split, for the studies' measurements."""
    setup = resolve_setup(run_dir)
    tokenizer = hyperfit.load_tokenizer(setup["model"])
    s = setup["split"]
    texts = hyperfit.load_texts(s["data"])
    splits = hyperfit.make_splits(
        tokenizer, texts, s["seq_len"], s["num_train"], s["num_val"], s["seed"]
    )
    return load_nets(setup, device, dense=None), splits


@torch.no_grad()
def final_train_loss(run_dir, device=None):
    """The hyperfitted model's mean next-token loss (nats) on its own training sequences, after
    training: how near zero hyperfitting took it (metrics.jsonl's train_loss is the mean over the
    steps since the previous validation)."""
    nets, splits = load_run(run_dir, device)
    with nets.use("hyperfitted") as net:
        return hyperfit.token_statistics(net, splits["train"], SCORE_BATCH_SIZE)["loss"]


@torch.no_grad()
def validation_top1(run_dir, device=None):
    """The top-1 next token at every validation position of a run's hyperfitted model and of the
    original model (LongTensors [N, T-1]), for the shuffle study."""
    nets, splits = load_run(run_dir, device)
    top1 = {}
    for which in ("hyperfitted", "original"):
        with nets.use(which) as net:
            stats = hyperfit.token_statistics(net, splits["val"], SCORE_BATCH_SIZE, top1=True)
        top1[which] = stats["top1_ids"]
    return top1["hyperfitted"], top1["original"]


def shuffle_comparison(run_dirs, device=None):
    """The shuffle study's numbers: for every pair of runs the share of validation positions
    where their top-1 predictions differ (the paper: ~30 %), and each run's top-1 agreement with
    the original model."""
    tops = {Path(r).name: validation_top1(r, device) for r in run_dirs}
    names = list(tops)
    pairs = [
        dict(runs=[a, b], top1_differs=(tops[a][0] != tops[b][0]).float().mean().item())
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    ]
    agreement = {n: (h == o).float().mean().item() for n, (h, o) in tops.items()}
    return dict(pairs=pairs, top1_agreement_with_original=agreement)


def run_study(
    study,
    out_dir=None,
    model=hyperfit.DEFAULT_MODEL,
    data=None,
    sizes=None,
    order_seeds=None,
    training=None,
    evaluation=None,
    progress=True,
):
    """Run one of the paper's studies (STUDIES: "data_size" or "shuffle") into `out_dir`
    (default results/studies/<study>/), one ordinary run folder per data size or order seed, and
    write study.json (the settings, one row per run, and for the shuffle study the top-1
    comparison). A rerun skips finished runs and resumes interrupted ones. `training` and
    `evaluation` override STUDY_TRAINING and STUDY_EVALUATION. Returns the study dict."""
    study = study.replace("-", "_")
    plan = study_plan(study, sizes, order_seeds)
    out_dir = Path(
        out_dir or Path(hyperfit.absolute_path("results")) / "studies" / study.replace("_", "-")
    )
    training = dict(
        STUDY_TRAINING, model=model, **({"data": data} if data else {}), **(training or {})
    )
    evaluation = dict(STUDY_EVALUATION, **(evaluation or {}))
    rows = []
    for name, settings in plan:
        if progress:
            print(f"== study {study}: run {name}", flush=True)
        rows.append(study_run(out_dir / name, dict(training, **settings), evaluation, progress))
    result = dict(
        study=study,
        paper=PAPER_STUDIES[study],
        training=training,
        evaluation=evaluation,
        rows=rows,
        command=shlex.join(["python", "evaluate.py", "--study", study.replace("_", "-")]),
    )
    if study == "shuffle":
        result["comparison"] = shuffle_comparison([out_dir / name for name, _ in plan])
    hyperfit.write_atomic(out_dir / "study.json", json.dumps(result, indent=2) + "\n")
    return result


# -----------------------------------------------------------------------------
# annotate.html: a blind A/B page for the paper's human study (Carlsson et al. 2025: annotators
# compare a continuation with the real human continuation of the same context; a mode's score is
# the share judged better than or equally good as the human text; plot.py scores the judgments)


def annotation_pairs(records, data, tokenizer, tokens):
    """One pair per prompt and annotated mode (ANNOTATE_MODES): the prompt, the mode's
    continuation and the human continuation (the text that follows the prompt in its source),
    both cut to the same number of tokens (at most `tokens`)."""
    pairs = []
    for record in records:
        if record["mode"] not in ANNOTATE_MODES:
            continue
        human = data["human"][record["prompt_id"]]
        length = min(tokens, len(human), len(record["token_ids"]))
        prompt = data["prompts"][record["prompt_id"]]
        pairs.append(
            dict(
                prompt_id=record["prompt_id"],
                mode=record["mode"],
                prompt=tokenizer.decode(prompt, skip_special_tokens=True),
                model_text=tokenizer.decode(record["token_ids"][:length]),
                human_text=tokenizer.decode(human[:length]),
            )
        )
    return pairs


JUDGMENTS_FORMAT = "hyperfit-judgments-1"  # the "format" field of a downloaded judgments file
PAIR_FIELDS = ("prompt_id", "mode", "prompt", "model_text", "human_text")
DEFAULT_TITLE = "Which continuation is better?"
DEFAULT_INSTRUCTIONS = (
    "Each item shows the beginning of a text (grey) and two possible continuations of it. "
    "Read both and choose the better continuation of the context: fluent, coherent, consistent "
    "with the context, interesting to read and not repetitive. If you cannot tell them apart in "
    "quality, choose “Equally good”. Judge each item on its own; there are no right answers."
)


# -----------------------------------------------------------------------------
# the page's items and its key


def check_pairs(pairs):
    """One line saying what is wrong with `pairs`, or None."""
    if not pairs:
        return "no pairs to annotate: pass one {" + ", ".join(PAIR_FIELDS) + "} per prompt and mode"
    seen = set()
    for index, pair in enumerate(pairs):
        missing = [
            field for field in PAIR_FIELDS if not isinstance(pair, dict) or field not in pair
        ]
        if missing:
            return (
                f"pair {index} lacks {', '.join(missing)}; each pair needs {', '.join(PAIR_FIELDS)}"
            )
        if (pair["prompt_id"], pair["mode"]) in seen:
            return (
                f"pair {index} repeats prompt {pair['prompt_id']} in mode {pair['mode']!r}; "
                "pass each (prompt, mode) once"
            )
        seen.add((pair["prompt_id"], pair["mode"]))
    return None


def annotation_rounds(pairs, rng):
    """Group the pairs into rounds that each hold every mode at most once, on different prompts.
    A Latin square: with the prompts in a shuffled order, the pair (mode j, prompt at position i)
    goes to round (i - j) mod P, so a round holds every mode once whenever each mode covers every
    prompt."""
    modes = sorted({pair["mode"] for pair in pairs})
    prompt_ids = sorted({pair["prompt_id"] for pair in pairs})
    rng.shuffle(modes)
    rng.shuffle(prompt_ids)
    mode_index = {mode: j for j, mode in enumerate(modes)}
    prompt_position = {prompt_id: i for i, prompt_id in enumerate(prompt_ids)}
    rounds = [[] for _ in prompt_ids]
    for pair in sorted(
        pairs, key=lambda p: (prompt_position[p["prompt_id"]], mode_index[p["mode"]])
    ):
        position = prompt_position[pair["prompt_id"]] - mode_index[pair["mode"]]
        rounds[position % len(prompt_ids)].append(pair)
    for round_pairs in rounds:
        rng.shuffle(round_pairs)
    rng.shuffle(rounds)
    return [round_pairs for round_pairs in rounds if round_pairs]


def item_clash(pair, previous):
    """(same prompt, same mode) as 0/1 for `pair` shown right after `previous`."""
    if previous is None:
        return (0, 0)
    return (int(pair["prompt_id"] == previous["prompt_id"]), int(pair["mode"] == previous["mode"]))


def next_in_round(round_pairs, previous):
    """Index of the pair to show next: not the previous prompt if possible; then the prompt with the
    most pairs left in the round (placing the commonest prompt first is what keeps repeats apart
    when a round has more modes than there are prompts); then not the previous mode."""
    ranks = []
    for pair in round_pairs:
        same_prompt, same_mode = item_clash(pair, previous)
        left = sum(other["prompt_id"] == pair["prompt_id"] for other in round_pairs)
        ranks.append((same_prompt, -left, same_mode))
    return ranks.index(min(ranks))


def presentation_order(rounds):
    """The pairs in the order shown. Greedy: the next round is the first remaining one that can
    start without repeating the previous item's prompt or mode (else its prompt only), and inside a
    round the next item is chosen by next_in_round."""
    order = []
    remaining_rounds = list(rounds)
    while remaining_rounds:
        previous = order[-1] if order else None
        best_start = [min(item_clash(pair, previous) for pair in r) for r in remaining_rounds]
        round_pairs = list(remaining_rounds.pop(best_start.index(min(best_start))))
        while round_pairs:
            previous = order[-1] if order else None
            order.append(round_pairs.pop(next_in_round(round_pairs, previous)))
    return order


def model_sides(order, rng):
    """Left/right for the model text of each pair in `order`: a shuffled half-and-half split
    within each mode, so every mode has (within one) as many model texts on the left as on the
    right and an annotator's side preference cannot favour one mode."""
    sides = [None] * len(order)
    for mode in sorted({pair["mode"] for pair in order}):
        positions = [i for i, pair in enumerate(order) if pair["mode"] == mode]
        mode_sides = ["left", "right"] * (len(positions) // 2)
        if len(positions) % 2:
            mode_sides.append(rng.choice(["left", "right"]))
        rng.shuffle(mode_sides)
        for position, side in zip(positions, mode_sides):
            sides[position] = side
    return sides


def page_id_of(page_items):
    """First 16 hex digits of the SHA-256 of the page items' canonical JSON: another page (other
    texts, order or sides) gets another id, the same page always the same one."""
    canonical = json.dumps(page_items, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def build_annotation(pairs, seed=0):
    """The annotation page's items and the key that unblinds them.

    pairs: one dict per prompt x decoding mode, {"prompt_id", "mode", "prompt", "model_text",
    "human_text"}. Returns (page_items, key): page_items = [{"item_id", "prompt", "left", "right"}]
    in presentation order; key = {"page_id", "seed", "items": {item_id: {"mode", "prompt_id",
    "model_side"}}}. Items come in rounds holding every mode once on different prompts, so
    modes alternate and a prompt never shows twice in a row (when there are two or more prompts);
    the model side is balanced within each mode. Item ids ("i001", ... in presentation order)
    reveal no mode. Everything random comes from random.Random(seed): same pairs and seed -> same
    page. Raises UsageError (one line) for missing fields or a repeated (prompt, mode)."""
    problem = check_pairs(pairs)
    if problem:
        raise UsageError(problem)
    rng = random.Random(seed)
    order = presentation_order(annotation_rounds(list(pairs), rng))
    sides = model_sides(order, rng)
    width = max(3, len(str(len(order))))
    page_items, key_items = [], {}
    for number, (pair, model_side) in enumerate(zip(order, sides), 1):
        item_id = f"i{number:0{width}d}"
        texts = {
            model_side: pair["model_text"],
            ("right" if model_side == "left" else "left"): pair["human_text"],
        }
        page_items.append(
            {
                "item_id": item_id,
                "prompt": pair["prompt"],
                "left": texts["left"],
                "right": texts["right"],
            }
        )
        key_items[item_id] = {
            "mode": pair["mode"],
            "prompt_id": pair["prompt_id"],
            "model_side": model_side,
        }
    return page_items, {"page_id": page_id_of(page_items), "seed": seed, "items": key_items}


# -----------------------------------------------------------------------------
# the HTML page


def script_json(value):
    """JSON that is safe inside <script>: '<' escaped, so no text can close the tag early."""
    return json.dumps(value, ensure_ascii=False).replace("<", "\\u003c")


def annotation_html(page_items, page_id, title=DEFAULT_TITLE, instructions=DEFAULT_INSTRUCTIONS):
    """The annotation page as one self-contained HTML document (inline CSS and JS, no network).

    Judgments are saved to localStorage after every click or key (under
    "hyperfit-annotate:<page_id>"), so a reload resumes where the annotator was; "Download
    judgments" saves judgments-<page_id>-<annotator>.json (format JUDGMENTS_FORMAT) and "Import
    judgments" restores a session from such a file. The page holds only page_items: no decoding
    mode is named anywhere."""
    replacements = {
        "__TITLE__": html.escape(title),
        "__INSTRUCTIONS__": html.escape(instructions),
        "__PAGE_ID__": html.escape(page_id),
        "__ITEMS_JSON__": script_json(page_items),
        "__PAGE_JSON__": script_json({"page_id": page_id, "format": JUDGMENTS_FORMAT}),
    }
    text = PAGE_TEMPLATE
    for placeholder, value in replacements.items():
        text = text.replace(placeholder, value)
    return text


def write_annotation(
    out_dir, pairs, seed=0, title=DEFAULT_TITLE, instructions=DEFAULT_INSTRUCTIONS
):
    """Write annotate.html (the blind page for annotators) and annotate_key.json (which side holds
    which mode's text: keep it away from annotators) into out_dir, each atomically, the key first so
    a page never exists without its key. Returns (html_path, key_path) as strings."""
    page_items, key = build_annotation(pairs, seed=seed)
    page_text = annotation_html(page_items, key["page_id"], title=title, instructions=instructions)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key_path, html_path = out / "annotate_key.json", out / "annotate.html"
    hyperfit.write_atomic(key_path, json.dumps(key, indent=2, ensure_ascii=False) + "\n")
    hyperfit.write_atomic(html_path, page_text)
    return str(html_path), str(key_path)


# The page. Placeholders __LIKE_THIS__ are filled by annotation_html (str.replace, so the CSS braces
# and JS template literals need no escaping). The items and the page id travel as JSON in
# <script type="application/json"> blocks; the JS reads them with JSON.parse.
PAGE_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
  :root {
    --ink: #1d1d1f; --muted: #6b6b70; --faint: #8a8a90; --paper: #fbfaf7; --card: #ffffff;
    --line: #dedcd5; --accent: #2f5d8a; --accent-soft: #e7eef6; --warn: #a33a1f;
    --serif: Charter, "Bitstream Charter", "Iowan Old Style", "Palatino Linotype", Palatino,
             Georgia, Cambria, "Times New Roman", serif;
    --sans: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  }
  * { box-sizing: border-box; }
  body { margin: 0; background: var(--paper); color: var(--ink); font-family: var(--sans);
         font-size: 15px; line-height: 1.45; }
  header { position: sticky; top: 0; z-index: 2; background: var(--card);
           border-bottom: 1px solid var(--line); }
  .bar { max-width: 1240px; margin: 0 auto; padding: 10px 24px; display: flex; gap: 18px;
         align-items: baseline; flex-wrap: wrap; }
  h1 { font-size: 18px; margin: 0; font-weight: 600; }
  #progress { font-weight: 600; color: var(--accent); }
  .who { margin-left: auto; color: var(--muted); }
  main { max-width: 1240px; margin: 0 auto; padding: 16px 24px 40px; }
  details.instructions { background: var(--card); border: 1px solid var(--line); border-radius: 6px;
                         padding: 8px 14px; margin-bottom: 14px; color: #333; }
  details.instructions summary { cursor: pointer; font-weight: 600; }
  details.instructions p { max-width: 75ch; margin: 8px 0; }
  kbd { font-family: var(--sans); font-size: 12px; border: 1px solid #c8c6bf;
        border-bottom-width: 2px; border-radius: 4px; padding: 0 5px; background: #f4f3ef; }
  .card { background: var(--card); border: 1px solid var(--line); border-radius: 6px;
          padding: 16px 22px; }
  .label { font-family: var(--sans); font-size: 12px; letter-spacing: .06em;
           text-transform: uppercase; color: var(--faint); margin: 0 0 6px; }
  .prose { font-family: var(--serif); font-size: 18px; line-height: 1.6; white-space: pre-wrap;
           overflow-wrap: break-word; margin: 0; }
  #context { color: var(--muted); max-width: 80ch; }
  .pair { display: grid; grid-template-columns: 1fr 1fr; gap: 20px; margin: 14px 0; }
  .pair .prose { max-width: 68ch; }
  .ellipsis { color: var(--faint); }
  /* the answer buttons stay in view at the bottom of the window while long texts scroll */
  .controls { position: sticky; bottom: 0; background: var(--paper); padding: 10px 0 8px;
              border-top: 1px solid var(--line); }
  .choices { display: flex; gap: 12px; justify-content: center; margin: 0 0 10px; }
  button, .button { font: inherit; font-size: 15px; padding: 8px 16px; border-radius: 6px;
                    border: 1px solid #b9b7b0; background: #f6f5f1; color: var(--ink);
                    cursor: pointer; }
  button:hover, .button:hover { background: #ecebe6; }
  button:disabled { opacity: .45; cursor: default; }
  .choices button { min-width: 200px; padding: 11px 18px; font-size: 16px;
                    background: var(--accent-soft); border-color: #9fb7cf; }
  .choices button:hover { background: #d6e3f0; }
  .note-row { display: flex; gap: 10px; align-items: flex-start; }
  .note-row label { color: var(--muted); padding-top: 6px; white-space: nowrap; }
  textarea, input[type=text] { font: inherit; border: 1px solid #c8c6bf; border-radius: 6px;
                               padding: 6px 9px; background: #fff; }
  textarea { flex: 1; min-height: 2.4em; resize: vertical; }
  .toolbar { display: flex; gap: 10px; align-items: center; flex-wrap: wrap; margin-top: 18px;
             padding-top: 14px; border-top: 1px solid var(--line); color: var(--muted); }
  .toolbar .spacer { flex: 1; }
  .visually-hidden { position: absolute; width: 1px; height: 1px; overflow: hidden;
                     clip: rect(0 0 0 0); white-space: nowrap; }
  #message { min-height: 1.5em; margin: 8px 0 0; }
  #message.error { color: var(--warn); font-weight: 600; }
  #setup, #done { max-width: 640px; margin: 40px auto; }
  #setup input { width: 100%; font-size: 17px; margin: 8px 0 12px; }
  [hidden] { display: none !important; }
</style>
</head>
<body>
<header>
  <div class="bar">
    <h1>__TITLE__</h1>
    <span id="progress" aria-live="polite"></span>
    <span id="saved-status"></span>
    <span class="who">Annotator: <strong id="annotator-label">–</strong>
      <button type="button" id="change-name">change</button></span>
  </div>
</header>
<main>
  <details class="instructions" id="instructions" open>
    <summary>Instructions</summary>
    <p>__INSTRUCTIONS__</p>
    <p>Keys: <kbd>1</kbd> or <kbd>&larr;</kbd> left is better, <kbd>2</kbd> or <kbd>&darr;</kbd>
      equally good, <kbd>3</kbd> or <kbd>&rarr;</kbd> right is better, <kbd>Backspace</kbd> or
      <kbd>U</kbd> undo the last answer. Keys do nothing while you type a note
      (<kbd>Esc</kbd> leaves the note field). Every answer is saved in this browser at once: you can
      close the tab and come back later. When you are done, press &ldquo;Download judgments&rdquo;
      and send the file.</p>
  </details>

  <form id="setup" class="card" hidden>
    <p class="label">Before you start</p>
    <label for="annotator-name">Your name or initials (goes into the file you send back):</label>
    <input type="text" id="annotator-name" autocomplete="off" maxlength="60">
    <button type="submit" id="start">Start</button>
  </form>

  <section id="work" hidden>
    <div class="card">
      <p class="label">Context</p>
      <p id="context" class="prose"></p>
    </div>
    <div class="pair">
      <div class="card">
        <p class="label">Left continuation</p>
        <p class="prose"><span class="ellipsis">&hellip;</span><span id="left-text"></span></p>
      </div>
      <div class="card">
        <p class="label">Right continuation</p>
        <p class="prose"><span class="ellipsis">&hellip;</span><span id="right-text"></span></p>
      </div>
    </div>
    <div class="controls">
    <div class="choices">
      <button type="button" id="choose-left" aria-keyshortcuts="1 ArrowLeft">
        &larr; Left is better <kbd>1</kbd></button>
      <button type="button" id="choose-equal" aria-keyshortcuts="2 ArrowDown">
        Equally good <kbd>2</kbd></button>
      <button type="button" id="choose-right" aria-keyshortcuts="3 ArrowRight">
        Right is better &rarr; <kbd>3</kbd></button>
    </div>
    <div class="note-row">
      <label for="note">Note (optional):</label>
      <textarea id="note" rows="1"
                placeholder="anything worth telling us about this item"></textarea>
    </div>
    </div>
  </section>

  <section id="done" class="card" hidden>
    <p class="label">Finished</p>
    <p id="done-text"></p>
    <p><button type="button" id="download-done">Download judgments</button></p>
  </section>

  <div class="toolbar">
    <button type="button" id="undo" aria-keyshortcuts="Backspace U">Undo last answer</button>
    <span class="spacer"></span>
    <span id="judged-count"></span>
    <button type="button" id="download">Download judgments</button>
    <label class="button" for="import-file">Import judgments&hellip;</label>
    <input type="file" id="import-file" class="visually-hidden" accept=".json,application/json">
  </div>
  <p id="message" role="status"></p>
</main>

<script type="application/json" id="items-data">__ITEMS_JSON__</script>
<script type="application/json" id="page-data">__PAGE_JSON__</script>
<script>
"use strict";
const ITEMS = JSON.parse(document.getElementById("items-data").textContent);
const PAGE = JSON.parse(document.getElementById("page-data").textContent);
const ITEM_IDS = new Set(ITEMS.map((item) => item.item_id));
const CHOICES = ["left", "equal", "right"];

/* localStorage schema. One entry per page, so several pages opened from disk (which share one
   file:// origin) never mix:
     "hyperfit-annotate:<page_id>" -> JSON {
       "version": 1, "page_id": str, "annotator": str,
       "judgments": [{"item_id": str, "choice": "left"|"equal"|"right", "time": ISO str,
                      "note": str}],   // in the order judged, at most one per item
       "drafts": {item_id: str}        // a note typed on an item not yet judged
     }
   "hyperfit-annotate:last-annotator" -> the last name entered on any page (to prefill it). */
const STORAGE_KEY = "hyperfit-annotate:" + PAGE.page_id;
const NAME_KEY = "hyperfit-annotate:last-annotator";

let state = emptyState();
let storageWorks = true;
let editingName = false;

function emptyState() {
  return { version: 1, page_id: PAGE.page_id, annotator: "", judgments: [], drafts: {} };
}

function loadState() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORAGE_KEY) || "null");
    if (saved && saved.page_id === PAGE.page_id && Array.isArray(saved.judgments)) {
      state = Object.assign(emptyState(), saved);
      state.judgments = state.judgments.filter((j) => ITEM_IDS.has(j.item_id));
    }
  } catch (error) {
    storageWorks = false;
  }
}

function saveState() {
  try {
    localStorage.setItem(STORAGE_KEY, JSON.stringify(state));
    storageWorks = true;
  } catch (error) {
    // private mode or a full quota: keep working, but tell the annotator to download often
    storageWorks = false;
  }
}

function judgedIds() {
  return new Set(state.judgments.map((j) => j.item_id));
}

// The item on screen is the first one (in page order) not yet judged.
function currentIndex() {
  const judged = judgedIds();
  return ITEMS.findIndex((item) => !judged.has(item.item_id));
}

function showMessage(text, isError) {
  const message = document.getElementById("message");
  message.textContent = text;
  message.className = isError ? "error" : "";
}

function render() {
  const index = currentIndex();
  const named = Boolean(state.annotator) && !editingName;
  document.getElementById("setup").hidden = named;
  document.getElementById("work").hidden = !named || index < 0;
  document.getElementById("done").hidden = !named || index >= 0;
  document.getElementById("annotator-label").textContent = state.annotator || "–";
  document.getElementById("change-name").hidden = !named;
  document.getElementById("progress").textContent =
    index < 0 ? `All ${ITEMS.length} items judged` : `Item ${index + 1} of ${ITEMS.length}`;
  document.getElementById("judged-count").textContent =
    `${state.judgments.length} of ${ITEMS.length} judged`;
  document.getElementById("saved-status").textContent = storageWorks
    ? "saved in this browser" : "NOT saved in this browser: download your judgments often";
  document.getElementById("undo").disabled = state.judgments.length === 0;
  if (!named) {
    document.getElementById("annotator-name").value = state.annotator || readLastName();
  } else if (index >= 0) {
    const item = ITEMS[index];
    document.getElementById("context").textContent = item.prompt;
    document.getElementById("left-text").textContent = item.left;
    document.getElementById("right-text").textContent = item.right;
    document.getElementById("note").value = state.drafts[item.item_id] || "";
  } else {
    document.getElementById("done-text").textContent =
      `All ${ITEMS.length} items are judged. Thank you! Press "Download judgments" and send ` +
      "the file. You can still undo your last answers.";
  }
}

function readLastName() {
  try {
    return localStorage.getItem(NAME_KEY) || "";
  } catch (error) {
    return "";
  }
}

function setName(event) {
  event.preventDefault();
  const name = document.getElementById("annotator-name").value.trim();
  if (!name) {
    showMessage("Please enter your name or initials first.", true);
    return;
  }
  state.annotator = name;
  editingName = false;
  saveState();
  try {
    localStorage.setItem(NAME_KEY, name);
  } catch (error) { /* prefilling the name is only a convenience */ }
  showMessage("", false);
  render();
}

function judge(choice) {
  const index = currentIndex();
  if (!state.annotator || editingName || index < 0) return;
  const item = ITEMS[index];
  const note = document.getElementById("note").value.trim();
  state.judgments.push({ item_id: item.item_id, choice: choice,
                         time: new Date().toISOString(), note: note });
  delete state.drafts[item.item_id];
  saveState();
  showMessage("", false);
  render();
  window.scrollTo(0, 0);
}

// Undo takes back the latest answer: its item comes back on screen with its note.
function undo() {
  const last = state.judgments.pop();
  if (!last) return;
  if (last.note) state.drafts[last.item_id] = last.note;
  saveState();
  const number = ITEMS.findIndex((item) => item.item_id === last.item_id) + 1;
  showMessage(`Took back your answer to item ${number}.`, false);
  render();
}

function saveDraft() {
  const index = currentIndex();
  if (index < 0) return;
  const text = document.getElementById("note").value;
  if (text) state.drafts[ITEMS[index].item_id] = text;
  else delete state.drafts[ITEMS[index].item_id];
  saveState();
}

function safeFileName(name) {
  return name.replace(/[^A-Za-z0-9_-]+/g, "_").replace(/^_+|_+$/g, "") || "annotator";
}

// The downloaded file: what preference.py reads. Judgments in the order judged, one per item.
function download() {
  if (state.judgments.length === 0) {
    showMessage("Nothing judged yet: there is nothing to download.", true);
    return;
  }
  const data = { format: PAGE.format, page_id: PAGE.page_id, annotator: state.annotator,
                 num_items: ITEMS.length, exported: new Date().toISOString(),
                 judgments: state.judgments };
  const blob = new Blob([JSON.stringify(data, null, 1) + "\n"], { type: "application/json" });
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = `judgments-${PAGE.page_id}-${safeFileName(state.annotator)}.json`;
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);  // revoking at once can cancel the download
  showMessage(`Downloaded ${state.judgments.length} judgments as ${link.download}.`, false);
}

// One sentence saying why `data` cannot be imported into this page, or "".
function importProblem(data) {
  if (!data || data.format !== PAGE.format || !Array.isArray(data.judgments)) {
    return "this is not a judgments file downloaded from an annotation page.";
  }
  if (data.page_id !== PAGE.page_id) {
    return `it was made on another annotation page (page id ${data.page_id}, this page is ` +
           `${PAGE.page_id}); open the page it came from.`;
  }
  const bad = data.judgments.find(
    (j) => !j || !ITEM_IDS.has(j.item_id) || !CHOICES.includes(j.choice));
  return bad ? "it holds an answer to an item this page does not have." : "";
}

function importJudgments(fileText, fileName) {
  let data = null;
  try {
    data = JSON.parse(fileText);
  } catch (error) { /* reported below as "not a judgments file" */ }
  const problem = importProblem(data);
  if (problem) {
    showMessage(`Could not import ${fileName}: ${problem}`, true);
    return;
  }
  const latest = new Map();  // a later answer to the same item replaces the earlier one
  for (const j of data.judgments) {
    latest.delete(j.item_id);
    latest.set(j.item_id, { item_id: j.item_id, choice: j.choice, time: String(j.time || ""),
                            note: String(j.note || "") });
  }
  state = emptyState();
  state.annotator = String(data.annotator || "").trim();
  state.judgments = Array.from(latest.values());
  editingName = false;
  saveState();
  render();
  showMessage(`Imported ${state.judgments.length} judgments by ${state.annotator || "(no name)"} ` +
              `from ${fileName}.`, false);
}

function onImportFile(event) {
  const file = event.target.files[0];
  event.target.value = "";  // so choosing the same file again fires another change event
  if (!file) return;
  file.text().then((text) => importJudgments(text, file.name),
                   () => showMessage(`Could not read ${file.name}.`, true));
}

const KEY_CHOICES = { "1": "left", "ArrowLeft": "left", "2": "equal", "ArrowDown": "equal",
                      "3": "right", "ArrowRight": "right" };

function onKey(event) {
  const target = event.target;
  // typing a note or a name must never answer an item
  if (target.closest && target.closest("input, textarea, select, [contenteditable]")) {
    if (event.key === "Escape" && target.blur) target.blur();
    return;
  }
  if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
  if (!state.annotator || editingName) return;  // the name form is up: no answers, no undo
  if (KEY_CHOICES[event.key]) {
    event.preventDefault();
    judge(KEY_CHOICES[event.key]);
  } else if (event.key === "Backspace" || event.key === "u" || event.key === "U") {
    event.preventDefault();
    undo();
  }
}

// A clicked button keeps focus; blur it so Enter or Space cannot repeat the answer on the next
// item.
function clickThenBlur(handler) {
  return (event) => {
    handler();
    event.currentTarget.blur();
  };
}

function startEditingName() {
  editingName = true;
  render();
  document.getElementById("annotator-name").focus();
}

function init() {
  loadState();
  // returning annotators have read the instructions: fold them away to leave room for the texts
  document.getElementById("instructions").open = state.judgments.length === 0;
  document.getElementById("setup").addEventListener("submit", setName);
  document.getElementById("change-name").addEventListener("click", startEditingName);
  for (const choice of CHOICES) {
    document.getElementById("choose-" + choice)
      .addEventListener("click", clickThenBlur(() => judge(choice)));
  }
  document.getElementById("undo").addEventListener("click", clickThenBlur(undo));
  document.getElementById("download").addEventListener("click", clickThenBlur(download));
  document.getElementById("download-done").addEventListener("click", clickThenBlur(download));
  document.getElementById("import-file").addEventListener("change", onImportFile);
  document.getElementById("note").addEventListener("input", saveDraft);
  document.addEventListener("keydown", onKey);
  render();
  if (!state.annotator) document.getElementById("annotator-name").focus();
}

init();
</script>
</body>
</html>
"""


# -----------------------------------------------------------------------------
# command line


# (option, type, default, help) of evaluate.py's options that have one fixed default
FIXED_DEFAULTS = [
    ("block-ngrams", int, BLOCK_NGRAMS, "citation blocking: forbid the training n-grams of this n"),
    ("top-p", float, TOP_P, "original_top_p: nucleus mass (the paper's)"),
    ("temperature", float, TEMPERATURE, "original_top_p: temperature (the paper's)"),
    ("top-k", int, TOP_K, "original_top_p: top-k, 0 = off (the paper's)"),
    ("batch-size", int, BATCH_SIZE, "continuations generated at once (modes share them)"),
    ("seed", int, SEED, "sampling seed"),
    ("annotate-tokens", int, ANNOTATE_TOKENS, "tokens per side on annotate.html (0: no page)"),
]
# (option, help) of the options whose default depends on the device: a CPU's, a GPU's
DEVICE_DEFAULTS = [
    ("num-prompts", "held-out contexts", NUM_PROMPTS),
    ("new-tokens", "tokens generated per prompt (the paper: 96, 128, 256)", NEW_TOKENS),
    ("sharpness-seqs", "validation sequences of the sharpness table", SHARPNESS_SEQS),
]


def build_parser():
    p = argparse.ArgumentParser(
        description="Generate continuations of held-out prompts with the original and the "
        "hyperfitted model and write the paper's tables to RUN_DIR/eval/ (summary.json, "
        "generations.jsonl, table.md, paper_comparison.md, annotate.html). With --study, run one "
        "of the paper's studies (train + evaluate) into results/studies/<study>/.",
        epilog=f"modes: {', '.join(MODES)} (without RUN_DIR: {', '.join(ORIGINAL_ONLY_MODES)})\n"
        "examples:\n  python evaluate.py results/smollm2-135m\n  python evaluate.py --model "
        "smollm2-135m\n  python evaluate.py --study data-size\n"
        "  python evaluate.py --study shuffle",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a run folder of hyperfit.py")
    p.add_argument(
        "--model",
        help="base model: preset, folder or hub id (default: the run's; required without RUN_DIR)",
    )
    p.add_argument("--modes", help="comma-separated decoding modes (default: all that apply)")
    for name, text, values in DEVICE_DEFAULTS:
        default = f"default: {values['cpu']} on a CPU, {values['cuda']} on a GPU"
        p.add_argument(f"--{name}", type=int, help=f"{text} ({default})")
    for name, kind, value, text in FIXED_DEFAULTS:
        p.add_argument(f"--{name}", type=kind, default=value, help=f"{text} (default: {value})")
    p.add_argument("--quant", choices=["4bit", "8bit", "none"], help="default: the run's")
    p.add_argument(
        "--dtype", help="compute dtype: auto, float32, bfloat16, float16 (default: the run's)"
    )
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument(
        "--dense",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="generate with dense copies of the models (default: on a CPU) or with "
        "the 4-bit model, its adapter toggled (default: on a GPU)",
    )
    p.add_argument(
        "--out-dir",
        help="output folder (default: RUN_DIR/eval; with --study: results/studies/<study>)",
    )
    add_split_and_study_options(p)
    return p


def add_split_and_study_options(p):
    g = p.add_argument_group("data split without RUN_DIR (default: the preset's)")
    g.add_argument("--data", help="a .txt, a .jsonl with a 'text' field, or a folder of .txt")
    for name in ("seq-len", "num-train", "num-val", "prompt-len"):
        g.add_argument(f"--{name}", type=int)
    s = p.add_argument_group("studies")
    s.add_argument(
        "--study", choices=["data-size", "shuffle"], help="run one of the paper's studies"
    )
    sizes, seeds = STUDIES["data_size"]["sizes"], STUDIES["shuffle"]["order_seeds"]
    s.add_argument(
        "--sizes",
        help=f"data-size study: training sequences (default: {','.join(map(str, sizes))})",
    )
    s.add_argument(
        "--order-seeds",
        help=f"shuffle study: data-order seeds (default: {','.join(map(str, seeds))})",
    )


def int_list(text, flag):
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} {text}: give comma-separated integers, e.g. 8,16,32") from None


def main(argv=None):
    """The command line: returns the exit code (0 done, 2 bad input); errors are one line."""
    args = vars(build_parser().parse_args(argv))
    study, sizes, seeds = args.pop("study"), args.pop("sizes"), args.pop("order_seeds")
    try:
        if study:
            result = run_study(
                study,
                out_dir=args["out_dir"],
                model=args["model"] or hyperfit.DEFAULT_MODEL,
                data=args["data"],
                sizes=int_list(sizes, "--sizes"),
                order_seeds=int_list(seeds, "--order-seeds"),
            )
            folder = args["out_dir"] or f"results/studies/{study}"
            print(f"done: {len(result['rows'])} runs (next: python plot.py {folder})")
            return 0
        summary = evaluate(**args)
    except UsageError as e:
        print(f"evaluate.py: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evaluate.py: interrupted; nothing of this evaluation was written", file=sys.stderr)
        return 130
    print(format_table(summary))
    run = f"  (next: python plot.py {args['run_dir']})" if args["run_dir"] else ""
    print(f"done in {summary['timing_s']['total_s']:.0f}s: {summary['args']['out_dir']}{run}")
    return 0


if __name__ == "__main__" and "__file__" in globals():  # not when pasted into a notebook cell
    sys.exit(main())
