"""Training through the real 4-bit + LoRA path on a tiny random Llama, and the run's reliability:
bad input, interrupt and resume, atomic checkpoints, NaN guard, determinism."""
import json
import os
import signal
from pathlib import Path

import pytest
import torch

import hyperfit as hf
from evaluate import generate

TINY_RUN = dict(quant="4bit", seq_len=64, num_train=24, num_val=8, num_prompts=4, prompt_len=16,
                gen_tokens=16, batch_size=8, lr=1e-2, progress=False)


def run(tiny_model_dir, tiny_data, out_dir, name, **kwargs):
    return Path(hf.hyperfit(model=tiny_model_dir, data=tiny_data, out_dir=str(out_dir), run_name=name,
                            **dict(TINY_RUN, **kwargs)))


def metrics_without_timings(run_dir):
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in hf.read_jsonl(run_dir / "metrics.jsonl")]


def adapter_tensors(run_dir, folder="adapter"):
    from safetensors.torch import load_file
    return load_file(run_dir / folder / "adapter_model.safetensors")


def test_tiny_model_hyperfits_to_near_zero_loss(tiny_model_dir, tiny_data, tmp_path):
    run_dir = run(tiny_model_dir, tiny_data, tmp_path, "fit", num_train=16, epochs=30, eval_every=20)
    records = hf.read_jsonl(run_dir / "metrics.jsonl")
    first, last = records[0], records[-1]
    assert first["step"] == 0 and first["train_loss"] is None
    assert last["step"] == 60 and last["epoch"] == 30
    assert last["train_loss"] < 0.3                      # near-zero training loss ...
    assert last["val_loss"] > first["val_loss"]          # ... while validation loss rises
    for key in ("val_entropy", "val_top1_prob", "ttr_last96"):
        assert all(0 <= r[key] < 10 for r in records)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["args"]["lr"] == 1e-2 and config["steps_per_epoch"] == 2
    assert config["versions"]["torch"] and "git_commit" in config and config["args"]["seed"] == 0
    assert (run_dir / "adapter" / "adapter_config.json").exists()
    samples = hf.read_jsonl(run_dir / "samples.jsonl")
    assert {s["step"] for s in samples} == {0, 20, 40, 60} and all(s["continuation"] for s in samples)


def lora_model(tiny_model_dir, **kwargs):
    model, tokenizer = hf.load_model(tiny_model_dir, "4bit", device="cpu")
    torch.manual_seed(0)
    return hf.add_lora(model, **kwargs), tokenizer


def test_gradients_reach_every_lora_tensor_after_generate(tiny_model_dir):
    """Guards the bitsandbytes CPU repack trap: after an eval-mode generate, backprop must still
    reach every LoRA tensor (lora_B starts at zero, so lora_A gets gradient from step 2)."""
    model, _ = lora_model(tiny_model_dir)
    ids = torch.randint(0, 300, (4, 24))
    generate(model, ids[:, :8], 8)
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    optimizer = torch.optim.AdamW(lora.values(), lr=1e-2)
    for _ in range(2):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads = {n: p.grad.abs().sum().item() for n, p in lora.items()}
        optimizer.step()
        optimizer.zero_grad()
        generate(model, ids[:, :8], 4)
    assert all(g > 0 for g in grads.values()), [n for n, g in grads.items() if g == 0]


def test_late_stage_lora_targets_only_the_last_layers(tiny_model_dir):
    model, _ = lora_model(tiny_model_dir, last_layers=1)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".layers.1." in n for n in names)
    assert len(names) == 2 * len(hf.LORA_TARGETS)
    with pytest.raises(hf.UsageError, match="the model has 2 layers"):
        lora_model(tiny_model_dir, last_layers=3)


def test_adapter_save_and_reload_gives_identical_logits_and_generations(tiny_model_dir, tmp_path):
    model, _ = lora_model(tiny_model_dir)
    ids = torch.randint(0, 300, (4, 24))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp_path / "adapter")
    reloaded, _ = hf.load_model(tiny_model_dir, "4bit", adapter=str(tmp_path / "adapter"), device="cpu")
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    assert torch.equal(generate(model, ids[:, :8], 12), generate(reloaded, ids[:, :8], 12))


