"""Tests for evaluate.py: every metric on hand-computed examples and against sacrebleu / brute force,
citation blocking against brute force, the entropy-matched temperature search, an end-to-end
evaluation of a tiny hyperfitted run, and bad input (exit 2, one line, nothing written). CPU only."""
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
import torch

import evaluate as ev
import hyperfit as hf

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and on a CPU shared with other jobs two OpenMP threads
    can be 10x slower (they spin waiting for each other); the setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ngrams(ids, n):
    return {tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)}


def brute_longest_span(ids, rows):
    best = 0
    for row in rows:
        for i in range(len(ids)):
            for j in range(len(row)):
                length = 0
                while i + length < len(ids) and j + length < len(row) and ids[i + length] == row[j + length]:
                    length += 1
                best = max(best, length)
    return best


def sacre(hypothesis, references):
    """sacrebleu's own sentence BLEU on token-id strings, with the smoothing evaluate.py uses."""
    as_text = lambda ids: " ".join(map(str, ids))  # noqa: E731
    return sacrebleu.sentence_bleu(as_text(hypothesis), [as_text(r) for r in references],
                                   smooth_method="floor", smooth_value=0.1, tokenize="none").score


# -----------------------------------------------------------------------------
# metrics on hand-computed examples

def test_looping_sequence():
    ids = [5, 6, 7, 8] * 6  # 24 tokens, 4 types
    assert ev.type_token_ratio(ids) == pytest.approx(4 / 24)
    assert ev.type_token_ratio(ids, last=96) == pytest.approx(4 / 24)  # shorter than 96: all of it
    assert ev.type_token_ratio(ids, last=8) == pytest.approx(4 / 8)
    assert ev.rep_n(ids, 2) == pytest.approx(1 - 4 / 23)  # 23 bigrams, 4 distinct
    assert ev.rep_n(ids, 3) == pytest.approx(1 - 4 / 22)
    assert ev.rep_n(ids, 4) == pytest.approx(1 - 4 / 21)
    assert ev.diversity(ids) == pytest.approx((4 / 23) * (4 / 22) * (4 / 21))
    assert ev.ends_in_loop(ids)
    positions, ttrs = ev.ttr_windows(ids, window=8, stride=4)
    assert positions == [8, 12, 16, 20, 24] and ttrs == pytest.approx([0.5] * 5)


def test_all_distinct_tokens():
    ids = list(range(100, 300))
    assert ev.type_token_ratio(ids) == 1.0 and ev.type_token_ratio(ids, last=96) == 1.0
    assert [ev.rep_n(ids, n) for n in (2, 3, 4)] == [0.0, 0.0, 0.0]
    assert ev.diversity(ids) == 1.0
    assert not ev.ends_in_loop(ids)
    positions, ttrs = ev.ttr_windows(ids)  # the defaults: 96-token windows every 8 tokens
    assert positions == list(range(96, 201, 8)) and ttrs == [1.0] * len(positions)
    assert ev.ttr_windows(ids[:40])[0] == [40]  # shorter than the window: one window over all of it


def test_ttr_windows_follow_a_sequence_that_starts_to_loop():
    ids = list(range(16)) + [1, 2] * 8  # 16 distinct, then a period-2 loop
    positions, ttrs = ev.ttr_windows(ids, window=16, stride=8)
    assert positions == [16, 24, 32]
    assert ttrs == pytest.approx([1.0, 10 / 16, 2 / 16])


def test_ends_in_loop_definition():
    assert ev.ends_in_loop([3] * 16) and not ev.ends_in_loop([3] * 15)      # p=1 needs 16 tokens
    assert ev.ends_in_loop([9, 9, 9] + list(range(8)) * 2)                   # p=8: two copies = 16 tokens
    assert not ev.ends_in_loop([9] + list(range(7)) * 2)                     # p=7: only 14 tokens
    sentence = list(range(100, 130))
    assert ev.ends_in_loop(list(range(50)) + sentence * 2)                   # a 30-token sentence twice
    assert not ev.ends_in_loop([1, 2, 3] * 10 + [4])                         # a loop that was broken
    long_unit = list(range(200, 270))
    assert not ev.ends_in_loop(long_unit * 2)                                # period 70 > LOOP_MAX_PERIOD
    assert ev.ends_in_loop(long_unit * 2, max_period=70)


