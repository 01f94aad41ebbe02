# roimae BIDS-App container image.
#
# Published image (CUDA-capable PyTorch from PyPI, AAL3 downloaded with nilearn at build time):
#   docker buildx build -t roimae/roimae:0.1.0 .
# Offline / smoke-test build (CPU wheel, a local AAL3 folder, any Python 3.11 base image):
#   docker buildx build --build-arg TORCH_SPEC=torch==2.13.0+cpu \
#     --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu \
#     --build-arg ATLAS_SOURCE=local --build-context atlas-dir=/path/to/aal3 -t roimae:dev .
# (Without buildx's --build-context, put the atlas folder at docker/atlas/ in the build context.)
# scripts/container-smoke.sh builds it that way and runs it read-only as an arbitrary user.
#
# Needs BuildKit (the default builder of Docker >= 23, buildx, or DOCKER_BUILDKIT=1): it builds
# only the atlas stage that ATLAS_SOURCE selects. The legacy builder would run both.

# Any Debian-like image with Python 3.11 and its venv module (the pins in
# docker/requirements.txt are for Python 3.11).
ARG BASE_IMAGE=python:3.11-slim-bookworm
# "nilearn": download AAL3 at build time; "local": copy the folder of stage atlas-dir.
ARG ATLAS_SOURCE=nilearn

# ---------------------------------------------------------------------------------------------
# build: a virtual environment in /opt/roimae/venv with roimae and its pinned dependencies.
FROM ${BASE_IMAGE} AS build

# PyTorch requirement. PyPI's Linux wheel bundles the CUDA runtime (nvidia-* wheels), so the
# published image needs only the host's NVIDIA driver; "torch==2.13.0+cpu" with
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu gives a CPU-only image. Measured with
# Debian's docker.io 20.10 (`docker image inspect -f '{{.Size}}' IMAGE`, on a Python 3.11 Debian
# base): 1.74 GB with the CPU wheel, 5.76 GB with the default CUDA one.
ARG TORCH_SPEC="torch==2.13.0"
# Optional pip sources, passed to pip through its environment (unset unless given).
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/roimae/venv/bin:$PATH

RUN python3 -m venv /opt/roimae/venv

# Dependencies first (a layer that survives source changes): torch, constrained to the same pins
# for its own dependencies, then the rest of the lock file.
COPY docker/requirements.txt /tmp/roimae/requirements.txt
RUN pip install --constraint /tmp/roimae/requirements.txt "${TORCH_SPEC}" \
    && pip install --requirement /tmp/roimae/requirements.txt

COPY pyproject.toml README.md LICENSE /tmp/roimae/src/
COPY bidsapp /tmp/roimae/src/bidsapp
# --no-deps: everything is pinned above; pip check proves nothing is missing or conflicting.
RUN pip install --no-deps /tmp/roimae/src \
    && pip check \
    && roimae --version

# ---------------------------------------------------------------------------------------------
# AAL3 in ROIMAE_ATLAS_DIR folder form (/opt/roimae/atlas: one image, one label table), so that
# at run time roimae never reaches nilearn's downloader or writes anything.

# Download with nilearn (version "3v2", as `pip install roimae` does without an atlas) and
# convert with roimae's own loader; the folder must load as the same atlas: name AAL3v2 and the
# same SHA-256 of grid, labels and region table, hence the same checkpoints and outputs.
FROM build AS atlas-nilearn
RUN ROIMAE_DATA_DIR=/tmp/nilearn-data python -c "\
from pathlib import Path; import nibabel as nib; from bidsapp.atlas import load_atlas; \
fetched = load_atlas(); out = Path('/opt/roimae/atlas'); out.mkdir(parents=True); \
img, tsv = out / f'{fetched.name}.nii.gz', out / f'{fetched.name}_labels.tsv'; \
nib.save(fetched.image, img); \
fetched.table().to_csv(tsv, sep='\t', index=False, lineterminator='\n'); \
local = load_atlas(img, tsv); \
assert (local.name, local.sha256()) == (fetched.name, fetched.sha256()), 'conversion changed AAL3'; \
print(local.name, len(local.regions), 'regions', local.sha256())" \
    && rm -rf /tmp/nilearn-data

