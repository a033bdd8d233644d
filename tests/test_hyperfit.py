"""Training through the real 4-bit + LoRA path on a tiny random Llama: it hyperfits, it resumes
exactly, it is deterministic, and the training step is the paper's."""

import json
import os
import re
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_RUN, tiny_run

import engine
import hyperfit
import runfiles


def metrics_without_timings(run_dir):
    return [
        {k: v for k, v in r.items() if k not in ("elapsed_s", "score_s", "gen_s")}  # seconds
        for r in runfiles.read_jsonl(run_dir / "metrics.jsonl")
    ]


def adapter_tensors(run_dir, folder="adapter"):
    from safetensors.torch import load_file

    return load_file(run_dir / folder / "adapter_model.safetensors")


def assert_same_adapter(a_dir, b_dir, tol=1e-6, folder="adapter"):
    a, b = adapter_tensors(a_dir, folder), adapter_tensors(b_dir, folder)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= tol


class InterruptAt:
    """hyperfit.global_batches, with SIGINT sent while optimizer step `step` computes (each step
    asks for its batch once): the step finishes, then the run saves and stops."""

    def __init__(self, step):
        self.step, self.calls, self.batches = step, 0, hyperfit.global_batches

    def __call__(self, *args):
        self.calls += 1
        if self.calls == self.step:
            os.kill(os.getpid(), signal.SIGINT)
        return self.batches(*args)


def assert_close_records(xs, ys, tol=1e-6):
    assert len(xs) == len(ys) > 0
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], float):
                assert abs(x[k] - y[k]) <= tol, (k, x[k], y[k])
            else:
                assert x[k] == y[k], (k, x[k], y[k])


def test_tiny_model_hyperfits_to_near_zero_loss(tiny_model_dir, tiny_data, tmp_path):
    run_dir = tiny_run(
        tiny_model_dir, tiny_data, tmp_path, "fit", num_train=16, epochs=30, eval_every=20
    )
    records = runfiles.read_jsonl(run_dir / "metrics.jsonl")
    first, last = records[0], records[-1]
    assert first["step"] == 0 and first["train_loss"] is None
    assert last["step"] == 60 and last["epoch"] == 30
    assert last["train_loss"] < 0.3  # near-zero training loss ...
    assert last["val_loss"] > first["val_loss"]  # ... while validation loss rises
    for key in ("val_entropy", "val_top1_prob", "val_greedy_ttr"):
        assert all(0 <= r[key] < 10 for r in records)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["args"]["lr"] == 1e-2 and config["steps_per_epoch"] == 2
    assert config["versions"]["torch"] and "git_commit" in config and config["args"]["seed"] == 0
    # what decides the numbers beyond the settings: dtype, threads, CPU flags (docs/reliability.md)
    assert config["compute_dtype"] in ("float32", "bfloat16") and config["torch_threads"] >= 1
    assert isinstance(config["cpu_flags"], list) and config["cpu"]
    assert (run_dir / "adapter" / "adapter_config.json").exists()
    samples = runfiles.read_jsonl(run_dir / "samples.jsonl")
    assert {s["step"] for s in samples} == {0, 20, 40, 60} and all(
        s["continuation"] for s in samples
    )


def test_every_step_s_loss_is_logged_and_cheap_validations_skip_generation(
    tiny_model_dir, tiny_data, tmp_path
):
    """steps.jsonl holds every optimizer step's loss (the curve's every point); validations
    between --gen-every steps score loss, entropy and top-1 without generating (TTR None), and
    metrics.jsonl's train_loss is the mean of the steps since the previous validation."""
    run_dir = tiny_run(
        tiny_model_dir, tiny_data, tmp_path, "steps", epochs=3, eval_every=1, gen_every=4
    )
    steps = runfiles.read_jsonl(run_dir / "steps.jsonl")
    assert [r["step"] for r in steps] == list(range(1, 10))  # 3 epochs x 3 steps
    assert all(r["lr"] == 1e-2 and r["epoch"] == round(r["step"] / 3, 4) for r in steps)
    records = runfiles.read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(10))  # a validation at every step
    generated = [r["step"] for r in records if r["val_greedy_ttr"] is not None]
    assert generated == [0, 4, 8, 9]  # every 4th step, and the last
    assert all(r["val_loss"] > 0 and r["val_entropy"] > 0 for r in records)
    for record, step in zip(records[1:], steps):
        assert record["train_loss"] == pytest.approx(step["train_loss"])  # one step per record
    assert {s["step"] for s in runfiles.read_jsonl(run_dir / "samples.jsonl")} == set(generated)


