"""
Generate long continuations from held-out prompts and measure them: the paper's tables.

    python evaluate.py results/reference                 # every decoding mode of a hyperfitted run
    python evaluate.py --model smollm2-135m              # the original model alone (its two modes)
    python evaluate.py results/reference --modes hyperfitted_greedy,hyperfitted_blocked --new-tokens 96

In a notebook:  from evaluate import evaluate; summary = evaluate("results/reference", num_prompts=8)

Writes <run>/eval/ (or --out-dir): generations.jsonl (one record per continuation), table.md (rows =
decoding modes, columns = metrics, as in the paper) and summary.json (mean ± std per mode), each file
written to a temporary name and renamed, summary.json last.

Decoding modes (Carlsson et al., ICLR 2025, and the follow-up "Beyond Temperature", ICML 2026):
    original_greedy            the model before hyperfitting, greedy
    original_top_p             the same, sampled (top-p 0.9, temperature 0.7, top-k 50)
    original_entropy_matched   the same, pure temperature sampling at the temperature where its mean
                               predictive entropy on validation text equals the hyperfitted model's
    hyperfitted_greedy         the hyperfitted model (base + LoRA adapter), greedy
    hyperfitted_blocked        the same with citation blocking: no token may complete an n-gram of the
                               training sequences (the prompt counts); the best remaining token is taken

Metric definitions (token ids throughout; a "continuation" excludes its 32-token prompt):
    ttr_last96, ttr      unique / total tokens over the last 96 tokens (Carlsson et al.) / all of it
    rep_n, diversity     SimCTG (Su et al. 2022): rep-n = 1 - |unique n-grams| / |n-grams| of one
                         continuation (0 when it has no n-gram); diversity = prod_{n=2..4} (1 - rep-n)
    distinct_n           unique n-grams / all n-grams, pooled over the continuations of a mode (Li et al. 2016)
    self_bleu4           Texygen (Zhu et al. 2018): BLEU-4 of each continuation with every other one of its
                         mode as references, averaged; 0-100
    dataset_bleu4        BLEU-4 of each continuation with every training sequence as references; 0-100
    BLEU                 sacrebleu's BLEU (compute_bleu: geometric mean of clipped 1-4-gram precisions,
                         brevity penalty vs the closest reference length, "floor" smoothing 0.1 = Chen &
                         Cherry's method 1 as in nltk/Texygen, effective order) on token-id strings. The
                         clipped n-gram counts come from one shared table of reference counts instead of
                         re-reading 299 (or 2,000) references per continuation; tests check the result equals
                         sacrebleu.sentence_bleu given the references explicitly.
    ends_in_loop         the continuation ends in a repeating loop (Holtzman et al. 2020's repetition): for
                         some period p <= LOOP_MAX_PERIOD its last max(2p, LOOP_MIN_TOKENS) tokens repeat
                         with period p, i.e. at least two full copies of the unit; loop_share = share of them
    longest_train_overlap  longest run of consecutive tokens that also occurs inside one training sequence;
                         overlap_gt10_share = share of continuations with one of more than 10 tokens (the
                         paper's "dataset overlap")
    ppl_original         perplexity of the continuation given its prompt under the original model
    sharpness            on validation sequences: perplexity, mean entropy -sum p ln p (nats), mean probability
                         mass of the top-1/3/5 tokens; top1_agreement = share of positions where the
                         hyperfitted and the original model have the same top-1 token
"""
import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LogitsProcessor

from hyperfit import UsageError  # bad input: one line on stderr, exit 2, nothing written


# -----------------------------------------------------------------------------
# defaults (the paper's settings where it has one)

MODES = ("original_greedy", "original_top_p", "original_entropy_matched",
         "hyperfitted_greedy", "hyperfitted_blocked")
ORIGINAL_ONLY_MODES = ("original_greedy", "original_top_p")  # what a bare model (no run) can be evaluated on
NEW_TOKENS = 256            # paper: 128 and 256 (human study), 96 (diversity table)
NUM_PROMPTS_CPU = 32        # one batch; 5 modes x 256 steps at ~0.25 s: ~6 min for SmolLM2-135M on 2 cores
NUM_PROMPTS_GPU = 300       # the paper's ~300 contexts per study
BATCH_SIZE = 64             # generation batch; CPU generation is memory-bound, 64 rows cost about what 16 do
SCORE_BATCH_SIZE = 8        # sequences per forward pass when scoring (full-vocabulary logits are large)
SHARPNESS_SEQS_CPU = 16     # validation sequences for the sharpness table (and the entropy match)
SHARPNESS_SEQS_GPU = 128    # the paper's validation set size
BLOCK_NGRAMS = 5            # citation blocking n (paper: 5)
TOP_P, TEMPERATURE, TOP_K = 0.9, 0.7, 50  # the paper's sampling baseline
SEED = 0
TTR_WINDOW, TTR_STRIDE = 96, 8            # sliding-window TTR along the continuation (paper Fig. 9)
LOOP_MAX_PERIOD, LOOP_MIN_TOKENS = 64, 16  # see ends_in_loop
OVERLAP_TOKENS = 10                        # "shares more than 10 tokens with the training data"
BLEU_ORDER, BLEU_SMOOTH, BLEU_SMOOTH_VALUE = 4, "floor", 0.1
ENTROPY_SEARCH_RANGE, ENTROPY_SEARCH_TOLERANCE = (0.05, 2.0), 1e-3  # temperature bracket; stop width
LOGIT_CACHE_BYTES = 2 * 2**30  # keep validation logits across the temperature search when they fit

PER_GENERATION_METRICS = ("ttr_last96", "ttr", "rep_2", "rep_3", "rep_4", "diversity", "dataset_bleu4",
                          "longest_train_overlap", "ppl_original")
