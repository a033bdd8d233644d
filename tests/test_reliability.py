"""What a hostile-but-realistic user does to a run (issue "Reliability"): each case first broke the
kit; each test reproduces it. Bad input is one line on stderr, exit 2, nothing lost or
half-written; a run never touches what it does not own."""

import collections
import json
import os
import pickle
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, TINY_COMMAND, command_line, tiny_run
from test_hyperfit import (
    adapter_tensors,
    assert_close_records,
    assert_same_adapter,
    metrics_without_timings,
)

import hyperfit
import runfiles


def cli(args, capsys):
    """Run hyperfit.py's command line in-process; return (exit code, stderr lines other than the
    progress bar's)."""
    code = hyperfit.main([str(a) for a in args])
    lines = capsys.readouterr().err.splitlines()
    return code, [line for line in lines if line.strip() and "%|" not in line]


@pytest.fixture
def base_args(tiny_model_dir, tiny_data, tmp_path):
    return command_line(
        model=tiny_model_dir,
        data=tiny_data,
        out_dir=tmp_path / "results",
        **dict(TINY_COMMAND, num_train=16, epochs=1),
    )


def replace(args, flag, value):
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


def tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# ---------------------------------------------------------------- 1. --overwrite never reaches out


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "/abs/path", "~x"])
def test_a_run_name_is_one_plain_folder_name(base_args, tmp_path, capsys, name):
    results = tmp_path / "results"
    (results / "keep").mkdir(parents=True)
    (results / "keep" / "config.json").write_text('{"run_name": "keep", "args": {}}')
    code, err = cli(base_args + ["--run-name", name, "--overwrite"], capsys)
    assert code == 2 and len(err) == 1 and "one plain folder name" in err[0]
    assert tree(tmp_path / "results") == ["keep", "keep/config.json"]


def test_model_dot_gets_a_run_name_from_the_folder_not_the_out_dir(
    tiny_model_dir, base_args, monkeypatch
):
    monkeypatch.chdir(tiny_model_dir)
    assert runfiles.default_run_name(".") == os.path.basename(tiny_model_dir)


def test_a_full_fine_tune_s_model_gets_a_run_name_from_its_run(tmp_path):
    """Every full fine-tune writes model/: two of them, evaluated alone, went into one folder
    (results/model-original), the second evaluation replacing the first."""
    for run in ("full", "full2"):
        (tmp_path / run / "model").mkdir(parents=True)
        (tmp_path / run / "config.json").write_text(json.dumps(dict(run_name=run, args={})))
    names = [runfiles.default_run_name(tmp_path / run / "model") for run in ("full", "full2")]
    assert names == ["full-model", "full2-model"]


def test_overwrite_only_replaces_a_run_folder(base_args, tmp_path, capsys):
    stranger = tmp_path / "results" / "photos"
    stranger.mkdir(parents=True)
    (stranger / "holiday.jpg").write_text("precious")
    code, err = cli(base_args + ["--run-name", "photos", "--overwrite"], capsys)
    assert code == 2 and "is not a hyperfit run" in err[0]
    assert (stranger / "holiday.jpg").read_text() == "precious"


def test_a_run_inside_another_run_is_refused(base_args, tmp_path, capsys):
    """A run made inside another run's folder went with it at that run's next --overwrite."""
    outer = tmp_path / "results" / "outer"
    outer.mkdir(parents=True)
    (outer / "config.json").write_text('{"run_name": "outer", "args": {}}')
    args = replace(base_args, "--out-dir", str(outer)) + ["--run-name", "nested"]
    code, err = cli(args, capsys)
    assert code == 2 and len(err) == 1 and f"lies inside the run {outer}" in err[0]
    assert tree(outer) == ["config.json"]


def test_overwrite_replaces_the_run_and_nothing_beside_it(base_args, tmp_path, capsys):
    assert cli(base_args + ["--run-name", "a"], capsys)[0] == 0
    assert cli(base_args + ["--run-name", "b"], capsys)[0] == 0
    (tmp_path / "results" / "a" / "extra.txt").write_text("from the old run")
    assert cli(base_args + ["--run-name", "a", "--overwrite"], capsys)[0] == 0
    assert not (tmp_path / "results" / "a" / "extra.txt").exists()
    assert (tmp_path / "results" / "b" / "adapter" / "adapter_config.json").exists()


# ---------------------------------------------------------------- 2. no code runs from a checkpoint


class Exploit:
    """A pickle that runs a command when unpickled: what a crafted trainer_state.pt can hold."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_resume_never_unpickles_code(tiny_model_dir, tiny_data, tmp_path, capsys):
    run = tiny_run(tiny_model_dir, tiny_data, tmp_path, "r", epochs=1, eval_every=1)
    pwned = tmp_path / "pwned"
    with open(run / "checkpoint" / "trainer_state.pt", "wb") as f:
        pickle.dump({"step": 1, "x": Exploit(pwned)}, f)
    args = command_line(
        model=tiny_model_dir, data=tiny_data, out_dir=tmp_path, run_name="r", resume=True, epochs=2
    )
    code, err = cli(args, capsys)
    assert code == 2 and len(err) == 1 and "is not a checkpoint this kit wrote" in err[0]
    assert not pwned.exists()


def test_a_truncated_checkpoint_weights_file_is_one_line(
    tiny_model_dir, tiny_data, tmp_path, capsys
):
    """A truncated adapter_model.safetensors raised safetensors' traceback on --resume."""
    run = tiny_run(tiny_model_dir, tiny_data, tmp_path, "r", epochs=1, eval_every=1)
    weights = run / "checkpoint" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    args = command_line(
        model=tiny_model_dir, data=tiny_data, out_dir=tmp_path, run_name="r", resume=True, epochs=2
    )
    code, err = cli(args, capsys)
    assert code == 2 and len(err) == 1, err
    assert "adapter_model.safetensors is not a checkpoint this kit wrote, or is damaged" in err[0]


