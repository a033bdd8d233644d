"""
The measures of a continuation and of a set of continuations, each defined as the paper (or the
work it cites) defines it; evaluate.py computes them, and every definition is checked by a test
against the source's own library or a hand-computed case. Pure Python and numpy on token ids and
decoded texts: a reader can recompute any number of eval/generations.jsonl from its records.

"tokens" are the model's token ids; a continuation excludes its prompt.
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
                         BLEU-4 (smoothing method 1) of each continuation's words (nltk's
                         word_tokenize, as Texygen) against the words of the mode's other
                         continuations, averaged, x 100. Computed from shared n-gram counts; a
                         test checks it equals nltk.translate.bleu_score.sentence_bleu.
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
  ppl_hyperfitted        the same under the hyperfitted model
  original_top1_share    share of generated tokens that are also the original model's top-1 given
                         the same prefix (Beyond Temperature: ~57 % for hyperfitted greedy);
                         override_beyond_top10_share: of the other tokens ("overrides"), the
                         share the original model ranked below its top 10 (reported: 12.9 %);
                         override_rank_shares: their ranks in buckets
Quality: real words, in the training data's scripts, distributed like the human text?
  unknown_word_share     of a continuation's words, the share that wordfreq's English list does not
                         know (zipf_frequency(word, "en") == 0, its "best" = large list): a word is
                         a token of wordfreq.tokenize(text, "en") (lower-cased; split at spaces,
                         punctuation and hyphens) that holds a letter; numbers are not words.
                         Names from the books (Rokovoko, Yojo) count as unknown too, so read it
                         beside the human text's share. unknown_words: the words themselves
  foreign_script_share   of a continuation's letters (str.isalpha), the share whose script (the
                         first word of the letter's Unicode name: LATIN, CJK, HIRAGANA, GREEK ...)
                         never occurs among the letters of the training sequences
  mauve                  MAUVE (Pillutla et al. 2021; the mauve-text package, compute_mauve with
                         precomputed features and its defaults) of a mode's continuations against
                         the human continuations of the same prompts; features: the last hidden
                         state at the final token of each continuation (the continuation alone,
                         as mauve's featurizer does with its text), from the original model by
                         default. Computed only from MAUVE_MIN_SAMPLES (1,000) continuations per
                         side, with a percentile bootstrap interval over prompts (summary.json:
                         modes[m].metrics.mauve.ci)
Self-BLEU's words: nltk.word_tokenize, Punkt sentence split then the Treebank word tokenizer, as
Texygen calls it; Punkt's English parameters ship as plain text in data/nltk_data.
"""

import functools
import math
import os
import re
import statistics
import unicodedata
from pathlib import Path

import numpy as np

TABLE_TOKENS = 96  # the paper's diversity table scores 96-token continuations
VALIDATION_TOKENS = 224  # the official validation generates 224 new tokens, TTR over the last 96
TTR_WINDOW = 96  # the paper's TTR: unique / total tokens over the last 96 generated tokens
TTR_STRIDE = 8  # the sliding-window TTR along a continuation moves 8 tokens at a time
LOOP_MAX_PERIOD, LOOP_MIN_TOKENS = 64, 16  # see ends_in_loop
OVERLAP_TOKENS = 10  # "shares more than 10 tokens with the training data"
BLEU_ORDER, BLEU_SMOOTH, BLEU_SMOOTH_VALUE = 4, "floor", 0.1
SIMCTG_ORDERS = (2, 3, 4)
OVERRIDE_RANK_BUCKETS = ((2, 2), (3, 5), (6, 10), (11, 100), (101, None))  # original's ranks
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
    "ppl_hyperfitted",
    "unknown_word_share",
    "foreign_script_share",
    "word_loop",
    "intrusion",
)
SET_METRICS = (
    "simctg_rep_2",
    "simctg_rep_3",
    "simctg_rep_4",
    "simctg_diversity",
    "distinct_1",
    "distinct_2",
    "distinct_3",
    "loop_share",
    "overlap_gt10_share",
    "overlap_gt10_share_first96",
    "override_beyond_top10_share",
)  # one value per mode
NLTK_DATA = "data/nltk_data"  # Punkt's English parameters, plain text (data/nltk_data/README.md)
MAUVE_BOOTSTRAP = 100  # resamples of the prompts for MAUVE's interval
# MAUVE is shown only from this many continuations per side. Its authors compute it on 5,000
# (Pillutla et al. 2021, 2023: the estimate is biased and unstable at small n and they recommend
# thousands); at the CPU's 32 per side it cannot tell human text from the original's looping
# greedy text: human text against itself scores 0.66-1.00 over random half-splits, and every
# mode falls inside the permutation null (modes pooled with human text and split: 0.81-1.00).
MAUVE_MIN_SAMPLES = 1000
WORD_LOOP_MAX_PERIOD, WORD_LOOP_MIN_WORDS = 32, 12  # see ends_in_word_loop
NAME_CAPITALISED = 0.9  # a name: a word written capitalised at least this often in training text
BOOTSTRAP_RESAMPLES, PERMUTATIONS, ALPHA = 2000, 10000, 0.05  # intervals and tests over prompts

