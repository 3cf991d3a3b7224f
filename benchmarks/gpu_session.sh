#!/usr/bin/env bash
# One lent-GPU call, run from the repository root on the device machine (docs/torch-engine-gpu.md says how to
# prepare .gpu/ here first): install the carried wheels, run the GPU-relevant tests with real Triton and CUDA
# graphs, then `python -m benchmarks.gpu` with the phases in PHASES.
# Everything lands in $OUT: pytest.txt, bench.txt, $NAME.json (+ .png; NAME=gpu-$SHAPE by default, SHAPE=llama8b).
# Limits per stage via TEST_S / BENCH_S (the whole benchmark) and PHASE_S (each phase); TESTS=none skips the tests.
# SERVE_VARIANTS=default,no-piecewise,gil-5ms compares server variants side by side (benchmarks/gpu.py).
# Phase times on an H200 (8B shape): parity ~26 s, serve ~41 s, hf ~47 s, profile ~23 s (measured 2026-12-04);
# fp8 ~4 min and embeddings ~3 min (estimates: not yet run on a GPU). The default call (tests + the first four)
# takes ~5 minutes; the fp8 + embeddings call, which needs serve for its bf16 rows, is
#   PHASES=serve,fp8,embeddings TESTS=none BENCH_S=540 PHASE_S=300 NAME=gpu-llama8b-fp8-embeddings
# (~8 minutes: give the device call its 600 s limit, and nothing else in it).
set -u
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

TESTS=${TESTS:-tests/engine/kernels tests/engine/test_triton_path.py tests/engine/layers/test_sampler_device.py tests/engine/test_graph_runner.py}
if [ "$TESTS" = none ]; then
  echo "tests skipped (TESTS=none)"
else
  # shellcheck disable=SC2086
  timeout "${TEST_S:-150}" python3 -m pytest -q -p no:cacheprovider --timeout 100 -o addopts="" -rs $TESTS \
    >"$OUT/pytest.txt" 2>&1
  echo "pytest exit $?"; grep -E "passed|failed|error" "$OUT/pytest.txt" | tail -3
  grep -E "^(FAILED|ERROR)" "$OUT/pytest.txt" | head -20
fi

SHAPE=${SHAPE:-llama8b}  # or qwen3-30b-a3b (the MoE shape; ~61 GB of dummy weights)
NAME=${NAME:-gpu-$SHAPE}
timeout "${BENCH_S:-330}" python3 -m benchmarks.gpu --tokenizer .gpu/tok --out "$OUT/$NAME.json" --shape "$SHAPE" \
  --phases "${PHASES:-parity,serve,profile,hf}" --phase-timeout "${PHASE_S:-200}" --max-seconds "${LOAD_S:-15}" \
  --serve-variants "${SERVE_VARIANTS:-default}" --encoder-tokenizer .gpu/enc \
  >"$OUT/bench.txt" 2>&1
echo "bench exit $?"
grep -v -E "USDT|profiler_st" "$OUT/bench.txt" | cut -c1-700 | tail -40
