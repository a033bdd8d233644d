"""measures.py's metrics on hand-computed cases and against the reference implementations (SimCTG's
measure_repetition_and_diversity, nltk's and sacrebleu's BLEU, brute force). CPU, no model."""

import math
import random

import numpy as np
import pytest
import sacrebleu
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

import measures


def ngrams(ids, n):
    return {tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)}


def brute_longest_span(ids, rows):
    best = 0
    for row in rows:
        for i in range(len(ids)):
            for j in range(len(row)):
                length = 0
                while (
                    i + length < len(ids)
                    and j + length < len(row)
                    and ids[i + length] == row[j + length]
                ):
                    length += 1
                best = max(best, length)
    return best


def sacre(hypothesis, references):
    """sacrebleu's own sentence BLEU on token-id strings, with the smoothing measures.py uses."""
    as_text = lambda ids: " ".join(map(str, ids))  # noqa: E731
    return sacrebleu.sentence_bleu(
        as_text(hypothesis),
        [as_text(r) for r in references],
        smooth_method="floor",
        smooth_value=0.1,
        tokenize="none",
    ).score


def simctg_reference(texts):
    """SimCTG's measure_repetition_and_diversity, written from its published definition (per-text
    unique and total n-gram counts of whitespace words, the loop stopping one n-gram before the
    end, summed over texts; rep-n in percent rounded to 2 decimals; diversity from the rounded
    values), independently of measures.simctg_repetition."""
    reps = []
    for n in (2, 3, 4):
        unique = total = 0
        for text in texts:
            words = text.strip("\n").strip().split()
            start, end, seen, count = 0, n, set(), 0
            while end < len(words):
                seen.add(" ".join(words[start:end]))
                count, start, end = count + 1, start + 1, end + 1
            unique, total = unique + len(seen), total + count
        reps.append(round((1 - unique / total) * 100, 2))
    return reps, (1 - reps[0] / 100) * (1 - reps[1] / 100) * (1 - reps[2] / 100)


# -----------------------------------------------------------------------------
# TTR in the paper's windows, and the kit's token-level variants


def test_ttr_windows_of_the_paper():
    ids = list(range(96)) + [7] * 160  # 96 distinct tokens, then one token repeated
    assert measures.ttr_of_window(ids, 1, 96) == 1.0  # the paper's table: 96-token continuations
    # the official validation: new tokens 129-224 (the last 96 of 224) are all the token 7
    assert measures.ttr_of_window(ids, 129, 224) == pytest.approx(1 / 96)
    assert measures.type_token_ratio(ids, last=96) == pytest.approx(1 / 96)  # tokens 161-256
    assert measures.ttr_of_window(ids[:200], 129, 224) is None  # shorter: no such window
    mixed = list(range(48)) + [1, 2] * 24 + list(range(100, 228))  # 224 tokens
    assert measures.ttr_of_window(mixed, 1, 96) == pytest.approx(48 / 96)  # 0..47 (1, 2 among)
    assert measures.ttr_of_window(mixed, 129, 224) == 1.0


def test_looping_sequence():
    ids = [5, 6, 7, 8] * 6  # 24 tokens, 4 types
    assert measures.type_token_ratio(ids) == pytest.approx(4 / 24)
    assert measures.type_token_ratio(ids, last=96) == pytest.approx(4 / 24)  # shorter: all of it
    assert measures.type_token_ratio(ids, last=8) == pytest.approx(4 / 8)
    assert measures.token_rep_n(ids, 2) == pytest.approx(1 - 4 / 23)  # 23 bigrams, 4 distinct
    assert measures.token_rep_n(ids, 3) == pytest.approx(1 - 4 / 22)
    assert measures.token_rep_n(ids, 4) == pytest.approx(1 - 4 / 21)
    assert measures.token_diversity(ids) == pytest.approx((4 / 23) * (4 / 22) * (4 / 21))
    assert measures.ends_in_loop(ids)
    positions, ttrs = measures.ttr_windows(ids, window=8, stride=4)
    assert positions == [8, 12, 16, 20, 24] and ttrs == pytest.approx([0.5] * 5)


