#!/usr/bin/env bash
# Container smoke test: build the roimae image (CPU PyTorch, a local AAL3 folder) and run it the
# way users and clusters do: read-only root file system, an arbitrary UID, the input mounted
# read-only, only the output and work directories (and a /tmp tmpfs) writable, no network.
#
# Needs a Docker engine with BuildKit (Docker >= 23, or DOCKER_BUILDKIT=1), python3 and a few
# minutes; not part of .ci/run. Run from anywhere:
#
#   scripts/container-smoke.sh
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
#   SMOKE_USER           UID:GID the containers run as              (the caller's: id -u, id -g)
#   KEEP                 1: keep the temporary directory
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
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
SMOKE_USER=${SMOKE_USER:-$(id -u):$(id -g)}
uid=${SMOKE_USER%%:*}
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$repo/bidsapp/__init__.py")

tmp=$(mktemp -d "${TMPDIR:-/tmp}/roimae-smoke.XXXXXX")
server_pid=
cleanup() {
    if [[ -n $server_pid ]]; then kill "$server_pid" 2>/dev/null || true; fi
    if [[ ${KEEP:-0} == 1 ]]; then echo "kept $tmp"; else rm -rf "$tmp"; fi
}
trap cleanup EXIT

step() { printf '\n=== %s\n' "$*"; }
pass() { printf 'PASS  %s\n' "$*"; summary+=("PASS  $*"); }
fail() { printf 'FAIL  %s\n' "$*" >&2; exit 1; }
summary=()
started=$SECONDS

# ---------------------------------------------------------------------------------------------
if [[ $SKIP_BUILD != 1 ]]; then
    step "build $IMAGE (base $BASE_IMAGE, $TORCH_SPEC, atlas ${ATLAS_DIR:-from nilearn})"
    # A staged build context: the files the Dockerfile copies, plus the atlas at docker/atlas/
    # (the fallback of the atlas-dir stage for builders without --build-context); nothing is
    # written into the checkout.
    ctx="$tmp/context"
    mkdir -p "$ctx/docker"
    cp -R "$repo/Dockerfile" "$repo/.dockerignore" "$repo/pyproject.toml" "$repo/README.md" \
        "$repo/bidsapp" "$ctx/"
    cp "$repo/docker/requirements.txt" "$ctx/docker/"
    build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "TORCH_SPEC=$TORCH_SPEC"
                --build-arg "VERSION=$version"
                --build-arg "VCS_REF=$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)"
                --build-arg "BUILD_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)")
    if [[ -n $ATLAS_DIR ]]; then
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
run() {
    "$DOCKER" run --rm --read-only --tmpfs /tmp --network none -u "$SMOKE_USER" \
        -v "$bids:/data:ro" -v "$out:/out" -v "$work:/work" "$@"
}

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

step "pretrain (1 epoch, tiny preset, CPU)"
t0=$SECONDS
run "$IMAGE" /data /out pretrain -w /work --epochs 1 --window-frames 10 --device cpu
[[ -f $out/models/desc-roi/model.safetensors ]] || fail "no models/desc-roi/model.safetensors"
pass "pretrain level in $((SECONDS - t0)) s: models/desc-roi/model.safetensors"

step "torchrun, 2 processes (gloo), inside the container"
t0=$SECONDS
# --hostname localhost: without a network the container's own name does not resolve, and c10d
# and gloo look themselves up by it.
run --hostname localhost --entrypoint torchrun "$IMAGE" --standalone --nproc-per-node 2 -m bidsapp \
    /data /out pretrain -w /work --masking random --epochs 1 --window-frames 10 --device cpu \
    --omp-nthreads 1
[[ -f $out/models/desc-random/model.safetensors ]] || fail "no models/desc-random/model.safetensors"
pass "torchrun --nproc-per-node 2 pretrain in $((SECONDS - t0)) s: models/desc-random"

step "participant (sub-01)"
t0=$SECONDS
run "$IMAGE" /data /out participant -w /work --participant-label 01 --model-desc roi \
    --device cpu
pass "participant level in $((SECONDS - t0)) s"

# ---------------------------------------------------------------------------------------------
step "checks"
for pattern in dataset_description.json 'sub-01/func/*_desc-roi_embedding.tsv' \
        'sub-01/func/*_stat-reconerror_boldmap.nii.gz' 'sub-01/func/*_attribution.tsv' \
        sub-01.html 'logs/roimae-participant-*.log'; do
    compgen -G "$out/$pattern" >/dev/null || fail "missing output $pattern"
done
pass "outputs exist (dataset_description.json, embeddings, attribution maps, report, logs)"

grep -q "\"Tag\": \"roimae/roimae:$version\"" "$out/dataset_description.json" \
    || fail "dataset_description.json lacks GeneratedBy.Container (ROIMAE_CONTAINER_IMAGE)"
pass "dataset_description.json records the container (roimae/roimae:$version)"

foreign=$(find "$out" "$work" -mindepth 1 ! -uid "$uid" | head -5)
[[ -z $foreign ]] || fail "files not owned by UID $uid: $foreign"
pass "all $(find "$out" "$work" -mindepth 1 | wc -l) output/work entries owned by UID $uid"

(cd "$bids" && find . -type f -exec cksum {} + | sort) >"$tmp/input-after.txt"
cmp -s "$tmp/input-before.txt" "$tmp/input-after.txt" || fail "the input dataset changed"
pass "input dataset unchanged"

printf '\n=== summary (%d s)\n' "$((SECONDS - started))"
printf '%s\n' "${summary[@]}"
echo "container smoke test passed"
