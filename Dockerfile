# Training/sampling image. PyPI's torch==2.14.1 wheel is the CUDA build (it bundles CUDA and cuDNN), so
# this runs on any host with an NVIDIA driver and the container toolkit; override BASE for another base.
# Build:  docker build -t ldm-train .
# Run:    docker run --gpus all -v $PWD/runs:/app/runs -v $PWD/data:/app/data ldm-train ldm-demo
#         docker run --gpus all ... ldm-train ldm-train --config configs/ldm/emoji.yaml
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

# npm fetches the emoji data set; git/g++/ninja build DeepSpeed's small ops on first use
RUN apt-get update \
 && apt-get install -y --no-install-recommends nodejs npm git g++ ninja-build \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md run.sh ./
COPY ldm ./ldm
COPY autoencoder ./autoencoder
COPY configs ./configs
COPY launch ./launch
# the same set-up the README's commands run (venv in /app/.venv, pip install -e ".[test]")
RUN PYTHON_BIN=python3 ./run.sh setup

ENV PATH=/app/.venv/bin:$PATH \
    LDM_CACHE=/app/.cache \
    TORCH_EXTENSIONS_DIR=/app/.cache/torch_extensions \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false
ENTRYPOINT ["/bin/bash", "-c", "exec \"$@\"", "--"]
CMD ["ldm-train", "--help"]
