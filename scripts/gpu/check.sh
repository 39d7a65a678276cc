#!/usr/bin/env bash
# The one prepared device check (issue 13): run it in a single call when a GPU is lent, and copy what
# it prints into docs/ with the card's name.
#
#   scripts/gpu/check.sh                  # CUDA: build with the cuda feature, parity on CUDA, timings
#   scripts/gpu/check.sh --backend cpu    # the same steps on the CPU with the bundled tiny shapes (CI)
#
# Steps: (1) build xtask for the backend; (2) the parity tests (HF parity of CLIP, projector, LLaMA,
# the f16/bf16 fixtures) on that backend; (3) generation on the demo checkpoint and on the half
# precision fixtures with tokens/s; (4) a few stage-1 and stage-2 steps (bf16, gradient checkpointing)
# with step time, and stage 2 data-parallel (one replica per GPU, at least 2); (5) with REAL_MODEL=DIR (a real-shape folder, scripts/real_shapes.py), load + prefill
# + decode of it via bench-real-one, and next to PyTorch when REF_PYTHON names a python with torch.
# Peak device memory comes from nvidia-smi's log on CUDA, peak RSS on the CPU.
# Everything goes to $OUT (default runs/gpu-check): check.log and one file per step.
set -uo pipefail
export RUST_BACKTRACE=0 NO_COLOR=1
cd "$(dirname "$0")/../.."
BACKEND=cuda
while [ $# -gt 0 ]; do
    case "$1" in
        --backend) BACKEND="$2"; shift 2 ;;
        *) echo "usage: $0 [--backend cuda|cpu]" >&2; exit 2 ;;
    esac
done
OUT="${OUT:-runs/gpu-check}"
mkdir -p "$OUT"
LOG="$OUT/check.log"
: > "$LOG"
FAILED=0
FEATURES=()
if [ "$BACKEND" = cuda ]; then FEATURES=(--features xtask/cuda); fi

step() { # name, command...
    local name="$1"; shift
    echo "== $name: $*" | tee -a "$LOG"
    local start=$SECONDS
    if "$@" >"$OUT/$name.out" 2>"$OUT/$name.err"; then
        echo "   ok in $((SECONDS - start)) s" | tee -a "$LOG"
    else
        echo "   FAILED (exit $?) in $((SECONDS - start)) s; last lines:" | tee -a "$LOG"
        tail -5 "$OUT/$name.err" | sed 's/^/   | /' | tee -a "$LOG"
        FAILED=1
    fi
    grep -hE "tokens/s|step [0-9]+|loss|prefill|decode|peak|load" "$OUT/$name.out" "$OUT/$name.err" 2>/dev/null \
        | grep -v "^\s*$" | tail -8 | sed 's/^/   /' | tee -a "$LOG"
}

{
    echo "backend: $BACKEND"; date -u; uname -m; nproc
    if [ "$BACKEND" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
} | tee -a "$LOG"
if [ "$BACKEND" = cuda ]; then
    nvidia-smi --query-gpu=timestamp,memory.used --format=csv -l 1 >"$OUT/nvidia-smi-memory.csv" 2>/dev/null &
    SMI=$!
    trap 'kill $SMI 2>/dev/null' EXIT
fi

XTASK=(cargo run --quiet -p xtask "${FEATURES[@]}" --)
step build cargo build -p xtask "${FEATURES[@]}"
if [ "$BACKEND" = cuda ]; then
    step parity cargo test --workspace --features llava/cuda --test parity --test half -- cuda
else
    # --workspace: the tests' own feature set, so nothing is rebuilt after `cargo test --workspace`.
    step parity cargo test --workspace --test parity --test half
fi
step demo-model "${XTASK[@]}" demo-model --out "$OUT/demo-model"
step generate-demo "${XTASK[@]}" generate --backend "$BACKEND" --model "$OUT/demo-model" \
    --prompt "USER: What is in the picture? ASSISTANT:" --max-new-tokens 32
for dtype in f16 bf16; do
    # The half-precision fixtures (kept in their dtype) with the demo's tokenizer beside them.
    rm -rf "$OUT/half-$dtype" && cp -r "tests/fixtures/half/$dtype" "$OUT/half-$dtype"
    cp "$OUT"/demo-model/tokenizer* "$OUT/half-$dtype/"
    step "generate-$dtype" "${XTASK[@]}" generate --backend "$BACKEND" --model "$OUT/half-$dtype" \
        --max-new-tokens 16
done
step demo-towers "${XTASK[@]}" demo-towers --out "$OUT/towers"
if [ ! -f datasets/demo-shapes/captions.json ]; then step demo-data "${XTASK[@]}" demo-data; fi
TRAIN=(--max-steps 3 --set training.bf16=true --set training.gradient_checkpointing=true
    --set "model.vision_tower=$OUT/towers/clip" --set "model.llm=$OUT/towers/llm")
step stage1 "${XTASK[@]}" stage1 --backend "$BACKEND" --config configs/demo-stage1.toml --run-dir "$OUT/stage1" \
    "${TRAIN[@]}" --set text_pretrain.steps=2
step stage2 "${XTASK[@]}" stage2 --backend "$BACKEND" --config configs/demo-stage2.toml --run-dir "$OUT/stage2" \
    "${TRAIN[@]}" --set "model.pretrained_projector=$OUT/stage1/mm_projector.safetensors"
# Data parallel: one replica per GPU (at least 2 replicas: on one GPU or the CPU they share it).
REPLICAS=2
if [ "$BACKEND" = cuda ]; then REPLICAS=$(( $(nvidia-smi -L | wc -l) > 2 ? $(nvidia-smi -L | wc -l) : 2 )); fi
step stage2-replicas "${XTASK[@]}" stage2 --backend "$BACKEND" --config configs/demo-stage2.toml \
    --run-dir "$OUT/stage2-replicas" "${TRAIN[@]}" --set "model.pretrained_projector=$OUT/stage1/mm_projector.safetensors" \
    --set "training.devices=$REPLICAS" --set "training.global_batch_size=$(( 16 * REPLICAS ))"
if [ -n "${REAL_MODEL:-}" ]; then
    step real-model "${XTASK[@]}" bench-real-one --model "$REAL_MODEL" --prompt-tokens 59 --new-tokens 32 \
        --batches 1,8 --iters 2
    if [ -n "${REF_PYTHON:-}" ]; then
        step real-model-torch "$REF_PYTHON" scripts/bench/real_ref.py "$REAL_MODEL" bfloat16 1,8 59 32 2 "$(nproc)"
    fi
fi
if [ "$BACKEND" = cuda ]; then
    kill "$SMI" 2>/dev/null
    echo "peak device memory (MiB): $(cut -d, -f2 "$OUT/nvidia-smi-memory.csv" | grep -oE '[0-9]+' | sort -n | tail -1)" \
        | tee -a "$LOG"
fi
echo "== done: $([ $FAILED = 0 ] && echo all steps passed || echo some steps FAILED) (log: $LOG)" | tee -a "$LOG"
exit $FAILED
