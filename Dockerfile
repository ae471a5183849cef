# RunPod serverless worker for Wan 2.1 (T2V 1.3B + VACE 1.3B) with Qwen 2.5-7B prompt enhancement.
#
#   docker build -t you/wan-worker .                                  # weights from a network volume
#   docker build --build-arg BAKE_MODELS=1 -t you/wan-worker:baked .  # weights baked into the image
#
# The GPU stack is exactly the benchmarked one (docs/PERFORMANCE.md, "Stack"): Python 3.12,
# CUDA 13.0, and requirements-gpu.txt's torch / triton / fa3-fwd / torchao pins.
# tests/test_stack.py keeps this file, requirements-gpu.txt and that line in sync, and
# scripts/check_image_deps.sh checks that the whole set resolves for this platform.
#
# PyPI's torch 2.11.0 brings its own CUDA 13.0 user-space libraries (cuda-toolkit 13.0.2,
# cuDNN 9.19) as wheels, so the base needs only the CUDA 13.0 driver glue: the "base" flavour,
# not "cudnn-runtime", which would carry a second copy of the same libraries.
FROM nvidia/cuda:13.0.2-base-ubuntu24.04

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive \
    HF_HUB_DISABLE_TELEMETRY=1 \
    MODELS_DIR=/runpod-volume/models \
    TORCHINDUCTOR_CACHE_DIR=/runpod-volume/.cache/torchinductor \
    COMPILE_CACHE_DIR=/runpod-volume/.cache/wan-worker \
    PATH=/opt/venv/bin:$PATH
# The compile caches on the network volume let a restarted worker skip most of its warm-up
# compile (docs/PERFORMANCE.md, cold start); without a volume they are plain directories.

# Ubuntu 24.04's Python is 3.12. Triton (behind torch.compile) builds small C launchers at run
# time against Python's headers, so the image keeps a C compiler and python3.12-dev. Without
# them, compile fails and the worker runs eagerly (slower; accel.EagerFallback).
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3.12 python3.12-venv python3.12-dev gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv

WORKDIR /app
COPY requirements-gpu.txt requirements.txt pyproject.toml ./
RUN pip install -r requirements-gpu.txt -r requirements.txt
COPY src ./src
# bytecode now, as pip did for the packages: a start then doesn't compile the worker's modules
RUN pip install --no-deps -e . && python -m compileall -q src

COPY builder ./builder
ARG BAKE_MODELS=0
RUN if [ "$BAKE_MODELS" = "1" ]; then \
      python builder/download_models.py --models-dir /models ; \
    fi
# The worker looks in MODELS_DIR (network volume), then /models (baked), then the HF cache.

COPY handler.py test_input.json ./
CMD ["python", "-u", "handler.py"]
