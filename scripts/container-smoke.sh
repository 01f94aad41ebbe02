#!/usr/bin/env bash
# Container smoke test: build the roimae image (CPU PyTorch, a local AAL3 folder) and run it the
# way users and clusters do: read-only root file system, an arbitrary UID, the input mounted
# read-only, only the output and work directories (and a /tmp tmpfs) writable, no network.
# Every level runs (pretrain with two maskings, one under torchrun; participant; group with
# --compare), then the Python API, and the outputs are checked, not only the exit codes.
#
# Needs a Docker engine with BuildKit (Docker >= 23, or DOCKER_BUILDKIT=1 as with Debian's
# docker.io 20.10), python3 and about ten minutes; not part of .ci/run. Run from anywhere:
#
#   scripts/container-smoke.sh
#   BASE_IMAGE=my/python:3.11 WHEEL_DIR=/opt/wheels scripts/container-smoke.sh   # offline-ish
#   scripts/container-smoke.sh --stage-context DIR   # only write the build context to DIR
#
# Settings (environment variables, all optional):
#   DOCKER               docker client                              (docker)
#   IMAGE                tag to build, or the image to test with SKIP_BUILD=1   (roimae:smoke)
#   SKIP_BUILD           1: test IMAGE as it is (e.g. the published CUDA image on a CPU runner)
#   BASE_IMAGE           Python 3.11 base image                     (python:3.11-slim-bookworm)
#   ATLAS_DIR            AAL3 folder copied into the image; empty: download it with nilearn
#                        during the build                           (../shared/atlas/aal3 if present)
#   TORCH_SPEC           PyTorch requirement                        (torch==2.13.0+cpu)
#   WHEEL_DIR            folder of wheels (e.g. the CPU torch wheel) served to pip in the build
#                        ($PIP_FIND_LINKS when that is a local folder)
#   WHEEL_PORT           host loopback port of that wheel server    (38751)
#   PIP_EXTRA_INDEX_URL  where pip finds TORCH_SPEC when WHEEL_DIR lacks it
#                        (https://download.pytorch.org/whl/cpu, or nothing when WHEEL_DIR is set)
#   SMOKE_USER           UID:GID the containers run as              (the caller's; 4321:4321 for root)
#   APPTAINER            apptainer (or singularity) client: also build the SIF from `docker save`
#                        with apptainer/roimae.def and run it       (apptainer, if on PATH)
#   KEEP                 1: keep the temporary directory
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)

step() { printf '\n=== %s\n' "$*"; }
pass() { printf 'PASS  %s\n' "$*"; summary+=("PASS  $*"); }
skip() { printf 'SKIP  %s\n' "$*"; summary+=("SKIP  $*"); }
fail() { printf 'FAIL  %s\n' "$*" >&2; exit 1; }
summary=()

# The sources of the Dockerfile's COPY instructions that come from the build context (not those
# with --from=), read from the Dockerfile itself so that no second list can fall behind it.
# tests/test_packaging.py checks that this finds every one.
copied_sources() {
    awk 'toupper($1) == "COPY" {
             from = 0; n = 0
             for (i = 2; i < NF; i++) {
                 if ($i ~ /^--from=/) from = 1
                 else if ($i !~ /^--/) src[++n] = $i
             }
             if (!from) for (i = 1; i <= n; i++) print src[i]
         }' "$repo/Dockerfile"
}

# A build context holding only the Dockerfile, .dockerignore and what the Dockerfile copies, from
# this checkout; nothing is written into the checkout. docker/atlas/ (the atlas of
# ATLAS_SOURCE=local) is optional: the build stages ATLAS_DIR there.
stage_context() {
    local ctx=$1 source
    mkdir -p "$ctx"
    cp "$repo/Dockerfile" "$repo/.dockerignore" "$ctx/"
    while read -r source; do
        source=${source%/}
        [[ $source == docker/atlas ]] && continue
        [[ -e $repo/$source ]] \
            || fail "the Dockerfile copies $source, which is missing from $repo"
        mkdir -p "$ctx/$(dirname "$source")"
        cp -R "$repo/$source" "$ctx/$source"
    done < <(copied_sources)
}