# -----------------------------------------------------------------------------
# repetition within one continuation (lists of token ids)


def type_token_ratio(ids, last=None):
    """Unique tokens / tokens, over the last `last` tokens if given (the paper uses the last 96)."""
    ids = list(ids)[-last:] if last else list(ids)
    return len(set(ids)) / len(ids) if ids else float("nan")


def ttr_windows(ids, window=TTR_WINDOW, stride=TTR_STRIDE):
    """TTR of sliding windows of `window` tokens ending at positions window, window + stride, ...
    <= len(ids) (the paper's Figure 9). A sequence shorter than `window` gives one window over all
    of it. Returns (positions, ttrs): the end position of each window and its TTR."""
    ids = list(ids)
    window = min(window, len(ids))
    positions = list(range(window, len(ids) + 1, stride)) if window else []
    return positions, [type_token_ratio(ids[end - window : end]) for end in positions]


def ttr_of_window(ids, first, last):
    """TTR of tokens first..last (1-based, inclusive); None when the sequence is shorter."""
    return type_token_ratio(ids[first - 1 : last]) if len(ids) >= last else None


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


def loop_words(text):
    """The words of a text for the word-level loop detector: lower-cased runs of letters, digits
    and apostrophes; line breaks, spacing and punctuation do not count."""
    return re.findall(r"[\w']+", text.lower())


def ends_in_word_loop(text, max_period=WORD_LOOP_MAX_PERIOD, min_words=WORD_LOOP_MIN_WORDS):
    """ends_in_loop on words instead of tokens: True if the text's last max(2p, min_words) words
    repeat with some period p <= max_period. The same sentence printed with other line breaks
    is other tokens but the same words: "Did not your mother say so?" repeated for 128 tokens
    over varying breaks escapes the token-level detector, not this one."""
    return ends_in_loop(np.array(loop_words(text), dtype=object), max_period, min_words)


def capitalised_words(text):
    """{word: (times written capitalised, times written at all)} of a text, by its lower-cased
    form (runs of letters)."""
    counts = {}
    for word in re.findall(r"[^\W\d_]+", text):
        seen = counts.setdefault(word.lower(), [0, 0])
        seen[0] += word[0].isupper()
        seen[1] += 1
    return counts


@functools.lru_cache(maxsize=32)
def words_of_book(text):
    """The lower-cased words of a whole book, counted once per book: every prompt drawn from it
    asks again (a few hundred kB each)."""
    return frozenset(capitalised_words(text))


def names_of(text, share=NAME_CAPITALISED):
    """The names of a text: words it writes capitalised at least `share` of the time (proper
    nouns; sentence-initial common words are mostly written lower-case), at least twice."""
    counts = capitalised_words(text)
    return {w for w, (upper, total) in counts.items() if total >= 2 and upper >= share * total}


def intruding_names(text, prompt, source_text, training_names):
    """The training data's names in a continuation that neither its prompt nor the prompt's own
    source text holds: characters from other training books ("Miss Morland" in an Alice
    prompt). `training_names`: names_of(the training text); `source_text`: the prompt's book."""
    known = set(loop_words(prompt)) | words_of_book(source_text)
    written = {w.lower() for w in re.findall(r"\b[A-Z][^\W\d_]+", text)}  # capitalised words
    return sorted(w for w in written if w in training_names and w not in known)


def bootstrap_interval(values, resamples=BOOTSTRAP_RESAMPLES, seed=0, level=0.95):
    """The percentile bootstrap interval of the mean of per-prompt `values` (Efron and
    Tibshirani 1993): resample the prompts with replacement. None values are left out."""
    x = np.array([v for v in values if v is not None], dtype=float)
    if len(x) < 2:
        return None
    means = x[np.random.default_rng(seed).integers(0, len(x), (resamples, len(x)))].mean(1)
    return percentile_interval(means, level)


