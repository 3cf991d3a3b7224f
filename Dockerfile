# GPU image: build and serve in one container. TensorRT-LLM comes from NVIDIA's release image (Python 3.12,
# CUDA, MPI); the torch backend runs in the same image for encoders and as the fallback.
#
#   docker build -t engine-builder .
#   docker run --gpus all -p 8000:8000 -v $PWD/configs/llama-3.2-3b-l4.yaml:/config/config.yaml:ro \
#     -e ENGINE_BUILDER_API_KEYS=change-me -e hf_access_token=hf_... engine-builder
#
# Nothing in this image has been built or run on a GPU by this project yet (see docs/gpu-backend.md).
ARG TRTLLM_IMAGE=nvcr.io/nvidia/tensorrt-llm/release:1.2.1
FROM ${TRTLLM_IMAGE}

ARG APP_UID=10001
WORKDIR /opt/engine-builder

# tini as the first process: it forwards signals to engine-builder and reaps children. A PID 1 without a handler
# ignores SIGTERM (the command installs its own at start, but not before Python has started and imported it).
RUN apt-get update && apt-get install -y --no-install-recommends tini && rm -rf /var/lib/apt/lists/*

# Keep the base image's TensorRT-LLM pins (torch, transformers, xgrammar, fastapi, pydantic, numpy):
# installing the project must not upgrade what tensorrt_llm was built against. (The check below only finds
# tensorrt_llm: importing it loads CUDA libraries a `docker build` host may not have.)
COPY pyproject.toml README.md ./
COPY engine_builder ./engine_builder
COPY configs ./configs
RUN python3 -m pip freeze | grep -iE '^(torch|transformers|tokenizers|xgrammar|fastapi|pydantic|numpy|safetensors)==' \
        > /tmp/base-pins.txt \
    && python3 -m pip install --no-cache-dir -c /tmp/base-pins.txt '.[storage]' \
    && python3 -c "import importlib.util as u, engine_builder.serve.server.main; assert u.find_spec('tensorrt_llm')" \
    && rm /tmp/base-pins.txt

# A non-root user owns the writable paths: engines, download cache, secrets mount point.
RUN useradd --uid ${APP_UID} --user-group --create-home --shell /usr/sbin/nologin engine \
    && mkdir -p /engines /cache /config /secrets \
    && chown -R engine:engine /engines /cache /secrets
USER engine

ENV ENGINE_BUILDER_ENGINES=/engines \
    ENGINE_BUILDER_CACHE=/cache/engine-builder \
    HF_HOME=/cache/huggingface \
    PYTHONUNBUFFERED=1
EXPOSE 8000

# Liveness only: the port opens once the engine is loaded, then /health answers 200, and 503 once its loop died.
# Readiness is /ready (503 until the engine is warm, and while draining); orchestrators probe it (see deploy/k8s).
# `run` builds the engine before the server starts, so the start period covers a long build.
HEALTHCHECK --interval=15s --timeout=5s --start-period=1800s --retries=4 \
    CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)" || exit 1

# Binding 0.0.0.0 requires an API key: set ENGINE_BUILDER_API_KEYS (comma-separated).
ENTRYPOINT ["tini", "--", "engine-builder"]
CMD ["run", "/config/config.yaml", "--engine-dir", "/engines/current", "--host", "0.0.0.0", "--port", "8000"]