def test_distinct_n_pools_the_set():
    seqs = [[1, 2, 3], [1, 2, 4]]
    assert ev.distinct_n(seqs, 1) == pytest.approx(4 / 6)
    assert ev.distinct_n(seqs, 2) == pytest.approx(3 / 4)  # 12, 23, 24 of 4 bigrams
    assert ev.distinct_n(seqs, 3) == pytest.approx(2 / 2)
    assert ev.rep_n([1, 2], 3) == 0.0 and ev.distinct_n([[1]], 2) == 0.0  # no n-grams at all


def test_known_bleu():
    hyp, ref = [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7]
    expected = 100 * (5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25  # clipped 1..4-gram precisions, no brevity penalty
    assert ev.self_bleu4([hyp, ref]) == pytest.approx([expected, expected])
    assert ev.dataset_bleu4(hyp, ev.TrainingIndex([ref])) == pytest.approx(expected)
    assert ev.self_bleu4([hyp, hyp, hyp]) == pytest.approx([100.0] * 3)
    assert ev.self_bleu4([hyp]) == [None]  # no other generation to compare with
    # floor smoothing: no 4-gram match -> 0.1 / 3 for the 4-gram precision (Chen & Cherry method 1)
    smoothed = 100 * (5 / 6 * 3 / 5 * 1 / 4 * (0.1 / 3)) ** 0.25
    assert ev.self_bleu4([[1, 2, 3, 9, 5, 6], [1, 2, 3, 4, 5, 6]])[0] == pytest.approx(smoothed)


def test_bleu_equals_sacrebleu_with_explicit_references():
    rng = random.Random(0)
    for trial in range(20):
        vocab = rng.choice([3, 6, 30])
        seqs = [[rng.randrange(vocab) for _ in range(rng.randint(1, 25))] for _ in range(rng.randint(2, 6))]
        self_bleu = ev.self_bleu4(seqs)
        for k, hyp in enumerate(seqs):
            assert self_bleu[k] == pytest.approx(sacre(hyp, seqs[:k] + seqs[k + 1:]), abs=1e-9), (trial, k)
        train = [[rng.randrange(vocab) for _ in range(12)] for _ in range(5)]
        index = ev.TrainingIndex(train)
        for hyp in seqs:
            assert ev.dataset_bleu4(hyp, index) == pytest.approx(sacre(hyp, train), abs=1e-9)


def test_longest_shared_span():
    train = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]
    index = ev.TrainingIndex(train)
    assert ev.longest_shared_span([0, 3, 4, 5, 6, 7, 8, 9], index) == 4  # 6 -> 7 crosses two sequences
    assert ev.longest_shared_span([0, 0, 0], index) == 0
    # random data, including spans far beyond the 11-token anchor, against brute force
    rng = np.random.RandomState(0)
    train = rng.randint(0, 6, (8, 40))  # small vocabulary: many short chance matches
    index = ev.TrainingIndex(train)
    for trial in range(12):
        ids = rng.randint(0, 6, 50)
        length, row, at, col = rng.randint(3, 35), rng.randint(8), rng.randint(0, 15), rng.randint(0, 5)
        ids[at:at + length] = train[row, col:col + length][:50 - at]
        assert ev.longest_shared_span(ids.tolist(), index) == brute_longest_span(ids.tolist(), train.tolist())


def test_metrics_are_fast_enough():
    """The guide: 300 generations x 256 tokens against 2,000 x 256 training tokens. Measured, not asserted
    tightly (the CPU is shared); 30 s is the budget for all of it."""
    import time
    rng = np.random.RandomState(1)
    train = rng.randint(0, 49152, (2000, 256))
    gens = rng.randint(0, 3000, (300, 256))
    gens[:30, 20:120] = train[:30, :100]  # some memorised
    start = time.time()
    index = ev.TrainingIndex(train)
    spans = [ev.longest_shared_span(g, index) for g in gens]
    ev.self_bleu4(gens.tolist())
    [ev.dataset_bleu4(g, index) for g in gens]
    assert max(spans) == 100 and time.time() - start < 60