def percentile_interval(replicates, level=0.95):
    """The central `level` interval of bootstrap replicates (NaN replicates, where a resample
    leaves a ratio undefined, left out)."""
    tail = (1 - level) / 2 * 100
    return [float(v) for v in np.nanpercentile(replicates, [tail, 100 - tail])]


def paired_permutation_p(a, b, permutations=PERMUTATIONS, seed=0):
    """Two-sided p-value of the difference of means of paired per-prompt values a and b (the same
    prompts, two modes): under the null the two values of a prompt are exchangeable, so each
    difference's sign is flipped at random (a sign-flip permutation test, Good 2005)."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    d = np.array([x - y for x, y in pairs], dtype=float)
    if len(d) < 2 or not d.any():
        return 1.0
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(permutations, len(d)))
    null = np.abs((signs * d).mean(1))
    return float((1 + (null >= abs(d.mean()) - 1e-12).sum()) / (1 + permutations))


# -----------------------------------------------------------------------------
# memorisation: n-grams shared with the training sequences

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
    """Texygen's words of a text: nltk.word_tokenize (Punkt's sentence split, then the Treebank
    word tokenizer), with Punkt's English parameters from the kit's data/nltk_data."""
    import nltk

    kit = Path(globals().get("__file__", "pasted")).resolve().parent  # pasted: the working folder
    folder = str(kit / NLTK_DATA)
    if folder not in nltk.data.path:
        nltk.data.path.insert(0, folder)
    return nltk.word_tokenize(text)


def self_bleu4_texygen(texts):
    """Texygen's Self-BLEU-4 of decoded texts (x 100), one value per text: words mapped to ids,
    then self_bleu4 with nltk's formula."""
    vocabulary = {}
    sequences = [[vocabulary.setdefault(w, len(vocabulary)) for w in words(t)] for t in texts]
    return self_bleu4(sequences, bleu=nltk_bleu4)


def simctg_counts(text):
    """{n: (unique, total)} n-grams of whitespace words in one text for n = 2, 3, 4, as SimCTG's
    measure_repetition_and_diversity (simctg/evaluation.py) counts them: its loop stops one
    n-gram before the end of a text."""
    tokens = text.strip("\n").strip().split()
    counts = {}
    for n in SIMCTG_ORDERS:
        grams = [" ".join(tokens[i : i + n]) for i in range(len(tokens) - n)]  # its bound
        counts[n] = (len(set(grams)), len(grams))
    return counts


def simctg_repetition(texts):
    """SimCTG's measure_repetition_and_diversity on decoded texts: the per-text unique and total
    n-gram counts (simctg_counts) summed over the texts; rep-n = 100 * (1 - unique / total)
    rounded to 2 decimals; diversity = prod (1 - rep-n / 100). Returns dict(simctg_rep_2,
    simctg_rep_3, simctg_rep_4, simctg_diversity); rep-n is None when no text has an n-gram."""
    counts = [simctg_counts(text) for text in texts]
    result = {}
    for n in SIMCTG_ORDERS:
        unique, total = (sum(c[n][k] for c in counts) for k in (0, 1))
        result[f"simctg_rep_{n}"] = round((1 - unique / total) * 100, 2) if total else None
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
# quality: real words, the training data's scripts, and MAUVE against the human text


def text_words(text):
    """The words of a text as unknown_word_share counts them: the tokens of wordfreq's English
    tokenizer (lower-cased), stripped of the underscores around them, that hold a letter.
    Project Gutenberg marks italics as _word_ or _several words_, and wordfreq's tokenizer keeps
    an underscore as part of a word: without the strip, "_us_" would be an unknown word."""
    import wordfreq

    tokens = (token.strip("_") for token in wordfreq.tokenize(text, "en"))
    return [token for token in tokens if any(c.isalpha() for c in token)]


def unknown_words(text):
    """The words of `text` that wordfreq's English list does not know (zipf frequency 0)."""
    import wordfreq

    return [word for word in text_words(text) if wordfreq.zipf_frequency(word, "en") == 0]


def unknown_word_share(text):
    """Share of the text's words that are unknown (None for a text without words)."""
    count = len(text_words(text))
    return len(unknown_words(text)) / count if count else None


def script(letter):
    """The script of a letter: the first word of its Unicode name (LATIN, CJK, HIRAGANA, ...)."""
    return unicodedata.name(letter, "UNKNOWN").split(" ")[0]


