"""What a GPU run takes differently, run on the CPU: the lean loss (no full-vocabulary logits)
equals the plain one to the last gradient; training, validation and generation at fp16 compute
(Kaggle's and Colab's T4/P100) and at bf16 compute (GPUs from Ampere on; here without native
support, so tiny and slow): the loss stays finite, gradients reach every LoRA tensor, an adapter
saved and reloaded gives the same logits."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from conftest import tiny_run

import engine
import hyperfit
import runfiles


def lora_net(model_dir, dtype="float32", **kwargs):
    net, _ = hyperfit.load_model(model_dir, "4bit", device="cpu", dtype=dtype)
    torch.manual_seed(0)
    return hyperfit.add_lora(net, **kwargs)


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_lean_loss_equals_the_plain_loss_to_every_gradient(tiny_model_dir, gradient_checkpointing):
    ids = torch.randint(0, 300, (4, 40), generator=torch.Generator().manual_seed(0))
    results = []
    for loss_fn in (
        hyperfit.plain_loss_sum,
        lambda net, ids, loss: engine.lean_loss_sum(net, ids, loss, 48),
    ):
        net = lora_net(tiny_model_dir, gradient_checkpointing=gradient_checkpointing)
        for p in net.parameters():
            if p.requires_grad:
                p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
        net.train()
        # 4 x 39 = 156 positions: chunks of 48, 48, 48, 12
        loss = loss_fn(net, ids, hyperfit.token_loss_sum)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}
        results.append((loss.item(), grads))
    (plain, plain_grads), (lean, lean_grads) = results
    assert lean == pytest.approx(plain, rel=1e-5)
    assert plain_grads.keys() == lean_grads.keys() and len(plain_grads) == 28
    for name, grad in plain_grads.items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(lean_grads[name], grad, rtol=1e-5, atol=1e-6), name


def test_lean_loss_never_holds_the_full_logits(tiny_model_dir, monkeypatch):
    """The output layer only ever sees chunks of positions, never the whole batch."""
    net = lora_net(tiny_model_dir)
    head = net.get_output_embeddings()
    seen = []
    handle = head.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    ids = torch.randint(0, 300, (8, 64))
    engine.lean_loss_sum(
        net, ids, hyperfit.token_loss_sum, chunk_tokens=100
    ).backward()  # recomputed chunks: seen again
    handle.remove()
    vocab = head.weight.shape[0]
    assert seen and all(shape[-1] == vocab and math.prod(shape[:-1]) <= 100 for shape in seen)
    # the model's own logits of one position per row (logits_to_keep=1), then every chunk twice:
    # the forward and its recomputation in the backward pass
    assert sum(math.prod(s[:-1]) for s in seen) == 8 + 2 * 8 * 63


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_training_steps_at_low_precision(tiny_model_dir, dtype):
    net = lora_net(tiny_model_dir, dtype=dtype)
    assert runfiles.net_dtype(net) == runfiles.DTYPES[dtype]
    lora = {n: p for n, p in net.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in lora.values())  # fp32 LoRA weights and state
    before = {n: p.detach().clone() for n, p in lora.items()}
    optimizer = torch.optim.AdamW(lora.values(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == "float16")  # as prepare_run sets it
    ids = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(1))
    net.train()
    step = SimpleNamespace(
        net=net,
        optimizer=optimizer,
        scaler=scaler,
        lean_loss=True,
        accelerator=Accelerator(cpu=True),
        micro_batch_size=8,
    )
    losses = [hyperfit.train_step(step, ids) for _ in range(3)]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    unchanged = [n for n, p in lora.items() if torch.equal(p, before[n])]
    assert not unchanged  # gradients reached every LoRA tensor (lora_B first, then lora_A)
    assert all(state["exp_avg"].dtype == torch.float32 for state in optimizer.state.values())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_run_at_low_precision_validates_generates_and_reloads(
    tiny_model_dir, tiny_data, tmp_path, dtype
):
    run = tiny_run(
        tiny_model_dir,
        tiny_data,
        tmp_path,
        dtype,
        dtype=dtype,
        epochs=2,
        eval_every=3,
        num_train=16,
    )
    config = json.loads((run / "config.json").read_text())
    assert config["compute_dtype"] == dtype
    records = runfiles.read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 3, 4]
    for record in records:
        for key in ("val_loss", "val_entropy", "val_top1_prob", "val_greedy_ttr"):
            assert math.isfinite(record[key]), (key, record)
    assert all(math.isfinite(r["train_loss"]) for r in records[1:])
    net, _ = hyperfit.load_model(
        tiny_model_dir, "4bit", adapter=str(run / "adapter"), device="cpu", dtype=dtype
    )
    again, _ = hyperfit.load_model(
        tiny_model_dir, "4bit", adapter=str(run / "adapter"), device="cpu", dtype=dtype
    )
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        logits = net(input_ids=ids).logits
        assert torch.isfinite(logits).all() and torch.equal(logits, again(input_ids=ids).logits)
    quantized = engine.generate(net, ids[:, :8], 8)  # the GPU branch: the 4-bit net itself
    assert quantized.shape == (2, 8)
    record, _ = hyperfit.validate(
        net, hyperfit.load_tokenizer(tiny_model_dir), ids, ids[:, :8], 8, 2, dense=False
    )
    assert all(math.isfinite(v) for v in record.values())
