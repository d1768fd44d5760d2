#!/usr/bin/env bash
# bench/gpu_real.py on an NVIDIA GPU machine that has no network and whose Python 3.12 holds jax (CUDA plugin),
# torch (CUDA), transformers, flax and safetensors, but not diffusers or torchax (bench/README.md, "GPU").
#
#   bash bench/gpu_setup.sh download      here, once, with network: the wheels that machine lacks, for CPython
#                                         3.12 on x86-64 Linux, into .wheels/gpu-py312/ (git ignores it; ~6 MB)
#   bash bench/gpu_setup.sh run [ARGS]    there, from a copy of this tree that carries .wheels/: installs them
#                                         into a temporary folder (nothing else on the machine changes), runs
#                                         python3 bench/gpu_real.py ARGS with it on PYTHONPATH, removes it
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.wheels/gpu-py312
# diffusers and torchax as pyproject.toml pins them; the rest is what diffusers needs beyond that image
PACKAGES=(diffusers==0.42.1 torchax==0.0.13 importlib_metadata==10.2.0 lazy-importer==0.1.0 zipp==4.1.2)

case "${1:-}" in
  download)
    mkdir -p "$WHEELS"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" "${PACKAGES[@]}"
    du -sh "$WHEELS"
    ;;
  run)
    shift
    if ! compgen -G "$WHEELS/*.whl" > /dev/null; then
      echo "gpu_setup.sh: expected wheels in $WHEELS, found none (run 'bash bench/gpu_setup.sh download' where" \
           "there is network, and carry .wheels)" >&2
      exit 2
    fi
    site=$(mktemp -d)
    trap 'rm -rf "$site"' EXIT
    python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$WHEELS"/*.whl
    PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 python3 bench/gpu_real.py "$@"
    ;;
  *)
    echo "usage: bash bench/gpu_setup.sh download | run [bench/gpu_real.py options]" >&2
    exit 2
    ;;
esac