def lora_net(tiny_model_dir, dtype="float32", **kwargs):
    net, tokenizer = hyperfit.load_model(tiny_model_dir, "4bit", device="cpu", dtype=dtype)
    torch.manual_seed(0)
    return hyperfit.add_lora(net, **kwargs), tokenizer


def test_gradients_reach_every_lora_tensor_after_generate(tiny_model_dir):
    """Guards the bitsandbytes CPU repack trap: after an eval-mode generate, backprop must still
    reach every LoRA tensor (lora_B starts at zero, so lora_A gets gradient from step 2)."""
    net, _ = lora_net(tiny_model_dir)
    ids = torch.randint(0, 300, (4, 24))
    engine.generate(net, ids[:, :8], 8)
    lora = {n: p for n, p in net.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    optimizer = torch.optim.AdamW(lora.values(), lr=1e-2)
    for _ in range(2):
        net.train()
        net(input_ids=ids, labels=ids).loss.backward()
        grads = {n: p.grad.abs().sum().item() for n, p in lora.items()}
        optimizer.step()
        optimizer.zero_grad()
        engine.generate(net, ids[:, :8], 4)
    assert all(g > 0 for g in grads.values()), [n for n, g in grads.items() if g == 0]


def test_late_stage_lora_targets_only_the_last_layers(tiny_model_dir):
    net, _ = lora_net(tiny_model_dir, last_layers=1)
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    assert names and all(".layers.1." in n for n in names)
    assert len(names) == 2 * len(hyperfit.LORA_TARGETS)
    with pytest.raises(hyperfit.UsageError, match="the model has 2 layers"):
        lora_net(tiny_model_dir, last_layers=3)


def test_train_step_is_the_token_mean_cross_entropy_of_the_batch(tiny_model_dir):
    """train_step's loss and update equal the paper's step: transformers' own mean loss, then
    backward and an optimizer step (SGD at lr 1 here, so the update is the gradient itself)."""
    from accelerate import Accelerator

    ids = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(0))
    accelerator = Accelerator(cpu=True)
    results = []
    for micro in (8, 2):  # one pass, and gradient accumulation over four micro-batches
        net, _ = lora_net(tiny_model_dir)
        optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1.0)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        step = SimpleNamespace(
            net=net,
            optimizer=optimizer,
            scaler=scaler,
            accelerator=accelerator,
            micro_batch_size=micro,
            lean_loss=True,
        )
        loss = hyperfit.train_step(step, ids)
        results.append(
            (loss, {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad})
        )
    net, _ = lora_net(tiny_model_dir)
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1.0)
    reference = net(input_ids=ids, labels=ids).loss  # transformers' mean next-token loss
    reference.backward()
    optimizer.step()
    for loss, weights in results:
        assert loss == pytest.approx(reference.item(), rel=1e-5)
        for name, p in net.named_parameters():
            if p.requires_grad:
                assert torch.allclose(weights[name], p, atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("lean_loss", [True, False])
def test_a_loss_changed_in_token_loss_sum_is_the_loss_train_step_takes(
    tiny_model_dir, monkeypatch, lean_loss
):
    """A student changes the loss in one place, token_loss_sum, and the step takes it on both
    paths (the default lean one and --no-lean-loss): here label smoothing 0.1, checked against
    torch's label-smoothed cross-entropy of the full logits."""
    from accelerate import Accelerator

    def smoothed(logits, targets):
        return torch.nn.functional.cross_entropy(
            logits.float(), targets, reduction="sum", label_smoothing=0.1
        )

    ids = torch.randint(0, 300, (4, 24), generator=torch.Generator().manual_seed(0))
    net, _ = lora_net(tiny_model_dir)
    with torch.no_grad():
        logits = net(input_ids=ids).logits[:, :-1].float().flatten(0, 1)
    targets = ids[:, 1:].reshape(-1)
    expected = torch.nn.functional.cross_entropy(logits, targets, label_smoothing=0.1).item()
    unchanged = torch.nn.functional.cross_entropy(logits, targets).item()
    monkeypatch.setattr(hyperfit, "token_loss_sum", smoothed)
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1.0)
    step = SimpleNamespace(
        net=net,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        accelerator=Accelerator(cpu=True),
        micro_batch_size=4,
        lean_loss=lean_loss,
    )
    loss = hyperfit.train_step(step, ids)
    assert loss == pytest.approx(expected, rel=1e-5)
    assert abs(loss - unchanged) > 1e-3  # the change is seen, not the paper's loss