SET_METRICS = ("self_bleu4", "distinct_1", "distinct_2", "distinct_3", "loop_share", "overlap_gt10_share")

# -----------------------------------------------------------------------------
# generation


class _StepProgress(LogitsProcessor):
    """Ticks a progress bar once per generated token (it leaves the scores alone)."""

    def __init__(self, bar):
        self.bar = bar

    def __call__(self, input_ids, scores):
        self.bar.update(1)
        return scores


@torch.no_grad()
def generate(model, prompt_ids, new_tokens, batch_size=16, do_sample=False, temperature=1.0,
             top_p=1.0, top_k=0, logits_processor=None, seed=0, desc=None):
    """Continue each row of `prompt_ids` (LongTensor [P, T], equal-length prompts, no padding)
    by exactly `new_tokens` tokens with the KV cache, `batch_size` prompts at a time.

    EOS is suppressed (min_new_tokens) so every continuation has the same length and the
    metrics compare like with like, as in the paper's fixed-length continuations. Sampling is
    seeded (same prompts, batch size and seed -> same text); top_k=0 / top_p=1 switch those off.
    `desc` names a progress bar over token steps (None: no bar).
    Returns LongTensor [P, new_tokens] of generated ids (prompt not included)."""
    from tqdm.auto import tqdm
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    if do_sample:
        torch.manual_seed(seed)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k) if do_sample \
        else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    starts = range(0, len(prompt_ids), batch_size)
    bar = tqdm(total=len(starts) * new_tokens, desc=desc, unit="tok", disable=desc is None, leave=False)
    processors = list(logits_processor or []) + [_StepProgress(bar)]
    outputs = []
    for start in starts:
        batch = prompt_ids[start:start + batch_size].to(device)
        out = model.generate(
            input_ids=batch, attention_mask=torch.ones_like(batch),
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id,
            logits_processor=LogitsProcessorList(processors), use_cache=True, **sampling)
        outputs.append(out[:, batch.shape[1]:].cpu())
    bar.close()
    model.train(was_training)
    return torch.cat(outputs)


class NGramBlocker(LogitsProcessor):
    """Citation blocking (Carlsson et al. 2025): at every step, forbid each token that would make the
    last `n` tokens (prompt included) an n-gram of the training sequences; the best remaining token is
    then taken. If every token of a row is forbidden, that row is left unblocked.

    The index is built once: a dict from each (n-1)-token prefix seen in training (as a tuple) to the
    list of tokens that follow it there. A step costs one dict lookup per row and one indexed
    assignment, whatever the size of the training data. Time it with
    `generate(model, prompts, 256, logits_processor=[NGramBlocker(train_ids, 5)])` against plain generate."""

    def __init__(self, train_ids, n=BLOCK_NGRAMS):
        if n < 1:
            raise UsageError(f"--block-ngrams must be at least 1, got {n}")
        self.n = n
        next_tokens = {}
        windows = torch.as_tensor(train_ids).unfold(1, n, 1).reshape(-1, n).unique(dim=0).tolist()
        for *prefix, token in windows:  # each n-gram once (unique above), so no duplicate bans
            next_tokens.setdefault(tuple(prefix), []).append(token)
        self.next_tokens = next_tokens

    def __call__(self, input_ids, scores):
        length = input_ids.shape[1]
        if length < self.n - 1:
            return scores
        rows, cols = [], []
        for row, prefix in enumerate(input_ids[:, length - (self.n - 1):].tolist()):
            banned = self.next_tokens.get(tuple(prefix))
            if banned:
                rows += [row] * len(banned)
                cols += banned
        if rows:
            rows = torch.tensor(rows, device=scores.device)
            cols = torch.tensor(cols, device=scores.device)
            kept = scores[rows, cols]
            scores[rows, cols] = -math.inf
            dead = torch.isneginf(scores).all(dim=-1)  # nothing left to take: undo the ban on that row
            if dead.any():
                undo = dead[rows]
                scores[rows[undo], cols[undo]] = kept[undo]
        return scores


# -----------------------------------------------------------------------------
# metrics of one continuation or a set of them (lists of token ids)


def type_token_ratio(ids, last=None):
    """Unique tokens / tokens, over the last `last` tokens if given (the paper uses the last 96)."""
    ids = list(ids)[-last:] if last else list(ids)
    return len(set(ids)) / len(ids) if ids else float("nan")


def ttr_windows(ids, window=TTR_WINDOW, stride=TTR_STRIDE):
    """TTR of sliding windows of `window` tokens ending at positions window, window+stride, ... <= len(ids)
    (paper Fig. 9). A continuation shorter than `window` gives one window over all of it.
    Returns (positions, ttrs): the end position of each window and its TTR."""
    ids = list(ids)
    window = min(window, len(ids))
    positions = list(range(window, len(ids) + 1, stride)) if window else []
    return positions, [type_token_ratio(ids[end - window:end]) for end in positions]


def _ngrams(ids, n):
    ids = list(ids)
    return [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]


