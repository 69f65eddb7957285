#!/usr/bin/env bash
# Prepare .device-sgl/ (git-ignored; 48 MB): SGLang 0.5.23's sources as the CPU venv holds them
# (no caches, binaries, multimodal_gen, tests, benchmarks: 7.7 MB as tar.xz) and the wheels of
# what its modules import (.ci/sglang-requirements.txt, for CPython 3.12 on x86-64: 41 MB).
# FlashInfer's wheels (.device-wheels, 34 MB) do not fit in the same run (64 MiB), so the GPU run
# takes two calls on a warm machine (less than 30 s apart; /tmp survives, the work tree does not):
#   run(command="STEPS=sglang-install bash benchmarks/gpu_run.sh", carry=[".device-sgl"], kind="nvidia-h200")
#   run(command="STEPS=sglang bash benchmarks/gpu_run.sh", carry=[".device-wheels"], kind="nvidia-h200")
set -euo pipefail
SITE=$(.venv/bin/python -c "import sglang, os; print(os.path.dirname(os.path.dirname(sglang.__file__)))")
mkdir -p .device-sgl
grep -vE '^#|^$' .ci/sglang-requirements.txt > .device-sgl/requirements.txt
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .device-sgl -r .device-sgl/requirements.txt
tar --exclude='__pycache__' --exclude='*.so' --exclude='sglang/srt/rust_extensions' --exclude='sglang/multimodal_gen' \
  --exclude='sglang/test' --exclude='sglang/benchmark' -cJf .device-sgl/sgl_src.tar.xz -C "$SITE" sglang
du -sh .device-sgl
