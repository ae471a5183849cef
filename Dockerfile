# RunPod serverless worker for Wan 2.1 (T2V 1.3B + VACE 1.3B) with Qwen 2.5-7B prompt enhancement.
#
#   docker build -t you/wan-worker .                                  # weights from a network volume
#   docker build --build-arg BAKE_MODELS=1 -t you/wan-worker:baked .  # weights baked into the image
#
# The install steps are the README's set-up, minus the CPU torch wheel (the base has CUDA torch).
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    MODELS_DIR=/runpod-volume/models \
    TORCHINDUCTOR_CACHE_DIR=/runpod-volume/.cache/torchinductor
# The compile cache on the network volume lets a restarted worker skip most of its warm-up
# compile (docs/PERFORMANCE.md, cold start); without a volume it is a plain directory.

# Triton (behind torch.compile) builds small C launchers at run time; the runtime base image
# has no C compiler. Without one, compile fails and the worker runs eagerly (slower; accel.EagerFallback).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt pyproject.toml ./
COPY src ./src
RUN pip install -r requirements.txt && pip install --no-deps -e .

COPY builder ./builder
ARG BAKE_MODELS=0
RUN if [ "$BAKE_MODELS" = "1" ]; then \
      python builder/download_models.py --models-dir /models ; \
    fi
# The worker looks in MODELS_DIR (network volume), then /models (baked), then the HF cache.

COPY handler.py test_input.json ./
CMD ["python", "-u", "handler.py"]
