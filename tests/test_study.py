"""The paper's studies (evaluate.py --study) on the tiny model: every run is an ordinary run folder,
validation and prompts are the same at every data size, a rerun skips finished runs and resumes
an interrupted one, and plot.py draws the study."""

import json
import shutil

import pytest

import evaluate
import hyperfit
import plot

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
    folder = tmp_path_factory.mktemp("studies") / "data-size"
    study = evaluate.run_study(
        "data-size",
        out_dir=folder,
        model=tiny_model_dir,
        data=tiny_data,
        sizes=[8, 16],
        training=TRAINING,
        evaluation=EVALUATION,
        progress=False,
    )
    return folder, study


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
        ):
            assert row[key] is not None, key
    assert json.loads((folder / "study.json").read_text())["rows"] == study["rows"]


def test_validation_and_prompts_are_the_same_at_every_size(data_size_study, tiny_model_dir):
    folder, _ = data_size_study
    prompts, val = [], []
    for name in ("n8", "n16"):
        records = hyperfit.read_jsonl(folder / name / "eval" / "generations.jsonl")
        prompts.append(
            [
                (r["prompt_id"], r["prompt_source"])
                for r in records
                if r["mode"] == "original_greedy"
            ]
        )
        val.append(hyperfit.read_jsonl(folder / name / "metrics.jsonl")[0]["val_loss"])
    assert prompts[0] == prompts[1] and len(prompts[0]) == 12
    assert val[0] == val[1]  # step 0: the original model on the same validation text


def test_a_rerun_skips_finished_runs_and_resumes_an_interrupted_one(
    data_size_study, tiny_model_dir, tiny_data
):
    folder, study = data_size_study
    finished = (folder / "n8" / "metrics.jsonl").stat().st_mtime_ns
    shutil.rmtree(folder / "n16" / "adapter")  # n16 killed after its last checkpoint ...
    shutil.rmtree(folder / "n16" / "eval")  # ... before it was evaluated
    again = evaluate.run_study(
        "data-size",
        out_dir=folder,
        model=tiny_model_dir,
        data=tiny_data,
        sizes=[8, 16],
        training=TRAINING,
        evaluation=EVALUATION,
        progress=False,
    )
    assert (folder / "n8" / "metrics.jsonl").stat().st_mtime_ns == finished  # not retrained
    assert (folder / "n16" / "adapter").exists() and (
        folder / "n16" / "eval" / "summary.json"
    ).exists()
    assert [r["steps"] for r in again["rows"]] == [r["steps"] for r in study["rows"]]
    assert again["rows"][1]["train_loss"] == study["rows"][1]["train_loss"]  # resumed, not redone


def test_plot_draws_the_study(data_size_study, capsys):
    folder, _ = data_size_study
    assert plot.main([str(folder)]) == 0
    assert (folder / "study.png").exists() and "[n16](n16/report.md)" in (
        folder / "report.md"
    ).read_text()
    for run in ("n8", "n16"):  # the links lead somewhere: each run has its own report
        assert (folder / run / "report.md").exists()
        assert (folder / run / "eval" / "decoding_comparison.png").exists()


def test_the_shuffle_study_compares_top1_predictions(tiny_model_dir, tiny_data, tmp_path):
    study = evaluate.run_study(
        "shuffle",
        out_dir=tmp_path / "shuffle",
        model=tiny_model_dir,
        data=tiny_data,
        order_seeds=[0, 1],
        training=dict(TRAINING, num_train=16),
        evaluation=dict(EVALUATION, modes=("hyperfitted_greedy",)),
        progress=False,
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


def test_an_unknown_study_is_one_line(capsys):
    assert evaluate.main(["--study", "data-size", "--sizes", "8,x"]) == 2
    assert "--sizes 8,x: give comma-separated integers" in capsys.readouterr().err
