"""hyperfit.py unchanged under `accelerate launch` with 2 data-parallel CPU processes (gloo)."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil  # accelerate's own dependency
from conftest import TINY_COMMAND, command_line
from safetensors.torch import load_file

import hyperfit
import runfiles

ROOT = Path(__file__).resolve().parents[1]
ARGS = command_line(**dict(TINY_COMMAND, gen_tokens=16), lr=1e-2, epochs=2, eval_every=3)
ENV = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HYPERFIT_DTYPE="float32")


def launch(args, port):
    """hyperfit.py under accelerate's --multi_gpu launcher (torchrun) with 2 processes: on a
    machine without GPUs each runs on the CPU and Accelerator joins them with gloo (accelerate's
    own --cpu launcher needs mpirun)."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    launcher += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    launcher += ["--dynamo_backend", "no", "--main_process_port", str(port)]
    return launcher + [str(ROOT / "hyperfit.py"), *args]


def test_two_processes_match_one_process(tiny_model_dir, tiny_data, tmp_path):
    common = ["--model", tiny_model_dir, "--data", tiny_data, "--out-dir", str(tmp_path)] + ARGS
    # fp32 compute, forced: this test is about data parallelism, and bf16 (what an AVX512-BF16 CPU
    # picks) rounds the two all-reduce orders apart by 3.5e-3 where fp32 stays within 3.5e-5
    done = subprocess.run(
        launch(["--run-name", "two"] + common, 29533),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: ") == 1  # only the main process reports
    os.environ["HYPERFIT_DTYPE"] = "float32"
    try:
        assert hyperfit.main(["--run-name", "one"] + common) == 0
    finally:
        del os.environ["HYPERFIT_DTYPE"]

    one, two = tmp_path / "one", tmp_path / "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "one",
        "two",
    ]  # one results folder per run
    config = json.loads((two / "config.json").read_text())
    assert (
        config["processes"] == 2
        and config["micro_batch_size"] == 4
        and config["gradient_accumulation"] == 1
    )
    assert len(runfiles.read_jsonl(two / "metrics.jsonl")) == 3  # written once, by the main process
    # Same data order and global batch; only the all-reduce adds gradients in another order, so
    # float32 sums differ in the last bits and Adam (which divides by sqrt of tiny second moments)
    # carries that into the weights. Six steps at lr 1e-2 measured 3.5e-5; 1e-3 is 10% of one
    # step's largest possible move.
    a, b = (
        load_file(one / "adapter" / "adapter_model.safetensors"),
        load_file(two / "adapter" / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3
    losses = [
        (r["train_loss"], s["train_loss"])
        for r, s in zip(
            runfiles.read_jsonl(one / "metrics.jsonl"), runfiles.read_jsonl(two / "metrics.jsonl")
        )
    ][1:]
    assert all(abs(x - y) < 1e-4 for x, y in losses)


def test_global_batch_that_does_not_split_is_refused(tiny_model_dir, tiny_data, tmp_path, capsys):
    code = hyperfit.main(
        ["--model", tiny_model_dir, "--data", tiny_data, "--out-dir", str(tmp_path)]
        + ARGS
        + ["--micro-batch-size", "3"]
    )
    assert code == 2
    assert "global batch 8 cannot be split" in capsys.readouterr().err


def test_a_killed_process_is_one_line_from_the_others_and_the_run_resumes(
    tiny_model_dir, tiny_data, tmp_path
):
    """kill -9 of one process mid-run: the surviving one prints the kit's one line (not gloo's
    traceback), the checkpoint is intact, and the same launch with --resume finishes the run.
    (accelerate's launcher itself still prints torchrun's failure summary: not the kit's.)"""
    common = ["--model", tiny_model_dir, "--data", tiny_data, "--out-dir", str(tmp_path)]
    common += ["--run-name", "k", *command_line(**TINY_COMMAND, lr=1e-2, eval_every=30)]
    running = subprocess.Popen(
        launch([*common, "--epochs", "300"], 29534),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    steps, deadline = tmp_path / "k" / "steps.jsonl", time.time() + 300
    while time.time() < deadline and len(runfiles.read_jsonl(steps)) < 32:  # past the save at 30
        time.sleep(0.2)
    processes = psutil.Process(running.pid).children(recursive=True)
    next(p for p in processes if p.environ().get("LOCAL_RANK") == "1").kill()
    err = running.communicate(timeout=300)[1]
    assert running.returncode != 0
    stopped = r"hyperfit.py: another process of this run stopped \(Connection \w+ by peer\); "
    assert re.search(stopped + "launch it again with --resume", err), err[-3000:]
    assert "[rank0]: Traceback" not in err and "pair.cc" not in err  # gloo's, before
    resumed = subprocess.run(
        launch([*common, "--epochs", "11", "--resume"], 29535),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in runfiles.read_jsonl(steps)] == list(range(1, 34))