# ---------------------------------------------------------------- 3. a killed save never blocks


def test_leftovers_of_a_killed_save_do_not_block_the_resume(tiny_model_dir, tiny_data, tmp_path):
    settings = dict(epochs=3, eval_every=3, save_every=1)
    straight = tiny_run(tiny_model_dir, tiny_data, tmp_path, "straight", **settings)
    run = tiny_run(tiny_model_dir, tiny_data, tmp_path, "killed", **dict(settings, epochs=1))
    for leftover in ("checkpoint.old", "checkpoint.tmp", "adapter.tmp"):  # every kill point
        (run / leftover).mkdir(exist_ok=True)
        (run / leftover / "x").write_text("half")
    resumed = tiny_run(tiny_model_dir, tiny_data, tmp_path, "killed", resume=True, **settings)
    assert_close_records(metrics_without_timings(resumed), metrics_without_timings(straight))
    assert_same_adapter(straight, resumed)
    assert not {"checkpoint.old", "checkpoint.tmp", "adapter.tmp"} & set(os.listdir(resumed))


def test_a_save_killed_between_its_renames_resumes_from_the_old_checkpoint(
    tiny_model_dir, tiny_data, tmp_path
):
    settings = dict(epochs=2, eval_every=3)
    straight = tiny_run(tiny_model_dir, tiny_data, tmp_path, "straight", **settings)
    run = tiny_run(tiny_model_dir, tiny_data, tmp_path, "killed", **dict(settings, epochs=1))
    (run / "checkpoint").rename(run / "checkpoint.old")  # the kill: old renamed, new not yet in
    (run / "adapter").rename(run / "adapter.tmp")
    assert runfiles.latest_checkpoint(run) == run / "checkpoint.old"
    resumed = tiny_run(tiny_model_dir, tiny_data, tmp_path, "killed", resume=True, **settings)
    assert_same_adapter(straight, resumed)


DiskUsage = collections.namedtuple("DiskUsage", "total used free")


def test_a_full_disk_during_a_save_keeps_the_checkpoint_and_says_so(
    tiny_model_dir, tiny_data, tmp_path, monkeypatch
):
    run = tiny_run(tiny_model_dir, tiny_data, tmp_path, "full", epochs=1, eval_every=3)
    before = adapter_tensors(run, "checkpoint")

    def disk_full(*args, **kwargs):  # torch's C++ writer reports it without an errno
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 123")

    net, _ = hyperfit.load_model(tiny_model_dir, "4bit", device="cpu", dtype="float32")
    net = hyperfit.add_lora(net)
    monkeypatch.setattr(torch, "save", disk_full)
    monkeypatch.setattr(runfiles.shutil, "disk_usage", lambda path: DiskUsage(10**9, 10**9, 0))
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = dict(step=9, loss_sum=0.0, loss_count=0, elapsed_s=0.0)
    with pytest.raises(hyperfit.UsageError, match="no space left under .*checkpoint/\\) is intact"):
        runfiles.save_checkpoint(run, net, optimizer, scaler, state)
    monkeypatch.undo()
    assert not (run / "checkpoint.tmp").exists()
    assert torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=True)["step"] == 3
    after = adapter_tensors(run, "checkpoint")
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------- 4. nothing non-finite is saved


@pytest.mark.parametrize("lr", ["nan", "inf", "-1", "0"])
def test_a_non_finite_or_non_positive_lr_is_refused(base_args, tmp_path, capsys, lr):
    code, err = cli(base_args + ["--lr", lr], capsys)
    assert code == 2 and len(err) == 1 and "--lr must be a positive finite number" in err[0]
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    "setting, message",
    [
        (dict(lr=10**400), "--lr must be a positive finite number"),  # an OverflowError
        (dict(dtype=["x"]), "--dtype must be text (or a path), got ['x']"),  # a TypeError
        (dict(run_name=5), "--run-name must be text (or a path), got 5"),
        (dict(out_dir=5), "--out-dir must be text (or a path), got 5"),
        (dict(lean_loss="False"), "--lean-loss must be True or False, got 'False'"),  # ran, lean
    ],
)
def test_a_python_call_with_a_value_of_the_wrong_kind_is_a_usage_error(
    tiny_model_dir, tiny_data, tmp_path, setting, message
):
    """The Python API took these past the command line's parsing: tracebacks, or a string
    "False" that ran the lean loss and was recorded as "False"."""
    given = dict(model=tiny_model_dir, data=tiny_data, out_dir=str(tmp_path / "results"))
    with pytest.raises(runfiles.UsageError, match=re.escape(message)):
        hyperfit.hyperfit(**dict(given, **setting), progress=False)
    assert not (tmp_path / "results").exists()


def test_weights_that_become_non_finite_stop_the_run_before_any_save(
    tiny_model_dir, tiny_data, tmp_path, capsys
):
    args = command_line(
        model=tiny_model_dir,
        data=tiny_data,
        out_dir=tmp_path,
        run_name="huge",
        **TINY_COMMAND,
        epochs=3,
        save_every=1,
        eval_every=100,
        lr=1e30,
    )
    code, err = cli(args, capsys)
    assert code == 1 and len(err) == 1
    assert re.search(r"(loss became (nan|inf)|LoRA weight became NaN/inf) at step \d", err[0])
    assert "--resume --lr 1e+29" in err[0]  # the way out: the run's own lr, lowered
    for folder in ("checkpoint", "checkpoint.old"):
        if (tmp_path / "huge" / folder).exists():
            assert all(
                torch.isfinite(t).all() for t in adapter_tensors(tmp_path / "huge", folder).values()
            )
    assert not (tmp_path / "huge" / "adapter").exists()  # the run did not pretend to finish