def test_all_distinct_tokens():
    ids = list(range(100, 300))
    assert measures.type_token_ratio(ids) == 1.0 and measures.type_token_ratio(ids, last=96) == 1.0
    assert [measures.token_rep_n(ids, n) for n in (2, 3, 4)] == [0.0, 0.0, 0.0]
    assert measures.token_diversity(ids) == 1.0
    assert not measures.ends_in_loop(ids)
    positions, ttrs = measures.ttr_windows(ids)  # the defaults: 96-token windows every 8 tokens
    assert positions == list(range(96, 201, 8)) and ttrs == [1.0] * len(positions)
    assert measures.ttr_windows(ids[:40])[0] == [40]  # shorter than the window: one window


def test_ttr_windows_follow_a_sequence_that_starts_to_loop():
    ids = list(range(16)) + [1, 2] * 8  # 16 distinct, then a period-2 loop
    positions, ttrs = measures.ttr_windows(ids, window=16, stride=8)
    assert positions == [16, 24, 32]
    assert ttrs == pytest.approx([1.0, 10 / 16, 2 / 16])


def test_ends_in_loop_definition():
    assert measures.ends_in_loop([3] * 16) and not measures.ends_in_loop([3] * 15)  # p=1: 16 tokens
    assert measures.ends_in_loop([9, 9, 9] + list(range(8)) * 2)  # p=8: two copies = 16 tokens
    assert not measures.ends_in_loop([9] + list(range(7)) * 2)  # p=7: only 14 tokens
    sentence = list(range(100, 130))
    assert measures.ends_in_loop(list(range(50)) + sentence * 2)  # a 30-token sentence twice
    assert not measures.ends_in_loop([1, 2, 3] * 10 + [4])  # a loop that was broken
    long_unit = list(range(200, 270))
    assert not measures.ends_in_loop(long_unit * 2)  # period 70 > LOOP_MAX_PERIOD
    assert measures.ends_in_loop(long_unit * 2, max_period=70)


def test_distinct_n_pools_the_set():
    seqs = [[1, 2, 3], [1, 2, 4]]
    assert measures.distinct_n(seqs, 1) == pytest.approx(4 / 6)
    assert measures.distinct_n(seqs, 2) == pytest.approx(3 / 4)  # 12, 23, 24 of 4 bigrams
    assert measures.distinct_n(seqs, 3) == pytest.approx(2 / 2)
    assert measures.token_rep_n([1, 2], 3) == 0.0 and measures.distinct_n([[1]], 2) == 0.0


# -----------------------------------------------------------------------------
# SimCTG's repetition and diversity, exactly as its reference code


def test_simctg_on_hand_computed_texts():
    # "a b a b a": its loop stops one n-gram early, so the bigrams are ab, ba, ab (not the last
    # ba): 2 unique of 3; trigrams aba, bab: 2 of 2; 4-grams abab: 1 of 1
    texts = [
        "a b a b a",
        "  c d e f g\n",
    ]  # cdef g: bigrams cd de ef (3 of 3); trigrams 2 of 2; 1 of 1
    result = measures.simctg_repetition(texts)
    assert result["simctg_rep_2"] == round((1 - 5 / 6) * 100, 2) == 16.67
    assert result["simctg_rep_3"] == 0.0 and result["simctg_rep_4"] == 0.0
    assert result["simctg_diversity"] == pytest.approx((1 - 0.1667) * 1 * 1)
    assert measures.simctg_repetition(["one two"])["simctg_rep_2"] is None  # no bigram counted


def test_simctg_equals_its_reference_code_on_random_texts():
    rng = random.Random(0)
    for _ in range(30):
        words = [
            rng.choice("the a of cat sat on mat . ,".split()) for _ in range(rng.randint(5, 60))
        ]
        texts = [" ".join(words[i:]) for i in range(0, len(words), 17)]
        reps, diversity = simctg_reference(texts)
        result = measures.simctg_repetition(texts)
        assert [result[f"simctg_rep_{n}"] for n in (2, 3, 4)] == reps
        assert result["simctg_diversity"] == pytest.approx(diversity, abs=1e-12)