def scripts(texts):
    """Every script among the letters of `texts`."""
    return {script(c) for text in texts for c in set(text) if c.isalpha()}


def foreign_letters(text, allowed):
    """The letters of `text` whose script is not in `allowed` (the training data's scripts)."""
    return [c for c in text if c.isalpha() and script(c) not in allowed]


def foreign_script_share(text, allowed):
    """Share of the text's letters outside the scripts `allowed` (None without letters)."""
    letters = sum(c.isalpha() for c in text)
    return len(foreign_letters(text, allowed)) / letters if letters else None


def mauve_score(p_features, q_features, seed=0, bootstrap=MAUVE_BOOTSTRAP):
    """MAUVE of q (a mode's continuations) against p (the human ones), both [n, d] feature arrays
    of the same prompts, by mauve-text's compute_mauve with its defaults (buckets: n / 10), and a
    95 % percentile interval from `bootstrap` resamples of the prompts (the same prompts drawn
    for p and q). Returns dict(mauve, ci, samples, buckets, bootstrap)."""
    n = len(p_features)
    draws = np.random.default_rng(seed).integers(0, n, size=(bootstrap, n))
    replicates = [mauve_of(p_features[rows], q_features[rows], seed) for rows in draws]
    ci = [float(v) for v in np.percentile(replicates, [2.5, 97.5])] if bootstrap else None
    value = mauve_of(p_features, q_features, seed)
    return dict(mauve=value, ci=ci, samples=n, buckets=max(2, round(n / 10)), bootstrap=bootstrap)


def mauve_of(p_features, q_features, seed):
    """mauve.compute_mauve on precomputed features, with its defaults. faiss (its k-means) warns
    from C++ on stderr about every small clustering; that stays off the kit's stderr."""
    import mauve

    stderr, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        return float(
            mauve.compute_mauve(p_features=p_features, q_features=q_features, seed=seed).mauve
        )
    finally:
        os.dup2(stderr, 2)
        os.close(stderr)
        os.close(devnull)


# -----------------------------------------------------------------------------
# the records of one decoding mode and their summary


def measure_mode(mode, data, rows, index, tokenizer, scores):
    """The generations.jsonl records of one mode: the texts, the tokens (ids and pieces) and the
    per-continuation measures, over the whole continuation and (the paper's table) over its first
    96 tokens. `rows`: the continuations' token ids (lists; the human row's may differ in
    length); `scores`: {"original": (perplexities, ranks), "hyperfitted": (perplexities, ranks)
    or None without a hyperfitted model}; data["scripts"]: the training data's scripts;
    `tokenizer`: anything with the tokenizer's decode."""
    (perplexities, ranks), hyperfitted = scores["original"], scores.get("hyperfitted")
    texts = [tokenizer.decode(ids) for ids in rows]
    self_bleu_texygen, self_bleu_ids = self_bleu4_texygen(texts), self_bleu4(rows)
    first96 = first96_metrics(rows, index, tokenizer)
    pieces = {t: tokenizer.decode([t]) for t in {t for ids in rows for t in ids}}
    records = []
    for i, (ids, text) in enumerate(zip(rows, texts)):
        window = (VALIDATION_TOKENS - TTR_WINDOW + 1, VALIDATION_TOKENS)
        record = dict(
            mode=mode,
            prompt_id=i,
            prompt_source=data["prompt_sources"][i],
            prompt_text=tokenizer.decode(data["prompts"][i]),
            text=text,
            tokens=[pieces[t] for t in ids],
            token_ids=ids,
            ttr_first96=ttr_of_window(ids, 1, TABLE_TOKENS),
            **first96[i],
            ttr_last96_of_224=ttr_of_window(ids, *window),
            ttr_last96=type_token_ratio(ids, last=TTR_WINDOW),
            ttr=type_token_ratio(ids),
        )
        record.update({f"token_rep_{n}": token_rep_n(ids, n) for n in SIMCTG_ORDERS})
        record.update(
            token_diversity=token_diversity(ids),
            ends_in_loop=ends_in_loop(ids),
            longest_train_overlap=longest_shared_span(ids, index),
            dataset_bleu4=dataset_bleu4(ids, index),
            self_bleu4_texygen=self_bleu_texygen[i],
            self_bleu4_token_ids=self_bleu_ids[i],
            ppl_original=perplexities[i],
            ppl_hyperfitted=hyperfitted[0][i] if hyperfitted else None,
            original_top1_share=sum(r == 1 for r in ranks[i]) / len(ranks[i]) if ids else None,
            original_ranks=ranks[i],
            unknown_word_share=unknown_word_share(text),
            unknown_words=unknown_words(text),
            foreign_script_share=foreign_script_share(text, data["scripts"]),
            foreign_letters="".join(foreign_letters(text, data["scripts"])),
            word_loop=float(ends_in_word_loop(text)),
        )
        intruders = intruding_names(
            text, record["prompt_text"], data["source_texts"][i], data["training_names"]
        )
        record.update(intrusion=float(bool(intruders)), intruding_names=intruders)
        records.append(record)
    return records