if [[ ${1:-} == --stage-context ]]; then
    [[ $# == 2 ]] || fail "usage: $0 --stage-context DIR"
    stage_context "$2"
    exit 0
fi
[[ $# == 0 ]] || fail "usage: $0 [--stage-context DIR] (settings are environment variables)"

# BuildKit builds only the atlas stage that ATLAS_SOURCE selects (the legacy builder runs both).
export DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-1}
DOCKER=${DOCKER:-docker}
IMAGE=${IMAGE:-roimae:smoke}
SKIP_BUILD=${SKIP_BUILD:-0}
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim-bookworm}
if [[ -z ${ATLAS_DIR+set} && -d "$repo/../shared/atlas/aal3" ]]; then
    ATLAS_DIR=$(cd "$repo/../shared/atlas/aal3" && pwd)
fi
ATLAS_DIR=${ATLAS_DIR:-}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0+cpu}
if [[ -z ${WHEEL_DIR+set} && -n ${PIP_FIND_LINKS:-} && -d ${PIP_FIND_LINKS%% *} ]]; then
    WHEEL_DIR=${PIP_FIND_LINKS%% *}
fi
WHEEL_DIR=${WHEEL_DIR:-}
if [[ -z ${PIP_EXTRA_INDEX_URL+set} && -z $WHEEL_DIR ]]; then
    PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
fi
PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL:-}
# An arbitrary UID without a passwd entry in the image, as docker -u and clusters give; root's
# runs would hide permission problems.
if [[ -z ${SMOKE_USER:-} ]]; then
    if [[ $(id -u) == 0 ]]; then SMOKE_USER=4321:4321; else SMOKE_USER=$(id -u):$(id -g); fi
fi
uid=${SMOKE_USER%%:*}
APPTAINER=${APPTAINER:-$(command -v apptainer || command -v singularity || true)}
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$repo/bidsapp/_version.py")

tmp=$(mktemp -d "${TMPDIR:-/tmp}/roimae-smoke.XXXXXX")
server_pid=
cleanup() {
    if [[ -n $server_pid ]]; then kill "$server_pid" 2>/dev/null || true; fi
    if [[ ${KEEP:-0} == 1 ]]; then echo "kept $tmp"; else rm -rf "$tmp"; fi
}
trap cleanup EXIT
started=$SECONDS

# ---------------------------------------------------------------------------------------------
if [[ $SKIP_BUILD != 1 ]]; then
    step "build $IMAGE (base $BASE_IMAGE, $TORCH_SPEC, atlas ${ATLAS_DIR:-from nilearn})"
    ctx="$tmp/context"
    stage_context "$ctx"
    build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "TORCH_SPEC=$TORCH_SPEC"
                --build-arg "VERSION=$version"
                --build-arg "VCS_REF=$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)"
                --build-arg "BUILD_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)")
    if [[ -n $ATLAS_DIR ]]; then
        # The fallback of the atlas-dir stage for builders without --build-context.
        mkdir -p "$ctx/docker/atlas"
        cp -R "$ATLAS_DIR/." "$ctx/docker/atlas/"
        build_args+=(--build-arg ATLAS_SOURCE=local)
    fi
    if [[ -n $WHEEL_DIR ]]; then
        # Serve the wheels on the host's loopback; the build joins the host network to see it.
        # A fixed port: the URL is a build argument, and a new one would void the layer cache.
        port=${WHEEL_PORT:-38751}
        python3 -m http.server --bind 127.0.0.1 --directory "$WHEEL_DIR" "$port" \
            >"$tmp/wheel-server.log" 2>&1 &
        server_pid=$!
        sleep 1
        kill -0 "$server_pid" 2>/dev/null \
            || { cat "$tmp/wheel-server.log"; fail "cannot serve $WHEEL_DIR on port $port"; }
        build_args+=(--build-arg "PIP_FIND_LINKS=http://127.0.0.1:$port/")
    fi
    if [[ -n $PIP_EXTRA_INDEX_URL ]]; then
        build_args+=(--build-arg "PIP_EXTRA_INDEX_URL=$PIP_EXTRA_INDEX_URL")
    fi
    t0=$SECONDS
    # The full log goes to build.log; the terminal gets one line per finished step.
    set +e
    "$DOCKER" build --network host "${build_args[@]}" -t "$IMAGE" "$ctx" 2>&1 \
        | tee "$tmp/build.log" \
        | { grep --line-buffered -E '^(#[0-9]+ (DONE|ERROR|CACHED)|Step |ERROR)' || true; }
    status=${PIPESTATUS[0]}
    set -e
    [[ $status == 0 ]] || { tail -40 "$tmp/build.log"; fail "docker build (exit $status)"; }
    pass "image $IMAGE built in $((SECONDS - t0)) s ($("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1 / 1e9}'))"