# A local folder instead (e.g. AAL3v1_2mm.nii.gz + AAL3v1_labels.tsv; no network needed). The
# stage atlas-dir is replaced by `--build-context atlas-dir=PATH`; without it, docker/atlas/.
FROM scratch AS atlas-dir
COPY docker/atlas/ /

FROM build AS atlas-local
COPY --from=atlas-dir / /opt/roimae/atlas/

# The stage that ATLAS_SOURCE names (hadolint takes it for an untagged image).
# hadolint ignore=DL3006
FROM atlas-${ATLAS_SOURCE} AS atlas

# ---------------------------------------------------------------------------------------------
# runtime: the venv and the atlas on a fresh base; no compilers, caches or build files.
FROM ${BASE_IMAGE} AS runtime

ARG VERSION=0.1.0
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
ARG SOURCE=https://github.com/roimae/roimae
ARG IMAGE_NAME=roimae/roimae

LABEL org.opencontainers.image.title="roimae" \
      org.opencontainers.image.description="BIDS-App: region-aware (ROI-guided) masked autoencoder pretraining, embeddings and attribution for 4D fMRI" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.url="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=atlas /opt/roimae /opt/roimae

# Run as any UID (docker -u, Apptainer) on a read-only root file system: nothing is written
# outside the mounted output/work directories and /tmp (give docker `--tmpfs /tmp`).
# - HOME, XDG_CACHE_HOME and every tool's cache point into /tmp (an arbitrary UID has no home;
#   Apptainer binds the host's $HOME over HOME, which is fine). roimae creates each cache
#   directory with mode 0700 and uses it only when it is the user's own and writable; otherwise
#   (no writable /tmp, or a /tmp shared with other users, as under Apptainer without --contain)
#   the cache moves to WORK_DIR/caches-uid<UID>/ (bidsapp/caches.py), so no run fails on it and
#   no two users share one.
# - MPLCONFIGDIR: matplotlib builds its font cache there on first use.
# - PYTHONNOUSERSITE: packages in a bind-mounted ~/.local (Apptainer) must not shadow the pins.
# - PYTHONDONTWRITEBYTECODE: the .pyc files were compiled at install; never write new ones.
# - ROIMAE_CONTAINER_IMAGE: recorded in GeneratedBy.Container of the derivatives.
# - OMP_NUM_THREADS is deliberately NOT set: roimae sizes PyTorch's thread pool from
#   --omp-nthreads (default: CPUs / --nprocs) and exports OMP_NUM_THREADS to its data workers
#   only when unset, so a value baked in here would silently cap those workers. Under a CPU
#   quota (docker --cpus, Slurm) pass --omp-nthreads with the allocated count. torchrun sets
#   OMP_NUM_THREADS=1 itself for multi-process runs.
ENV PATH=/opt/roimae/venv/bin:$PATH \
    ROIMAE_ATLAS_DIR=/opt/roimae/atlas \
    ROIMAE_CONTAINER_IMAGE="${IMAGE_NAME}:${VERSION}" \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    MPLBACKEND=Agg \
    NILEARN_DATA=/tmp/nilearn_data \
    TORCH_HOME=/tmp/torch \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    TRITON_CACHE_DIR=/tmp/triton \
    CUDA_CACHE_PATH=/tmp/nv-cache \
    DENO_DIR=/tmp/deno \
    PYTHONNOUSERSITE=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LANG=C.UTF-8

# Fail the build, not the first user, if the venv or the atlas is broken.
RUN roimae --version \
    && python -c "from bidsapp.atlas import load_atlas; a = load_atlas(); print(a.name, len(a.regions))"

ENTRYPOINT ["roimae"]
CMD ["--help"]
