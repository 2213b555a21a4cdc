#!/usr/bin/env bash
# Download, here, the wheels that the lent GPU machine's image lacks, for its Python (3.12,
# x86-64 manylinux), into build/gpu_wheels/ (ignored by git: never commit wheels). The machine
# has torch, numpy, pandas, matplotlib, seaborn, transformers, accelerate, psutil, nvidia-ml-py
# and tqdm (see the device tool's KINDS.md), and no network. tools/gpu_notebooks.py installs
# what lies here. Usage: bash tools/fetch_gpu_wheels.sh [PIP]   (PIP defaults to .venv/bin/pip)
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${1:-.venv/bin/pip}
DEST=build/gpu_wheels
rm -rf "$DEST" && mkdir -p "$DEST"
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3
        --abi none --platform manylinux_2_39_x86_64 --platform manylinux_2_35_x86_64
        --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
        --platform manylinux_2_26_x86_64 --platform manylinux_2_24_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
        --platform manylinux2010_x86_64 --platform manylinux1_x86_64 --platform any)
# The notebook stack, with its dependencies resolved for that Python.
"$PIP" download -q "${TARGET[@]}" -d "$DEST" \
    "nbclient>=0.10" "nbformat>=5.9" "ipykernel>=6.0" "ipywidgets>=8.0"
# Quantization backends and the GGUF reader, without their dependencies (torch, numpy, ... are
# there already; a second torch would not fit in what the device tool carries: 64 MiB).
"$PIP" download -q --no-deps "${TARGET[@]}" -d "$DEST" "torchao==0.18.0" bitsandbytes gguf
# Drop what the image already has, and what is optional at run time, to stay under 64 MiB:
# debugpy (ipykernel's debugger) and widgetsnbextension (the classic Notebook's front end).
for name in attrs packaging psutil pygments python_dateutil six typing_extensions pyyaml \
            requests tqdm numpy debugpy widgetsnbextension; do
    rm -f "$DEST/$name"-[0-9]*.whl
done
ls "$DEST"
du -sh "$DEST"