fi

# Every run: read-only root, the chosen UID, no network; /tmp is the only writable system path.
bids="$tmp/bids" out="$tmp/out" work="$tmp/work"
mkdir -p "$out" "$work"
if [[ $uid != "$(id -u)" ]]; then chmod 0777 "$out" "$work"; fi  # writable for that other UID
run_no_tmp() {
    "$DOCKER" run --rm --read-only --network none -u "$SMOKE_USER" \
        -v "$bids:/data:ro" -v "$out:/out" -v "$work:/work" "$@"
}
run() { run_no_tmp --tmpfs /tmp "$@"; }
# A check in Python on the host (standard library only); fails the test with its message.
check() { python3 -c "$1" "${@:2}" || fail "check failed: $1"; }

# ---------------------------------------------------------------------------------------------
step "--version (read-only, no /tmp, as $SMOKE_USER)"
got=$("$DOCKER" run --rm --read-only --network none -u "$SMOKE_USER" "$IMAGE" --version)
[[ $got == "roimae $version" ]] || fail "--version printed '$got', expected 'roimae $version'"
pass "--version: $got"

labels=$("$DOCKER" image inspect -f \
    '{{index .Config.Labels "org.opencontainers.image.version"}} {{index .Config.Labels "org.opencontainers.image.revision"}}' \
    "$IMAGE")
pass "OCI labels version/revision: $labels"

step "demo dataset"
if command -v roimae >/dev/null 2>&1 && [[ -n $ATLAS_DIR ]]; then
    ROIMAE_ATLAS_DIR=$ATLAS_DIR roimae demo "$bids" --participants 4 --frames 24
    pass "demo dataset written on the host (4 participants, 24 frames)"
else  # no roimae on the host: the image writes it (the demo needs the image's atlas anyway)
    mkdir -p "$bids"
    if [[ $uid != "$(id -u)" ]]; then chmod 0777 "$bids"; fi
    "$DOCKER" run --rm --read-only --tmpfs /tmp --network none -u "$SMOKE_USER" \
        -v "$bids:/demo" "$IMAGE" demo /demo --participants 4 --frames 24
    pass "demo dataset written by the container (4 participants, 24 frames)"
fi
(cd "$bids" && find . -type f -exec cksum {} + | sort) >"$tmp/input-before.txt"

step "BIDS validator (deno) in the container"
run --entrypoint bids-validator-deno "$IMAGE" /data >"$tmp/validator.log" 2>&1 \
    || { tail -20 "$tmp/validator.log"; fail "bids-validator-deno on the demo dataset"; }
pass "bids-validator-deno runs read-only and accepts the demo dataset"

step "pretrain, roi masking (1 epoch, tiny preset, CPU)"
t0=$SECONDS
run "$IMAGE" /data /out pretrain -w /work --epochs 1 --window-frames 10 --device cpu
pass "pretrain level in $((SECONDS - t0)) s"