def rep_n(ids, n):
    """SimCTG rep-n: 1 - unique n-grams / n-grams of one continuation (0.0 if it has no n-gram)."""
    grams = _ngrams(ids, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def diversity(ids):
    """SimCTG diversity: product of (1 - rep-n) for n = 2, 3, 4."""
    return math.prod(1.0 - rep_n(ids, n) for n in (2, 3, 4))


def distinct_n(sequences, n):
    """distinct-n across a set: unique n-grams / all n-grams, pooled over all sequences."""
    grams = [g for ids in sequences for g in _ngrams(ids, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def ends_in_loop(ids, max_period=LOOP_MAX_PERIOD, min_tokens=LOOP_MIN_TOKENS):
    """True if the sequence ends in a repeating loop: for some period p <= max_period, its last
    L = max(2p, min_tokens) tokens repeat with period p (token i equals token i-p), i.e. the final unit
    of p tokens occurs at least twice back to back and the repetition covers >= min_tokens tokens
    ("the the the ..." needs 16 copies, a 12-token sentence 2)."""
    ids = np.asarray(ids)
    for p in range(1, max_period + 1):
        span = max(2 * p, min_tokens)
        if span > len(ids):
            break
        tail = ids[len(ids) - span:]
        if np.array_equal(tail[p:], tail[:-p]):
            return True
    return False


# n-grams of token ids are compared through 64-bit hashes (FNV-1a over whole tokens, wrapping uint64
# arithmetic): a few million n-grams collide with probability ~1e-7, and sorted arrays of hashes make
# "which of these n-grams occur in training" one vectorised binary search.
_FNV_OFFSET, _FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)


def _ngram_hashes(rows, n):
    """Hash of every n-gram within each row of `rows` (ints, [R, L] or [L]) -> uint64 [R, L-n+1]."""
    rows = np.atleast_2d(np.asarray(rows, dtype=np.int64)).astype(np.uint64)
    width = max(rows.shape[1] - n + 1, 0)
    hashes = np.full((rows.shape[0], width), _FNV_OFFSET, dtype=np.uint64)
    for j in range(n):
        hashes = (hashes ^ rows[:, j:j + width]) * _FNV_PRIME
    return hashes


def _max_count_table(rows, n):
    """For the n-grams of `rows` [R, L]: (sorted unique hashes, the largest count of each within one row),
    i.e. the reference side of BLEU's clipping with every row as a reference."""
    hashes = np.sort(_ngram_hashes(rows, n), axis=1)
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
    """The training sequences (LongTensor or array [R, L]) indexed once for the memorisation metrics:
    for n = 1 .. OVERLAP_TOKENS + 1 the n-grams occurring in training (sorted hashes, with the largest
    count within one sequence for BLEU), and where each (OVERLAP_TOKENS + 1)-gram occurs, to extend a
    shared span beyond that length token by token. N-grams never cross from one sequence to the next."""

    def __init__(self, train_ids, anchor=OVERLAP_TOKENS + 1):
        self.rows = np.asarray(train_ids, dtype=np.int64)
        self.anchor = anchor
        self.tables = {n: _max_count_table(self.rows, n) for n in range(1, max(anchor, BLEU_ORDER) + 1)}
        anchor_hashes = _ngram_hashes(self.rows, anchor).ravel()
        self.anchor_order = np.argsort(anchor_hashes, kind="stable")  # flat positions, sorted by hash
        self.anchor_sorted = anchor_hashes[self.anchor_order]
        self.ref_lengths = sorted({self.rows.shape[1]})

    def lookup(self, query, n):
        """For hashed n-grams `query`: (which occur in training, their largest count within one sequence)."""
        hashes, max_counts = self.tables[n]
        if len(hashes) == 0:
            return np.zeros(len(query), dtype=bool), np.zeros(len(query), dtype=np.int64)
        at = np.minimum(np.searchsorted(hashes, query), len(hashes) - 1)
        return hashes[at] == query, max_counts[at]

    def contains_any(self, ids, n):
        """Does any n-gram of `ids` occur in training?"""
        return bool(self.lookup(_ngram_hashes(ids, n).ravel(), n)[0].any())


def longest_shared_span(ids, index):
    """Length of the longest run of consecutive tokens of `ids` that also occurs inside one training
    sequence (`index`: a TrainingIndex). Up to index.anchor tokens it is read off the n-gram tables;
    longer spans are found by extending every anchor-length match token by token, skipping matches that
    extend to the left (they are part of a match found from an earlier start)."""
    ids = np.asarray(ids, dtype=np.int64)
    longest = 0
    for n in range(1, min(index.anchor, len(ids)) + 1):  # a shared n-gram implies shared shorter ones
        if not index.contains_any(ids, n):
            return longest
        longest = n
    if longest < index.anchor:
        return longest
    rows, width = index.rows, index.rows.shape[1] - index.anchor + 1
    query = _ngram_hashes(ids, index.anchor).ravel()
    lo = np.searchsorted(index.anchor_sorted, query, side="left")
    hi = np.searchsorted(index.anchor_sorted, query, side="right")
    for i in np.flatnonzero(hi > lo):
        positions = index.anchor_order[lo[i]:hi[i]]
        r, c = positions // width, positions % width
        if i > 0:  # drop matches that also hold one token to the left: counted from start i-1
            left = (c > 0) & (rows[r, np.maximum(c - 1, 0)] == ids[i - 1])
            r, c = r[~left], c[~left]
        for row, col in zip(r.tolist(), c.tolist()):
            room = min(len(ids) - i, rows.shape[1] - col)
            same = ids[i:i + room] == rows[row, col:col + room]
            length = room if same.all() else int(np.argmin(same))  # exact, so a hash collision can't count
            longest = max(longest, length)
    return longest


def _bleu(correct, total, hyp_len, ref_lens):
    """sacrebleu's sentence BLEU-4 from clipped n-gram counts (floor smoothing 0.1, effective order)."""
    from sacrebleu.metrics import BLEU
    ref_len = min(ref_lens, key=lambda r: (abs(r - hyp_len), r))  # closest, the shorter on a tie
    return BLEU.compute_bleu([int(c) for c in correct], [int(t) for t in total], hyp_len, ref_len,
                             smooth_method=BLEU_SMOOTH, smooth_value=BLEU_SMOOTH_VALUE,
                             effective_order=True, max_ngram_order=BLEU_ORDER).score


def dataset_bleu4(ids, index):
    """BLEU-4 (0-100) of one continuation with every training sequence as a reference (`index`: a
    TrainingIndex). Same value as sacrebleu.sentence_bleu with all of them listed as references."""
    correct, total = [], []
    for n in range(1, BLEU_ORDER + 1):
        query, counts = np.unique(_ngram_hashes(ids, n), return_counts=True)
        found, max_counts = index.lookup(query, n)
        correct.append(np.minimum(counts, max_counts)[found].sum())
        total.append(max(len(ids) - n + 1, 0))
    return _bleu(correct, total, len(ids), index.ref_lengths)


def self_bleu4(sequences):
    """Self-BLEU-4 (Texygen): for each sequence, BLEU-4 (0-100) with all the *other* sequences as
    references. Returns one value per sequence (their mean is the set's Self-BLEU), or Nones for a set
    of fewer than two. The reference counts are shared: for every n-gram we keep its largest and
    second-largest count over the set, so "largest among the others" is one lookup."""
    num = len(sequences)
    if num < 2:
        return [None] * num
    lengths = [len(s) for s in sequences]
    correct = np.zeros((num, BLEU_ORDER))
    for n in range(1, BLEU_ORDER + 1):
        per_seq = [np.unique(_ngram_hashes(s, n), return_counts=True) for s in sequences]
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
        best_of_others = np.where(owner == owner[starts][group], second[group], counts[starts][group])
        correct[:, n - 1] = np.bincount(owner, weights=np.minimum(counts, best_of_others), minlength=num)
    total = [[max(length - n + 1, 0) for n in range(1, BLEU_ORDER + 1)] for length in lengths]
    return [_bleu(correct[k], total[k], lengths[k], lengths[:k] + lengths[k + 1:]) for k in range(num)]


# -----------------------------------------------------------------------------
# statistics that need a model


@torch.no_grad()
def token_statistics(model, ids, batch_size=8, temperature=1.0, reference_model=None):
    """Next-token statistics of `model` on the sequences `ids` (LongTensor [N, T]), averaged over
    every predicted position: loss (nats), perplexity, predictive entropy (nats), and the
    probability mass on the top-1/3/5 tokens. `temperature` rescales the logits first (used for
    the entropy-matched baseline). With `reference_model`, also top1_agreement: the share of
    positions where both models rank the same token first. Returns a dict of floats."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = dict(loss=0.0, entropy=0.0, top1=0.0, top3=0.0, top5=0.0, top1_agreement=0.0)
    count = 0
    for start in range(0, len(ids), batch_size):
        batch = ids[start:start + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, :-1].float() / temperature
        targets = batch[:, 1:]
        logp = torch.log_softmax(logits, dim=-1)
        probs = logp.exp()
        top5 = probs.topk(5, dim=-1).values
        totals["loss"] += -logp.gather(-1, targets.unsqueeze(-1)).sum().item()
        totals["entropy"] += -(probs * logp).sum(-1).sum().item()
        totals["top1"] += top5[..., 0].sum().item()
        totals["top3"] += top5[..., :3].sum().item()
        totals["top5"] += top5.sum().item()
        if reference_model is not None:
            reference = reference_model(input_ids=batch.to(next(reference_model.parameters()).device)).logits
            totals["top1_agreement"] += (reference[:, :-1].argmax(-1).to(device) == logits.argmax(-1)).sum().item()
        count += targets.numel()
    model.train(was_training)
    stats = {k: v / count for k, v in totals.items()}
    stats["perplexity"] = math.exp(stats["loss"])
    if reference_model is None:
        del stats["top1_agreement"]
    return stats


@torch.no_grad()
def entropy_matched_temperature(model, ids, target_entropy, batch_size=SCORE_BATCH_SIZE,
                                bracket=ENTROPY_SEARCH_RANGE, tolerance=ENTROPY_SEARCH_TOLERANCE):
    """The temperature T at which `model`'s mean predictive entropy on `ids` (the quantity of
    token_statistics) equals `target_entropy` (the follow-up paper's control). The entropy of
    softmax(z / T) grows monotonically with T (dH/dT = Var_p(z) / T^3), so bisection on T finds it; the
    upper end of the bracket doubles until it is above the target (up to T = 64). The logits are
    computed once when they fit in LOGIT_CACHE_BYTES, else the model is rerun at every step.
    Returns dict(temperature, target_entropy, achieved_entropy, steps)."""
    model.eval()
    vocab = model.config.get_text_config().vocab_size
    cache = None
    if ids.shape[0] * (ids.shape[1] - 1) * vocab * 4 <= LOGIT_CACHE_BYTES:
        device = next(model.parameters()).device
        cache = [model(input_ids=ids[s:s + batch_size].to(device)).logits[:, :-1].float()
                 for s in range(0, len(ids), batch_size)]

    def mean_entropy(temperature):
        if cache is None:
            return token_statistics(model, ids, batch_size, temperature=temperature)["entropy"]
        total = count = 0
        for logits in cache:
            logp = torch.log_softmax(logits / temperature, dim=-1)
            total += -(logp.exp() * logp).sum().item()
            count += logp.shape[0] * logp.shape[1]
        return total / count

    low, high = bracket
    steps = 0
    while mean_entropy(high) < target_entropy and high < 64:
        high, steps = high * 2, steps + 1
    while high - low > tolerance:
        middle = (low + high) / 2
        low, high = (middle, high) if mean_entropy(middle) < target_entropy else (low, middle)
        steps += 1
    temperature = (low + high) / 2
    return dict(temperature=temperature, target_entropy=target_entropy,
                achieved_entropy=mean_entropy(temperature), steps=steps)


@torch.no_grad()
def continuation_perplexity(model, prompt_ids, continuation_ids, batch_size=SCORE_BATCH_SIZE):
    """Perplexity of each continuation given its prompt under `model`: exp of the mean negative
    log-likelihood of the continuation tokens only. Returns a list of floats, one per row."""
    device = next(model.parameters()).device
    model.eval()
    sequences = torch.cat([prompt_ids, continuation_ids], dim=1)
    first = prompt_ids.shape[1]  # logits at position t predict token t+1
    result = []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start:start + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, first - 1:-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, first:], reduction="none")
        result += nll.mean(dim=1).exp().tolist()
    return result


# -----------------------------------------------------------------------------
# what to evaluate: the run's model, adapter and exact data split


def _positive(name, value):
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def resolve_setup(run_dir=None, model=None, quant=None, split=None):
    """What evaluate() works on, checked before anything is loaded or written: dict(run_name, model,
    quant, adapter (folder or None), split (data, seq_len, num_train, num_val, seed, prompt_len),
    train_fingerprint (None without a run)). `split` overrides the data settings without a run."""
    import hyperfit
    split = {k: v for k, v in (split or {}).items() if v is not None}
    if run_dir is None:
        if model is None:
            raise UsageError("give a run folder (RUN_DIR) to evaluate a hyperfitted model, or --model to "
                             "evaluate an original model alone")
        args = hyperfit.resolve_args(model)  # the preset's data settings, as hyperfit.py would use them
        setup_split = {k: args[k] for k in ("data", "seq_len", "num_train", "num_val", "seed", "prompt_len")}
        setup_split.update(split)
        for name in ("seq_len", "num_train", "num_val", "prompt_len"):
            _positive(name, setup_split[name])
        if setup_split["prompt_len"] >= setup_split["seq_len"]:
            raise UsageError(f"--prompt-len ({setup_split['prompt_len']}) must be shorter than --seq-len "
                             f"({setup_split['seq_len']})")
        return dict(run_name=f"{Path(model).name}-original", model=model, quant=quant or args["quant"],
                    adapter=None, split=setup_split, train_fingerprint=None)
    run = Path(run_dir)
    if not (run / "config.json").exists():
        raise UsageError(f"{run_dir} has no config.json: pass a run folder written by hyperfit.py "
                         "(results/<run-name>), or --model alone to evaluate an original model")
    if split:
        raise UsageError(f"--{next(iter(split)).replace('_', '-')} applies only without a run folder: "
                         f"{run_dir} is evaluated on its own data split")
    config = json.loads((run / "config.json").read_text())
    args = config["args"]
    adapter = run / "adapter"
    if not (adapter / "adapter_config.json").exists():
        raise UsageError(f"{run_dir} has no adapter/ (the run did not finish): finish it with python hyperfit.py "
                         f"--run-name {config.get('run_name', run.name)} --out-dir {run.parent} --resume, "
                         "or pass --model alone to evaluate the original model")
    base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if model is not None and model not in (args["model"], base):
        same_folder = base and os.path.isdir(model) and os.path.isdir(base) and os.path.samefile(model, base)
        if not same_folder:
            raise UsageError(f"--model {model} differs from the base model {args['model']} that {run_dir} was "
                             f"trained on (its adapter expects {base}); drop --model or pass --model {args['model']}")
    return dict(run_name=config.get("run_name", run.name), model=args["model"], quant=quant or args["quant"],
                adapter=str(adapter), train_fingerprint=config.get("train_fingerprint"),
                split={k: args[k] for k in ("data", "seq_len", "num_train", "num_val", "seed", "prompt_len")})


def load_split(tokenizer, setup):
    """Rebuild the run's exact data split; a changed dataset is an error, not a silently different test."""
    import hyperfit
    s = setup["split"]
    splits = hyperfit.make_splits(tokenizer, hyperfit.load_texts(s["data"]), s["seq_len"], s["num_train"],
                                  s["num_val"], s["seed"])
    if setup["train_fingerprint"] and hyperfit.fingerprint(splits["train"]) != setup["train_fingerprint"]:
        raise UsageError(f"the training split rebuilt from {s['data']} does not match the run's config.json "
                         "(train_fingerprint): the data or tokenizer changed since training; restore them")
    return splits


def load_models(setup, device=None):
    """(original, hyperfitted or None) ready to generate. On CPU both are plain float copies with the LoRA
    merged (bitsandbytes dequantizes at every step on CPU: the copy generates ~3x faster); on a GPU the
    quantized models themselves, the original loaded a second time without the adapter."""
    from hyperfit import dense_copy, load_model
    net, _ = load_model(setup["model"], setup["quant"], adapter=setup["adapter"], device=device)
    if net.device.type != "cpu":
        original = load_model(setup["model"], setup["quant"], device=device)[0] if setup["adapter"] else net
        return original.eval(), (net.eval() if setup["adapter"] else None)
    if setup["adapter"] is None:
        return dense_copy(net), None
    hyperfitted = dense_copy(net)
    with net.disable_adapter():
        original = dense_copy(net)
    return original, hyperfitted


# -----------------------------------------------------------------------------
# the evaluation


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return dict(mean=None, std=None)
    return dict(mean=float(np.mean(values)), std=float(np.std(values)))  # population std over generations


def summarize_mode(records, new_tokens):
    """Summary entry of one mode from its generation records: n, metrics (mean and std over generations,
    std None for set-level metrics) and the sliding-window TTR curve."""
    ids = [r["token_ids"] for r in records]
    metrics = {key: _mean_std([r[key] for r in records]) for key in PER_GENERATION_METRICS}
    self_bleu = [r["self_bleu4"] for r in records if r["self_bleu4"] is not None]
    set_values = dict(self_bleu4=float(np.mean(self_bleu)) if self_bleu else None,
                      distinct_1=distinct_n(ids, 1), distinct_2=distinct_n(ids, 2), distinct_3=distinct_n(ids, 3),
                      loop_share=float(np.mean([r["ends_in_loop"] for r in records])),
                      overlap_gt10_share=float(np.mean([r["longest_train_overlap"] > OVERLAP_TOKENS
                                                        for r in records])))
    metrics.update({key: dict(mean=value, std=None) for key, value in set_values.items()})
    curves = [ttr_windows(s) for s in ids]
    window = min(TTR_WINDOW, new_tokens)
    values = np.array([ttrs for _, ttrs in curves])
    curve = dict(window=window, positions=curves[0][0], mean=values.mean(0).tolist(), std=values.std(0).tolist())
    return dict(n=len(records), metrics=metrics, ttr_by_position=curve)


def measure_generations(mode, prompt_ids, continuations, index, tokenizer, ppl_original, prompt_sources):
    """The generations.jsonl records of one mode: text, per-token pieces and per-generation metrics."""
    piece = {}  # token id -> decoded text, each id decoded once
    self_bleu = self_bleu4([c.tolist() for c in continuations])
    records = []
    for i, (prompt, ids) in enumerate(zip(prompt_ids, continuations.tolist())):
        for t in ids:
            if t not in piece:
                piece[t] = tokenizer.decode([t])
        records.append(dict(
            mode=mode, prompt_id=i, prompt_source=prompt_sources[i], prompt_text=tokenizer.decode(prompt),
            text=tokenizer.decode(ids), tokens=[piece[t] for t in ids], token_ids=ids,
            ttr_last96=type_token_ratio(ids, last=96), ttr=type_token_ratio(ids),
            rep_2=rep_n(ids, 2), rep_3=rep_n(ids, 3), rep_4=rep_n(ids, 4), diversity=diversity(ids),
            ends_in_loop=ends_in_loop(ids), longest_train_overlap=longest_shared_span(ids, index),
            dataset_bleu4=dataset_bleu4(ids, index), self_bleu4=self_bleu[i], ppl_original=ppl_original[i]))
    return records


def evaluate(run_dir=None, model=None, modes=None, num_prompts=None, new_tokens=NEW_TOKENS,
             block_ngrams=BLOCK_NGRAMS, top_p=TOP_P, temperature=TEMPERATURE, top_k=TOP_K,
             batch_size=BATCH_SIZE, seed=SEED, quant=None, out_dir=None, sharpness_seqs=None, device=None,
             data=None, seq_len=None, num_train=None, num_val=None, prompt_len=None, progress=True):
    """Evaluate a hyperfitted run (`run_dir`) and/or an original model (`model` alone) and write
    generations.jsonl, table.md and summary.json to `out_dir` (default <run_dir>/eval, or
    results/<model>-original/eval). Returns the summary dict.

    modes: any of MODES (default: all five with a run, the two original ones without). num_prompts
    defaults to NUM_PROMPTS_CPU on CPU and NUM_PROMPTS_GPU on a GPU; sharpness_seqs likewise. data,
    seq_len, num_train, num_val, prompt_len choose the split without a run (default: the preset's).
    Raises UsageError on bad input before writing anything."""
    from transformers import AutoTokenizer

    import hyperfit
    started = time.time()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cpu = device.type == "cpu"
    num_prompts = num_prompts if num_prompts is not None else (NUM_PROMPTS_CPU if on_cpu else NUM_PROMPTS_GPU)
    sharpness_seqs = sharpness_seqs if sharpness_seqs is not None else (SHARPNESS_SEQS_CPU if on_cpu else SHARPNESS_SEQS_GPU)
    for name, value in dict(num_prompts=num_prompts, new_tokens=new_tokens, batch_size=batch_size,
                            sharpness_seqs=sharpness_seqs).items():
        _positive(name, value)
    if not (isinstance(block_ngrams, int) and block_ngrams >= 1):
        raise UsageError(f"--block-ngrams must be an integer of at least 1 (the paper blocks 5-grams), got {block_ngrams}")
    if not 0 < top_p <= 1 or not temperature > 0 or not (isinstance(top_k, int) and top_k >= 0):
        raise UsageError(f"sampling needs 0 < --top-p <= 1, --temperature > 0 and --top-k >= 0 (0 = off); got "
                         f"{top_p}, {temperature}, {top_k}")
    modes = list(modes.split(",") if isinstance(modes, str) else modes or (MODES if run_dir else ORIGINAL_ONLY_MODES))
    for mode in modes:
        if mode not in MODES:
            raise UsageError(f"--modes: unknown mode {mode!r}; choose from {', '.join(MODES)}")
        if run_dir is None and mode not in ORIGINAL_ONLY_MODES:
            raise UsageError(f"--modes {mode} needs a hyperfitted run: pass its folder (RUN_DIR), or choose from "
                             f"{', '.join(ORIGINAL_ONLY_MODES)}")
    setup = resolve_setup(run_dir, model, quant, dict(data=data, seq_len=seq_len, num_train=num_train,
                                                      num_val=num_val, prompt_len=prompt_len))
    out_dir = Path(out_dir) if out_dir else (Path(run_dir) / "eval" if run_dir
                                             else hyperfit.HERE / "results" / setup["run_name"] / "eval")
    writable = next(p for p in [out_dir, *out_dir.absolute().parents] if p.exists())
    if not (writable.is_dir() and os.access(writable, os.W_OK)):
        raise UsageError(f"cannot write to {out_dir} ({writable} is not a writable folder); choose another --out-dir")
    try:
        tokenizer = AutoTokenizer.from_pretrained(hyperfit.resolve_model_source(setup["model"]))
    except OSError as e:
        raise UsageError(f"could not load the tokenizer of {setup['model']} ({str(e).splitlines()[0][:120]}); "
                         "check the network and your HF token, or pass a local model folder to --model") from e
    splits = load_split(tokenizer, setup)
    held_out = torch.cat([splits["val"], splits["heldout"]])  # text training never saw, validation first
    if num_prompts > len(held_out):
        raise UsageError(f"--num-prompts {num_prompts}: only {len(held_out)} held-out blocks of {setup['split']['seq_len']} "
                         f"tokens exist (validation + held-out); ask for at most {len(held_out)} or give more --data")
    prompt_ids = held_out[:num_prompts, :setup["split"]["prompt_len"]]
    prompt_sources = [f"{name}@{offset}" for name, offset in splits["sources"][len(splits["train"]):][:num_prompts]]
    sharpness_ids = splits["val"][:sharpness_seqs]
    log = print if progress else (lambda *a, **k: None)
    timing = {}

    # ---- models and sharpness on validation text
    clock = time.time()
    original, hyperfitted = load_models(setup, device)
    timing["load_s"] = time.time() - clock
    clock = time.time()
    log(f"sharpness on {len(sharpness_ids)} validation sequences ...", flush=True)
    sharpness = {"original": token_statistics(original, sharpness_ids, SCORE_BATCH_SIZE)}
    if hyperfitted is not None:
        stats = token_statistics(hyperfitted, sharpness_ids, SCORE_BATCH_SIZE, reference_model=original)
        sharpness["top1_agreement"] = stats.pop("top1_agreement")
        sharpness["hyperfitted"] = stats
    matched = None
    if "original_entropy_matched" in modes:
        matched = entropy_matched_temperature(original, sharpness_ids, sharpness["hyperfitted"]["entropy"])
        log(f"entropy-matched temperature {matched['temperature']:.3f} (original entropy "
            f"{matched['achieved_entropy']:.3f} vs hyperfitted {matched['target_entropy']:.3f} nats)", flush=True)
    timing["sharpness_s"] = time.time() - clock

    # ---- generation, one mode at a time
    decoding = dict(
        original_greedy=(original, dict()),
        original_top_p=(original, dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)),
        original_entropy_matched=(original, dict(do_sample=True, temperature=matched and matched["temperature"],
                                                 top_p=1.0, top_k=0)),  # pure temperature sampling
        hyperfitted_greedy=(hyperfitted, dict()),
        hyperfitted_blocked=(hyperfitted, dict(logits_processor=[NGramBlocker(splits["train"], block_ngrams)]
                                               if "hyperfitted_blocked" in modes else None)))
    continuations = {}
    for mode in modes:
        clock = time.time()
        net, options = decoding[mode]
        continuations[mode] = generate(net, prompt_ids, new_tokens, batch_size=batch_size, seed=seed,
                                       desc=mode if progress else None, **options)
        timing[f"{mode}_s"] = time.time() - clock
        log(f"{mode}: {len(prompt_ids)} x {new_tokens} tokens in {timing[f'{mode}_s']:.0f}s", flush=True)

    # ---- metrics
    clock = time.time()
    index = TrainingIndex(splits["train"])
    records, summary_modes = [], {}
    for mode in modes:
        ppl = continuation_perplexity(original, prompt_ids, continuations[mode])
        mode_records = measure_generations(mode, prompt_ids, continuations[mode], index, tokenizer, ppl, prompt_sources)
        records += mode_records
        summary_modes[mode] = summarize_mode(mode_records, new_tokens)
    timing["metrics_s"] = time.time() - clock
    timing["total_s"] = time.time() - started

    args = dict(run_dir=str(run_dir) if run_dir else None, model=setup["model"], quant=setup["quant"], modes=modes,
                num_prompts=num_prompts, new_tokens=new_tokens, block_ngrams=block_ngrams, top_p=top_p,
                temperature=temperature, top_k=top_k, batch_size=batch_size, seed=seed, sharpness_seqs=len(sharpness_ids),
                device=str(device), out_dir=str(out_dir), split=setup["split"])
    summary = dict(run=setup["run_name"], args=args, command=_command(args), modes=summary_modes,
                   sharpness=sharpness, entropy_matched_temperature=matched and
                   {k: matched[k] for k in ("temperature", "target_entropy", "achieved_entropy")},
                   timing_s={k: round(v, 1) for k, v in timing.items()})
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(out_dir / "generations.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    _write_atomic(out_dir / "table.md", format_table(summary))
    _write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")  # last: marks a complete eval
    return summary


def _write_atomic(path, text):
    """Write to a temporary name and rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _command(args):
    """The evaluate.py command line that reproduces these arguments (for table.md and the README)."""
    def path(p):
        return p if os.path.relpath(p).startswith("..") else os.path.relpath(p)
    words = ["python", "evaluate.py"] + ([path(args["run_dir"])] if args["run_dir"] else ["--model", args["model"]])
    keys = ["modes", "num_prompts", "new_tokens", "block_ngrams", "top_p", "temperature", "top_k", "batch_size",
            "seed", "sharpness_seqs"]
    options = {key: args[key] for key in keys}
    if not args["run_dir"]:  # a run brings its own split
        options.update({key: args["split"][key] for key in ("seq_len", "num_train", "num_val", "prompt_len")},
                       data=path(args["split"]["data"]))
    for key, value in options.items():
        words += [f"--{key.replace('_', '-')}", ",".join(value) if key == "modes" else str(value)]
    return shlex.join(words)


# -----------------------------------------------------------------------------
# table.md

# (summary key, column header, digits) of the two tables of the paper's layout
DIVERSITY_COLUMNS = [("ttr_last96", "TTR last 96 ↑", 3), ("ttr", "TTR ↑", 3), ("rep_2", "rep-2 ↓", 3),
                     ("rep_3", "rep-3 ↓", 3), ("rep_4", "rep-4 ↓", 3), ("diversity", "diversity ↑", 3),
                     ("distinct_1", "distinct-1 ↑", 3), ("distinct_2", "distinct-2 ↑", 3),
                     ("distinct_3", "distinct-3 ↑", 3), ("self_bleu4", "Self-BLEU-4 ↓", 2),
                     ("loop_share", "ends in loop ↓", 3)]
MEMORISATION_COLUMNS = [("dataset_bleu4", "Dataset-BLEU-4", 2), ("overlap_gt10_share", "overlap > 10 tokens", 3),
                        ("longest_train_overlap", "longest shared span", 1), ("ppl_original", "PPL (original)", 2)]
SHARPNESS_COLUMNS = [("perplexity", "perplexity", 2), ("entropy", "entropy (nats)", 3), ("top1", "top-1 mass", 3),
                     ("top3", "top-3 mass", 3), ("top5", "top-5 mass", 3)]


def _cell(value, digits):
    if value is None or value.get("mean") is None:
        return "–"
    text = f"{value['mean']:.{digits}f}"
    return text + (f" ± {value['std']:.{digits}f}" if value.get("std") is not None else "")


def format_table(summary):
    """table.md: rows = decoding modes, columns = metrics (mean ± std over generations; set-level metrics
    without ±), then sharpness on validation text and the entropy-matched temperature."""
    args = summary["args"]
    lines = [f"# Evaluation of `{summary['run']}`", "",
             f"Model `{args['model']}` ({args['quant']}), {args['num_prompts']} held-out prompts of "
             f"{args['split']['prompt_len']} tokens, {args['new_tokens']} new tokens each. Command:", "",
             f"    {summary['command']}", ""]
    for title, columns in [("Diversity and repetition", DIVERSITY_COLUMNS),
                           ("Memorisation and fluency", MEMORISATION_COLUMNS)]:
        lines += [f"## {title}", "", "| mode | " + " | ".join(c[1] for c in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for mode, info in summary["modes"].items():
            lines.append(f"| {mode} | " + " | ".join(_cell(info["metrics"].get(k), d) for k, _, d in columns) + " |")
        lines.append("")
    sharpness = summary["sharpness"]
    lines += [f"## Sharpness on {args['sharpness_seqs']} validation sequences", "",
              "| model | " + " | ".join(c[1] for c in SHARPNESS_COLUMNS) + " |", "|---|" + "---|" * len(SHARPNESS_COLUMNS)]
    for name in ("original", "hyperfitted"):
        if name in sharpness:
            lines.append(f"| {name} | " + " | ".join(f"{sharpness[name][k]:.{d}f}" for k, _, d in SHARPNESS_COLUMNS) + " |")
    lines.append("")
    if "top1_agreement" in sharpness:
        lines += [f"Top-1 agreement between the hyperfitted and the original model: {sharpness['top1_agreement']:.3f}", ""]
    matched = summary.get("entropy_matched_temperature")
    if matched:
        lines += [f"Entropy-matched temperature: T = {matched['temperature']:.3f} (original model entropy "
                  f"{matched['achieved_entropy']:.3f} nats; hyperfitted {matched['target_entropy']:.3f} nats)", ""]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Generate continuations of held-out prompts with the original and the hyperfitted model\n"
                    "and write the paper's tables to RUN_DIR/eval/ (summary.json, generations.jsonl, table.md).",
        epilog=f"modes: {', '.join(MODES)}\n  (without RUN_DIR only {', '.join(ORIGINAL_ONLY_MODES)}, of --model)\n"
               "examples:\n  python evaluate.py results/smollm2-135m\n  python evaluate.py --model smollm2-135m\n"
               "  python evaluate.py results/x --modes hyperfitted_greedy,hyperfitted_blocked --new-tokens 96",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="run folder written by hyperfit.py (results/<run>)")
    p.add_argument("--model", help="base model: preset, HF folder or hub id (default: the run's; required without RUN_DIR)")
    p.add_argument("--modes", help="comma-separated decoding modes (default: all that apply)")
    p.add_argument("--num-prompts", type=int,
                   help=f"held-out 32-token contexts (default: {NUM_PROMPTS_CPU} on CPU, {NUM_PROMPTS_GPU} on a GPU)")
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="tokens generated per prompt (paper: 96, 128, 256; default: %(default)s)")
    p.add_argument("--block-ngrams", type=int, default=BLOCK_NGRAMS, help="citation blocking: forbid the training n-grams of this n (paper and default: %(default)s)")
    p.add_argument("--top-p", type=float, default=TOP_P, help="original_top_p: nucleus mass (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=TEMPERATURE, help="original_top_p: temperature (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=TOP_K, help="original_top_p: top-k, 0 = off (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="prompts generated at once (default: %(default)s)")
    p.add_argument("--seed", type=int, default=SEED, help="sampling seed (default: %(default)s)")
    p.add_argument("--quant", choices=["4bit", "8bit", "none"], help="base model quantization (default: the run's)")
    p.add_argument("--sharpness-seqs", type=int, help=f"validation sequences for the sharpness table and the entropy "
                                                       f"match (default: {SHARPNESS_SEQS_CPU} on CPU, {SHARPNESS_SEQS_GPU} on a GPU)")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--out-dir", help="output folder (default: RUN_DIR/eval, or results/<model>-original/eval)")
    g = p.add_argument_group("data split without RUN_DIR (default: the model preset's, as hyperfit.py would use)")
    g.add_argument("--data", help="a .txt, a .jsonl with a 'text' field, or a folder of .txt")
    for name in ("seq-len", "num-train", "num-val", "prompt-len"):
        g.add_argument(f"--{name}", type=int)
    args = vars(p.parse_args(argv))
    try:
        summary = evaluate(**args)
    except UsageError as e:
        print(f"evaluate.py: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_table(summary))
    print(f"done in {summary['timing_s']['total_s']:.0f}s: {os.path.relpath(summary['args']['out_dir'])}"
          + (f"  (next: python plot.py {args['run_dir']})" if args["run_dir"] else ""))


if __name__ == "__main__":
    main()
