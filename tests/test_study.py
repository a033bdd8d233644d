"""The paper's studies (studies.py) on the tiny model: every run is an ordinary run folder,
validation and prompts are the same at every data size, a rerun skips finished runs and resumes
an interrupted one, a rerun with other settings is refused, every option of the command is
honoured, and plot.py draws the study."""

import json
import re
import shutil

import pytest
from conftest import ROOT

import hyperfit
import plot
import runfiles
import studies

TRAINING = dict(
    seq_len=64,
    num_val=8,
    num_prompts=4,
    prompt_len=16,
    gen_tokens=16,
    epochs=2,
    lr=1e-2,
    quant="4bit",
)
EVALUATION = dict(  # more prompts than validation sequences: held-out blocks prompt too
    num_prompts=12, new_tokens=100, sharpness_seqs=2, batch_size=8
)


@pytest.fixture(scope="module")
def data_size_study(tiny_model_dir, tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("studies")
    training = dict(TRAINING, model=tiny_model_dir, data=tiny_data)
    study = studies.run_study(
        "data-size", root, training, EVALUATION, sizes=[8, 16], progress=False
    )
    return root / "data-size", study


def test_one_ordinary_run_per_size(data_size_study):
    folder, study = data_size_study
    assert [row["num_train"] for row in study["rows"]] == [8, 16]
    assert [row["steps"] for row in study["rows"]] == [2, 4]  # epochs fixed: 1 and 2 steps each
    for row in study["rows"]:
        run = folder / row["run"]
        assert (run / "config.json").exists() and (run / "adapter" / "adapter_config.json").exists()
        assert (run / "eval" / "summary.json").exists() and row["wall_s"] > 0
        for key in (
            "hyperfitted_greedy.ttr_first96",
            "hyperfitted_blocked.ttr_first96",
            "hyperfitted_greedy.overlap_gt10_share_first96",
            "val_loss",
            "train_loss",
            "final_train_loss",
            "human.unknown_word_share",
        ):
            assert row[key] is not None, key
    assert json.loads((folder / "study.json").read_text())["rows"] == study["rows"]
    assert study["command"].startswith("python experiments/studies.py data-size")
    assert study["command"].endswith(f"--out-dir {folder.parent}")  # where it was, not the default


def test_validation_and_prompts_are_the_same_at_every_size(data_size_study):
    folder, _ = data_size_study
    prompts, val = [], []
    for name in ("n8", "n16"):
        records = runfiles.read_jsonl(folder / name / "eval" / "generations.jsonl")
        prompts.append(
            [
                (r["prompt_id"], r["prompt_source"])
                for r in records
                if r["mode"] == "original_greedy"
            ]
        )
        val.append(runfiles.read_jsonl(folder / name / "metrics.jsonl")[0]["val_loss"])
    assert prompts[0] == prompts[1] and len(prompts[0]) == 12
    assert val[0] == val[1]  # step 0: the original model on the same validation text


def test_a_rerun_skips_finished_runs_and_resumes_an_interrupted_one(
    data_size_study, tiny_model_dir, tiny_data
):
    folder, study = data_size_study
    finished = (folder / "n8" / "metrics.jsonl").stat().st_mtime_ns
    shutil.rmtree(folder / "n16" / "adapter")  # n16 killed after its last checkpoint ...
    shutil.rmtree(folder / "n16" / "eval")  # ... before it was evaluated
    training = dict(TRAINING, model=tiny_model_dir, data=tiny_data)
    again = studies.run_study(
        "data-size", folder.parent, training, EVALUATION, sizes=[8, 16], progress=False
    )
    assert (folder / "n8" / "metrics.jsonl").stat().st_mtime_ns == finished  # not retrained
    assert (folder / "n16" / "adapter").exists() and (
        folder / "n16" / "eval" / "summary.json"
    ).exists()
    assert [r["steps"] for r in again["rows"]] == [r["steps"] for r in study["rows"]]
    assert again["rows"][1]["train_loss"] == study["rows"][1]["train_loss"]  # resumed, not redone


def test_a_rerun_with_other_settings_is_refused(
    data_size_study, tiny_model_dir, tiny_data, tiny_bos_model_dir, tmp_path
):
    """A study never mixes runs made with another model, other data or another evaluation."""
    folder, _ = data_size_study
    before = (folder / "study.json").read_text()
    other_data = tmp_path / "other.txt"
    other_data.write_text(open(tiny_data).read()[::-1])
    for training, evaluation, message in [
        (
            dict(TRAINING, model=tiny_bos_model_dir, data=tiny_data),
            EVALUATION,
            "other training settings (model)",
        ),
        (
            dict(TRAINING, model=tiny_model_dir, data=str(other_data)),
            EVALUATION,
            "other training settings (data)",
        ),
        (
            dict(TRAINING, model=tiny_model_dir, data=tiny_data),
            dict(EVALUATION, new_tokens=50),
            "other evaluation",
        ),
    ]:
        with pytest.raises(hyperfit.UsageError, match=re.escape(message)):
            studies.run_study(
                "data-size", folder.parent, training, evaluation, sizes=[8, 16], progress=False
            )
    assert (folder / "study.json").read_text() == before
    (folder / "study.json").unlink()  # without study.json: each run's own config.json decides
    with pytest.raises(hyperfit.UsageError, match=r"n8 was trained with other settings \(model"):
        studies.run_study(
            "data-size",
            folder.parent,
            dict(TRAINING, model=tiny_bos_model_dir, data=tiny_data),
            EVALUATION,
            sizes=[8, 16],
            progress=False,
        )
    (folder / "study.json").write_text(before)


@pytest.mark.parametrize("interrupted", [False, True])
def test_a_run_evaluated_with_other_options_is_not_reused(
    data_size_study, tiny_model_dir, tiny_data, tmp_path, interrupted
):
    """A run's eval/ replaced by another evaluation (here other --num-prompts), or, with study.json
    not written yet (an interrupted study), a rerun with other evaluation options than the runs
    already evaluated: the study exited 0 with rows of two evaluations. Refused, nothing touched."""
    folder = tmp_path / "data-size"
    shutil.copytree(data_size_study[0], folder)
    training = dict(TRAINING, model=tiny_model_dir, data=tiny_data)
    evaluation = dict(EVALUATION)
    if interrupted:
        (folder / "study.json").unlink()
        evaluation["new_tokens"] = 50
    else:
        summary = json.loads((folder / "n8" / "eval" / "summary.json").read_text())
        summary["args"]["num_prompts"] = 6
        (folder / "n8" / "eval" / "summary.json").write_text(json.dumps(summary))
    before = sorted((p.relative_to(folder), p.stat().st_mtime_ns) for p in folder.rglob("*"))
    with pytest.raises(hyperfit.UsageError, match="evaluation made with other options"):
        studies.run_study(
            "data-size", tmp_path, training, evaluation, sizes=[8, 16], progress=False
        )
    assert (
        sorted((p.relative_to(folder), p.stat().st_mtime_ns) for p in folder.rglob("*")) == before
    )


def test_the_study_is_drawn(data_size_study):
    folder, _ = data_size_study
    assert (folder / "study.png").exists() and "[n16](n16/report.md)" in (
        folder / "report.md"
    ).read_text()
    for run in ("n8", "n16"):  # the links lead somewhere: each run has its own report
        assert (folder / run / "report.md").exists()
        assert (folder / run / "eval" / "decoding_comparison.png").exists()


def test_the_shuffle_study_compares_top1_predictions(tiny_model_dir, tiny_data, tmp_path):
    training = dict(TRAINING, model=tiny_model_dir, data=tiny_data, num_train=16)
    evaluation = dict(EVALUATION, modes="hyperfitted_greedy")
    study = studies.run_study(
        "shuffle", tmp_path, training, evaluation, order_seeds=[0, 1], progress=False
    )
    configs = [
        json.loads((tmp_path / "shuffle" / r["run"] / "config.json").read_text())
        for r in study["rows"]
    ]
    assert [c["args"]["order_seed"] for c in configs] == [0, 1]
    assert configs[0]["train_fingerprint"] == configs[1]["train_fingerprint"]  # the same data
    [pair] = study["comparison"]["pairs"]
    assert pair["runs"] == ["order0", "order1"] and 0 < pair["top1_differs"] < 1
    assert set(study["comparison"]["top1_agreement_with_original"]) == {"order0", "order1"}


def test_the_quality_study_chooses_a_preset(tiny_model_dir, tiny_data, tmp_path):
    """One run per (lr, size, epochs) on top of the preset; the choice follows quality_choice's
    rule, checked here against the rows it was made from; plot.py draws it."""
    training = dict(TRAINING, model=tiny_model_dir, data=tiny_data, num_train=16)
    evaluation = dict(EVALUATION, num_prompts=6)
    study = studies.run_study(
        "quality", tmp_path, training, evaluation, lrs=[1e-2], epochs=[1, 2], progress=False
    )
    assert [r["run"] for r in study["rows"]] == ["lr0.01-n16-e1", "lr0.01-n16-e2"]
    assert [r["epochs"] for r in study["rows"]] == [1, 2]
    choice, rows = study["choice"], study["rows"]
    assert choice == studies.quality_choice(rows) and choice["run"] in {r["run"] for r in rows}
    chosen = next(r for r in rows if r["run"] == choice["run"])
    twice = [
        r
        for r in rows
        if r["hyperfitted_greedy.ttr_first96"] >= 2 * r["original_greedy.ttr_first96"]
    ]
    if not twice:  # a random tiny model: nothing reaches twice the original's TTR
        assert chosen["hyperfitted_greedy.ttr_first96"] == max(
            r["hyperfitted_greedy.ttr_first96"] for r in rows
        )
    assert (tmp_path / "quality" / "study.png").exists()
    assert f"Chosen: **{choice['run']}**" in (tmp_path / "quality" / "report.md").read_text()


def test_the_frontier_runs_only_the_settings_asked_for_at_every_seed():
    plan = studies.study_plan("frontier", settings=["gentle"], order_seeds=[0, 1])
    gentle = studies.FRONTIER_RUNS["gentle"]
    assert plan == [("gentle-s0", dict(gentle, seed=0)), ("gentle-s1", dict(gentle, seed=1))]
    names = [name for name, _ in studies.study_plan("frontier")]
    assert len(names) == 3 * len(studies.FRONTIER_DEFAULT) and names[0] == "base-s0"
    committed = sorted(p.name for p in (ROOT / "results/studies/frontier").iterdir() if p.is_dir())
    assert sorted(names) == committed  # `frontier` reruns what results/studies/frontier holds


def test_quality_choice_on_hand_made_rows():
    def row(name, ttr, unknown, epochs=10):
        return {
            "run": name,
            "lr": 1e-3,
            "epochs": epochs,
            "hyperfitted_greedy.ttr_first96": ttr,
            "original_greedy.ttr_first96": 0.2,
            "hyperfitted_greedy.unknown_word_share": unknown,
            "human.unknown_word_share": 0.004,
        }

    rows = [row("a", 0.6, 0.02), row("b", 0.5, 0.003), row("c", 0.45, 0.002), row("d", 0.3, 0.0)]
    assert studies.quality_choice(rows)["run"] == "b" and studies.quality_choice(rows)["goal_met"]
    rows = [row("a", 0.6, 0.02), row("b", 0.5, 0.01), row("d", 0.3, 0.0)]
    choice = studies.quality_choice(rows)
    assert (
        choice["run"] == "b" and not choice["goal_met"] and "no run meets the goal" in choice["why"]
    )


def test_the_recorded_command_names_every_setting_not_the_studys_own():
    """study.json's command reproduces the study: a setting that differs from that study's own
    defaults is a flag (the quality study's evaluation defaults differ from the other studies')."""
    own_training, own_evaluation = studies.study_defaults("quality")
    assert studies.study_flags("quality", dict(own_training), dict(own_evaluation), {}) == []
    evaluation = dict(own_evaluation, num_prompts=64)
    flags = studies.study_flags("quality", dict(own_training, seq_len=64), evaluation, {})
    assert flags == ["--seq-len", "64", "--num-prompts", "64"]
    own_training, own_evaluation = studies.study_defaults("data_size")
    flags = studies.study_flags(
        "data_size", dict(own_training), dict(own_evaluation), {"sizes": [8]}
    )
    assert flags == ["--sizes", "8"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["data-size", "--sizes", "8,x"], "--sizes: invalid comma-separated int"),
        (["data-size", "--modes", "original_greedy"], "unrecognized arguments: --modes"),
        (["quality", "--device", "cuda"], "--device cuda: no CUDA GPU is visible here"),
        (["nonsense"], "invalid choice: 'nonsense'"),
        # the TTR of the first 96 tokens decides the quality study: it failed after every run
        (["quality", "--new-tokens", "50"], "first 96 new tokens; give --new-tokens 96 or more"),
        # the advice named --num-prompts, which studies.py cannot set for training
        (["data-size", "--num-val", "4"], "--num-val 4: each run continues its first 16 valid"),
        (["frontier", "--settings", "base,nope"], "--settings nope: choose from base, n16"),
    ],
)
def test_bad_options_are_one_line(argv, message, capsys, tmp_path):
    code = studies.main([*argv, "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())


def test_the_command_line_honours_every_option(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    """Each option reaches the runs: model, data, seq-len, num-val, seed (training) and
    num-prompts, new-tokens, device (evaluation) are in every run's config and summary."""
    monkeypatch.setattr(
        studies, "STUDY_TRAINING", dict(studies.STUDY_TRAINING, **TRAINING, num_train=16)
    )
    argv = [
        "shuffle",
        "--out-dir",
        tmp_path,
        "--model",
        tiny_model_dir,
        "--data",
        tiny_data,
        "--seq-len",
        48,
        "--num-val",
        6,
        "--seed",
        3,
        "--num-prompts",
        5,
        "--new-tokens",
        20,
        "--device",
        "cpu",
        "--order-seeds",
        "0,1",
    ]
    monkeypatch.setattr(
        studies, "STUDY_EVALUATION", dict(studies.STUDY_EVALUATION, sharpness_seqs=2)
    )
    assert studies.main([str(a) for a in argv]) == 0
    for run in ("order0", "order1"):
        args = json.loads((tmp_path / "shuffle" / run / "config.json").read_text())["args"]
        assert (args["seq_len"], args["num_val"], args["seed"]) == (48, 6, 3)
        assert args["model"] == tiny_model_dir and args["data"] == runfiles.portable_path(tiny_data)
        summary = json.loads((tmp_path / "shuffle" / run / "eval" / "summary.json").read_text())
        assert (summary["args"]["num_prompts"], summary["args"]["new_tokens"]) == (5, 20)
        assert summary["args"]["device"] == "cpu"


# -----------------------------------------------------------------------------
# a study's figure and report, from a hand-made study.json


def study_json(kind):
    rows = []
    for i, size in enumerate([8, 16, 32] if kind == "data_size" else [16, 16]):
        rows.append(
            {
                "run": f"n{size}" if kind == "data_size" else f"order{i}",
                "num_train": size,
                "order_seed": None if kind == "data_size" else i,
                "steps": size // 8 * 10,
                "train_loss": 0.5 / (i + 1),
                "val_loss": 4 + i,
                "val_entropy": 2 - 0.3 * i,
                "val_top1_prob": 0.4 + 0.1 * i,
                "wall_s": 100.0 * (i + 1),
                "hyperfitted_greedy.ttr_first96": 0.4 + 0.1 * i,
                "hyperfitted_blocked.ttr_first96": 0.35 + 0.1 * i,
                "original_greedy.ttr_first96": 0.2,
                "hyperfitted_greedy.overlap_gt10_share_first96": 0.3 / (i + 1),
                "hyperfitted_greedy.dataset_bleu4_first96": 10.0 - i,
                "hyperfitted_greedy.self_bleu4_texygen_first96": 20.0 - i,
            }
        )
    study = {
        "study": kind,
        "paper": "a claim",
        "rows": rows,
        "command": f"python experiments/studies.py {kind}",
        "training": {"model": "smollm2-135m", "seq_len": 64},
        "evaluation": {"new_tokens": 96},
    }
    if kind == "shuffle":
        study["comparison"] = {
            "pairs": [{"runs": ["order0", "order1"], "top1_differs": 0.27}],
            "top1_agreement_with_original": {"order0": 0.4, "order1": 0.41},
        }
    return study


@pytest.mark.parametrize("kind", ["data_size", "shuffle"])
def test_a_study_gets_its_figure_and_report(tmp_path, kind):
    folder = tmp_path / kind
    folder.mkdir()
    (folder / "study.json").write_text(json.dumps(study_json(kind)))
    assert studies.write_study(folder)
    assert (folder / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (folder / "report.md").read_text()
    statement = plot.read_paper()["studies"][kind]["statement"]  # the paper's, from data/paper.json
    assert "![study](study.png)" in report and statement in report
    rows = [line for line in report.splitlines() if line.startswith("| [")]
    assert len(rows) == len(study_json(kind)["rows"])
    if kind == "shuffle":
        assert "order0 vs order1: 0.270" in report
    else:
        axes = studies.plot_study(study_json(kind)).axes
        assert axes[0].get_xscale() == "log"  # data size on a log axis
        assert any(line.get_label().startswith("paper") for line in axes[0].lines)


def test_the_frontier_study_reports_each_setting_over_seeds(
    tiny_model_dir, tiny_data, tmp_path, monkeypatch
):
    """The frontier study on two tiny settings x two seeds: one ordinary run per (setting, seed),
    each row with the text measures the frontier compares (word loops, intrusions), and per
    setting the mean over seeds with a 95 % interval, the goal checks, the choice, the figure
    and the report."""
    runs = dict(a=dict(lr=1e-2, num_train=16, epochs=2), b=dict(lr=1e-2, num_train=16, epochs=4))
    monkeypatch.setattr(studies, "FRONTIER_RUNS", runs)
    monkeypatch.setattr(studies, "FRONTIER_DEFAULT", tuple(runs))  # what `frontier` runs
    training = dict(TRAINING, model=tiny_model_dir, data=tiny_data)
    evaluation = dict(EVALUATION, num_prompts=6, new_tokens=24)
    study = studies.run_study(
        "frontier", tmp_path, training, evaluation, order_seeds=[0, 1], progress=False
    )
    assert [r["run"] for r in study["rows"]] == ["a-s0", "b-s0", "a-s1", "b-s1"]
    assert {r["seed"] for r in study["rows"]} == {0, 1}
    for row in study["rows"]:
        for key in ("word_loop", "intrusion", "unknown_word_share"):
            assert 0 <= row[f"hyperfitted_greedy.{key}"] <= 1, key
        assert row["hyperfitted_greedy.ttr_first96"] is None  # 24 tokens: no 96-token window
        assert row["human.intrusion"] == 0  # the human text comes from the prompt's own book
    settings = {e["setting"]: e for e in study["settings"]}
    assert set(settings) == {"a", "b"} and settings["a"]["seeds"] == [0, 1]
    loss = settings["b"]["final_train_loss"]
    rows = [r["final_train_loss"] for r in study["rows"] if r["setting"] == "b"]
    assert loss["mean"] == pytest.approx(sum(rows) / 2) and loss["ci"][0] <= loss["mean"]
    assert study["choice"]["setting"] in settings and set(study["choice"]["goals"]) == {"a", "b"}
    folder = tmp_path / "frontier"
    report = (folder / "report.md").read_text()
    assert "| a |" in report and f"Chosen: **{study['choice']['setting']}**" in report
    assert (folder / "study.png").stat().st_size > 0