# -----------------------------------------------------------------------------
# citation blocking

def allowed_best(prefix, scores, banned_ngrams, n):
    """Brute force: the highest-scoring token that does not complete a training n-gram (None if all do)."""
    order = torch.argsort(scores, descending=True).tolist()
    allowed = [t for t in order if tuple(prefix[len(prefix) - (n - 1):] if n > 1 else []) + (t,) not in banned_ngrams]
    return allowed[0] if allowed else None


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_blocker_takes_the_best_unbanned_token(n):
    gen = torch.Generator().manual_seed(n)
    vocab = 12
    train = torch.randint(0, vocab, (6, 30), generator=gen)
    banned = set().union(*(ngrams(row, n) for row in train.tolist()))
    blocker = ev.NGramBlocker(train, n)
    # inputs that end in training prefixes (so bans apply) and random ones
    inputs = torch.cat([train[:, :10], torch.randint(0, vocab, (6, 10), generator=gen)])
    scores = torch.randn(len(inputs), vocab, generator=gen)
    processed = blocker(inputs, scores.clone())
    changed = 0
    for row in range(len(inputs)):
        best = allowed_best(inputs[row].tolist(), scores[row], banned, n)
        if best is None:  # every token banned: the row is left as it was
            assert torch.equal(processed[row], scores[row])
            continue
        assert processed[row].argmax().item() == best
        prefix = tuple(inputs[row].tolist()[10 - (n - 1):]) if n > 1 else ()
        assert all(prefix + (t,) not in banned for t in range(vocab) if torch.isfinite(processed[row, t]))
        changed += best != scores[row].argmax().item()
    assert changed > 0 or n == 1  # (n = 1: all 12 tokens occur in training, so every row falls back)