def test_dense_copy_matches_the_quantized_lora_model(tiny_model_dir):
    model, _ = lora_model(tiny_model_dir)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)  # a non-trivial adapter
    ids = torch.randint(0, 300, (2, 16))
    model.eval()
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        assert torch.allclose(hf.dense_copy(model)(input_ids=ids).logits, tuned, atol=1e-4)
        with model.disable_adapter():
            original = model(input_ids=ids).logits
            assert torch.allclose(hf.dense_copy(model)(input_ids=ids).logits, original, atol=1e-4)
    assert not torch.allclose(tuned, original, atol=1e-2)


def test_interrupt_and_resume_equals_an_uninterrupted_run(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    settings = dict(epochs=3, eval_every=2)  # 24 sequences / batch 8 = 3 steps per epoch, 9 steps
    straight = run(tiny_model_dir, tiny_data, tmp_path, "straight", **settings)

    # SIGINT arrives while step 5 computes (epoch 2, mid-epoch): the step finishes, then the run saves and stops
    real_batches, calls = hf.global_batches, []
    def batches_then_interrupt(*args):
        calls.append(args)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return real_batches(*args)
    monkeypatch.setattr(hf, "global_batches", batches_then_interrupt)
    with pytest.raises(hf.RunInterrupted, match="interrupted at step 5/9.*--resume"):
        run(tiny_model_dir, tiny_data, tmp_path, "resumed", **settings)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    state = torch.load(tmp_path / "resumed" / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 5 and not (tmp_path / "resumed" / "adapter").exists()
    monkeypatch.setattr(hf, "global_batches", real_batches)

    resumed = run(tiny_model_dir, tiny_data, tmp_path, "resumed", resume=True, **settings)
    assert_close_records(metrics_without_timings(resumed), metrics_without_timings(straight))
    a, b = adapter_tensors(straight), adapter_tensors(resumed)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def assert_close_records(xs, ys, tol=1e-6):
    assert len(xs) == len(ys) > 0
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], float):
                assert abs(x[k] - y[k]) <= tol, (k, x[k], y[k])
            else:
                assert x[k] == y[k], (k, x[k], y[k])


def test_same_seed_gives_identical_metrics(tiny_model_dir, tiny_data, tmp_path):
    a = run(tiny_model_dir, tiny_data, tmp_path, "a", epochs=2, eval_every=3)
    b = run(tiny_model_dir, tiny_data, tmp_path, "b", epochs=2, eval_every=3)
    assert metrics_without_timings(a) == metrics_without_timings(b)
    c = run(tiny_model_dir, tiny_data, tmp_path, "c", epochs=2, eval_every=3, seed=1)
    assert metrics_without_timings(a) != metrics_without_timings(c)


