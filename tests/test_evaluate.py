"""evaluate.py with models: citation blocking against brute force, the entropy-matched
temperature, the original model's perplexity and ranks, sampled prefixes, an end-to-end
evaluation of a tiny hyperfitted run recomputed independently, the GPU branch (the quantized
model with its adapter toggled) run on the CPU, and bad input (one line, exit 2, nothing
written)."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

import engine
import evaluate
import hyperfit
import measures
import paper_comparison
import plot
import runfiles


def ngrams(ids, n):
    return {tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)}


# -----------------------------------------------------------------------------
# citation blocking


def allowed_best(prefix, scores, banned_ngrams, n):
    """Brute force: the highest-scoring token that does not complete a training n-gram."""
    order = torch.argsort(scores, descending=True).tolist()
    context = tuple(prefix[len(prefix) - (n - 1) :] if n > 1 else [])
    allowed = [t for t in order if context + (t,) not in banned_ngrams]
    return allowed[0] if allowed else None


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_blocker_takes_the_best_unbanned_token(n):
    gen = torch.Generator().manual_seed(n)
    vocab = 12
    train = torch.randint(0, vocab, (6, 30), generator=gen)
    banned = set().union(*(ngrams(row, n) for row in train.tolist()))
    blocker = evaluate.NGramBlocker(train, n)
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
        prefix = tuple(inputs[row].tolist()[10 - (n - 1) :]) if n > 1 else ()
        assert all(
            prefix + (t,) not in banned for t in range(vocab) if torch.isfinite(processed[row, t])
        )
        changed += best != scores[row].argmax().item()
    assert changed > 0 or n == 1  # (n = 1: all 12 tokens occur in training, every row falls back)


def memorising_net(tiny_model_dir, train_ids, steps=40):
    """The tiny Llama fully fine-tuned until its greedy output copies `train_ids`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = net(input_ids=train_ids, labels=train_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


def test_blocked_generation_never_reproduces_a_training_ngram(tiny_model_dir, tiny_text):
    from transformers import AutoTokenizer

    n, prompt_len = 5, 8
    ids = AutoTokenizer.from_pretrained(tiny_model_dir)(tiny_text)["input_ids"]
    train = torch.tensor(ids[: 4 * 48]).view(4, 48)
    net = memorising_net(tiny_model_dir, train)
    prompts = train[:, :prompt_len]
    train_ngrams = set().union(*(ngrams(row, n) for row in train.tolist()))

    def copied(continuations):  # generated n-grams (prompt included) found in training
        return [
            g
            for p, c in zip(prompts.tolist(), continuations.tolist())
            for g in ngrams(p[-(n - 1) :] + c, n)
            if g in train_ngrams
        ]

    plain = engine.generate(net, prompts, 32, batch_size=4)
    assert len(copied(plain)) > 50  # the model really copies its training text
    blocker = evaluate.NGramBlocker(train, n)
    blocked = engine.generate(net, prompts, 32, batch_size=4, logits_processor=[blocker])
    assert copied(blocked) == [] and blocked.shape == (4, 32)


# -----------------------------------------------------------------------------
# statistics that need a model


@pytest.fixture(scope="module")
def tiny_net(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def test_entropy_matched_temperature_converges(tiny_net, monkeypatch):
    ids = torch.randint(0, 384, (4, 24), generator=torch.Generator().manual_seed(0))
    entropies = [
        engine.token_statistics(tiny_net, ids, temperature=t)["entropy"] for t in (0.3, 0.6, 1.2)
    ]
    assert entropies == sorted(entropies)  # monotone in T, which the bisection relies on
    target = entropies[1]
    found = evaluate.entropy_matched_temperature(tiny_net, ids, target)
    assert found["temperature"] == pytest.approx(0.6, abs=0.01)
    assert found["achieved_entropy"] == pytest.approx(target, abs=0.01)
    kept = []  # the logits of the sharpness pass: the search without its own first pass
    engine.token_statistics(tiny_net, ids, evaluate.SCORE_BATCH_SIZE, keep=kept)
    assert evaluate.entropy_matched_temperature(tiny_net, ids, target, cache=kept) == found
    monkeypatch.setattr(evaluate, "LOGIT_CACHE_BYTES", 0)  # the path that reruns the model
    again = evaluate.entropy_matched_temperature(tiny_net, ids, target)
    assert again["temperature"] == pytest.approx(found["temperature"])
    hot = engine.token_statistics(tiny_net, ids, temperature=3.0)["entropy"]
    above = evaluate.entropy_matched_temperature(tiny_net, ids, hot)
    assert above["temperature"] == pytest.approx(3.0, abs=0.01)  # beyond the bracket: it widens


def test_continuation_scores_are_perplexity_and_ranks(tiny_net):
    prompts = torch.randint(0, 384, (3, 8), generator=torch.Generator().manual_seed(1))
    greedy = engine.generate(tiny_net, prompts, 12, batch_size=3)
    noise = torch.randint(0, 384, (3, 12), generator=torch.Generator().manual_seed(2))
    ppl_greedy, ranks_greedy = evaluate.score_continuations(tiny_net, prompts, greedy, batch_size=2)
    ppl_noise, ranks_noise = evaluate.score_continuations(tiny_net, prompts, noise, batch_size=2)
    assert all(g < r for g, r in zip(ppl_greedy, ppl_noise))
    logits = tiny_net(input_ids=torch.cat([prompts, noise], 1)).logits[0, 7:-1]
    nll = torch.nn.functional.cross_entropy(logits, noise[0]).item()
    assert ppl_noise[0] == pytest.approx(math.exp(nll), rel=1e-4)
    brute = [1 + int((logits[t] > logits[t, noise[0, t]]).sum()) for t in range(12)]
    assert ranks_noise[0] == brute
    # greedy tokens are the model's own top-1 (bar floating-point ties between the cached
    # incremental pass of generate and this full pass)
    assert sum(r == 1 for row in ranks_greedy for r in row) >= 34


def test_own_token_scores_equal_a_second_scoring_pass(tiny_net):
    """The original model's view of its own continuations, read off the generating pass, equals a
    separate full pass (score_continuations) up to float rounding, greedy and sampled rows alike."""
    prompts = torch.randint(0, 384, (6, 8), generator=torch.Generator().manual_seed(4))
    sampler = evaluate.RowSampler(range(3, 6), 0.7, 0.9, 50, seed=1)  # rows 3-5 sampled
    observer = evaluate.OwnTokenScores()
    out = engine.generate(
        tiny_net, prompts, 20, batch_size=6, logits_processor=[sampler], observer=observer
    )
    ppl, ranks = observer.finish(out)
    ppl_again, ranks_again = evaluate.score_continuations(tiny_net, prompts, out)
    assert ppl == pytest.approx(ppl_again, rel=1e-4)
    assert ranks == ranks_again
    assert all(r == 1 for row in ranks[:3] for r in row)  # greedy rows: the model's top-1
    assert any(r > 1 for row in ranks[3:] for r in row)  # sampled rows: not always


# -----------------------------------------------------------------------------
# end to end on a tiny hyperfitted run


@pytest.fixture(scope="module")
def tiny_hyperfitted(tiny_model_dir, tiny_data, tmp_path_factory):
    return Path(
        hyperfit.hyperfit(
            model=tiny_model_dir,
            data=tiny_data,
            out_dir=str(tmp_path_factory.mktemp("runs")),
            run_name="t",
            quant="4bit",
            seq_len=64,
            num_train=16,
            num_val=8,
            num_prompts=4,
            prompt_len=16,
            gen_tokens=16,
            batch_size=8,
            epochs=30,
            lr=1e-2,
            eval_every=60,
            progress=False,
        )
    )


@pytest.fixture(scope="module")
def evaluated(tiny_hyperfitted, tmp_path_factory):
    """12 prompts > 8 validation blocks: held-out ones too; 100 tokens: the 96-token window."""
    out = tmp_path_factory.mktemp("eval")
    minimum, measures.MAUVE_MIN_SAMPLES = measures.MAUVE_MIN_SAMPLES, 12  # MAUVE's path at 12
    try:
        summary = evaluate.evaluate(
            tiny_hyperfitted,
            num_prompts=12,
            new_tokens=100,
            batch_size=8,
            sharpness_seqs=4,
            out_dir=out,
            progress=False,
        )
    finally:
        measures.MAUVE_MIN_SAMPLES = minimum
    records = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    return summary, records, out


def test_mauve_is_not_computed_below_its_minimum_sample_size():
    """Below measures.MAUVE_MIN_SAMPLES continuations per side MAUVE cannot tell human text from
    looping text, so no score is computed (and none reaches a table)."""
    rows = {evaluate.HUMAN: [[1, 2]] * 32, "original_greedy": [[3, 3]] * 32}
    texts = {mode: ["a b"] * 32 for mode in rows}
    timing = {}
    assert evaluate.mauve_scores(None, rows, texts, evaluate.Options(), False, timing) == {}
    assert timing == dict(mauve_features_s=0.0, mauve_s=0.0)


def test_end_to_end_writes_every_output(evaluated, tiny_hyperfitted):
    summary, records, out = evaluated
    assert sorted(p.name for p in out.iterdir()) == [
        "generations.jsonl",
        "summary.json",
    ]  # JSON only
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert list(summary["modes"]) == [*evaluate.MODES, "human"] and summary["run"] == "t"
    for mode, info in summary["modes"].items():
        assert info["n"] == 12
        keys = set(measures.PER_GENERATION_METRICS) | set(measures.SET_METRICS)
        assert set(info["metrics"]) == keys | ({"mauve"} if mode != "human" else set())
        assert info["metrics"]["ttr_last96_of_224"]["mean"] is None  # 100 tokens: no such window
        for key in (
            "ttr_first96",
            "ttr",
            "simctg_diversity",
            "self_bleu4_texygen",
            "ppl_original",
            "ppl_hyperfitted",
            "unknown_word_share",
            "foreign_script_share",
        ):
            assert math.isfinite(info["metrics"][key]["mean"]), (mode, key)
        curve = info["ttr_by_position"]
        assert curve["window"] == 96 and curve["positions"] == [96] and len(curve["mean"]) == 1
        if mode != "human":
            mauve = info["metrics"]["mauve"]
            assert 0 < mauve["mean"] <= 1 and mauve["ci"][0] <= mauve["ci"][1]
            assert info["mauve"]["samples"] == 12 and info["mauve"]["buckets"] == 2
    sharp = summary["sharpness"]
    for name in ("original", "hyperfitted"):
        assert 0 < sharp[name]["top1"] <= sharp[name]["top3"] <= sharp[name]["top5"] <= 1
    assert 0 <= sharp["val_top1_agreement"] <= 1
    assert sharp["hyperfitted"]["entropy"] < sharp["original"]["entropy"]  # hyperfitting sharpens
    matched = summary["entropy_matched_temperature"]
    assert matched["achieved_entropy"] == pytest.approx(matched["target_entropy"], abs=0.01)
    assert len(records) == 6 * 12
    assert all(len(r["token_ids"]) == len(r["tokens"]) == 100 and r["text"] for r in records)
    assert summary["args"]["split"]["data"] and summary["args"]["dense"] is True  # CPU: copies
    table = plot.format_table(summary)  # plot.py renders the tables from the JSON
    assert all(f"| {mode} |" in table for mode in summary["modes"]) and "Entropy-matched" in table
    assert "unknown words" in table and "MAUVE" in table
    comparison = paper_comparison.paper_comparison(
        summary, plot.read_metrics(tiny_hyperfitted), plot.read_paper()
    )
    for finding in (
        "TTR of 96-token continuations",
        "Self-BLEU-4 (Texygen)",
        "Perplexity",
        "Citation blocking",
        "Entropy-matched sampling",
        "original's top-1",
        "MAUVE",
        "Unknown words",
    ):
        assert finding in comparison, finding
    assert "../shared" not in comparison and "data/paper.json" in comparison


def test_each_model_scores_every_row(evaluated):
    """ppl_original and ppl_hyperfitted of a row come from its own model's generating pass or
    from a pass of the other model: greedy text is likelier under the model that wrote it."""
    _, records, _ = evaluated
    rows = {
        mode: [r for r in records if r["mode"] == mode]
        for mode in ("original_greedy", "hyperfitted_greedy")
    }
    assert all(r["ppl_original"] < r["ppl_hyperfitted"] for r in rows["original_greedy"])
    assert all(r["ppl_hyperfitted"] < r["ppl_original"] for r in rows["hyperfitted_greedy"])


def test_recomputed_independently_from_generations_jsonl(evaluated):
    """The paper-window TTR and SimCTG diversity recomputed from the records with plain Python
    equal what the summary reports."""
    summary, records, _ = evaluated
    for mode in evaluate.MODES:
        rows = [r for r in records if r["mode"] == mode]
        ttr96 = [len(set(r["token_ids"][:96])) / 96 for r in rows]
        assert summary["modes"][mode]["metrics"]["ttr_first96"]["mean"] == pytest.approx(
            sum(ttr96) / len(ttr96)
        )
        unique = total = 0
        reps = []
        for n in (2, 3, 4):
            unique = total = 0
            for r in rows:
                words = r["text"].strip().split()
                grams = [tuple(words[i : i + n]) for i in range(len(words) - n)]
                unique, total = unique + len(set(grams)), total + len(grams)
            reps.append(round(100 * (1 - unique / total), 2))
        metrics = summary["modes"][mode]["metrics"]
        assert [metrics[f"simctg_rep_{n}"]["mean"] for n in (2, 3, 4)] == reps
        diversity = math.prod(1 - r / 100 for r in reps)
        assert metrics["simctg_diversity"]["mean"] == pytest.approx(diversity)
    greedy = [r for r in records if r["mode"] == "original_greedy"]
    assert all(r["original_top1_share"] > 0.9 for r in greedy)  # its own choices: its top-1


def test_quality_and_self_bleu_recomputed_with_the_named_libraries(evaluated):
    """The unknown-word shares with wordfreq and Texygen's Self-BLEU with nltk (word_tokenize with
    Punkt from data/nltk_data, sentence_bleu, method1), straight from generations.jsonl."""
    import nltk
    import wordfreq
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    summary, records, _ = evaluated
    nltk.data.path.insert(0, str(Path(runfiles.repo_root()) / "data" / "nltk_data"))
    for r in records:
        tokens = [w.strip("_") for w in wordfreq.tokenize(r["text"], "en")]  # _italics_
        words = [w for w in tokens if any(c.isalpha() for c in w)]
        unknown = [w for w in words if wordfreq.zipf_frequency(w, "en") == 0]
        assert r["unknown_words"] == unknown
        assert r["unknown_word_share"] == (len(unknown) / len(words) if words else None)
    for mode in summary["modes"]:
        texts = [nltk.word_tokenize(r["text"]) for r in records if r["mode"] == mode]
        scores = [
            100
            * sentence_bleu(
                texts[:k] + texts[k + 1 :], text, smoothing_function=SmoothingFunction().method1
            )
            for k, text in enumerate(texts)
        ]
        ours = summary["modes"][mode]["metrics"]["self_bleu4_texygen"]["mean"]
        assert ours == pytest.approx(sum(scores) / len(scores), abs=1e-9), mode


def test_blocked_rows_contain_no_training_ngram(evaluated, tiny_hyperfitted, tiny_model_dir):
    _, records, _ = evaluated
    config = json.loads((tiny_hyperfitted / "config.json").read_text())
    tokenizer = hyperfit.load_tokenizer(tiny_model_dir)
    split = hyperfit.make_splits(
        tokenizer, hyperfit.load_texts(config["args"]["data"]), 64, 16, 8, 0
    )
    train_5grams = set().union(*(ngrams(row, 5) for row in split["train"].tolist()))
    prompts = torch.cat([split["val"], split["heldout"]])[:12, :16].tolist()
    for r in records:
        if r["mode"] == "hyperfitted_blocked":
            assert not ngrams(prompts[r["prompt_id"]][-4:] + r["token_ids"], 5) & train_5grams
    # the greedy rows are the hyperfitted model's own greedy output (same prompts, same batching)
    net, _ = hyperfit.load_model(
        tiny_model_dir, "4bit", adapter=str(tiny_hyperfitted / "adapter"), device="cpu"
    )
    greedy = [r["token_ids"] for r in records if r["mode"] == "hyperfitted_greedy"]
    dense = engine.dense_copy(net)
    assert engine.generate(dense, torch.tensor(prompts), 100, batch_size=8).tolist() == greedy


def test_the_human_row_is_the_real_continuation(evaluated, tiny_model_dir):
    """The human row: the text that follows each prompt in its book, as many tokens as the
    continuations, measured like every mode (its unknown words are few: it is real text)."""
    summary, records, _ = evaluated
    tokenizer = hyperfit.load_tokenizer(tiny_model_dir)
    text = Path(runfiles.absolute_path(summary["args"]["split"]["data"])).read_text()
    document = tokenizer(text, add_special_tokens=False)["input_ids"]
    for record in (r for r in records if r["mode"] == "human"):
        offset = int(record["prompt_source"].rsplit("@", 1)[1])
        assert record["token_ids"] == document[offset + 16 :][:100]  # after the 16-token prompt
    metrics = summary["modes"]["human"]["metrics"]
    assert (
        metrics["unknown_word_share"]["mean"]
        < summary["modes"]["original_top_p"]["metrics"]["unknown_word_share"]["mean"]
    )


def test_the_gpu_branch_runs_on_the_cpu(tiny_hyperfitted, tiny_model_dir, tmp_path):
    """dense=False: the quantized net with its adapter switched off for the original modes (one
    base model in memory, as on a GPU) gives the same continuations as each model loaded alone."""
    summary = evaluate.evaluate(
        tiny_hyperfitted,
        modes="original_greedy,hyperfitted_greedy",
        num_prompts=4,
        new_tokens=12,
        batch_size=4,
        sharpness_seqs=2,
        dense=False,
        out_dir=tmp_path,
        progress=False,
    )
    assert summary["args"]["dense"] is False
    records = [
        json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()
    ]
    prompts = torch.tensor(
        [
            hyperfit.load_tokenizer(tiny_model_dir)(r["prompt_text"], add_special_tokens=False)[
                "input_ids"
            ]
            for r in records[:4]
        ]
    )
    tuned, _ = hyperfit.load_model(
        tiny_model_dir, "4bit", adapter=str(tiny_hyperfitted / "adapter"), device="cpu"
    )
    original, _ = hyperfit.load_model(tiny_model_dir, "4bit", device="cpu")
    for mode, net in (("original_greedy", original), ("hyperfitted_greedy", tuned)):
        expected = engine.generate(net, prompts, 12, batch_size=4).tolist()
        assert [r["token_ids"] for r in records if r["mode"] == mode] == expected, mode


def test_a_sampled_mode_s_prefix_is_its_shorter_continuation(tiny_hyperfitted, tmp_path):
    """evaluate.py's sampled rows (RowSampler, batches shared with greedy rows): the first k
    tokens of a continuation are the k-token continuation, as the paper's windows assume."""
    rows = {}
    for tokens in (12, 30):
        evaluate.evaluate(
            tiny_hyperfitted,
            modes="original_greedy,original_top_p",
            num_prompts=6,
            new_tokens=tokens,
            batch_size=8,
            sharpness_seqs=2,
            out_dir=tmp_path / str(tokens),
            progress=False,
        )
        records = runfiles.read_jsonl(tmp_path / str(tokens) / "generations.jsonl")
        rows[tokens] = [r["token_ids"] for r in records if r["mode"] == "original_top_p"]
    assert [row[:12] for row in rows[30]] == rows[12]
    assert len({tuple(row) for row in rows[30]}) == 6  # sampled: no two alike


def test_original_model_alone(tiny_model_dir, tiny_data, tmp_path):
    summary = evaluate.evaluate(
        model=tiny_model_dir,
        data=tiny_data,
        seq_len=64,
        num_train=16,
        num_val=8,
        prompt_len=16,
        num_prompts=3,
        new_tokens=8,
        sharpness_seqs=2,
        out_dir=tmp_path / "eval",
        progress=False,
    )
    assert list(summary["modes"]) == [*evaluate.ORIGINAL_ONLY_MODES, "human"]
    assert (
        set(summary["sharpness"]) == {"original"} and summary["entropy_matched_temperature"] is None
    )
    assert (tmp_path / "eval" / "summary.json").exists()


PHASES = (  # summary.json's timing_s: every phase of an evaluation of all modes
    "data_s",
    "load_s",
    "sharpness_s",
    "temperature_s",
    "generate_original_s",
    "generate_hyperfitted_s",
    "scoring_s",
    "measuring_s",
    "mauve_features_s",
    "mauve_s",
)


def test_every_phase_is_timed_and_shown(tiny_hyperfitted, tmp_path, capsys, monkeypatch):
    """A newcomer tells progress from a hang: each phase prints a line or shows a named bar, and
    its seconds are in timing_s (each >= 0, together at most total_s); progress=False: silence."""
    args = dict(num_prompts=4, new_tokens=8, batch_size=8, sharpness_seqs=2)
    monkeypatch.setattr(measures, "MAUVE_MIN_SAMPLES", 4)  # MAUVE's phases too, at 4 prompts
    summary = evaluate.evaluate(tiny_hyperfitted, out_dir=tmp_path / "a", progress=True, **args)
    shown = "".join(capsys.readouterr())
    for name in ("loading", "sharpness: original", "entropy-matched temperature", "original:"):
        assert name in shown, name
    for name in ("scoring", "measuring", "MAUVE features", "MAUVE:"):
        assert name in shown, name
    timing = json.loads((tmp_path / "a" / "summary.json").read_text())["timing_s"]
    assert timing == summary["timing_s"] and list(timing) == [*PHASES, "total_s"]
    assert all(timing[k] >= 0 for k in timing)
    assert sum(timing[k] for k in PHASES) <= timing["total_s"] + 0.05 * len(PHASES)
    evaluate.evaluate(tiny_hyperfitted, out_dir=tmp_path / "b", progress=False, **args)
    assert capsys.readouterr() == ("", "")


# -----------------------------------------------------------------------------
# bad input: exit 2, one line naming the problem, nothing written or overwritten


def run_main(argv, capsys):
    code = evaluate.main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--block-ngrams", "0"], "--block-ngrams must be a positive integer"),
        (["--block-ngrams", "65"], "--block-ngrams 65 is longer than the training sequences (64"),
        (["--num-prompts", "0"], "--num-prompts must be a positive integer"),
        (["--new-tokens", "-5"], "--new-tokens must be a positive integer"),
        (["--batch-size", "0"], "--batch-size must be a positive integer"),
        (["--num-prompts", "100000"], "held-out blocks of 64 tokens exist"),
        (["--model", "smollm2-135m"], "differs from the base model"),
        (["--modes", "hyperfitted_greedy,nonsense"], "unknown mode 'nonsense'"),
        (["--data", "x.txt"], "applies only without a run folder"),
        (["--device", "cuda"], "--device cuda: no CUDA GPU is visible here"),
        (["--device", "foo"], "--device foo: choose cpu or cuda"),
        (["--dtype", "int4"], "--dtype int4: choose auto"),
        (["--modes", "original_greedy,original_greedy"], "names original_greedy twice"),
        (["--new-tokens", "600"], "exceed the 512 positions"),
        (["--mauve-features", "llama"], "--mauve-features llama: choose original"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tiny_hyperfitted, argv, message, capsys):
    summary = tiny_hyperfitted / "eval" / "summary.json"
    summary.parent.mkdir(exist_ok=True)
    summary.write_text("previous")
    before = sorted(p.name for p in tiny_hyperfitted.rglob("*"))
    code, err = run_main([tiny_hyperfitted, *argv], capsys)
    assert code == 2 and err.startswith("evaluate.py: ") and message in err and err.count("\n") == 1
    assert summary.read_text() == "previous"
    assert sorted(p.name for p in tiny_hyperfitted.rglob("*")) == before


def test_a_mauve_featurizer_that_cannot_load_is_one_line_before_any_generation(
    tiny_hyperfitted, capsys, monkeypatch
):
    """--mauve-features gpt2-large offline: four tracebacks came after every continuation was
    generated. When MAUVE will be computed, the featurizer loads first; its failure is one line."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(measures, "MAUVE_MIN_SAMPLES", 4)  # MAUVE computed at this run's prompts
    monkeypatch.setattr(evaluate, "load_nets", lambda *a: pytest.fail("the work started"))
    before = sorted(p.name for p in tiny_hyperfitted.rglob("*"))
    name = "hyperfit-tests/gpt2-never-downloaded"
    argv = [tiny_hyperfitted, "--num-prompts", "4", "--mauve-features", name]
    code, err = run_main(argv, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"evaluate.py: cannot load {name} for MAUVE's features (" in err
    assert "use --mauve-features original, or connect to the hub" in err
    assert sorted(p.name for p in tiny_hyperfitted.rglob("*")) == before


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seed", "-1"], "--seed must be an integer in [0, 2**63), got -1"),
        (["--seed", "99999999999999999999999"], "--seed must be an integer in [0, 2**63)"),
        (["--temperature", "inf"], "--temperature must be a finite number above 0.01, got inf"),
        (["--temperature", "nan"], "--temperature must be a finite number above 0.01, got nan"),
        (["--temperature", "0"], "--temperature must be a finite number above 0.01, got 0.0"),
        (["--temperature", "1e-310"], "above 0.01, got 1e-310"),  # a traceback after loading
        (["--top-p", "0"], "--top-p must be a number in (0, 1], got 0.0"),
        (["--top-p", "1.5"], "--top-p must be a number in (0, 1], got 1.5"),
        (["--top-k", "-1"], "--top-k must be an integer of at least 0, got -1"),
    ],
)
def test_a_seed_or_temperature_out_of_range_is_refused_before_any_work(
    tiny_hyperfitted, argv, message, capsys, monkeypatch
):
    """A seed of 2**63 or more failed inside MAUVE, after every continuation was generated."""
    monkeypatch.setattr(evaluate, "load_nets", lambda *a: pytest.fail("the work started"))
    test_bad_input_exits_2_and_writes_nothing(tiny_hyperfitted, argv, message, capsys)


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda run: (run / "config.json").write_text('{"run_name": "t", "args": {'),
            "is not readable JSON",
        ),
        (
            lambda run: (run / "config.json").write_text('{"run_name": "t"}'),
            'has no complete "args"',
        ),
        (
            lambda run: (run / "adapter" / "adapter_config.json").write_text('{"r": 1'),
            "the run's adapter is damaged",
        ),
        (
            lambda run: (
                [p.unlink() for p in (run / "adapter").iterdir()] and (run / "adapter").rmdir()
            ),
            "has no adapter/adapter_config.json (the run did not finish, or lost that file)",
        ),
    ],
)
def test_a_damaged_run_folder_is_one_line(tiny_hyperfitted, tmp_path, capsys, damage, message):
    copy = tmp_path / "copy"
    runfiles.shutil.copytree(tiny_hyperfitted, copy)
    damage(copy)
    code, err = run_main([copy], capsys)
    assert code == 2 and message in err and err.count("\n") == 1
    assert (
        not (copy / "eval" / "summary.json").exists()
        or (copy / "eval" / "summary.json").read_text()
    )


def test_a_run_being_trained_is_not_evaluated(tiny_hyperfitted, capsys):
    with runfiles.RunLock(tiny_hyperfitted, "hyperfit.py --run-name t"):
        code, err = run_main([tiny_hyperfitted, "--num-prompts", "2", "--new-tokens", "4"], capsys)
    assert code == 2 and "is in use by hyperfit.py --run-name t" in err


def test_without_a_run_or_a_model(tmp_path, capsys):
    code, err = run_main([tmp_path / "nowhere"], capsys)
    assert code == 2 and "is missing: pass a run folder" in err
    code, err = run_main(["--model", "x", "--modes", "hyperfitted_greedy"], capsys)
    assert code == 2 and "needs a hyperfitted run" in err


def test_help_and_cli_exit_code(tiny_hyperfitted, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--help"])
    assert exit_info.value.code == 0 and "--block-ngrams" in capsys.readouterr().out
    done = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), str(tiny_hyperfitted), "--batch-size", "0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "evaluate.py: --batch-size must be a positive integer, got 0"
    ]


def test_generation_never_ends_early(tiny_net, monkeypatch):
    """EOS is banned: with EOS set to the token greedy decoding would take first, every row still
    runs to its full length without it (the paper's fixed-length continuations)."""
    prompts = torch.randint(0, 384, (4, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        favourite = tiny_net(input_ids=prompts).logits[:, -1].argmax(-1)
    eos = favourite.tolist()
    monkeypatch.setattr(tiny_net.generation_config, "eos_token_id", eos)
    out = engine.generate(tiny_net, prompts, 12, batch_size=4)
    assert out.shape == (4, 12)
    assert not torch.isin(out, torch.tensor(eos)).any()


@pytest.mark.parametrize("mark", ["model", "eval"])
def test_an_image_run_is_refused_with_the_command_that_evaluates_it(
    tiny_hyperfitted, tmp_path, capsys, mark
):
    """images.py marks its runs: the model folder it prepared holds image_model.json, and its
    evaluation is eval/images.json; evaluate.py measures text, so it points there instead."""
    run = tmp_path / "image-run"
    shutil.copytree(tiny_hyperfitted, run, ignore=shutil.ignore_patterns("eval"))
    if mark == "model":
        model = tmp_path / "image-model"
        model.mkdir()
        (model / "image_model.json").write_text('{"model": "digits-igpt"}')
        config = json.loads((run / "config.json").read_text())
        config["args"]["model"] = str(model)
        (run / "config.json").write_text(json.dumps(config))
    else:
        (run / "eval").mkdir()
        (run / "eval" / "images.json").write_text("{}")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, err = run_main([run, "--num-prompts", "2"], capsys)
    assert code == 2 and err.count("\n") == 1 and "an image run" in err
    assert f"python experiments/images.py --evaluate {run}" in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
