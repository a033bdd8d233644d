"""bench/bench.py on the tiny random model (--quick): every section is written with positive
timings, the ratios are the reference's own numbers divided out, every row says its compute dtype
and the CPU's flags, a forced dtype is honoured, the subprocess-per-measurement and the random-
init shape paths work, a time budget skips, bad input exits 2 with one line. CPU, about a minute."""

import importlib.metadata
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_bench

import runfiles

ROOT = Path(__file__).resolve().parents[1]
bench = load_bench()
HAVE_TRL = importlib.util.find_spec("trl") is not None  # the SFTTrainer peer's package


def run(out_dir, *argv):
    """bench.main on argv; returns (results, markdown) of the one file pair it wrote."""
    assert bench.main([*argv, "--out-dir", str(out_dir)]) == 0
    files = list(Path(out_dir).glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text()), files[0].with_suffix(".md").read_text()


@pytest.fixture(scope="module", autouse=True)
def fp32_compute():
    """fp32 whatever the CPU (one with AVX512-BF16 would pick bf16), as the fp32-only kind does;
    test_a_forced_dtype_is_honoured takes bf16 on either kind."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HYPERFIT_DTYPE", "float32")
        yield


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return run(tmp_path_factory.mktemp("quick"), "--quick")


def test_quick_writes_every_section(quick):
    data, markdown = quick
    assert data["machine"].startswith("cpu-") and data["machine"].endswith("-fp32-quick")
    # the CPU kind is in the name: the two kinds' fp32 results never overwrite each other
    assert ("-avx512bf16-" in data["machine"]) == ("avx512_bf16" in runfiles.cpu_flags())
    assert data["quick"] and data["isolation"] == "in-process"
    assert data["command"].startswith("python bench/bench.py --quick --out-dir ")
    assert data["environment"]["versions"]["torch"] == importlib.metadata.version("torch")
    assert [r["config"] for r in data["train"]] == list(bench.CONFIGS)
    for r in data["train"]:
        if r["config"] == "sft_qlora" and not HAVE_TRL:  # bench/requirements.txt adds it
            assert r["skipped"].startswith("trl is not installed")
            continue
        assert "error" not in r and "skipped" not in r, r
        assert r["batch"] == 8 and r["seq_len"] == bench.SIZES["quick"]["seq_len"]
        assert r["s_per_step"] > 0 and r["peak_mem_mb"] > 0 and r["last_loss"] > 0
        assert len(r["s_per_step_all"]) == bench.SIZES["quick"]["steps"]
        assert r["tokens_per_s"] == pytest.approx(8 * r["seq_len"] / r["s_per_step"])
        assert r["peak_memory"] == "VmHWM: peak RSS"
    rows = {r["config"]: r for r in data["train"]}
    assert rows["4bit_lora_gc"]["gradient_checkpointing"] and rows["8bit_lora"]["quant"] == "8bit"
    assert rows["4bit_lora"]["lean_loss"] and not rows["4bit_lora_plain_loss"]["lean_loss"]
    assert rows["4bit_lora"]["trainable_params"] < rows["full_fp32"]["trainable_params"]
    assert [r["batch"] for r in data["generation"]] == [1, 16]
    for r in data["generation"]:
        assert r["plain_s"] > 0 and r["blocked_s"] > 0 and r["index_build_s"] > 0
        assert r["blocking_overhead"] == pytest.approx(r["blocked_s"] / r["plain_s"])
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * r["new_tokens"] / r["plain_s"])
    (e,) = data["evaluation"]
    assert (e["continuations"], e["tokens"], e["score_measured_on"]) == (30, 64, 30)
    timings = [k for k in e if k.endswith("_s") and k not in ("metrics_s", "total_s")]
    assert len(timings) == 8 and all(e[k] > 0 for k in timings)
    assert e["metrics_s"] == pytest.approx(sum(e[k] for k in timings) - e["score_continuations_s"])
    assert e["total_s"] == pytest.approx(e["metrics_s"] + e["score_continuations_s"])
    for heading in ("## Training step", "## Generation", "## Evaluation metrics", "## Goals"):
        assert heading in markdown
    for config in bench.CONFIGS:
        assert f"| tiny-random | {config} | float32 |" in markdown


def test_every_row_says_its_dtype_and_the_cpu_flags(quick):
    data, _ = quick
    rows = data["train"] + data["generation"] + data["evaluation"]
    assert len(rows) == len(bench.CONFIGS) + 2 + 1
    for r in rows:
        assert r["compute_dtype"] == "float32" and r["cpu_flags"] == runfiles.cpu_flags()


def test_ratios_are_the_references_numbers_divided_out(quick):
    data, _ = quick
    ref = data["train"][0]
    assert ref["config"] == "full_fp32" and ref["speed_vs_reference"] == 1.0
    for r in data["train"]:
        assert r["speed_vs_reference"] == pytest.approx(ref["s_per_step"] / r["s_per_step"])
        assert r["mem_vs_reference"] == pytest.approx(r["peak_mem_mb"] / ref["peak_mem_mb"])


def test_goals_name_their_reference_and_a_tiny_model_meets_none(quick):
    data, markdown = quick
    goals = {g["goal"].split(" <=")[0].split(" >=")[0]: g for g in data["goals"]}
    assert len(goals) == 6 and all(g["met"] is None for g in goals.values())
    rows = {r["config"]: r for r in data["train"]}
    assert goals["4-bit + LoRA + checkpointing peak memory"]["measured"] == pytest.approx(
        rows["4bit_lora_gc"]["mem_vs_reference"]
    )
    assert goals["train step"]["measured"] == pytest.approx(rows["4bit_lora"]["speed_vs_reference"])
    assert goals["citation blocking"]["measured"] == data["generation"][-1]["blocking_overhead"]
    assert "the paper's fp32 full fine-tune (QLoRA, Dettmers et al. 2023" in markdown
    peers = [rows[c] for c in bench.PEERS if "tokens_per_s" in rows[c]]
    fastest = max(r["tokens_per_s"] for r in peers)
    assert goals["kit default step"]["measured"] == pytest.approx(
        rows["4bit_lora"]["tokens_per_s"] / fastest
    )
    lowest = min(r["peak_mem_mb"] for r in peers)
    assert goals["kit default peak memory"]["measured"] == pytest.approx(
        rows["4bit_lora"]["peak_mem_mb"] / lowest
    )


def test_the_peers_do_the_kits_work(quick):
    """Trainer and SFTTrainer train the kit's model on the kit's batch with its seed: the first
    loss (before any update; LoRA's B starts at 0) is the same forward pass, equal up to the
    summation order; the last one differs only by what their defaults change in the update,
    which AdamW's normalized step makes tiny: Trainer's gradient clipping scales the whole
    gradient (Adam divides the scale out), SFTTrainer's bf16 LoRA weights round each update
    (bf16 keeps ~3 digits of a weight; a step moves it ~1e-4). They differ by ~1e-6 relative
    here; 1e-3 is well above that, and below what the steps move the loss by (~4e-3 over 3
    steps, checked first): a peer that did not update would fail."""
    data, markdown = quick
    rows = {r["config"]: r for r in data["train"]}
    kit = rows["4bit_lora"]
    peers = [rows["trainer_qlora"]] + [rows["sft_qlora"]] * HAVE_TRL
    assert kit["last_loss"] < kit["first_loss"] * (1 - 1e-3)  # the steps do move the loss
    for r in peers:
        assert all(map(math.isfinite, r["losses"])) and len(r["losses"]) == len(kit["losses"])
        assert r["first_loss"] == pytest.approx(kit["first_loss"], rel=1e-5)
        assert r["last_loss"] == pytest.approx(kit["last_loss"], rel=1e-3)
        assert r["trainable_params"] == kit["trainable_params"]  # the same LoRA modules
        assert r["kit_speed_vs_this"] == pytest.approx(kit["tokens_per_s"] / r["tokens_per_s"])
        assert f"| tiny-random | {r['config']} |" in markdown.split("## Against the peers")[1]
    trainer = rows["trainer_qlora"]
    assert not trainer["gradient_checkpointing"] and trainer["adapter_dtype"] == "torch.float32"
    if HAVE_TRL:  # SFTTrainer's own defaults, recorded in its row
        assert rows["sft_qlora"]["gradient_checkpointing"]


def test_without_trl_the_sft_row_skips_and_says_so(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "trl" else find_spec(n, *a)
    )
    data, markdown = run(tmp_path, "--quick", "--only", "sft_qlora")
    (r,) = data["train"]
    assert r["skipped"] == "trl is not installed: pip install -r bench/requirements.txt"
    assert "trl is not installed" in markdown


def test_a_forced_dtype_is_honoured(tmp_path, monkeypatch):
    data, _ = run(
        tmp_path / "flag", "--quick", "--dtype", "bfloat16", "--only", "full_fp32", "4bit_lora"
    )
    assert data["machine"].endswith("-bf16-quick") and data["compute_dtype"] == "bfloat16"
    ref, kit = data["train"]
    assert ref["compute_dtype"] == "float32"  # the paper's fp32 loop, whatever --dtype says
    assert kit["compute_dtype"] == "bfloat16" and kit["s_per_step"] > 0
    monkeypatch.setenv("HYPERFIT_DTYPE", "bfloat16")  # what hyperfit reads when dtype is auto
    data, _ = run(tmp_path / "env", "--quick", "--only", "4bit_lora")
    assert [r["compute_dtype"] for r in data["train"]] == ["bfloat16"]


def test_one_process_per_measurement(tmp_path):
    data, _ = run(tmp_path, "--quick", "--isolate", "--only", "4bit_lora_gc")
    assert data["isolation"] == "a process per measurement"
    (r,) = data["train"]
    assert "error" not in r, r
    assert r["s_per_step"] > 0 and r["peak_mem_mb"] > 100  # a whole Python + torch process
    assert r["speed_vs_reference"] is None  # no reference measured in this run
    assert data["generation"] == [] and data["evaluation"] == []


def test_random_init_shape_path(tmp_path):
    """--shapes builds a model of an exact shape (here the 2-layer stand-in) with a BPE tokenizer
    and loads it through load_model, as the TinyLlama and Llama-8B shapes do on a GPU."""
    only = ("full_fp32", "4bit_lora", "trainer_qlora")  # a peer: the same shape path
    data, _ = run(tmp_path, "--quick", "--shapes", "tiny", "--only", *only)
    assert data["machine"].endswith("-shapes-quick")
    (model,) = data["models"]
    assert model["name"] == "tiny" and model["shape"]["hidden_size"] == 64
    assert model["params"] > 0 and model["shape"]["vocab_size"] == 512
    ref, kit, peer = data["train"]
    assert kit["speed_vs_reference"] == pytest.approx(ref["s_per_step"] / kit["s_per_step"])
    assert peer["first_loss"] == pytest.approx(kit["first_loss"], rel=1e-5)


def test_a_time_budget_skips_and_says_so(tmp_path):
    data, markdown = run(tmp_path, "--quick", "--time-budget", "1", "--only", "full_fp32")
    (r,) = data["train"]
    assert r["skipped"].startswith("time budget") and "s_per_step" not in r
    assert r["compute_dtype"] == "float32" and r["cpu_flags"] == runfiles.cpu_flags()
    assert "time budget" in markdown


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--only", "nope"], "--only: invalid choice: 'nope'"),
        (["--shapes", "gpt5"], "--shapes: invalid choice: 'gpt5'"),
        (["--time-budget", "-1"], "--time-budget -1.0"),
        (["--dtype", "fp64"], "--dtype fp64"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, message, tmp_path, capsys):
    assert bench.main([*argv, "--quick", "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench.py: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_the_paper_shapes_need_a_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert bench.main(["--shapes", "--out-dir", str(tmp_path)]) == 2
    assert "needs a GPU" in capsys.readouterr().err


def test_the_command_line_from_the_repo_root(tmp_path):
    done = subprocess.run(
        [sys.executable, "bench/bench.py", "--only", "x"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stderr.startswith("bench.py: argument --only")
    assert done.stderr.count("\n") == 1


def test_pasted_into_a_notebook_it_starts_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # without __file__, the kit's folder is the working directory
    cell = {"__name__": "__main__"}
    exec(compile((ROOT / "bench" / "bench.py").read_text(), "<cell>", "exec"), cell)
    assert cell["ROOT"] == ROOT and callable(cell["main"])


def test_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")]).returncode == 0
