# Training/sampling image: the locked dependencies (constraints.txt), then the project, no test extras.
# PyPI's torch==2.14.1 wheel is the CUDA 13 build (it bundles CUDA and cuDNN): it runs on hosts whose NVIDIA
# driver is >= 580 (`nvidia-smi` shows the version), with the container toolkit. For an older driver, build
# with a CUDA 12 torch/torchvision of the same versions from PyTorch's own wheel index (its .../whl/cu126 URL):
#   docker build --build-arg TORCH_INDEX_URL=<that URL> -t ldm-train .
# Build:  docker build -t ldm-train .
# Run:    docker run --gpus all --ipc=host -v $PWD/runs:/app/runs -v $PWD/data:/app/data ldm-train ldm-demo
#         docker run --gpus all --shm-size=16g --user "$(id -u):$(id -g)" -v $PWD/runs:/app/runs ldm-train ldm-train --config configs/ldm/emoji.yaml
# (--ipc=host or a large --shm-size: data-loader workers and NCCL share memory through /dev/shm, 64 MB by default)
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}
ARG TORCH_INDEX_URL=""

# npm fetches the emoji data set; git/g++/ninja build DeepSpeed's small ops on first use; the verbs/RDMA
# libraries and their providers let NCCL use InfiniBand or RoCE (without them it falls back to TCP sockets)
RUN apt-get update \
 && apt-get install -y --no-install-recommends nodejs npm git g++ ninja-build \
      libibverbs1 librdmacm1 ibverbs-providers \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# The dependencies first, from the lock: this layer is rebuilt only when pyproject.toml or constraints.txt
# change, not at every edit of the sources
COPY pyproject.toml constraints.txt ./
RUN python3 -m venv /app/.venv \
 && /app/.venv/bin/pip install --no-cache-dir --upgrade pip \
 && if [ -n "$TORCH_INDEX_URL" ]; then \
      /app/.venv/bin/pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" \
        "torch==$(sed -n 's/^torch==//p' constraints.txt)" "torchvision==$(sed -n 's/^torchvision==//p' constraints.txt)"; \
    fi \
 && python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
      > /tmp/requirements.txt \
 && /app/.venv/bin/pip install --no-cache-dir --constraint constraints.txt -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

COPY README.md run.sh ./
COPY ldm ./ldm
COPY autoencoder ./autoencoder
COPY configs ./configs
COPY launch ./launch
# the README's set-up step (venv in /app/.venv, pip install -e . with the lock), without the test extras
RUN LDM_EXTRAS= PIP_NO_CACHE_DIR=1 PYTHON_BIN=python3 ./run.sh setup

# Caches and outputs writable by any user (a container started with --user): HOME too, for tools that write there
ENV PATH=/app/.venv/bin:$PATH \
    HOME=/app/.cache/home \
    LDM_CACHE=/app/.cache \
    TORCH_EXTENSIONS_DIR=/app/.cache/torch_extensions \
    TORCHINDUCTOR_CACHE_DIR=/app/.cache/inductor \
    TRITON_CACHE_DIR=/app/.cache/triton \
    XDG_CACHE_HOME=/app/.cache/xdg \
    MPLCONFIGDIR=/app/.cache/matplotlib \
    npm_config_cache=/app/.cache/npm-cache \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false
RUN mkdir -p /app/.cache/home /app/runs /app/data \
 && chmod -R a+rwX /app/.cache /app/runs /app/data
ENTRYPOINT ["/bin/bash", "-c", "exec \"$@\"", "--"]
CMD ["ldm-train", "--help"]