def test_resume_takes_a_lower_learning_rate_and_records_it(
    tiny_model_dir, tiny_data, tmp_path, capsys
):
    tiny_run(tiny_model_dir, tiny_data, tmp_path, "r", epochs=1, eval_every=3)
    lower = command_line(
        model=tiny_model_dir, out_dir=tmp_path, run_name="r", resume=True, epochs=2, lr=5e-3
    )
    assert cli(lower, capsys)[0] == 0
    records = runfiles.read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert [(r["step"], r["lr"]) for r in records] == [(0, 1e-2), (3, 1e-2), (6, 5e-3)]
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    changed = config["resumed"][0]["changed"]
    assert config["resumed"][0]["at_step"] == 3 and changed == {
        "epochs": [1, 2],
        "lr": [1e-2, 5e-3],
    }


def test_weights_made_non_finite_by_the_update_are_never_saved(
    tiny_model_dir, tiny_data, tmp_path, monkeypatch
):
    """An update that leaves a NaN in a weight (fp16 overflow, a bad optimizer state) while the loss
    was still finite: the run stops before it saves, and says there is no checkpoint yet."""
    real_step = torch.optim.AdamW.step

    def step_then_blow_up(self, *args, **kwargs):
        real_step(self, *args, **kwargs)
        self.param_groups[0]["params"][0].data[0, 0] = float("nan")

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_blow_up)
    with pytest.raises(
        hyperfit.NumericalError,
        match="LoRA weight became NaN/inf .*at step 1; no "
        "checkpoint was saved before it: start again with a lower --lr and --overwrite",
    ):
        tiny_run(tiny_model_dir, tiny_data, tmp_path, "nan", epochs=1, save_every=1)
    assert runfiles.latest_checkpoint(tmp_path / "nan") is None
    assert not (tmp_path / "nan" / "adapter").exists()


def test_an_absurd_learning_rate_that_overflows_adamw_is_one_line(base_args, tmp_path, capsys):
    code, err = cli(base_args + ["--run-name", "absurd", "--lr", "1e38"], capsys)
    assert code == 1 and len(err) == 1 and "overflowed" in err[0]


# ---------------------------------------------------------------- 5. one run per folder at a time


def test_a_second_run_on_a_locked_folder_exits_2_naming_the_holder(base_args, tmp_path, capsys):
    folder = tmp_path / "results" / "busy"
    with runfiles.RunLock(folder, "hyperfit.py --run-name busy"):
        code, err = cli(base_args + ["--run-name", "busy", "--overwrite"], capsys)
    assert code == 2 and len(err) == 1
    assert f"is in use by hyperfit.py --run-name busy (pid {os.getpid()}" in err[0]
    assert not folder.exists()  # the lock made the folder for nothing: no trace left


def test_a_lock_left_by_a_killed_process_does_not_block(base_args, tmp_path, capsys):
    folder = tmp_path / "results" / "killed"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"""
import sys, time; sys.path.insert(0, {str(ROOT)!r})
import runfiles
with runfiles.RunLock({str(folder)!r}, "hyperfit.py (killed)"):
    print("locked", flush=True); time.sleep(60)
""",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    code, err = cli(base_args + ["--run-name", "killed"], capsys)
    assert code == 2 and "in use by hyperfit.py (killed)" in err[0]
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert cli(base_args + ["--run-name", "killed"], capsys)[0] == 0


# ---------------------------------------------------------------- 6. one line, exit 2


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a, p: replace(a, "--data", p / "nope.txt"), "no such file or folder"),
        (
            lambda a, p: (p / "e.txt").write_text("") or replace(a, "--data", p / "e.txt"),
            "no text in it",
        ),
        (
            lambda a, p: (
                (p / "n.jsonl").write_text('{"text": 3}\n') and replace(a, "--data", p / "n.jsonl")
            ),
            'line 1 is not a JSON object with a "text" string',
        ),
        (
            lambda a, p: (
                (p / "z.jsonl").write_text('{"text": null}\n')
                and replace(a, "--data", p / "z.jsonl")
            ),
            'line 1 is not a JSON object with a "text" string',
        ),
        (lambda a, p: a + ["--num-train", "5000"], "holds only .* sequences of 64 tokens"),
        (lambda a, p: replace(a, "--model", "no-such-preset"), "no such preset or folder; presets"),
        (lambda a, p: replace(a, "--model", p / "missing-model"), "no such preset or folder"),
        (lambda a, p: a + ["--epochs", "0"], "--epochs must be a positive integer"),
        (lambda a, p: a + ["--batch-size", "-8"], "--batch-size must be a positive integer"),
        (lambda a, p: a + ["--seq-len", "0"], "--seq-len must be a positive integer"),
        (lambda a, p: a + ["--save-every", "0"], "--save-every must be a positive integer"),
        (lambda a, p: a + ["--lora-alpha", "-2"], "--lora-alpha must be a positive integer"),
        (lambda a, p: a + ["--seed", str(2**63)], r"--seed must be an integer in \[0, 2\*\*63\)"),
        (lambda a, p: a + ["--seed", "-1"], r"--seed must be an integer in \[0, 2\*\*63\)"),
        (lambda a, p: a + ["--dtype", "float8"], "--dtype float8: choose auto"),
        (
            lambda a, p: a + ["--prompt-len", "64"],
            "--prompt-len 64 must be below --seq-len 64",
        ),
        (lambda a, p: a + ["--lora-layers", "3"], "--lora-layers 3: the model has 2 layers"),
        (lambda a, p: a + ["--resume", "--overwrite"], "choose one"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    base_args, tmp_path, capsys, change, message
):
    code, err = cli(change(base_args, tmp_path), capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("hyperfit.py: ") and re.search(message, err[0]), err[0]
    assert not (tmp_path / "results").exists()


def test_resume_after_a_kill_before_the_first_save_gives_the_way_out(base_args, tmp_path, capsys):
    assert cli(base_args + ["--run-name", "early"], capsys)[0] == 0
    run = tmp_path / "results" / "early"
    for folder in ("checkpoint", "adapter"):  # what a kill during step 1 leaves: no checkpoint
        runfiles.shutil.rmtree(run / folder)
    code, err = cli(base_args + ["--run-name", "early", "--resume"], capsys)
    assert code == 2 and "start it again with --overwrite" in err[0]
    code, err = cli(base_args + ["--run-name", "early"], capsys)
    assert code == 2 and "--overwrite to replace it" in err[0]
    assert cli(base_args + ["--run-name", "early", "--overwrite"], capsys)[0] == 0


def test_ctrl_c_during_model_load_exits_130_without_a_traceback(
    base_args, tmp_path, capsys, monkeypatch
):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hyperfit, "load_model", interrupted)
    code, err = cli(base_args + ["--run-name", "x"], capsys)
    assert code == 130 and len(err) == 1 and "aborted" in err[0]
    assert not (tmp_path / "results").exists()


