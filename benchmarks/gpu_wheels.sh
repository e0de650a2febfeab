#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_run.py needs on a GPU machine that has PyTorch, transformers and the
# Hugging Face libraries but not diffusers or pydantic, and no network: run it here (with network), carry the
# .whl/ folder there, and install it with
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#
# The versions are the ones installed in the Python environment that runs fluxserve's tests here ($PYTHON,
# default .venv/bin/python, else python3), so the GPU runs what was tested. Wheels are for CPython 3.12 on
# x86-64 Linux (PY_VERSION / PLATFORMS change that).
#
#   benchmarks/gpu_wheels.sh              # -> .whl/ in the repository root
#   PYTHON=/path/to/venv/bin/python WHEEL_DIR=/tmp/wheels benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
DEST="${WHEEL_DIR:-.whl}"
PY_VERSION="${PY_VERSION:-3.12}"
PLATFORMS="${PLATFORMS:-manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64}"

# What the first run imports that such a machine lacks (or has in another version than the tests use):
#   diffusers            the pipelines and the transformer (not installed there)
#   pydantic + its deps  fluxserve.request (not installed there): pydantic-core (compiled), annotated-types,
#                        typing-inspection; typing-extensions because pydantic needs >= 4.16 and the machine's
#                        version is not known
#   transformers         the version the tests use: the text-encoder truncation (engine/text_encoder.py) relies
#                        on its output-capturing internals; its requirements (tokenizers >= 0.23.1, < 0.24,
#                        huggingface-hub >= 1.31, safetensors >= 0.8, regex >= 2025.10.22) are those of the
#                        transformers 5.17 installed there, but for huggingface-hub's bound
#   peft                 the version the tests use (the acceleration levels check for LoRA layers with it)
#   fa3-fwd              FlashAttention-3's forward (bf16 and FP8) for Hopper: an attention candidate and FP8
#                        attention at high; one CPython-ABI3 wheel (PyTorch's stable ABI), 26 MiB, pinned here since
#                        it cannot be imported (so is not installed) where the tests run
#   fpng + lazy-loader   the fast PNG encoder (engine/encode.py; without it Pillow writes PNGs, many times slower)
PURE=(diffusers pydantic annotated-types typing-inspection typing-extensions transformers peft lazy-loader)
COMPILED=(pydantic-core fpng)
ABI3=("fa3-fwd==0.0.3")

version_of() {
  "$PY" -c 'import sys; from importlib.metadata import version; print(version(sys.argv[1]))' "$1"
}

mkdir -p "$DEST"
platform_flags=()
for p in $PLATFORMS; do platform_flags+=(--platform "$p"); done
for name in "${PURE[@]}"; do
  pin="$name==$(version_of "$name")"
  echo "== $pin (pure Python)"
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DEST" "$pin"
done
for name in "${COMPILED[@]}"; do
  pin="$name==$(version_of "$name")"
  echo "== $pin (CPython $PY_VERSION, x86-64 Linux)"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    "${platform_flags[@]}" -d "$DEST" "$pin"
done
for pin in "${ABI3[@]}"; do
  echo "== $pin (ABI3, x86-64 Linux)"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_24_x86_64 -d "$DEST" "$pin"
done
ls -l "$DEST"
du -ch "$DEST"/*.whl | tail -1