def test_crash_during_a_save_keeps_the_previous_checkpoint(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    run_dir = run(tiny_model_dir, tiny_data, tmp_path, "atomic", epochs=1, eval_every=3)
    before = adapter_tensors(run_dir, "checkpoint")
    model, _ = lora_model(tiny_model_dir)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        hf.save_checkpoint(run_dir, model, optimizer, dict(step=99, loss_sum=0.0, loss_count=0, elapsed_s=0.0))
    monkeypatch.undo()
    assert hf.latest_checkpoint(run_dir) == run_dir / "checkpoint"
    assert torch.load(run_dir / "checkpoint" / "trainer_state.pt", weights_only=False)["step"] == 3
    after = adapter_tensors(run_dir, "checkpoint")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_model_dir, tiny_data, tmp_path):
    with pytest.raises(hf.NumericalError, match="loss became nan|loss became inf"):
        run(tiny_model_dir, tiny_data, tmp_path, "nan", epochs=3, eval_every=100, save_every=1, lr=1e30)
    state = torch.load(tmp_path / "nan" / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["step"] >= 1
    assert all(torch.isfinite(t).all() for t in adapter_tensors(tmp_path / "nan", "checkpoint").values())
    assert not (tmp_path / "nan" / "adapter").exists()  # the run did not pretend to finish


# ---------------------------------------------------------------------------- bad input on the CLI


def cli(args, capsys):
    """Run hyperfit.py's CLI in-process; return (exit code, stderr lines)."""
    with pytest.raises(SystemExit) as exit_info:
        hf.main(args)
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture
def base_args(tiny_model_dir, tiny_data, tmp_path):
    return ["--model", tiny_model_dir, "--data", tiny_data, "--out-dir", str(tmp_path / "results"),
            "--seq-len", "64", "--num-train", "16", "--num-val", "8", "--num-prompts", "4"]


def replace(args, flag, value):
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


@pytest.mark.parametrize("change, message", [
    (lambda a, p: replace(a, "--data", str(p / "nope.txt")), "no such file or folder"),
    (lambda a, p: (p / "e.txt").write_text("") or replace(a, "--data", str(p / "e.txt")), "no text in it"),
    (lambda a, p: a + ["--num-train", "5000"], "holds only .* sequences of 64 tokens"),
    (lambda a, p: replace(a, "--model", "no-such-preset"), "no such preset or folder; presets: smollm2-135m"),
    (lambda a, p: replace(a, "--model", str(p / "missing-model")), "no such preset or folder"),
    (lambda a, p: a + ["--epochs", "0"], "--epochs must be a positive integer"),
    (lambda a, p: a + ["--batch-size", "-8"], "--batch-size must be a positive integer"),
    (lambda a, p: a + ["--seq-len", "0"], "--seq-len must be a positive integer"),
    (lambda a, p: a + ["--prompt-len", "64"], "--prompt-len .64. must be shorter than --seq-len .64."),
    (lambda a, p: a + ["--lora-layers", "3"], "--lora-layers 3: the model has 2 layers"),
    (lambda a, p: a + ["--resume"], "has no checkpoint to resume from"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(base_args, tmp_path, capsys, change, message):
    code, err = cli(change(base_args, tmp_path), capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("hyperfit.py: ") and __import__("re").search(message, err[0]), err[0]
    assert not (tmp_path / "results").exists()


def test_hub_id_while_offline_explains_how_to_use_a_local_folder(base_args, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = cli(replace(base_args, "--model", "no-such-org/no-such-model"), capsys)
    assert code == 2 and len(err) == 1
    assert "Hugging Face hub" in err[0] and "local model folder" in err[0]
    assert not (tmp_path / "results").exists()


def test_quant_4bit_without_bitsandbytes_names_quant_none(base_args, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)  # import now fails
    code, err = cli(base_args, capsys)
    assert code == 2 and len(err) == 1 and "--quant none" in err[0] and "bitsandbytes" in err[0]
    assert not (tmp_path / "results").exists()


def test_existing_run_is_never_overwritten_without_asking(base_args, tmp_path, capsys):
    run_dir = tmp_path / "results" / "keep"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text('{"precious": true}')
    code, err = cli(base_args + ["--run-name", "keep"], capsys)
    assert code == 2 and "already holds a run; pass --resume" in err[0]
    assert (run_dir / "config.json").read_text() == '{"precious": true}'
    assert sorted(os.listdir(run_dir)) == ["config.json"]


def test_unwritable_results_folder_is_refused_before_training(base_args, tmp_path, capsys):
    if os.geteuid() == 0:
        # root ignores permission bits; a file where the folder should be is unwritable for everyone
        (tmp_path / "results").write_text("not a folder")
        args = replace(base_args, "--out-dir", str(tmp_path / "results" / "sub"))
    else:
        (tmp_path / "results").mkdir(mode=0o500)
        args = base_args
    code, err = cli(args, capsys)
    assert code == 2 and len(err) == 1 and "--out-dir" in err[0]
