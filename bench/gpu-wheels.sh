#!/usr/bin/env bash
# Builds bench/wheels/: the packages bench/gpu.sh installs on the lent GPU machine, whose image
# (Python 3.12, torch 2.11, transformers, sentencepiece, tensorboard, ...) lacks them and cannot
# download. Run it here, then name bench/wheels in the device call's `carry`. Versions are those of
# this checkout's .venv, so the GPU runs the code the CPU tests ran.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=bench/wheels
binary=(megatron-core webdataset braceexpand omegaconf hjson pydantic pydantic-core annotated-types
        typing-inspection typing-extensions)
pins=$("$PY" -c 'import sys; from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))' "${binary[@]}" deepspeed)
rm -rf "$out" && mkdir -p "$out"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$out" ${pins% deepspeed==*}
# deepspeed publishes only an sdist; its wheel is pure Python (ops are JIT-built on the GPU machine).
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$out" "deepspeed==${pins##*deepspeed==}"
ls -1 "$out"
du -sh "$out"