step "pretrain, random masking, under torchrun with 2 processes (gloo)"
t0=$SECONDS
# --hostname localhost: without a network the container's own name does not resolve, and c10d
# and gloo look themselves up by it.
run --hostname localhost --entrypoint torchrun "$IMAGE" --standalone --nproc-per-node 2 -m bidsapp \
    /data /out pretrain -w /work --masking random --epochs 1 --window-frames 10 --device cpu \
    --omp-nthreads 1
pass "torchrun --nproc-per-node 2 pretrain in $((SECONDS - t0)) s"

check '
import json, sys
from pathlib import Path
for desc in ("roi", "random"):
    folder = Path(sys.argv[1]) / "models" / f"desc-{desc}"
    card = json.loads((folder / "model.json").read_text())
    assert (folder / "model.safetensors").stat().st_size > 0, folder
    assert card["masking"]["masking"] == desc and card["epoch"] == 1, (desc, card["masking"])
    assert len(card["data"]) == 4, "trained on the 4 demo runs"
    rows = (folder / "training_log.tsv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].split("\t")[0] == "1", rows
' "$out"
pass "models/desc-roi and desc-random: weights, sidecar (masking, 1 epoch, 4 runs), training log"

step "participant, desc-roi (every participant, with attribution)"
t0=$SECONDS
run "$IMAGE" /data /out participant -w /work --model-desc roi --device cpu
pass "participant level (roi) in $((SECONDS - t0)) s"

step "participant, desc-random, without a writable /tmp (no --tmpfs /tmp)"
t0=$SECONDS
# The caches the image points at /tmp move into the work directory: exit 0, not exit 1.
run_no_tmp "$IMAGE" /data /out participant -w /work --model-desc random --no-attribution \
    --device cpu 2>"$tmp/no-tmp.log" || { tail -5 "$tmp/no-tmp.log"; fail "participant without /tmp"; }
caches="$work/caches-uid$uid"
[[ -d $caches/matplotlib && $(stat -c %a "$caches") == 700 ]] \
    || fail "no private cache folder $caches (mode 0700) in the work directory"
grep -q "default directories are not writable" "$tmp/no-tmp.log" \
    || fail "the log does not say that the caches moved"
pass "participant level (random) without /tmp in $((SECONDS - t0)) s; caches in /work/caches-uid$uid (0700)"

step "group, --compare roi random fc"
t0=$SECONDS
run "$IMAGE" /data /out group -w /work --target diagnosis --compare roi random fc \
    --cv-folds 2 --n-permutations 20
pass "group level in $((SECONDS - t0)) s"

check '
import csv, sys
from pathlib import Path
group = Path(sys.argv[1]) / "group"
rows = list(csv.DictReader(open(group / "target-diagnosis_scores.tsv"), delimiter="\t"))
sets = {row["set"]: row for row in rows}
assert set(sets) == {"roi-connectivity", "random-connectivity", "fc"}, sorted(sets)
for name, row in sets.items():
    assert 0 <= float(row["balanced_accuracy"]) <= 1, (name, row["balanced_accuracy"])
pairs = list(csv.DictReader(open(group / "target-diagnosis_comparison.tsv"), delimiter="\t"))
assert len(pairs) == 3, pairs
assert (group.parent / "group_target-diagnosis.html").stat().st_size > 0
assert any((group / "figures").glob("*.png"))
' "$out"
pass "group outputs: scores of roi, random and fc, 3 pairwise comparisons, report, figures"

step "Python API in the container (load_model, embed_img)"
run --entrypoint python "$IMAGE" -c '
import csv, glob
import numpy as np
from bidsapp import embed_img, load_model
model = load_model("/out/models/desc-roi")
bold, = glob.glob("/data/sub-01/func/*_desc-preproc_bold.nii.gz")
mask, = glob.glob("/data/sub-01/func/*_desc-brain_mask.nii.gz")
run = embed_img(model, bold, mask, attribution=False, cache_dir="/work/api")
table, = glob.glob("/out/sub-01/func/*_desc-roi_stat-mean_embedding.tsv")
row = next(csv.DictReader(open(table), delimiter="\t"))
cli = np.array([float(v) for k, v in row.items() if k.startswith("e")])
assert run.embedding.shape == cli.shape, (run.embedding.shape, cli.shape)
assert np.allclose(run.embedding, cli, atol=1e-5), np.abs(run.embedding - cli).max()
print(f"embedding of {run.embedding.size} dimensions, as the participant level wrote it")
'
pass "the API embeds sub-01 as the participant level did"

# ---------------------------------------------------------------------------------------------
step "checks"
for sub in 01 02 03 04; do
    for pattern in "sub-$sub/func/*_desc-roi_stat-mean_embedding.tsv" \
            "sub-$sub/func/*_desc-random_stat-mean_embedding.tsv" \
            "sub-$sub/func/*_desc-roi_stat-reconerror_boldmap.nii.gz" \
            "sub-$sub/func/*_desc-roi_attribution.tsv" "sub-$sub.html"; do
        compgen -G "$out/$pattern" >/dev/null || fail "missing output $pattern"
    done
done
for level in pretrain participant group; do
    compgen -G "$out/logs/roimae-$level-*.log" >/dev/null || fail "no log of the $level level"
done
pass "participant outputs of sub-01..04 (both models' embeddings, roi attribution, reports), logs"

grep -q "\"Tag\": \"roimae/roimae:$version\"" "$out/dataset_description.json" \
    || fail "dataset_description.json lacks GeneratedBy.Container (ROIMAE_CONTAINER_IMAGE)"
pass "dataset_description.json records the container (roimae/roimae:$version)"

foreign=$(find "$out" "$work" -mindepth 1 ! -uid "$uid" | head -5)
[[ -z $foreign ]] || fail "files not owned by UID $uid: $foreign"
pass "all $(find "$out" "$work" -mindepth 1 | wc -l) output/work entries owned by UID $uid"

(cd "$bids" && find . -type f -exec cksum {} + | sort) >"$tmp/input-after.txt"
cmp -s "$tmp/input-before.txt" "$tmp/input-after.txt" || fail "the input dataset changed"
pass "input dataset unchanged"

# ---------------------------------------------------------------------------------------------
# As the caller (Apptainer runs as the user who starts it), into an output directory of its own.
step "Apptainer: apptainer/roimae.def built from \`docker save\` (docker-archive)"
if [[ -n $APPTAINER ]]; then
    t0=$SECONDS
    "$DOCKER" save -o "$tmp/roimae.tar" "$IMAGE"
    APPTAINER=$APPTAINER "$repo/scripts/apptainer-build.sh" "$tmp/roimae.tar" "$tmp/roimae.sif"
    got=$("$APPTAINER" run --cleanenv --contain "$tmp/roimae.sif" --version)
    [[ $got == "roimae $version" ]] || fail "the SIF printed '$got', expected 'roimae $version'"
    mkdir -p "$tmp/sif-out" "$tmp/sif-work"
    "$APPTAINER" run --cleanenv --contain -B "$bids:/data:ro" -B "$out/models:/models:ro" \
        -B "$tmp/sif-out:/out" -B "$tmp/sif-work:/work" "$tmp/roimae.sif" \
        /data /out participant -w /work --participant-label 01 --no-attribution \
        --model /models/desc-roi/model.safetensors --device cpu
    compgen -G "$tmp/sif-out/sub-01/func/*_desc-roi_stat-mean_embedding.tsv" >/dev/null \
        || fail "the SIF's participant run wrote no embedding"
    pass "SIF built and tested; --version and participant under --cleanenv --contain in $((SECONDS - t0)) s"
else
    skip "Apptainer: neither apptainer nor singularity is installed (set APPTAINER to its client)"
fi

printf '\n=== summary (%d s)\n' "$((SECONDS - started))"
printf '%s\n' "${summary[@]}"
echo "container smoke test passed"
