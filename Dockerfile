# mlm-pretrain on CPU by default; its default command runs the end-to-end demo offline.
#   docker build -t mlm-pretrain .
#   docker run --rm --stop-timeout 600 -v mlm-data:/data mlm-pretrain      # the demo, results in the volume
#   docker run --rm --stop-timeout 600 -v mlm-data:/data mlm-pretrain \
#       mlm-pretrain pretrain --recipe recipes/tiny.yaml --out /data/run --resume
# --stop-timeout: `docker stop` sends SIGTERM, mlm-pretrain finishes its step and writes a checkpoint,
# and only after this many seconds (Docker's default: 10) is it killed; give it a step plus a checkpoint.
# For CUDA, pick the wheel index of your CUDA version:
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 -t mlm-pretrain:cuda .
# The base image is pinned by digest, so a rebuild gets the same image; to move to a newer one, read
# the digest of the tag (the index digest, for every platform) and pass or paste it:
#   docker buildx imagetools inspect python:3.11-slim-bookworm     # the "Digest:" line
#   docker build --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest> -t mlm-pretrain .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91
FROM ${PYTHON_IMAGE}

# the torch this project is tested with (README); the CPU wheel unless another index is given
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# tini as PID 1: the kernel drops a signal to PID 1 that has no handler, so without it a SIGTERM
# before the training loop installs its own (while the model is built) is lost and Docker kills the
# container after its grace time; tini passes signals on and reaps the launcher's children
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

# a fixed numeric user, so that Kubernetes' runAsNonRoot can verify it and volumes can be chowned to it
RUN groupadd --gid 10001 mlm \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/mlm mlm \
    && mkdir /data \
    && chown mlm:mlm /data

# HF_HOME (the Hub cache and an `hf auth login` token) in the user's home, never on the output volume
# beside the models; pass a token with `-e HF_TOKEN` instead of logging in inside the container
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/home/mlm/.cache/huggingface

WORKDIR /app
# torch first, from the chosen index; naming it again below keeps the project's install from replacing it
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY mlm_pretrain ./mlm_pretrain
COPY recipes ./recipes
COPY tokenizers ./tokenizers
RUN pip install . "torch==${TORCH_VERSION}"

USER 10001:10001
VOLUME /data
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["mlm-pretrain", "demo", "--out", "/data/demo"]