def test_existing_run_is_never_overwritten_without_asking(base_args, tmp_path, capsys):
    run_dir = tmp_path / "results" / "keep"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text('{"run_name": "keep", "precious": true}')
    (run_dir / ".lock").write_text('{"command": "hyperfit.py --run-name keep"}')
    os.utime(run_dir / ".lock", ns=(10**18, 10**18))
    code, err = cli(base_args + ["--run-name", "keep"], capsys)
    assert code == 2 and "already holds a run; pass --resume" in err[0]
    assert (run_dir / "config.json").read_text() == '{"run_name": "keep", "precious": true}'
    assert tree(run_dir) == [".lock", "config.json"]
    # the run's lock file too: its holder record was rewritten by every refused command
    assert (run_dir / ".lock").read_text() == '{"command": "hyperfit.py --run-name keep"}'
    assert (run_dir / ".lock").stat().st_mtime_ns == 10**18


def test_unwritable_results_folder_is_refused_before_training(base_args, tmp_path, capsys):
    if os.geteuid() == 0:  # root ignores permission bits; a file where the folder goes stops all
        (tmp_path / "results").write_text("not a folder")
        args = replace(base_args, "--out-dir", tmp_path / "results" / "sub")
    else:
        (tmp_path / "results").mkdir(mode=0o500)
        args = base_args
    code, err = cli(args, capsys)
    assert code == 2 and len(err) == 1 and "--out-dir" in err[0]


def test_hub_id_while_offline_explains_how_to_use_a_local_folder(
    base_args, tmp_path, capsys, monkeypatch
):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = cli(replace(base_args, "--model", "no-such-org/no-such-model"), capsys)
    assert code == 2 and len(err) == 1
    assert "Hugging Face hub" in err[0] and "local model folder" in err[0]
    assert not (tmp_path / "results").exists()


