"""bench.py on the tiny random model (--quick): every section is written, timings are positive, the
ratios are the reference's own numbers divided out, the Markdown table exists; the subprocess-per-
measurement path and the random-init shape path work; bad input exits 2. CPU only, about a minute."""

import json
import subprocess
from pathlib import Path

import pytest

import bench

ROOT = Path(__file__).resolve().parents[1]


def results_of(out_dir):
    files = list(Path(out_dir).glob("*.json"))
    assert len(files) == 1, files
    assert files[0].with_suffix(".md").exists()
    return json.loads(files[0].read_text()), files[0].with_suffix(".md").read_text()


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-quick")
    returned = bench.main(["--quick", "--out-dir", str(out)])
    data, markdown = results_of(out)
    return returned, data, markdown


def test_quick_writes_every_section(quick):
    returned, data, markdown = quick
    assert data["mode"] == "quick" and data["quick"] and data["device_type"] == "cpu"
    assert data["device"].startswith("cpu-") and data["file_stem"] == data["device"] + "-quick"
    for key in (
        "device",
        "torch",
        "transformers",
        "bitsandbytes",
        "peft",
        "date",
        "command",
        "train",
        "generation",
        "evaluation",
        "goals",
        "models",
        "peak_memory",
    ):
        assert data[key], key
    assert data["command"].startswith("python bench.py --quick")
    assert returned["train"] == data["train"]  # main() returns what it wrote

    assert [r["config"] for r in data["train"]] == list(bench.DEFAULT_CONFIGS)
    for row in data["train"]:
        assert "error" not in row, row
        assert row["batch"] == bench.BATCH_SIZE and row["seq_len"] == bench.QUICK["seq_len"]
        assert row["s_per_step"] > 0 and row["tokens_per_s"] > 0 and row["peak_mem_mb"] > 0
        assert row["tokens_per_s"] == pytest.approx(
            row["batch"] * row["seq_len"] / row["s_per_step"]
        )
        assert len(row["s_per_step_all"]) == bench.QUICK["steps"]
        assert row["compute_dtype"] in ("float32", "bfloat16")
        assert row["first_loss"] > 0 and row["last_loss"] > 0
    by_config = {r["config"]: r for r in data["train"]}
    assert (
        by_config["full_fp32"]["compute_dtype"] == "float32" and not by_config["full_fp32"]["lora"]
    )
    assert (
        by_config["4bit_lora_gc"]["gradient_checkpointing"]
        and by_config["8bit_lora"]["quant"] == "8bit"
    )
    # LoRA trains a small fraction of what the full fine-tune trains
    assert by_config["4bit_lora"]["trainable_params"] < by_config["full_fp32"]["trainable_params"]


def test_ratios_are_to_the_reference_of_the_same_run(quick):
    _, data, _ = quick
    ref = next(r for r in data["train"] if r["config"] == "full_fp32")
    assert ref["speed_vs_reference"] == 1.0 and ref["mem_vs_reference"] == 1.0
    for row in data["train"]:
        assert row["speed_vs_reference"] == pytest.approx(ref["s_per_step"] / row["s_per_step"])
        assert row["mem_vs_reference"] == pytest.approx(row["peak_mem_mb"] / ref["peak_mem_mb"])


def test_generation_and_evaluation(quick):
    _, data, _ = quick
    assert [r["batch"] for r in data["generation"]] == list(bench.GEN_BATCH_SIZES)
    for row in data["generation"]:
        assert (
            row["tokens_per_s"] > 0
            and row["blocked_tokens_per_s"] > 0
            and row["new_tokens"] == bench.QUICK["gen_tokens"]
        )
        assert row["blocking_overhead"] == pytest.approx(row["blocked_s"] / row["plain_s"])
        assert row["tokens_per_s"] == pytest.approx(
            row["batch"] * row["new_tokens"] / row["plain_s"]
        )
        assert 0 <= row["banned_step_share"] <= 1
    e = data["evaluation"]
    assert (
        e["continuations"] == bench.QUICK["eval_continuations"]
        and e["tokens"] == bench.QUICK["eval_tokens"]
    )
    for key in ("index_build_s", "token_metrics_s", "ppl_original_s"):
        assert e[key] > 0, key
    assert e["total_s"] == pytest.approx(
        e["index_build_s"] + e["token_metrics_s"] + e["ppl_original_s"]
    )


def test_goals_and_markdown(quick):
    _, data, markdown = quick
    assert set(data["goals"]) == {
        "cpu_kit_step_speedup",
        "cpu_gc_peak_memory_ratio",
        "blocking_overhead_b16",
        "metrics_300x256_s",
    }
    for goal in data["goals"].values():
        assert goal["target"] and goal["measured"] is not None
        assert goal["met"] is None  # a tiny model proves nothing about the goals: never a pass
    assert data["goals"]["cpu_kit_step_speedup"]["measured"] == pytest.approx(
        next(r for r in data["train"] if r["config"] == "4bit_lora")["speed_vs_reference"]
    )
    for heading in ("## Training step", "## Generation", "## Evaluation", "## Goals"):
        assert heading in markdown
    for config in bench.DEFAULT_CONFIGS:
        assert f"| tiny-random | {config} |" in markdown


def test_one_subprocess_per_measurement(tmp_path):
    """The default path for real runs: each configuration in its own process, its peak its own."""
    bench.main(
        [
            "--quick",
            "--isolate",
            "--sections",
            "train",
            "--configs",
            "full_fp32,4bit_lora_gc",
            "--out-dir",
            str(tmp_path),
        ]
    )
    data, _ = results_of(tmp_path)
    assert data["isolation"] == "one subprocess per measurement"
    assert [r["config"] for r in data["train"]] == ["full_fp32", "4bit_lora_gc"]
    for row in data["train"]:
        assert "error" not in row, row
        assert row["s_per_step"] > 0 and row["peak_mem_mb"] > 100  # a whole Python + torch process
    assert data["generation"] == [] and data["evaluation"] is None


def test_random_init_shape_path(tmp_path):
    """--shapes builds a random model of a given shape with its own tokenizer and loads it through
    load_model; 'tiny' runs the same path as the TinyLlama / Llama-8B shapes do on a GPU."""
    bench.main(
        [
            "--quick",
            "--shapes",
            "tiny",
            "--device",
            "cpu",
            "--sections",
            "train",
            "--configs",
            "4bit_lora,full_fp32",
            "--out-dir",
            str(tmp_path),
        ]
    )
    data, _ = results_of(tmp_path)
    assert data["mode"] == "shapes" and data["file_stem"].endswith("-shapes")
    model = data["models"][0]
    assert model["name"] == "tiny" and model["params"] > 0 and model["shape"]["hidden_size"] == 64
    assert [r["config"] for r in data["train"]] == ["4bit_lora", "full_fp32"]
    assert all(r["s_per_step"] > 0 and "error" not in r for r in data["train"])
    assert data["train"][0]["speed_vs_reference"] == pytest.approx(
        data["train"][1]["s_per_step"] / data["train"][0]["s_per_step"]
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--configs", "nope"], "--configs nope"),
        (["--sections", "training"], "--sections training"),
        (["--shapes", "gpt5"], "--shapes gpt5"),
    ],
)
def test_bad_input_exits_2(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv + ["--quick", "--out-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_gpu_shapes_refused_without_a_gpu(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--shapes", "--out-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "no GPU is visible" in capsys.readouterr().err


def test_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "gpu_check.sh")]).returncode == 0