def first96_metrics(rows, index, tokenizer):
    """The paper's diversity and memorisation table scores 96-token continuations: Self-BLEU
    (Texygen), Dataset-BLEU and the longest shared span of each continuation's first 96 tokens
    (None for a continuation shorter than that; Self-BLEU among those that are not)."""
    names = ("self_bleu4_texygen_first96", "dataset_bleu4_first96", "longest_train_overlap_first96")
    long_enough = [i for i, ids in enumerate(rows) if len(ids) >= TABLE_TOKENS]
    heads = {i: rows[i][:TABLE_TOKENS] for i in long_enough}
    self_bleu = dict(
        zip(long_enough, self_bleu4_texygen([tokenizer.decode(heads[i]) for i in long_enough]))
    )
    values = [dict.fromkeys(names) for _ in rows]
    for i, ids in heads.items():
        values[i] = dict(
            zip(names, (self_bleu[i], dataset_bleu4(ids, index), longest_shared_span(ids, index)))
        )
    return values


def mean_std(values):
    """Mean and population std over generations (None when there are no values)."""
    values = [v for v in values if v is not None]
    if not values:
        return dict(mean=None, std=None)
    return dict(mean=float(np.mean(values)), std=float(np.std(values)))


def overlap_flags(spans):
    """Per continuation: 1.0 where its longest span shared with one training sequence is longer
    than OVERLAP_TOKENS tokens, else 0.0; None where it was not measured (too short)."""
    return [None if s is None else float(s > OVERLAP_TOKENS) for s in spans]


def overlap_share(spans):
    """Share of continuations sharing more than OVERLAP_TOKENS tokens with one training sequence."""
    flags = [f for f in overlap_flags(spans) if f is not None]
    return float(np.mean(flags)) if flags else None


def set_measures(records):
    """The measures of a mode's whole set of continuations (SET_METRICS): SimCTG's rep-n and
    diversity, distinct-n, the shares of continuations ending in a loop and sharing more than
    OVERLAP_TOKENS tokens with training, and of overrides beyond the original's top 10."""
    ids = [r["token_ids"] for r in records]
    overrides = override_statistics([r["original_ranks"] for r in records if r["original_ranks"]])
    return dict(
        simctg_repetition([r["text"] for r in records]),
        **{f"distinct_{n}": distinct_n(ids, n) for n in (1, 2, 3)},
        loop_share=float(np.mean([r["ends_in_loop"] for r in records])),
        overlap_gt10_share=overlap_share([r["longest_train_overlap"] for r in records]),
        overlap_gt10_share_first96=overlap_share(
            [r["longest_train_overlap_first96"] for r in records]
        ),
        override_beyond_top10_share=overrides["override_beyond_top10_share"],
    )


