# mlm-pretrain on CPU by default; its default command runs the end-to-end demo offline.
#   docker build -t mlm-pretrain .
#   docker run --rm -v mlm-data:/data mlm-pretrain                      # the demo, results in the volume
#   docker run --rm -v mlm-data:/data mlm-pretrain mlm-pretrain pretrain --recipe recipes/tiny.yaml --out /data/run
# For CUDA, pick the wheel index of your CUDA version:
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 -t mlm-pretrain:cuda .
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/data/huggingface

WORKDIR /app
# torch first, from the chosen index, so the project's install finds it satisfied
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY mlm_pretrain ./mlm_pretrain
COPY recipes ./recipes
COPY tokenizers ./tokenizers
RUN pip install .

VOLUME /data
CMD ["mlm-pretrain", "demo", "--out", "/data/demo"]