def memorising_model(tiny_model_dir, train_ids, steps=40):
    """The tiny Llama fully fine-tuned until its greedy output copies `train_ids`."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(input_ids=train_ids, labels=train_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_blocked_generation_never_reproduces_a_training_ngram(tiny_model_dir, tiny_text):
    from transformers import AutoTokenizer
    n, prompt_len = 5, 8
    ids = AutoTokenizer.from_pretrained(tiny_model_dir)(tiny_text)["input_ids"]
    train = torch.tensor(ids[:4 * 48]).view(4, 48)
    model = memorising_model(tiny_model_dir, train)
    prompts = train[:, :prompt_len]
    train_ngrams = set().union(*(ngrams(row, n) for row in train.tolist()))

    def copied(continuations):  # generated n-grams (the prompt counts) found in training, brute force
        return [g for p, c in zip(prompts.tolist(), continuations.tolist())
                for g in ngrams(p[-(n - 1):] + c, n) if g in train_ngrams]

    plain = ev.generate(model, prompts, 32, batch_size=4)
    assert len(copied(plain)) > 50  # the model really copies its training text
    blocked = ev.generate(model, prompts, 32, batch_size=4, logits_processor=[ev.NGramBlocker(train, n)])
    assert copied(blocked) == []
    assert blocked.shape == (4, 32)


# -----------------------------------------------------------------------------
# models: entropy-matched temperature, continuation perplexity

@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def test_entropy_matched_temperature_converges(tiny_model, monkeypatch):
    ids = torch.randint(0, 384, (4, 24), generator=torch.Generator().manual_seed(0))
    entropies = [ev.token_statistics(tiny_model, ids, temperature=t)["entropy"] for t in (0.3, 0.6, 1.2)]
    assert entropies == sorted(entropies)  # monotone in T, which the bisection relies on
    target = entropies[1]
    found = ev.entropy_matched_temperature(tiny_model, ids, target)
    assert found["temperature"] == pytest.approx(0.6, abs=0.01)
    assert found["achieved_entropy"] == pytest.approx(target, abs=0.01) and found["target_entropy"] == target
    monkeypatch.setattr(ev, "LOGIT_CACHE_BYTES", 0)  # the path that reruns the model at every step
    assert ev.entropy_matched_temperature(tiny_model, ids, target)["temperature"] == pytest.approx(found["temperature"])
    above = ev.entropy_matched_temperature(tiny_model, ids, ev.token_statistics(tiny_model, ids, temperature=3.0)["entropy"])
    assert above["temperature"] == pytest.approx(3.0, abs=0.01)  # beyond the initial bracket: it widens


def test_continuation_perplexity(tiny_model):
    prompts = torch.randint(0, 384, (3, 8), generator=torch.Generator().manual_seed(1))
    greedy = ev.generate(tiny_model, prompts, 12, batch_size=3)
    noise = torch.randint(0, 384, (3, 12), generator=torch.Generator().manual_seed(2))
    ppl_greedy = ev.continuation_perplexity(tiny_model, prompts, greedy, batch_size=2)
    ppl_noise = ev.continuation_perplexity(tiny_model, prompts, noise, batch_size=2)
    assert all(g < r for g, r in zip(ppl_greedy, ppl_noise))
    logits = tiny_model(input_ids=torch.cat([prompts, noise], 1)).logits[0, 7:-1]
    assert ppl_noise[0] == pytest.approx(math.exp(torch.nn.functional.cross_entropy(logits, noise[0]).item()), rel=1e-4)


# -----------------------------------------------------------------------------
# end to end on a tiny hyperfitted run

@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tiny_data, tmp_path_factory):
    return Path(hf.hyperfit(model=tiny_model_dir, data=tiny_data, out_dir=str(tmp_path_factory.mktemp("runs")),
                            run_name="t", quant="4bit", seq_len=64, num_train=16, num_val=8, num_prompts=4,
                            prompt_len=16, gen_tokens=16, batch_size=8, epochs=30, lr=1e-2, eval_every=60,
                            progress=False))


def test_end_to_end(tiny_run, tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    summary = ev.evaluate(tiny_run, num_prompts=12, new_tokens=24, batch_size=8, sharpness_seqs=4,
                          out_dir=out, progress=False)  # 12 prompts > 8 validation blocks: held-out ones too
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert set(summary["modes"]) == set(ev.MODES) and summary["run"] == "t"
    for mode, info in summary["modes"].items():
        assert info["n"] == 12
        assert set(info["metrics"]) == set(ev.PER_GENERATION_METRICS) | set(ev.SET_METRICS)
        for key, value in info["metrics"].items():
            assert math.isfinite(value["mean"]), (mode, key)
            assert (value["std"] is None) == (key in ev.SET_METRICS)
        assert 0 < info["metrics"]["ttr_last96"]["mean"] <= 1 and info["metrics"]["ppl_original"]["mean"] > 1
        curve = info["ttr_by_position"]
        assert curve["window"] == 24 and curve["positions"] == [24] and len(curve["mean"]) == len(curve["std"]) == 1
    sharp = summary["sharpness"]
    for name in ("original", "hyperfitted"):
        assert set(sharp[name]) >= {"perplexity", "entropy", "top1", "top3", "top5"}
        assert 0 < sharp[name]["top1"] <= sharp[name]["top3"] <= sharp[name]["top5"] <= 1
    assert 0 <= sharp["top1_agreement"] <= 1
    assert sharp["hyperfitted"]["entropy"] < sharp["original"]["entropy"]  # hyperfitting sharpens
    matched = summary["entropy_matched_temperature"]
    assert matched["temperature"] < 1 and matched["achieved_entropy"] == pytest.approx(matched["target_entropy"], abs=0.01)

    records = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(records) == 5 * 12
    for r in records:
        assert len(r["token_ids"]) == len(r["tokens"]) == 24 and r["text"] and r["prompt_text"]
        assert r["ttr"] == ev.type_token_ratio(r["token_ids"]) and isinstance(r["ends_in_loop"], bool)
    # the blocked continuations contain no training 5-gram, prompt included (brute force on the rebuilt split)
    config = json.loads((tiny_run / "config.json").read_text())
    from transformers import AutoTokenizer
    split = hf.make_splits(AutoTokenizer.from_pretrained(tiny_model_dir), hf.load_texts(config["args"]["data"]),
                           64, 16, 8, 0)
    train_5grams = set().union(*(ngrams(row, 5) for row in split["train"].tolist()))
    prompts = torch.cat([split["val"], split["heldout"]])[:12, :16].tolist()
    for r in records:
        if r["mode"] == "hyperfitted_blocked":
            assert not ngrams(prompts[r["prompt_id"]][-4:] + r["token_ids"], 5) & train_5grams
    # the greedy rows are the hyperfitted model's own greedy output (same prompts, same batching)
    greedy = [r["token_ids"] for r in records if r["mode"] == "hyperfitted_greedy"]
    assert ev.generate(hf_dense(tiny_run), torch.tensor(prompts), 24, batch_size=8).tolist() == greedy

    table = (out / "table.md").read_text()
    assert all(f"| {mode} |" in table for mode in ev.MODES) and "Entropy-matched temperature" in table
    import matplotlib
    matplotlib.use("Agg")
    import plot
    assert plot.plot_decoding_comparison(out / "summary.json") and plot.plot_ttr_by_position(summary)


def hf_dense(run_dir):
    config = json.loads((Path(run_dir) / "config.json").read_text())
    model, _ = hf.load_model(config["args"]["model"], "4bit", adapter=str(Path(run_dir) / "adapter"), device="cpu")
    return hf.dense_copy(model)


def test_original_model_alone(tiny_model_dir, tiny_data, tmp_path):
    summary = ev.evaluate(model=tiny_model_dir, data=tiny_data, seq_len=64, num_train=16, num_val=8, prompt_len=16,
                          num_prompts=3, new_tokens=8, sharpness_seqs=2, out_dir=tmp_path / "eval", progress=False)
    assert list(summary["modes"]) == list(ev.ORIGINAL_ONLY_MODES)
    assert set(summary["sharpness"]) == {"original"} and summary["entropy_matched_temperature"] is None
    assert (tmp_path / "eval" / "table.md").exists()


# -----------------------------------------------------------------------------
# bad input: exit 2, one line naming the problem, nothing written or overwritten

def run_main(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ev.main([str(a) for a in argv])
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--block-ngrams", "0"], "--block-ngrams must be an integer of at least 1"),
    (["--num-prompts", "0"], "--num-prompts must be a positive integer"),
    (["--new-tokens", "-5"], "--new-tokens must be a positive integer"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--num-prompts", "100000"], "held-out blocks of 64 tokens exist"),
    (["--model", "smollm2-135m"], "differs from the base model"),
    (["--modes", "hyperfitted_greedy,nonsense"], "unknown mode 'nonsense'"),
    (["--data", "x.txt"], "applies only without a run folder"),
])
def test_bad_input_exits_2_and_writes_nothing(tiny_run, argv, message, capsys):
    summary = tiny_run / "eval" / "summary.json"
    summary.parent.mkdir(exist_ok=True)
    summary.write_text("previous")
    before = sorted(p.name for p in tiny_run.rglob("*"))
    code, err = run_main([tiny_run, *argv], capsys)
    assert code == 2 and err.startswith("evaluate.py: ") and message in err and err.count("\n") == 1
    assert summary.read_text() == "previous" and sorted(p.name for p in tiny_run.rglob("*")) == before


def test_run_without_adapter(tiny_run, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((tiny_run / "config.json").read_text())
    code, err = run_main([unfinished], capsys)
    assert code == 2 and "has no adapter/" in err and "--resume" in err
    assert list(unfinished.iterdir()) == [unfinished / "config.json"]
    code, err = run_main([tmp_path / "nowhere"], capsys)
    assert code == 2 and "no config.json" in err
    code, err = run_main(["--model", "x", "--modes", "hyperfitted_greedy"], capsys)
    assert code == 2 and "needs a hyperfitted run" in err


def test_help_and_cli_exit_code(tiny_run, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ev.main(["--help"])
    assert exit_info.value.code == 0 and "--block-ngrams" in capsys.readouterr().out
    result = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), str(tiny_run), "--batch-size", "0"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["evaluate.py: --batch-size must be a positive integer, got 0"]