def test_quant_4bit_without_bitsandbytes_names_quant_none(base_args, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # the import now fails
    code, err = cli(base_args, capsys)
    assert code == 2 and len(err) == 1 and "--quant none" in err[0] and "bitsandbytes" in err[0]
    assert not (tmp_path / "results").exists()


def test_the_command_line_prints_one_line_and_no_library_noise(base_args, tmp_path):
    """A real process: the error comes after bitsandbytes and transformers are loaded (the model
    has 2 layers), and stderr holds the kit's line alone."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "hyperfit.py"), *map(str, base_args), "--lora-layers", "5"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "hyperfit.py: --lora-layers 5: the model has 2 layers; choose 1..2"
    ]


# ---------------------------------------------------------------- 7. both compute dtypes, forced


def test_the_compute_dtype_can_be_forced_and_is_recorded(
    tiny_model_dir, tiny_data, tmp_path, monkeypatch
):
    device = torch.device("cpu")
    assert runfiles.compute_dtype(device, "bf16") == torch.bfloat16
    monkeypatch.setenv("HYPERFIT_DTYPE", "float32")
    assert runfiles.compute_dtype(device, "auto") == torch.float32
    assert runfiles.compute_dtype(device, "bfloat16") == torch.bfloat16  # the option wins
    monkeypatch.setenv("HYPERFIT_DTYPE", "bfloat16")
    run = tiny_run(tiny_model_dir, tiny_data, tmp_path, "bf16", epochs=1, eval_every=3)
    config = json.loads((run / "config.json").read_text())
    assert config["compute_dtype"] == "bfloat16" and config["args"]["dtype"] == "auto"
    monkeypatch.setenv("HYPERFIT_DTYPE", "fp8")
    with pytest.raises(hyperfit.UsageError, match="HYPERFIT_DTYPE=fp8"):
        runfiles.compute_dtype(device)


# ---------------------------------------------------------------- 8. portable results


def test_paths_inside_the_kit_are_recorded_relative_to_it(tiny_model_dir, tmp_path):
    assert runfiles.portable_path(ROOT / "data" / "fiction") == "data/fiction"
    assert runfiles.portable_path(tmp_path) == str(tmp_path)
    assert runfiles.absolute_path("data/fiction") == str(ROOT / "data" / "fiction")
    settings = hyperfit.new_settings({"data": str(ROOT / "data" / "fiction")})
    assert settings.data == "data/fiction" and settings.out_dir == "results"


def test_a_sigterm_saves_and_exits_130(tiny_model_dir, tiny_data, tmp_path):
    """A real process stopped by SIGTERM mid-run: it finishes the step, saves, says how to
    resume."""
    args = [sys.executable, ROOT / "hyperfit.py"] + command_line(
        model=tiny_model_dir,
        data=tiny_data,
        out_dir=tmp_path,
        run_name="t",
        **TINY_COMMAND,
        epochs=400,
        eval_every=1000,
    )
    process = subprocess.Popen(
        [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 240
    while not (tmp_path / "t" / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.5)  # the step-0 validation is written: training has started
    time.sleep(1)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=240)
    assert process.returncode == 130, err[-2000:]
    assert "resume with: python hyperfit.py --run-name t" in err
    assert runfiles.latest_checkpoint(tmp_path / "t") is not None


# ---------------------------------------------------------------- 9. round three: no silent mix
# (issue "Reliability, round three"): each case below first broke the kit


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tiny_data, tmp_path_factory):
    """A finished tiny run (its checkpoint and adapter), copied by the tests that damage it."""
    return tiny_run(tiny_model_dir, tiny_data, tmp_path_factory.mktemp("finished"), "r", epochs=1)


def copy_run(run, tmp_path, name="r"):
    copy = tmp_path / "results" / name
    runfiles.shutil.copytree(run, copy)
    return copy


def test_resume_on_changed_data_is_refused(finished_run, tiny_model_dir, tmp_path, capsys):
    """The run's data file changed after its checkpoint: resuming would train on a mix."""
    run = copy_run(finished_run, tmp_path)
    changed = tmp_path / "changed.txt"
    original = json.loads((run / "config.json").read_text())["args"]["data"]
    changed.write_text(open(runfiles.absolute_path(original)).read()[::-1])
    config = json.loads((run / "config.json").read_text())
    config["args"]["data"] = str(changed)  # the run's own data, now holding other text
    (run / "config.json").write_text(json.dumps(config))
    before = tree(run)
    args = ["--run-name", "r", "--out-dir", run.parent, "--resume", "--epochs", "2"]
    code, err = cli(args, capsys)
    assert code == 2 and len(err) == 1 and "is not what" in err[0] and "train_fingerprint" in err[0]
    assert tree(run) == before


def test_resume_on_changed_validation_text_is_refused(finished_run, tmp_path, capsys):
    """The training split is the same but the validation split is not (the text of its blocks
    changed): resuming would write metrics.jsonl over two validation sets. Simulated by
    recording another validation split's fingerprint, as the run would have before the edit."""
    run = copy_run(finished_run, tmp_path)
    config = json.loads((run / "config.json").read_text())
    assert config["val_fingerprint"] and config["model_fingerprint"]
    config["val_fingerprint"] = runfiles.fingerprint(torch.zeros(8, 64, dtype=torch.long))
    (run / "config.json").write_text(json.dumps(config))
    before = tree(run)
    args = ["--run-name", "r", "--out-dir", run.parent, "--resume", "--epochs", "2"]
    code, err = cli(args, capsys)
    assert code == 2 and len(err) == 1 and "val_fingerprint" in err[0] and "mix" in err[0]
    assert tree(run) == before


def test_resume_on_replaced_base_model_weights_is_refused(
    tiny_model_dir, tiny_data, tmp_path, capsys
):
    """model.safetensors at the same --model path was replaced by other weights after the run
    started: resuming would train the adapter on over another model."""
    from transformers import AutoModelForCausalLM

    model = tmp_path / "model"
    runfiles.shutil.copytree(tiny_model_dir, model)
    run = tiny_run(str(model), tiny_data, tmp_path / "results", "r", epochs=1)
    net = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    net.save_pretrained(model)
    before = tree(run)
    args = ["--run-name", "r", "--out-dir", run.parent, "--resume", "--epochs", "2"]
    code, err = cli(args, capsys)
    assert code == 2 and len(err) == 1 and "model_fingerprint" in err[0], err
    assert tree(run) == before


def test_resume_with_the_run_s_own_values_is_no_change(finished_run, tmp_path, capsys):
    """--resume --seq-len <the run's own> is accepted; another value names the run's own one (no
    message about the preset's --prompt-len, which the run does not use)."""
    run = copy_run(finished_run, tmp_path)
    code, err = cli(
        ["--run-name", "r", "--out-dir", run.parent, "--resume", "--seq-len", "32"], capsys
    )
    assert code == 2 and len(err) == 1 and "keeps its own seq-len (64)" in err[0]
    code, err = cli(
        ["--run-name", "r", "--out-dir", run.parent, "--resume", "--seq-len", "64"], capsys
    )
    assert code == 0 and err == []


def test_resume_on_a_run_in_progress_names_the_holder(base_args, tmp_path, capsys):
    folder = tmp_path / "results" / "busy"
    with runfiles.RunLock(folder, "hyperfit.py --run-name busy"):  # training, no checkpoint yet
        code, err = cli(base_args + ["--run-name", "busy", "--resume"], capsys)
    assert code == 2 and len(err) == 1 and "in use by hyperfit.py --run-name busy" in err[0]


def test_a_truncated_config_leads_to_overwrite_and_overwrite_works(
    finished_run, tmp_path, capsys, base_args
):
    run = copy_run(finished_run, tmp_path)
    (run / "config.json").write_text('{"run_name": "r", "args": {')
    code, err = cli(["--run-name", "r", "--out-dir", run.parent, "--resume"], capsys)
    assert code == 2 and len(err) == 1 and "start the run again with --overwrite" in err[0]
    code, err = cli(base_args + ["--run-name", "r", "--overwrite"], capsys)  # the advice works
    assert code == 0 and json.loads((run / "config.json").read_text())["run_name"] == "r"


@pytest.mark.parametrize("tool", ["hyperfit.py", "plot.py"])
def test_a_read_only_run_folder_is_one_line(finished_run, tmp_path, tool):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; the check runs as an ordinary user")
    run = copy_run(finished_run, tmp_path)
    for path in [run, *run.rglob("*")]:
        if path.is_dir():
            path.chmod(0o555)
    argv = (
        ["--run-name", "r", "--out-dir", run.parent, "--resume", "--epochs", "2"]
        if tool == "hyperfit.py"
        else [run]
    )
    done = subprocess.run(
        [sys.executable, ROOT / tool, *map(str, argv)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_read_only_folder_is_one_line_for_every_tool(finished_run, tmp_path, monkeypatch, capsys):
    """As root (CI) nothing is read-only, so the write itself fails: the same one line."""
    import plot

    run = copy_run(finished_run, tmp_path)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(run / ".lock"))

    monkeypatch.setattr(runfiles.Path, "write_text", refuse)
    code, err = cli(
        ["--run-name", "r", "--out-dir", run.parent, "--resume", "--epochs", "2"], capsys
    )
    assert code == 2 and len(err) == 1 and "cannot write to" in err[0]
    monkeypatch.undo()
    monkeypatch.setattr(plot.Path, "write_bytes", refuse)
    assert plot.main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write" in err


@pytest.mark.parametrize("weights", ["adapter_model.bin", "pytorch_model.bin"])
def test_crafted_pickles_as_weights_are_one_line_and_run_nothing(
    finished_run, tiny_model_dir, tmp_path, weights
):
    """A pickle that would create a file, planted as the adapter's or the model's weights: one
    line, exit 2, and the file is never created (transformers and peft load .bin files with
    torch.load(weights_only=True))."""
    run = copy_run(finished_run, tmp_path)
    marker = tmp_path / "pwned"
    model = tmp_path / "model"
    runfiles.shutil.copytree(tiny_model_dir, model)
    if weights == "adapter_model.bin":
        (run / "adapter" / "adapter_model.safetensors").unlink()
        target = run / "adapter" / weights
    else:
        (model / "model.safetensors").unlink()
        target = model / weights
        config = json.loads((run / "config.json").read_text())
        config["args"]["model"] = str(model)
        (run / "config.json").write_text(json.dumps(config))

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    target.write_bytes(pickle.dumps(Planted()))
    done = subprocess.run(
        [sys.executable, ROOT / "evaluate.py", run, "--num-prompts", "2", "--new-tokens", "4"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not marker.exists()


def test_adapter_without_weights_or_of_another_model_is_one_line(
    finished_run, tiny_bos_model_dir, tmp_path, capsys
):
    import evaluate

    run = copy_run(finished_run, tmp_path)
    (run / "adapter" / "adapter_model.safetensors").unlink()
    assert evaluate.main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no adapter_model.safetensors" in err
    run = copy_run(finished_run, tmp_path, "other")
    config = json.loads((run / "config.json").read_text())
    config["args"]["model"] = tiny_bos_model_dir  # edited to another base model
    config["run_name"] = "other"
    (run / "config.json").write_text(json.dumps(config))
    assert evaluate.main([str(run), "--num-prompts", "2", "--new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and (
        "does not load onto" in err or "is not what the run trained on" in err
    ), err


@pytest.mark.parametrize(
    "tool",
    ["hyperfit.py", "evaluate.py", "plot.py", "experiments/annotate.py", "experiments/studies.py"],
)
def test_ctrl_c_while_the_imports_load_is_one_line_and_exit_130(tool, tmp_path):
    """Ctrl-C in the first second, while torch and transformers load: no traceback."""
    process = subprocess.Popen(
        [sys.executable, str(ROOT / tool), "--help"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    if process.returncode == 0:  # the imports were already done (a fast machine): --help ran
        assert "usage" in out
        return
    assert (
        process.returncode == 130 and "Traceback" not in err and len(err.strip().splitlines()) <= 1
    ), err


def test_a_full_disk_while_evaluating_keeps_the_earlier_evaluation_whole(
    finished_run, tmp_path, monkeypatch, capsys
):
    import errno

    import evaluate

    run = copy_run(finished_run, tmp_path)
    assert (
        evaluate.main(
            [str(run), "--num-prompts", "2", "--new-tokens", "4", "--modes", "original_greedy"]
        )
        == 0
    )
    before = {p.name: p.read_bytes() for p in (run / "eval").iterdir()}
    real = runfiles.Path.write_text

    def full(self, *args, **kwargs):
        if self.name == "summary.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(runfiles.Path, "write_text", full)
    assert evaluate.main([str(run), "--num-prompts", "3", "--new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the earlier evaluation is intact" in err
    assert {p.name: p.read_bytes() for p in (run / "eval").iterdir()} == before
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".eval")) == []  # no leftovers


def test_a_new_evaluation_replaces_the_old_one_whole(finished_run, tmp_path):
    import evaluate

    run = copy_run(finished_run, tmp_path)
    evaluate.evaluate(run, num_prompts=2, new_tokens=4, modes="original_greedy", progress=False)
    (run / "eval" / "table.md").write_text("rendered from the earlier evaluation")
    evaluate.evaluate(run, num_prompts=3, new_tokens=4, modes="original_greedy", progress=False)
    assert sorted(p.name for p in (run / "eval").iterdir()) == ["generations.jsonl", "summary.json"]
    assert json.loads((run / "eval" / "summary.json").read_text())["args"]["num_prompts"] == 3


def test_out_dir_into_another_run_or_a_foreign_folder_is_refused(finished_run, tmp_path, capsys):
    import evaluate

    run, other = copy_run(finished_run, tmp_path), copy_run(finished_run, tmp_path, "other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(config, run_name="other")))
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"jpeg")
    for out_dir, message in [
        (other / "eval", "lies inside the run"),
        (photos, "not an evaluation folder"),
        (run / "eval" / "sub", "lies inside the evaluation folder"),  # then run/eval held sub/
    ]:
        before = tree(tmp_path)
        assert evaluate.main([str(run), "--out-dir", str(out_dir), "--num-prompts", "2"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
        assert tree(tmp_path) == before
    assert evaluate.main([str(run), "--out-dir", "/", "--num-prompts", "2"]) == 2  # a traceback
    err = capsys.readouterr().err
    assert err == "evaluate.py: --out-dir /: an evaluation needs a folder of its own\n"


def test_an_out_dir_s_lock_folder_holding_a_user_s_file_is_refused(finished_run, tmp_path, capsys):
    """An --out-dir elsewhere is locked in .<name>/ beside it: a user's .<name>/.lock there was
    overwritten with the kit's holder record and left behind."""
    import evaluate

    run, mine = copy_run(finished_run, tmp_path), tmp_path / "decoy" / ".t4"
    mine.mkdir(parents=True)
    (mine / ".lock").write_text('{"mine": 1}')
    before = tree(tmp_path / "decoy")
    argv = [str(run), "--out-dir", str(tmp_path / "decoy" / "t4"), "--num-prompts", "2"]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not the kit's lock folder" in err
    assert tree(tmp_path / "decoy") == before and (mine / ".lock").read_text() == '{"mine": 1}'


def test_a_sigterm_during_an_evaluation_exits_130_and_leaves_no_lock_folder(
    finished_run, tmp_path, capsys, monkeypatch
):
    """SIGTERM killed an evaluation outright: its lock folder .<out-dir>/ stayed in the user's
    folder. Now it unwinds like Ctrl-C."""
    import evaluate

    def terminated(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        pytest.fail("SIGTERM did not stop the evaluation")

    run, previous = copy_run(finished_run, tmp_path), signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(evaluate, "load_nets", terminated)
    try:
        code = evaluate.main([str(run), "--out-dir", str(tmp_path / "out" / "t5")])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 130 and "interrupted" in capsys.readouterr().err
    assert tree(tmp_path / "out") == []


# (issue "Reliability, round four"): each case below first broke the kit


def test_out_dir_holding_a_summary_beside_a_user_s_files_is_refused(finished_run, tmp_path, capsys):
    import evaluate

    run, thesis = copy_run(finished_run, tmp_path), tmp_path / "thesis"
    (thesis / "sub").mkdir(parents=True)
    (thesis / "summary.json").write_text("{}")
    (thesis / "thesis.txt").write_text("three years of work")
    (thesis / "sub" / "notes.txt").write_text("notes")
    before = tree(tmp_path)
    assert evaluate.main([str(run), "--out-dir", str(thesis), "--num-prompts", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an evaluation folder" in err
    assert tree(tmp_path) == before


@pytest.mark.parametrize("outside_files", [["summary.json", "thesis.txt"], ["summary.json"]])
def test_an_eval_link_to_an_outside_folder_is_refused(
    finished_run, tmp_path, capsys, outside_files
):
    import evaluate

    run, outside = copy_run(finished_run, tmp_path), tmp_path / "outside"
    outside.mkdir()
    for name in outside_files:
        (outside / name).write_text("{}")
    (run / "eval").symlink_to(outside, target_is_directory=True)
    before = tree(tmp_path)
    assert evaluate.main([str(run), "--num-prompts", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a link" in err
    assert tree(tmp_path) == before and (run / "eval").is_symlink()


def test_write_folder_replaces_only_a_folder_of_the_kit_s_own_files(tmp_path):
    """The one place that replaces folders whole (evaluate.py's eval/, images.py's eval/,
    annotate.py's human_study/): a user's file in it, a sub-folder, or a link stops it."""
    folder, outside = tmp_path / "human_study", tmp_path / "outside"
    folder.mkdir()
    (folder / "annotate.html").write_text("old page")
    (folder / ".annotate.html.tmp123").write_text("left by a kill")
    runfiles.write_folder(folder, {"annotate.html": "new"}, "", owned={"annotate.html"})
    assert tree(folder) == ["annotate.html"] and (folder / "annotate.html").read_text() == "new"
    for extra in ("judgments-ann1.json", "sub/notes.txt"):
        (folder / extra).parent.mkdir(exist_ok=True)
        (folder / extra).write_text("an annotator's")
        before = tree(tmp_path)
        with pytest.raises(runfiles.UsageError, match="the kit did not write"):
            runfiles.write_folder(folder, {"annotate.html": "x"}, "", owned={"annotate.html"})
        assert tree(tmp_path) == before
        runfiles.shutil.rmtree(folder / extra.split("/")[0], ignore_errors=True)
        (folder / extra).unlink(missing_ok=True)
    outside.mkdir()
    (outside / "annotate.html").write_text("theirs")
    link = tmp_path / "linked"
    link.symlink_to(outside, target_is_directory=True)
    with pytest.raises(runfiles.UsageError, match="is a link"):
        runfiles.write_folder(link, {"annotate.html": "x"}, "", owned={"annotate.html"})
    assert (outside / "annotate.html").read_text() == "theirs"


def test_a_full_disk_while_plotting_leaves_no_temporary_file_and_names_the_file(
    finished_run, tmp_path, monkeypatch, capsys
):
    import errno

    import plot

    run = copy_run(finished_run, tmp_path)
    before = tree(run)

    def full(self, data):
        with open(self, "wb") as f:
            f.write(data[:10])  # part of it reaches the disk, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(plot.Path, "write_bytes", full)
    assert plot.main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "training_curves.png" in err and "None" not in err
    assert tree(run) == before  # no .training_curves.png.tmpNNN left behind


@pytest.mark.parametrize(
    "name, message",
    [
        ("a\nb", "without control characters"),
        ("run\x1b[31m", "without control characters"),
        ("tab\there", "without control characters"),
        ("€" * 100, "at most 255"),  # 100 characters, 300 bytes: Errno 36 from the filesystem
    ],
)
def test_a_run_name_with_a_control_character_or_over_255_bytes_is_one_line(
    base_args, tmp_path, capsys, name, message
):
    code, err = cli(base_args + ["--run-name", name], capsys)
    assert code == 2 and len(err) == 1 and message in err[0]
    assert tree(tmp_path / "results") == []


@pytest.mark.parametrize("in_folder", [False, True])
def test_a_named_pipe_as_data_is_one_line_not_a_hang(base_args, tmp_path, capsys, in_folder):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("some text " * 100)
    os.mkfifo(folder / "pipe.txt")  # nothing ever writes to it: reading it waits forever

    def hung(*_):
        raise TimeoutError("--data on a named pipe hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        data = folder if in_folder else folder / "pipe.txt"
        code, err = cli(replace(base_args, "--data", data), capsys)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert code == 2 and len(err) == 1 and "is not a regular file" in err[0]
    assert tree(tmp_path / "results") == []


# ---------------------------------------------------------------- 10. errors that say what to do


def test_a_latin1_data_file_names_the_conversion(base_args, tmp_path, capsys):
    """A Latin-1 book (common for old e-texts) is refused with the iconv command that fixes it."""
    book = tmp_path / "café.txt"
    book.write_bytes(("Il était une fois, à Paris. " * 200).encode("latin-1"))
    code, err = cli(replace(base_args, "--data", book), capsys)
    assert code == 2 and len(err) == 1 and "is not UTF-8 text" in err[0]
    converted = shlex.quote(str(tmp_path / "café.utf8.txt"))  # quoted: copied, it runs
    assert f"iconv -f latin1 -t utf-8 {shlex.quote(str(book))} > {converted}" in err[0]
    assert tree(tmp_path / "results") == []


@pytest.mark.parametrize("failing_step", [0, 1])
def test_out_of_gpu_memory_in_a_step_is_one_line_naming_the_options(
    tiny_model_dir, tiny_data, tmp_path, capsys, monkeypatch, failing_step
):
    """torch.OutOfMemoryError in a step: exit 2, one line with the peak, the options that need
    less memory and the resume command when a checkpoint was saved before it (kept)."""
    step = hyperfit.train_step

    def out_of_memory(run, batch):
        if run.step == failing_step:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return step(run, batch)

    monkeypatch.setattr(hyperfit, "train_step", out_of_memory)
    settings = dict(TINY_COMMAND, epochs=1, save_every=1, eval_every=100)
    args = command_line(model=tiny_model_dir, data=tiny_data, out_dir=tmp_path, **settings)
    code, err = cli([*args, "--run-name", "oom"], capsys)
    assert code == 2 and len(err) == 1, err
    assert f"out of GPU memory at step {failing_step + 1} (peak n/a allocated)" in err[0]
    for option in ("--batch-size", "--micro-batch-size", "--gradient-checkpointing", "--seq-len"):
        assert option in err[0], option
    kept = runfiles.latest_checkpoint(tmp_path / "oom")
    assert (kept is not None) == (failing_step > 0)
    assert ("--run-name oom" in err[0] and "--resume" in err[0]) == (kept is not None)
    assert not (tmp_path / "oom" / "adapter").exists()


def test_bfloat16_on_a_gpu_without_it_names_float16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    gpu = torch.device("cuda")
    with pytest.raises(hyperfit.UsageError, match=r"--dtype bfloat16: .* use --dtype float16"):
        runfiles.compute_dtype(gpu, "bfloat16")
    monkeypatch.setenv("HYPERFIT_DTYPE", "bf16")
    with pytest.raises(hyperfit.UsageError, match=r"HYPERFIT_DTYPE=bfloat16: .* --dtype float16"):
        runfiles.compute_dtype(gpu, "auto")
    monkeypatch.delenv("HYPERFIT_DTYPE")
    assert runfiles.compute_dtype(gpu, "auto") == torch.float16  # auto picks what the GPU computes
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert runfiles.compute_dtype(gpu, "bfloat16") == torch.bfloat16


def test_plain_python_on_several_gpus_says_once_which_gpu_it_uses(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(runfiles, "NOTED", set())
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert runfiles.pick_device() == torch.device("cuda")
    assert capsys.readouterr().out == ""  # one GPU: nothing to say
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    runfiles.pick_device()
    runfiles.pick_device("cuda")
    assert capsys.readouterr().out == (
        "using cuda:0 of 2 GPUs; accelerate launch --multi_gpu uses all, see docs/multi-gpu.md\n"
    )
    monkeypatch.setattr(runfiles, "NOTED", set())
    monkeypatch.setenv("WORLD_SIZE", "2")  # accelerate launch --multi_gpu: every GPU is used
    runfiles.pick_device()
    assert capsys.readouterr().out == ""


def test_a_kill_between_write_folder_s_renames_puts_the_old_folder_back(tmp_path):
    """A kill after eval/ became .eval.old and before the new one took its place: the last whole
    evaluation is put back by the next reader (plot.py) or writer, never deleted; an .old that
    is not a whole evaluation (a user's file, no summary) stays where it is."""
    import plot

    run = tmp_path / "r"
    old = run / ".eval.old"
    old.mkdir(parents=True)
    (old / "summary.json").write_text('{"modes": {}}')
    (old / "generations.jsonl").write_text("")
    plot._recover_eval(run)
    assert tree(run) == ["eval", "eval/generations.jsonl", "eval/summary.json"]
    (run / "eval").rename(old)
    assert runfiles.recover_eval_folder(run / "eval") and not old.exists()
    (run / "eval").rename(old)
    runfiles.write_folder(run / "eval", {"summary.json": "{}"}, "", owned=runfiles.EVAL_FILES)
    assert tree(run) == ["eval", "eval/summary.json"]  # put back, then replaced whole as asked
    runfiles.shutil.rmtree(run / "eval")
    old.mkdir()
    (old / "thesis.txt").write_text("a user's")
    (old / "summary.json").write_text("{}")
    assert not runfiles.recover_eval_folder(run / "eval")
    plot._recover_eval(run)
    assert not (run / "eval").exists() and plot._EVAL_FILES == runfiles.EVAL_FILES
