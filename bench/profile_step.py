"""
One training step of a bench.py row under torch.profiler: its top ops by self CPU time, to say
where a peer (transformers Trainer, TRL SFTTrainer) and the kit spend a step differently.

    HYPERFIT_DTYPE=float32 python bench/profile_step.py 4bit_lora trainer_qlora sft_qlora

Each config runs in its own process (bench.py's isolation); the step profiled is the second (the
first builds AdamW's state), with the row's batch and sequence length from bench.py's defaults.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
import hyperfit  # noqa: E402 (bench puts the kit on the path)


class SecondCall:
    """Wraps a step's start and end so that the second step runs under the profiler."""

    def __init__(self):
        self.calls, self.profiler = 0, None

    def begin(self):
        self.calls += 1
        if self.calls == 2:
            self.profiler = profile(activities=[ProfilerActivity.CPU])
            self.profiler.__enter__()

    def end(self):
        if self.calls == 2 and self.profiler is not None:
            self.profiler.__exit__(None, None, None)


def profile_config(config, rows=15):
    """Profile config's second step in this process; print its top ops by self CPU time."""
    second, sizes = SecondCall(), dict(bench.SIZES["cpu"], warmup=1, steps=1)
    kit_step, timer = hyperfit.train_step, bench.StepTimer
    begin, end = timer.on_step_begin, timer.on_step_end

    def train_step(run, batch):  # the kit's step, as bench.time_train calls it
        second.begin()
        try:
            return kit_step(run, batch)
        finally:
            second.end()

    hyperfit.train_step = train_step  # the peers: their trainers' callbacks mark the step
    timer.on_step_begin = lambda *a, **k: (second.begin(), begin(*a, **k))[1]
    timer.on_step_end = lambda *a, **k: (end(*a, **k), second.end())[0]
    with tempfile.TemporaryDirectory(prefix="profile-") as tmp:
        work, model = str(Path(tmp) / "work.pt"), "smollm2-135m"
        texts = hyperfit.load_texts("data/fiction")
        bench.prepare_inputs(hyperfit.load_tokenizer(model), texts, sizes, work)
        spec = dict(sizes, device="cpu", dtype="auto", model=model, work=work, kind="train")
        spec.update(config=config, threads=torch.get_num_threads())
        result = bench.measure(spec)
    print(f"== {config}: {result.get('s_per_step', result)} s/step (the profiled step)")
    table = second.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    print(table, flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--_one":
        profile_config(sys.argv[2])
    elif unknown := [c for c in sys.argv[1:] if c not in bench.CONFIGS]:
        choices = ", ".join(bench.CONFIGS)
        print(f"profile_step.py: {unknown[0]}: choose from {choices}", file=sys.stderr)
        sys.exit(2)
    else:  # a process per config: one's allocations and threads never touch the next's
        for config in sys.argv[1:] or ["4bit_lora", "trainer_qlora", "sft_qlora"]:
            subprocess.run([sys.executable, __file__, "--_one", config], check=True)