# -----------------------------------------------------------------------------
# BLEU: sacrebleu's (token ids) and nltk's (Texygen, words)


def test_known_bleu():
    hyp, ref = [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7]
    expected = 100 * (5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25  # clipped precisions, no brevity
    assert measures.self_bleu4([hyp, ref]) == pytest.approx([expected, expected])
    assert measures.dataset_bleu4(hyp, measures.TrainingIndex([ref])) == pytest.approx(expected)
    assert measures.self_bleu4([hyp, hyp, hyp]) == pytest.approx([100.0] * 3)
    assert measures.self_bleu4([hyp]) == [None]  # no other generation to compare with
    # floor smoothing: no 4-gram match -> 0.1 / 3 for the 4-gram precision (Chen & Cherry method 1)
    smoothed = 100 * (5 / 6 * 3 / 5 * 1 / 4 * (0.1 / 3)) ** 0.25
    assert measures.self_bleu4([[1, 2, 3, 9, 5, 6], [1, 2, 3, 4, 5, 6]])[0] == pytest.approx(
        smoothed
    )


def test_bleu_equals_sacrebleu_with_explicit_references():
    rng = random.Random(0)
    for trial in range(20):
        vocab = rng.choice([3, 6, 30])
        seqs = [
            [rng.randrange(vocab) for _ in range(rng.randint(1, 25))]
            for _ in range(rng.randint(2, 6))
        ]
        self_bleu = measures.self_bleu4(seqs)
        for k, hyp in enumerate(seqs):
            expected = sacre(hyp, seqs[:k] + seqs[k + 1 :])
            assert self_bleu[k] == pytest.approx(expected, abs=1e-9), (trial, k)
        train = [[rng.randrange(vocab) for _ in range(12)] for _ in range(5)]
        index = measures.TrainingIndex(train)
        for hyp in seqs:
            assert measures.dataset_bleu4(hyp, index) == pytest.approx(sacre(hyp, train), abs=1e-9)


def test_texygen_self_bleu_equals_nltk_sentence_bleu():
    """Texygen's Self-BLEU: nltk's sentence_bleu(other texts' words, text's words, method1) x 100,
    including nltk's own rules for very short texts and texts sharing no word."""
    rng = random.Random(1)
    vocabulary = "the cat sat on a mat , and dog ran . she said hello to him".split()
    method1 = SmoothingFunction().method1
    for trial in range(25):
        texts = [
            " ".join(rng.choice(vocabulary) for _ in range(rng.randint(1, 30)))
            for _ in range(rng.randint(2, 6))
        ]
        texts.append("zebra quokka")  # shares no word with any other text: 0
        words = [measures.words(t) for t in texts]
        ours = measures.self_bleu4_texygen(texts)
        for k in range(len(texts)):
            references = words[:k] + words[k + 1 :]
            expected = 100 * sentence_bleu(references, words[k], smoothing_function=method1)
            assert ours[k] == pytest.approx(expected, abs=1e-9), (trial, k, texts[k])


def test_texygen_words_are_nltks_word_tokenize_with_punkt():
    """Texygen's words: nltk.word_tokenize, which splits sentences with Punkt first, so a period
    that ends a sentence inside the text is its own word ("go", "."), as is the text's last one;
    Punkt's English parameters come from the kit's data/nltk_data (nothing downloaded)."""
    assert measures.words('She said, "Don\'t go." Then left. Mr. Yojo came.') == [
        "She",
        "said",
        ",",
        "``",
        "Do",
        "n't",
        "go",
        ".",
        "''",
        "Then",
        "left",
        ".",
        "Mr.",
        "Yojo",
        "came",
        ".",
    ]


# -----------------------------------------------------------------------------
# quality: real words, scripts, MAUVE


def test_unknown_words_on_hand_made_texts():
    """An invented word is unknown, a name from the books may be, a common word never is; numbers
    are not words; wordfreq's tokenizer lower-cases and splits at hyphens."""
    text = "The whale was meltheless, said Rokovoko's friend Ahab in 1851 - well-known."
    assert measures.text_words(text) == [
        "the",
        "whale",
        "was",
        "meltheless",
        "said",
        "rokovoko's",
        "friend",
        "ahab",
        "in",
        "well",
        "known",
    ]
    assert measures.unknown_words(text) == ["meltheless", "rokovoko's"]  # Ahab is in the list
    assert measures.unknown_word_share(text) == pytest.approx(2 / 11)
    assert measures.unknown_words("withoutValueError convincinglyArguing") == [
        "withoutvalueerror",
        "convincinglyarguing",
    ]
    assert measures.unknown_word_share("1851 ...") is None  # no words at all
    assert measures.unknown_word_share("He said that it was so.") == 0.0
    # Project Gutenberg's italics: the words inside the underscores are real words
    italics = "Tell _us_ of the _Daily Mirror_, snake_case"
    assert measures.text_words(italics) == [
        "tell",
        "us",
        "of",
        "the",
        "daily",
        "mirror",
        "snake_case",
    ]
    assert measures.unknown_words(italics) == ["snake_case"]


def test_foreign_script_letters_on_hand_made_texts():
    """Letters outside the scripts of the training text: a CJK character in English fiction is
    one, an accented Latin letter is not; punctuation and digits are no letters."""
    allowed = measures.scripts(["Natsume Sōseki wrote Botchan; the café was naïve."])
    assert allowed == {"LATIN"}
    text = "He wrote 日本 and café — 42 times."  # 2 CJK among 21 letters
    assert measures.foreign_letters(text, allowed) == ["日", "本"]
    assert measures.foreign_script_share(text, allowed) == pytest.approx(2 / 21)
    assert measures.foreign_script_share("— 42 —", allowed) is None
    assert measures.script("の") == "HIRAGANA" and measures.script("Ω") == "GREEK"


def test_mauve_equals_mauve_compute_mauve_on_the_same_features():
    """measures.mauve_score is mauve-text's compute_mauve on precomputed features (its defaults,
    the same seed), with a bootstrap interval that holds the value."""
    import mauve

    rng = np.random.RandomState(0)
    p = rng.normal(size=(40, 16)).astype(np.float32)
    q = (rng.normal(size=(40, 16)) + 0.8).astype(np.float32)
    result = measures.mauve_score(p, q, seed=3, bootstrap=20)
    direct = mauve.compute_mauve(p_features=p, q_features=q, seed=3).mauve
    assert result["mauve"] == pytest.approx(direct, abs=1e-12)
    assert result["samples"] == 40 and result["buckets"] == 4 and result["bootstrap"] == 20
    low, high = result["ci"]
    assert 0 <= low <= high <= 1
    same = measures.mauve_score(p, p, seed=3, bootstrap=0)
    assert same["mauve"] == pytest.approx(
        mauve.compute_mauve(p_features=p, q_features=p, seed=3).mauve
    )
    assert same["mauve"] > result["mauve"]  # identical sets are closer than shifted ones


# -----------------------------------------------------------------------------
# memorisation and the original model's ranks


def test_longest_shared_span():
    train = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]
    index = measures.TrainingIndex(train)
    assert measures.longest_shared_span([0, 3, 4, 5, 6, 7, 8, 9], index) == 4  # 6 -> 7 crosses
    assert measures.longest_shared_span([0, 0, 0], index) == 0
    # a match that runs to the end of the continuation: a plain int, as JSON needs
    whole = measures.longest_shared_span(
        [2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
        measures.TrainingIndex([list(range(1, 40))]),
    )
    assert whole == 12 and type(whole) is int
    rng = np.random.RandomState(0)  # random data, spans far beyond the 11-token anchor
    train = rng.randint(0, 6, (8, 40))  # small vocabulary: many short chance matches
    index = measures.TrainingIndex(train)
    for _ in range(12):
        ids = rng.randint(0, 6, 50)
        length, row, at, col = (
            rng.randint(3, 35),
            rng.randint(8),
            rng.randint(0, 15),
            rng.randint(0, 5),
        )
        ids[at : at + length] = train[row, col : col + length][: 50 - at]
        assert measures.longest_shared_span(ids.tolist(), index) == brute_longest_span(
            ids.tolist(), train.tolist()
        )


def test_override_statistics_on_hand_made_ranks():
    ranks = [[1, 1, 2, 15, 1], [1, 200, 4, 1, 7]]  # 10 tokens: 5 the original's top-1, 5 overrides
    stats = measures.override_statistics(ranks)
    assert stats["original_top1_share"] == 0.5
    assert stats["override_beyond_top10_share"] == pytest.approx(2 / 5)  # ranks 15 and 200
    assert stats["override_rank_shares"] == pytest.approx(
        {"2": 1 / 5, "3-5": 1 / 5, "6-10": 1 / 5, "11-100": 1 / 5, ">100": 1 / 5}
    )


def test_metrics_at_the_papers_scale():
    """The paper's scale: 300 generations x 256 tokens against 2,000 x 256 training tokens (the
    time it takes is the benchmark's, bench/bench.py)."""
    rng = np.random.RandomState(1)
    train = rng.randint(0, 49152, (2000, 256))
    gens = rng.randint(0, 3000, (300, 256))
    gens[:30, 20:120] = train[:30, :100]  # some memorised
    index = measures.TrainingIndex(train)
    spans = [measures.longest_shared_span(g, index) for g in gens]
    measures.self_bleu4(gens.tolist())
    [measures.dataset_bleu4(g, index) for g in gens]
    texts = [" ".join(f"w{t % 500}" for t in g) for g in gens]
    measures.self_bleu4_texygen(texts)
    measures.simctg_repetition(texts)
    assert max(spans) == 100
    assert math.isfinite(measures.self_bleu4_texygen(texts[:5])[0])


def test_a_loop_over_varying_line_breaks_is_a_word_loop_not_a_token_loop():
    """The case that escaped the token-level detector: one sentence repeated with other breaks."""
    text = "".join(
        f"Did not your mother say so?{sep}" for sep in [" ", "\n", "  ", "\n\n", " ", "\n"] * 3
    )
    assert measures.ends_in_word_loop(text)
    assert not measures.ends_in_word_loop(
        "Alice was beginning to get very tired of sitting by "
        "her sister on the bank, and of having nothing to do."
    )
    assert measures.ends_in_word_loop("the " * 12) and not measures.ends_in_word_loop("the " * 11)


def test_intruding_names_come_from_other_training_books_only():
    training = "Miss Morland smiled. Catherine Morland read. Alice ran. Alice fell. The cat sat."
    names = measures.names_of(training)
    assert names == {"morland", "alice"}  # "the", "cat": not names; each name twice, capitalised
    prompt, alice_book = "Alice was beginning to", "Alice in a hole. Alice again."
    assert measures.intruding_names("said Miss Morland to Alice.", prompt, alice_book, names) == [
        "morland"
    ]
    assert measures.intruding_names("Then Alice slept.", prompt, alice_book, names) == []


def test_bootstrap_interval_and_permutation_test_by_hand():
    assert measures.bootstrap_interval([1.0] * 10) == [1.0, 1.0]
    low, high = measures.bootstrap_interval([0.0, 1.0] * 16)
    assert low < 0.5 < high and high - low < 0.5  # a mean of 0.5 over 32 prompts, +- ~0.17
    assert measures.bootstrap_interval([None, 1.0]) is None
    a, b = [1.0] * 16, [0.0] * 16  # every prompt differs by 1: p = 1 / (1 + permutations) * ...
    assert measures.paired_permutation_p(a, b) < 0.001
    assert measures.paired_permutation_p([0.5, 0.2, 0.9, 0.1] * 8, [0.5, 0.2, 0.9, 0.1] * 8) == 1
    noise = np.random.default_rng(1).normal(size=(2, 32)).tolist()
    assert measures.paired_permutation_p(*noise) > 0.05  # two samples of the same distribution


def test_set_measure_intervals_recompute_each_measure_on_resampled_prompts():
    rng = np.random.default_rng(3)
    words = "the cat sat on a mat and then it ran off home".split()
    records = []
    for i in range(12):  # texts from looping (few distinct words) to varied
        text = " ".join(rng.choice(words[: 3 + i], size=30))
        ids = rng.integers(0, 4 + 3 * i, size=40).tolist()
        ranks = rng.integers(1, 30, size=40).tolist()
        records.append(
            dict(text=text, token_ids=ids, original_ranks=ranks, ends_in_loop=i < 4,
                 longest_train_overlap=int(rng.integers(0, 20)),
                 longest_train_overlap_first96=None if i == 0 else int(rng.integers(0, 20)))
        )  # fmt: skip
    intervals = measures.set_intervals(records, resamples=400, seed=5)
    values = measures.set_measures(records)
    draws = np.random.default_rng(5).integers(0, 12, (400, 12))
    replicates = [measures.set_measures([records[i] for i in draw]) for draw in draws]
    for key in ("simctg_rep_2", "simctg_rep_4", "simctg_diversity", "override_beyond_top10_share"):
        expected = np.percentile([r[key] for r in replicates], [2.5, 97.5])
        tolerance = 0.006 if key.startswith("simctg_rep") else 1e-3  # SimCTG rounds rep-n
        assert intervals[key] == pytest.approx(expected, abs=tolerance), key
        assert intervals[key][0] <= values[key] + tolerance <= intervals[key][1] + 2 * tolerance
    flags = [float(r["ends_in_loop"]) for r in records]
    assert intervals["loop_share"] == measures.bootstrap_interval(flags, 400, 5)
    assert measures.bootstrap_interval([None] + [1.0] * 11) == [1.0, 1.0]  # first96: None left out
    for n in (1, 2, 3):  # the delete-one jackknife, by its textbook formula
        ids = [r["token_ids"] for r in records]
        left_out = [measures.distinct_n(ids[:i] + ids[i + 1 :], n) for i in range(12)]
        se = math.sqrt(11 / 12 * sum((v - np.mean(left_out)) ** 2 for v in left_out))
        value = measures.distinct_n(ids, n)
        expected = [max(0, value - 1.96 * se), min(1, value + 1.96 * se)]  # a share: in [0, 1]
        assert intervals[f"distinct_{n}"] == pytest.approx(expected, abs=1e-3)
    # a prompt drawn twice adds no unique n-grams: resampled distinct-2 sits below its value
    assert np.median([r["distinct_2"] for r in replicates]) < values["distinct_2"]


def test_mode_differences_test_each_pair_on_the_same_prompts():
    records = [
        dict(mode=mode, prompt_id=i, ttr_first96=value + 0.01 * i, word_loop=0.0)
        for i in range(20)
        for mode, value in (("hyperfitted_greedy", 0.6), ("original_greedy", 0.2), ("human", 0.6))
    ]
    rows = measures.mode_differences(records, metrics=("ttr_first96", "word_loop"))
    found = {(r["a"], r["b"], r["metric"]): r for r in rows}
    vs_original = found[("hyperfitted_greedy", "original_greedy", "ttr_first96")]
    assert vs_original["diff"] == pytest.approx(0.4) and vs_original["significant"]
    vs_human = found[("hyperfitted_greedy", "human", "ttr_first96")]
    assert vs_human["diff"] == pytest.approx(0.0) and not vs_human["significant"]
    assert not found[("hyperfitted_greedy", "original_greedy", "word_loop")]["significant"]
    assert all(r["a"] == "hyperfitted_greedy" for r in rows)  # no blocked mode here