def test_adapter_save_and_reload_gives_identical_logits_and_generations(tiny_model_dir, tmp_path):
    net, _ = lora_net(tiny_model_dir)
    ids = torch.randint(0, 300, (4, 24))
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        net(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    net.save_pretrained(tmp_path / "adapter")
    reloaded, _ = hyperfit.load_model(
        tiny_model_dir, "4bit", adapter=str(tmp_path / "adapter"), device="cpu", dtype="float32"
    )
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    assert torch.equal(
        engine.generate(net, ids[:, :8], 12), engine.generate(reloaded, ids[:, :8], 12)
    )


def test_interrupt_and_resume_equals_an_uninterrupted_run(
    tiny_model_dir, tiny_data, tmp_path, monkeypatch
):
    settings = dict(epochs=3, eval_every=2)  # 24 sequences / batch 8 = 3 steps per epoch, 9 steps
    straight = tiny_run(tiny_model_dir, tiny_data, tmp_path, "straight", **settings)

    # SIGINT arrives while step 5 computes (epoch 2, mid-epoch): the step finishes, then the run
    # saves and stops
    interrupt = InterruptAt(5)
    monkeypatch.setattr(hyperfit, "global_batches", interrupt)
    # what was there before (SIG_IGN, not Python's handler, where the shell started pytest in the
    # background)
    handler_before = signal.getsignal(signal.SIGINT)
    with pytest.raises(runfiles.RunInterrupted, match="interrupted at step 5/9.*--resume"):
        tiny_run(tiny_model_dir, tiny_data, tmp_path, "resumed", **settings)
    assert signal.getsignal(signal.SIGINT) is handler_before  # handlers restored
    state = torch.load(tmp_path / "resumed" / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 5 and not (tmp_path / "resumed" / "adapter").exists()
    monkeypatch.setattr(hyperfit, "global_batches", interrupt.batches)

    resumed = tiny_run(tiny_model_dir, tiny_data, tmp_path, "resumed", resume=True, **settings)
    assert_close_records(metrics_without_timings(resumed), metrics_without_timings(straight))
    assert_same_adapter(straight, resumed)


def test_same_seed_gives_identical_metrics_and_order_seed_changes_only_the_order(
    tiny_model_dir, tiny_data, tmp_path
):
    a = tiny_run(tiny_model_dir, tiny_data, tmp_path, "a", epochs=2, eval_every=3)
    b = tiny_run(tiny_model_dir, tiny_data, tmp_path, "b", epochs=2, eval_every=3)
    assert metrics_without_timings(a) == metrics_without_timings(b)
    c = tiny_run(tiny_model_dir, tiny_data, tmp_path, "c", epochs=2, eval_every=3, seed=1)
    assert metrics_without_timings(a) != metrics_without_timings(c)
    d = tiny_run(tiny_model_dir, tiny_data, tmp_path, "d", epochs=2, eval_every=3, order_seed=7)
    config_a, config_d = (json.loads((r / "config.json").read_text()) for r in (a, d))
    assert config_a["train_fingerprint"] == config_d["train_fingerprint"]  # the same data ...
    step0_a, step0_d = metrics_without_timings(a)[0], metrics_without_timings(d)[0]
    assert step0_a == step0_d  # ... and the same LoRA initialisation (the untrained model) ...
    assert metrics_without_timings(a)[1:] != metrics_without_timings(d)[1:]  # ... another order
    assert (
        hyperfit.global_batches(24, 8, 0, 0)[0].tolist()
        != hyperfit.global_batches(24, 8, 7, 0)[0].tolist()
    )


def test_resume_with_more_epochs_extends_the_run_and_says_so(
    tiny_model_dir, tiny_data, tmp_path, capsys
):
    two = tiny_run(tiny_model_dir, tiny_data, tmp_path, "two", epochs=2, eval_every=3)
    three = tiny_run(tiny_model_dir, tiny_data, tmp_path, "three", epochs=3, eval_every=3)
    capsys.readouterr()
    tiny_run(tiny_model_dir, tiny_data, tmp_path, "two", epochs=3, eval_every=3, resume=True)
    assert "changed on resume: epochs 2 -> 3" in capsys.readouterr().out
    assert_close_records(metrics_without_timings(two), metrics_without_timings(three))
    assert_same_adapter(two, three)
    config = json.loads((two / "config.json").read_text())
    assert config["args"]["epochs"] == 3 and config["resumed"][0]["changed"] == {"epochs": [2, 3]}
    with pytest.raises(hyperfit.UsageError, match="a resumed run keeps its own seq-len"):
        tiny_run(tiny_model_dir, tiny_data, tmp_path, "two", epochs=4, seq_len=32, resume=True)


def test_dense_copy_matches_the_quantized_lora_model(tiny_model_dir, compute_dtype):
    """The dense copy computes the quantized LoRA net's function (in fp32 on a CPU): equal to the
    net to 1e-4 at fp32 compute; at bf16 compute the net rounds every activation to 8 bits of
    mantissa, so they agree to that precision."""
    net, _ = lora_net(tiny_model_dir, dtype=compute_dtype)
    for p in net.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)  # a non-trivial adapter
    ids = torch.randint(0, 300, (2, 16))
    net.eval()
    tolerance = dict(float32=1e-4, bfloat16=0.1)[compute_dtype]  # mean |difference| of logits
    with torch.no_grad():
        dense = engine.dense_copy(net)
        assert runfiles.net_dtype(dense) == torch.float32
        tuned = dense(input_ids=ids).logits
        assert (tuned - net(input_ids=ids).logits.float()).abs().mean() < tolerance
        with net.disable_adapter():
            original = engine.dense_copy(net)(input_ids=ids).logits
            assert (original - net(input_ids=ids).logits.float()).abs().mean() < tolerance
    assert (tuned - original).abs().mean() > 10 * tolerance  # the adapter does change the net


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
@pytest.mark.parametrize("quant", ["4bit", "none"])
def test_a_cpu_model_lets_its_weights_file_go(tiny_model_dir, tmp_path, quant):
    """transformers keeps the tensors it does not quantize as views of the memory-mapped
    safetensors file, which keeps every page quantization read resident (~400 MB for SmolLM2);
    load_model gives them memory of their own, so the file is unmapped."""
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")  # a path no other test maps
    net, _ = hyperfit.load_model(str(folder), quant, device="cpu", dtype="float32")
    assert str(folder) not in Path("/proc/self/maps").read_text()
    assert net(input_ids=torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_every_phase_is_named_and_the_expected_time_counts_the_validations(
    tiny_model_dir, tiny_data, tmp_path, capsys
):
    """A newcomer can tell progress from a hang: the run prints its settings, each validation is
    named on the bar, the expected total (timed on the first step and validation, validations
    included) is printed once, and the measured total at the end is within 2x of it."""
    run_dir = tiny_run(
        tiny_model_dir, tiny_data, tmp_path, "eta", epochs=8, eval_every=3, gen_every=6,
        progress=True,
    )  # fmt: skip
    out = capsys.readouterr()
    text = out.out + out.err
    assert "settings:" in text and "validating (greedy continuations) 1/" in text
    expected = re.search(r"expected: .* = (\d+) s", text)
    measured = re.search(r"trained in (\d+) s \(expected (\d+) s\)", text)
    assert expected and measured and measured[2] == expected[1]
    assert int(measured[1]) <= 2 * max(1, int(expected[1]))  # the ETA counts the validations
    records = runfiles.read_jsonl(run_dir / "metrics.jsonl")
    assert all(r["score_s"] > 0 for r in records)  # each validation's time, in its record
    assert [r["gen_s"] is not None for r in records] == [
        s % 6 == 0 or s == 24 for s in (r["step"] for r in records)
    ]


def test_a_run_slower_than_expected_ends_at_100_percent_not_beyond():
    """Steps that take longer than the first one timed never push the bar past 100 % or its ETA
    below zero (a busy machine: tqdm clamped with a warning and showed -00:00)."""
    settings = SimpleNamespace(eval_every=2, gen_every=None, run_name="slow")
    run = SimpleNamespace(settings=settings, step=0, total_steps=4)
    with runfiles.RunProgress(run, shown=True) as bar:
        bar.validated(1.0, 1.0)  # step 0
        for seconds in (1.0, 5.0, 5.0, 5.0):  # the first step sets the plan; the rest are slower
            run.step += 1
            bar.stepped(seconds, 0.1)
            if run.step % 2 == 0:
                bar.validated(1.0, 1.0)
        assert bar.expected == 4 * 1.0 + 3 * 1.0 + 3 * 1.0  # the plan, from the first timings
        assert bar.bar.n == bar.bar.total == bar.done == 3 * 2.0 + 16.0
    # a resumed run's plan is complete only at its last validation, when more may be done
    run.step, run.total_steps = 4, 6
    with runfiles.RunProgress(run, shown=True) as bar:
        for seconds in (1.0, 9.0):
            run.step += 1
            bar.stepped(seconds, 0.1)
        bar.validated(1.0, 1.0)
        assert bar.expected == 2 * 1.0 + 1.0 + 1.0 and bar.bar.n == bar.bar.total == 12.0


def test_the_quick_check_runs_the_chain_and_prints_each_sign(
    tiny_model_dir, tiny_data, tmp_path, capsys
):
    """python hyperfit.py --quick: a tiny run, evaluated and plotted, then each direction of the
    paper's signature with a check mark and the numbers behind it; a second one replaces the
    first quick run (and only it)."""
    argv = ["--quick", "--model", tiny_model_dir, "--data", tiny_data, "--out-dir", str(tmp_path)]
    for _ in range(2):
        assert hyperfit.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    signs = [line for line in lines if line[:1] in "✓✗" and line[1:2] == " "]
    assert len(signs) == 8  # four signs, twice
    run = tmp_path / "quick"
    steps = runfiles.read_jsonl(run / "steps.jsonl")
    first, last = steps[0]["train_loss"], steps[-1]["train_loss"]
    assert signs[4] == f"{'✓' if last < 0.5 * first else '✗'} training loss falls hard: " + (
        f"{first:.3f} -> {last:.3f}"
    )
    assert (
        len(steps) == 16 and (run / "report.md").exists() and (run / "training_curves.png").exists()
    )
    assert any(
        line.startswith("quick check: ") and "signs as in the paper" in line for line in lines
    )


def tied_model(tiny_model_dir, folder):
    """The tiny Llama with its output layer tied to the embeddings, as SmolLM2's is."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(tiny_model_dir, folder)
    net = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    net.config.tie_word_embeddings = True
    net.lm_head.weight = net.model.embed_tokens.weight
    net.save_pretrained(folder)
    return str(folder)


def test_full_fine_tuning_trains_every_weight_resumes_exactly_and_evaluates(
    tiny_model_dir, tiny_data, tmp_path, monkeypatch
):
    """--lora-r 0 (the paper's own setting): every weight moves, the tied output layer stays
    tied, the run saves model/ (a model folder of its own), a resumed run equals an uninterrupted
    one to the bit, and evaluate.py loads the original and the tuned model apart."""
    from safetensors.torch import load_file

    import evaluate

    model = tied_model(tiny_model_dir, tmp_path / "tied")
    full = dict(quant="none", dtype="float32", lora_r=0, lr=1e-3, epochs=2, eval_every=3)
    straight = tiny_run(model, tiny_data, tmp_path, "straight", **full)
    assert not (straight / "adapter").exists()
    tuned = load_file(straight / "model" / "model.safetensors")
    before = load_file(Path(model) / "model.safetensors")
    assert "lm_head.weight" not in tuned  # tied: saved once, as the embeddings
    net, _ = hyperfit.load_model(str(straight / "model"), "none", device="cpu", dtype="float32")
    assert net.lm_head.weight is net.model.embed_tokens.weight  # --model takes the folder
    assert all(not torch.equal(tuned[k], before[k]) for k in before if "norm" not in k), "frozen?"

    interrupt = InterruptAt(4)
    monkeypatch.setattr(hyperfit, "global_batches", interrupt)
    with pytest.raises(runfiles.RunInterrupted, match="interrupted at step 4/6"):
        tiny_run(model, tiny_data, tmp_path, "resumed", **full)
    monkeypatch.setattr(hyperfit, "global_batches", interrupt.batches)
    resumed = tiny_run(model, tiny_data, tmp_path, "resumed", resume=True, **full)
    again = load_file(resumed / "model" / "model.safetensors")
    assert tuned.keys() == again.keys() and all(torch.equal(tuned[k], again[k]) for k in tuned)
    assert_close_records(metrics_without_timings(resumed), metrics_without_timings(straight), 0)

    summary = evaluate.evaluate(
        straight, modes="original_greedy,hyperfitted_greedy", num_prompts=4, new_tokens=12,
        batch_size=4, sharpness_seqs=2, out_dir=tmp_path / "eval", progress=False,
    )  # fmt: skip
    sharp = summary["sharpness"]
    assert sharp["hyperfitted"]["loss"] != sharp["original"]["loss"]
    bare = evaluate.evaluate(
        None, model=model, data=tiny_data, modes="original_greedy", num_prompts=4, new_tokens=12,
        batch_size=4, sharpness_seqs=2, out_dir=tmp_path / "bare", progress=False,
        quant="none", dtype="float32",
        **{k: TINY_RUN[k] for k in ("seq_len", "num_train", "num_val", "prompt_len")},
    )  # fmt: skip
    assert bare["sharpness"]["original"]["loss"] == sharp["original"]["loss"]  # the original


@pytest.mark.parametrize(
    "wrong, says",
    [
        (dict(quant="4bit", dtype="float32"), "needs --quant none --dtype float32"),
        (dict(quant="none", dtype="bfloat16"), "needs --quant none --dtype float32"),
        (dict(quant="none", dtype="float32", lora_layers=1), "drop --lora-layers"),
    ],
)
def test_full_fine_tuning_refuses_what_it_cannot_train(
    tiny_model_dir, tiny_data, tmp_path, wrong, says
):
    with pytest.raises(runfiles.UsageError, match=says):
        tiny_run(tiny_model_dir, tiny_data, tmp_path, "refused", lora_r=0, **wrong)
    assert not (tmp_path / "refused").exists()  # refused before anything is written


def test_a_full_fine_tune_of_a_late_stage_lora_preset_drops_its_lora_layers():
    """qwen2.5-1.5b's preset sets lora_layers 5 (late-stage LoRA): --lora-r 0 on it was refused
    as "drop --lora-layers", an option the user had not given and could not unset."""
    full = dict(model="qwen2.5-1.5b", lora_r=0, quant="none", dtype="float32")
    assert hyperfit.new_settings(full).lora_layers is None
    assert hyperfit.new_settings(dict(model="qwen2.5-1.5b")).lora_layers == 5  # LoRA keeps them
    with pytest.raises(runfiles.UsageError, match="drop --lora-layers"):  # given: refused
        hyperfit.new_settings(dict(full, lora_layers=2))
