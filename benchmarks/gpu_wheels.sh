#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_run.py needs on a GPU machine that has PyTorch, transformers and the
# Hugging Face libraries but not diffusers, pydantic or the web stack, and no network: run it here (with
# network), carry the .whl/ folder there, and install it with
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#
# The versions are the ones installed in the Python environment that runs fluxserve's tests here ($PYTHON,
# default .venv/bin/python, else python3), so the GPU runs what was tested. Wheels are for CPython 3.12 on
# x86-64 Linux (PY_VERSION / PLATFORMS change that). The folder must stay small: it travels with the
# repository (64 MiB in all); the script prints its size.
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
PLATFORMS="${PLATFORMS:-manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64}"

# What the run imports that such a machine lacks (or has in another version than the tests use). It has, and
# nothing here carries: torch, triton, accelerate, tokenizers, safetensors, numpy, pillow, anyio, h11, httpx,
# httpcore, click, typer, annotated-doc, aiofiles, msgpack, uvloop, prometheus-client, rich, filelock, psutil,
# nvidia-ml-py, pyyaml, requests.
#
# The engine:
#   diffusers            the pipelines and the transformer (not installed there)
#   pydantic + its deps  fluxserve.request: pydantic-core (compiled), annotated-types, typing-inspection;
#                        typing-extensions because pydantic needs >= 4.16 and the machine's version is not known
#   transformers         the version the tests use: the text-encoder truncation (engine/text_encoder.py) relies
#                        on its output-capturing internals; its requirements (tokenizers >= 0.23.1, < 0.24,
#                        safetensors >= 0.8, regex >= 2025.10.22, typer) are met there, but for huggingface-hub
#   huggingface-hub      >= 2.4 for that transformers (the machine has 1.33), with what it needs: httpx2,
#                        httpcore2 and truststore (pure Python, small)
#   peft                 the version the tests use (the acceleration levels check for LoRA layers with it)
#   fa3-fwd              FlashAttention-3's forward (bf16 and FP8) for Hopper: an attention candidate and FP8
#                        attention at high; one CPython-ABI3 wheel (PyTorch's stable ABI), 26 MiB (the largest
#                        here), pinned here since it cannot be imported (so is not installed) where the tests run
#   fpng + lazy-loader   the fast PNG encoder (engine/encode.py; without it Pillow writes PNGs, many times slower)
# The server and the official fal client (the serving part: `fluxserve serve` in its own process):
#   fastapi, starlette, uvicorn, fastapi-offline, python-multipart   the HTTP app (uvicorn runs on h11 and
#                        uvloop there; httptools, its faster HTTP parser, is compiled and small: carried, as the
#                        tests run with it); opentelemetry-api because this fastapi imports it unconditionally
#   sqlalchemy           the job store (compiled; SQLite only: psycopg and boto3 are imported only for
#                        PostgreSQL and S3, greenlet only for asyncio engines, none carried)
#   fal-client + httpx-sse, asyncstdlib, websockets   the official fal client (websockets is compiled)
#   imagesize            training datasets' image dimensions, read from their headers when a job is submitted
# Not carried: cryptography (signs fal webhooks and serves their JWKS; imported only when a webhook is
# signed), boto3, psycopg, watchfiles and python-dotenv (uvicorn's reload and env files), and kernels (compiled,
# 2.7 MB: this transformers' from_pretrained refuses to load a model without it, but random weights are built,
# not loaded; the demo models, which are loaded, are for machines that have it).
PURE=(diffusers pydantic annotated-types typing-inspection typing-extensions transformers peft lazy-loader
      huggingface-hub httpx2 httpcore2 truststore
      fastapi starlette uvicorn fastapi-offline python-multipart opentelemetry-api
      fal-client httpx-sse asyncstdlib imagesize)
COMPILED=(pydantic-core fpng sqlalchemy httptools websockets)
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