def set_intervals(records, resamples=BOOTSTRAP_RESAMPLES, seed=0, level=0.95):
    """95 % intervals over prompts of set_measures. The shares are means over prompts
    (bootstrap_interval); SimCTG's rep-n and the override share are ratios of sums over prompts,
    resampled the same way (percentile bootstrap, Efron and Tibshirani 1993). distinct-n is not:
    a prompt drawn twice adds its n-grams twice to the total but once to the unique ones, which
    drags every resample down, so its interval is the delete-one jackknife's (ibid., ch. 11:
    the value +- z * the jackknife standard error)."""
    counts = [simctg_counts(r["text"]) for r in records]
    ratios = {
        f"simctg_rep_{n}": [(c[n][1] - c[n][0], c[n][1]) for c in counts] for n in SIMCTG_ORDERS
    }
    ranks = [np.asarray(r["original_ranks"] or []) for r in records]
    ratios["override_beyond_top10_share"] = [((x > 10).sum(), (x > 1).sum()) for x in ranks]
    draws = np.random.default_rng(seed).integers(0, len(records), (resamples, len(records)))
    replicates = {}
    for key, pairs in ratios.items():
        part, whole = (np.array(column, dtype=float)[draws].sum(1) for column in zip(*pairs))
        replicates[key] = np.where(whole > 0, part / np.maximum(whole, 1), np.nan)
        replicates[key] *= 100 if key.startswith("simctg") else 1  # SimCTG's rep-n is in %
    reps = [replicates[f"simctg_rep_{n}"] for n in SIMCTG_ORDERS]
    replicates["simctg_diversity"] = np.prod([1 - r / 100 for r in reps], axis=0)
    intervals = {
        key: percentile_interval(values, level)
        for key, values in replicates.items()
        if np.isfinite(values).any()
    }
    shares = dict(
        loop_share=[float(r["ends_in_loop"]) for r in records],
        overlap_gt10_share=overlap_flags([r["longest_train_overlap"] for r in records]),
        overlap_gt10_share_first96=overlap_flags(
            [r["longest_train_overlap_first96"] for r in records]
        ),
    )
    intervals.update({k: bootstrap_interval(v, resamples, seed, level) for k, v in shares.items()})
    z = statistics.NormalDist().inv_cdf(0.5 + level / 2)
    ids = [r["token_ids"] for r in records]
    for n in (1, 2, 3):
        value = distinct_n(ids, n)
        left_out = np.array([distinct_n(ids[:i] + ids[i + 1 :], n) for i in range(len(ids))])
        se = math.sqrt((len(ids) - 1) * np.mean((left_out - left_out.mean()) ** 2))
        intervals[f"distinct_{n}"] = [max(0.0, value - z * se), min(1.0, value + z * se)]
    return intervals


def summarize_mode(records):
    """Summary entry of one mode: n, metrics (mean, std over continuations and a 95 % interval
    over prompts; std None for set-level metrics), the original model's ranks of the overrides,
    and the sliding-window TTR curve (over the continuations of full length)."""
    ids = [r["token_ids"] for r in records]
    metrics = {key: mean_std([r[key] for r in records]) for key in PER_GENERATION_METRICS}
    for key in PER_GENERATION_METRICS:  # how far the mean could move over other prompts
        metrics[key]["ci"] = bootstrap_interval([r[key] for r in records])
    intervals = set_intervals(records)
    for key, value in set_measures(records).items():
        metrics[key] = dict(
            mean=value, std=None, ci=intervals.get(key) if value is not None else None
        )
    overrides = override_statistics([r["original_ranks"] for r in records if r["original_ranks"]])
    length = max(len(s) for s in ids)
    curves = [ttr_windows(s) for s in ids if len(s) == length]
    values = np.array([ttrs for _, ttrs in curves])
    curve = dict(
        window=min(TTR_WINDOW, length),
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


# the differences a report may call out: each hyperfitted mode against the original's modes and
# the human text, on the measures of diversity and quality
DIFFERENCE_METRICS = (
    "ttr_first96",
    "unknown_word_share",
    "word_loop",
    "intrusion",
    "ppl_original",
    "self_bleu4_texygen",
)
DIFFERENCE_PAIRS = tuple(
    (a, b)
    for a in ("hyperfitted_greedy", "hyperfitted_blocked")
    for b in ("original_greedy", "original_top_p", "original_entropy_matched", "human")
)


def mode_differences(records, metrics=DIFFERENCE_METRICS, pairs=DIFFERENCE_PAIRS, alpha=ALPHA):
    """For every pair of modes present (the same prompts) and each metric: the difference of
    the means and its paired permutation p-value (paired_permutation_p); `significant` where
    p < alpha. Only these may be called a difference at this many prompts."""
    by_mode = {}
    for r in records:
        by_mode.setdefault(r["mode"], {})[r["prompt_id"]] = r
    rows = []
    for a, b in pairs:
        if a not in by_mode or b not in by_mode:
            continue
        prompts = sorted(set(by_mode[a]) & set(by_mode[b]))
        for key in metrics:
            x = [by_mode[a][i].get(key) for i in prompts]
            y = [by_mode[b][i].get(key) for i in prompts]
            kept = [(u, v) for u, v in zip(x, y) if u is not None and v is not None]
            if not kept:
                continue
            diff = float(np.mean([u - v for u, v in kept]))
            p = paired_permutation_p(x, y)
            rows.append(dict(a=a, b=b, metric=key, diff=diff, p=p, significant=p < alpha))
    return rows
