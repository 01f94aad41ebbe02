#!/usr/bin/env bash
# The GPU rows of docs/performance.md in one command (under 8 minutes on one data-centre GPU):
#
#   bash benchmarks/gpu.sh [--quick] OUT_DIR
#
# Writes OUT_DIR/rows.jsonl (one JSON row per measurement, also printed) and OUT_DIR/gpu.log:
#   1. the pretrain step of each backbone and preset in bf16 (backbones.py): samples/s, TFLOP/s and
#      the fraction of the card's bf16 peak;
#   2. the same with the forward compiled, as `pretrain --torch-compile` does, at the default
#      preset (compiling the larger presets would take most of the 8 minutes);
#   2b. the upstream networks: the pretrain step of NeuroSTORM's MAE (released size) beside swin4d
#      base, and one forward pass of a 96^3 x 20 window of swin4d base, SwiFT and NeuroSTORM
#      (backbones.py --forward; each row's ratio_to_swin4d);
#   3. the real loader against the in-memory step (pretrain_step.py), with pinned memory;
#   4. one participant run: embeddings, then attribution (participant.py);
#   5. a 2-process DDP step under torchrun (on 2 GPUs; with fewer, the same step on the CPU with
#      gloo, and the row says "device": "cpu");
#   6. the paper's question at a GPU's compute (real_signal.py): roi vs random masking pretrained
#      on all 155 real-signal participants of ../shared/realdata (the `small` preset, 20 epochs
#      each), every readout beside fc, tangent and covariates on the same folds, with the
#      corrected resampled t-test; skipped, with a line, where the data are not there (the device
#      machine gets only the checkout: copy realdata into it and set ROIMAE_SHARED_DIR).
# --quick runs the same steps at the smallest sizes on whatever device there is (the forward rows
# on 4 frames, without the NeuroSTORM step); the tests run it on the CPU. OUT_DIR/rows.jsonl is
# never overwritten: give a new OUT_DIR for a new run. $PYTHON runs the benchmarks (default: the
# `python` on PATH), so a virtual environment need not be activated.
set -euo pipefail
python="${PYTHON:-python}"

here="$(cd "$(dirname "$0")" && pwd)"
quick=0
if [[ "${1:-}" == "--quick" ]]; then
    quick=1
    shift
fi
if [[ $# -ne 1 ]]; then
    echo "usage: bash benchmarks/gpu.sh [--quick] OUT_DIR" >&2
    exit 64
fi
out="$1"
rows="$out/rows.jsonl"
if [[ -e "$rows" ]]; then
    echo "gpu.sh: $rows already exists; give a new OUT_DIR" >&2
    exit 64
fi
mkdir -p "$out"
log="$out/gpu.log"
: > "$log"

if [[ $quick -eq 1 ]]; then
    presets=(tiny)
    step=(--batch-size 1 --frames 10 --steps 1 --warmup 1)
    loader=(--presets tiny --maskings roi --batch-size 1 --window-frames 5 --steps 1 --rounds 1)
    participant=(--frames 40 --presets tiny --subsets 2 --repeats 1)
    real_signal=(--per-class 2 --preset tiny --epochs 1 --window-frames 10 --cv-folds 2
                 --cv-repeats 1 --n-permutations 0 --features global)
    upstream_step=()   # NeuroSTORM's released MAE takes minutes per step on a CPU: not in --quick
    forward=(--frames 4 --steps 1)
else
    presets=(tiny small base)
    step=(--batch-size 2 --frames 20 --steps 10 --warmup 2)
    loader=(--presets tiny small base --maskings roi --steps 10 --rounds 3)
    participant=(--frames 176 --presets tiny small base --repeats 2)
    real_signal=(--preset small --epochs 20 --n-permutations 100)
    upstream_step=(--batch-size 2 --frames 20 --steps 5 --warmup 2)
    forward=(--frames 20 --steps 5)
fi
default_preset=tiny

n_gpus="$("$python" -c 'import torch; print(torch.cuda.device_count())')"
start=$SECONDS

# Runs one benchmark: its JSON rows go to rows.jsonl (and the screen), its stderr to the log.
measure() {
    local name="$1"
    shift
    local began=$SECONDS
    echo "== $name: $*" >> "$log"
    if ! "$@" 2>> "$log" | grep '^{' | tee -a "$rows"; then
        echo "gpu.sh: $name failed; see $log" >&2
        exit 1
    fi
    echo "gpu.sh: $name done in $((SECONDS - began)) s" >&2
}

measure "step" "$python" "$here/backbones.py" --presets "${presets[@]}" \
    --backbones swin4d vit4d "${step[@]}"
measure "compiled step" "$python" "$here/backbones.py" --presets "$default_preset" \
    --backbones swin4d vit4d "${step[@]}" --compile
if [[ ${#upstream_step[@]} -gt 0 ]]; then
    measure "upstream step" "$python" "$here/backbones.py" --presets base \
        --backbones swin4d neurostorm "${upstream_step[@]}"
fi
measure "forward" "$python" "$here/backbones.py" --forward "${forward[@]}"
measure "loader" "$python" "$here/pretrain_step.py" "${loader[@]}"
measure "participant" "$python" "$here/participant.py" "${participant[@]}"
if [[ "$n_gpus" -ge 2 ]]; then
    measure "ddp" "$python" -m torch.distributed.run --standalone --nproc-per-node 2 \
        "$here/backbones.py" --presets "$default_preset" --backbones swin4d "${step[@]}"
else
    echo "gpu.sh: $n_gpus GPU(s): the 2-process DDP step runs on the CPU (gloo)" >&2
    CUDA_VISIBLE_DEVICES="" measure "ddp" "$python" -m torch.distributed.run --standalone \
        --nproc-per-node 2 "$here/backbones.py" --presets "$default_preset" \
        --backbones swin4d --batch-size 1 --frames 10 --steps 1 --warmup 1
fi
realdata="${ROIMAE_SHARED_DIR:-$here/../../shared}/realdata/development_fmri"
if [[ -f "$realdata/timeseries_aal116.npz" ]]; then
    measure "roi vs random" "$python" "$here/real_signal.py" "$out/real-signal" \
        --realdata "$realdata" "${real_signal[@]}"
else
    echo "gpu.sh: no $realdata: the roi vs random row is skipped" >&2
fi
echo "gpu.sh: $(wc -l < "$rows") rows in $rows, $((SECONDS - start)) s in all" >&2
