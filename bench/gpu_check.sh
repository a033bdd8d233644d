#!/usr/bin/env bash
# The GPU check: bench.py --shapes on a fresh CUDA machine, with no internet and no package index, in
# under 8 minutes. The models are random-init TinyLlama-1.1B and Llama-3.1-8B shapes built from their
# configs (no download, no tokenizer from the hub, not the bundled model); the inputs are data/ (in git).
# Writes <device>-shapes.json and .md to $OUT if set, else results/bench/.
#
#   ./gpu_check.sh                  # the check
#   ./gpu_check.sh --fetch-wheels   # on a machine with PyPI: the pinned wheels into $WHEELS (~60 MB; carry
#                                   # them to a GPU machine that lacks the packages)
#   SHAPES=tiny ./gpu_check.sh      # check this script itself on any machine (CPU, seconds)
#
# Needs torch with CUDA, transformers, peft, bitsandbytes, accelerate (sacrebleu, if present, adds the
# evaluation section). A package that is missing, or at another version than requirements.txt pins, is
# installed from $WHEELS (default wheels/) when that folder holds its wheel, with no index; otherwise
# what is installed is used and its version recorded in the JSON.
set -euo pipefail
cd "$(dirname "$0")"
START=$(date +%s)
PY=${PYTHON:-python}
WHEELS=${WHEELS:-wheels}
OUT_DIR=${OUT:-results/bench}
SHAPES=${SHAPES:-tinyllama-1.1b,llama3.1-8b}
BUDGET_S=${BUDGET_S:-480}     # the whole check, this script included
MARGIN_S=40                   # for writing results and exiting after the last measurement
PACKAGES="transformers peft bitsandbytes accelerate"
EXTRA_WHEELS="huggingface_hub tokenizers safetensors"  # transformers' own pins are the likeliest to be too old

pin() {  # "name==version" as requirements.txt pins it
    grep -iE "^$1==" requirements.txt | head -1 | sed -E 's/[[:space:]]*#.*//; s/[[:space:]]+$//'
}

if [ "${1:-}" = "--fetch-wheels" ]; then
    mkdir -p "$WHEELS"
    extras=$($PY -c "import importlib.metadata as m, sys
print(' '.join(f'{p}=={m.version(p)}' for p in sys.argv[1:]))" $EXTRA_WHEELS)
    $PY -m pip download --no-deps --only-binary :all: --platform manylinux_2_28_x86_64 --python-version \
        "$($PY -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')" -d "$WHEELS" \
        $(for p in $PACKAGES; do pin "$p"; done) $extras
    du -sh "$WHEELS"
    exit 0
fi

echo "== packages"
# one line per package: name, installed version (or MISSING), pinned version
status=$($PY - $PACKAGES <<'EOF'
import importlib.metadata as m, re, sys
pins = dict(re.match(r"([A-Za-z0-9_.-]+)==([^\s#]+)", line).groups()
            for line in open("requirements.txt") if re.match(r"[A-Za-z0-9_.-]+==", line))
for name in sys.argv[1:]:
    try:
        have = m.version(name)
    except m.PackageNotFoundError:
        have = "MISSING"
    print(name, have, pins.get(name, "?"))
EOF
)
echo "$status"
install=()
while read -r name have want; do
    wheel=$(ls "$WHEELS"/"${name//-/_}"-"$want"-*.whl 2>/dev/null | head -1 || true)
    if [ "$have" != "$want" ] && [ -n "$wheel" ]; then
        install+=("$name==$want")
    elif [ "$have" = "MISSING" ]; then
        echo "gpu_check.sh: $name is not installed and $WHEELS/ holds no wheel for it; on a machine with PyPI run" \
             "./gpu_check.sh --fetch-wheels and carry $WHEELS/ here" >&2
        exit 2
    elif [ "$have" != "$want" ]; then
        echo "note: $name $have is installed, requirements.txt pins $want (no wheel in $WHEELS/): using $have"
    fi
done <<< "$status"
if [ ${#install[@]} -gt 0 ]; then
    echo "installing from $WHEELS/ (no index): ${install[*]}"
    # resolve dependencies from the wheels and what is installed; if one is missing, install the wheels alone
    $PY -m pip install -q --no-index --find-links "$WHEELS" "${install[@]}" \
        || $PY -m pip install -q --no-index --no-deps "$WHEELS"/*.whl
fi

echo "== environment"
$PY - "$SHAPES" <<'EOF'
import sys
import torch, transformers, peft, accelerate
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: F401  (fails early on a broken install)
try:
    import bitsandbytes
    bnb = bitsandbytes.__version__
except Exception as e:  # noqa: BLE001
    bnb = f"unusable ({e.__class__.__name__}: {e})"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
      f"peft {peft.__version__}, accelerate {accelerate.__version__}, bitsandbytes {bnb}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: {p.total_memory / 1e9:.0f} GB")
elif sys.argv[1] != "tiny":
    sys.exit("gpu_check.sh: no CUDA device is visible (SHAPES=tiny checks this script on a CPU)")
EOF

left=$(( BUDGET_S - ($(date +%s) - START) - MARGIN_S ))
echo "== bench.py --shapes $SHAPES (time budget ${left} s)"
device_args=()
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || device_args=(--device cpu --quick)
# --time-budget skips (and records as skipped) what would start too late; timeout is the hard stop
timeout --signal=INT $(( left + MARGIN_S / 2 )) \
    $PY bench.py --shapes "$SHAPES" --time-budget "$left" --out-dir "$OUT_DIR" "${device_args[@]}" "$@"
echo "gpu_check.sh: done in $(( $(date +%s) - START )) s; results in $OUT_DIR/"
