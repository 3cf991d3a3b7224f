# GPU image: the torch backend on CUDA, and the TensorRT-LLM backend where its wheel is available.
# Build: docker build -t engine-builder .   Run: docker run --gpus all -p 8000:8000 engine-builder
# tensorrt_llm ships from NVIDIA's index (pypi.nvidia.com) for Python 3.12; the base image provides it.
FROM nvcr.io/nvidia/tensorrt-llm/release:1.2.1

WORKDIR /opt/engine-builder
COPY pyproject.toml README.md ./
COPY engine_builder ./engine_builder
COPY runtime ./runtime
COPY calibration ./calibration
COPY configs ./configs
RUN pip install --no-cache-dir -e '.[storage]' && pip install --no-cache-dir --no-deps 'xgrammar==0.2.8'

ENV HF_HUB_OFFLINE=0 \
    ENGINE_BUILDER_ENGINE_DIR=/engines/current
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s CMD curl -fsS http://127.0.0.1:8000/health || exit 1
ENTRYPOINT ["engine-builder"]
CMD ["run", "/config/config.yaml", "--host", "0.0.0.0", "--port", "8000", "--backend", "auto"]
