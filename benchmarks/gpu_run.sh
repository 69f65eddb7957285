#!/usr/bin/env bash
# Everything issue 7 measures on the lent H100, in one command (from the repo root):
#   ../shared/gpu/fetch-wheels.sh .device-wheels      # here, once: FlashInfer + tvm-ffi wheels
#   run(command="bash benchmarks/gpu_run.sh", carry=[".device-wheels"])
# Logs go to $OUT (or ./gpu_out). Steps: install, then STEPS (default tests,bench,memcheck; also probe:
# benchmarks/gpu_slowdown_probe.py and gpu_graph_probe.py; variance: gpu_capture_variance.py; host:
# gpu_host_probe.py) in the order probe, variance, host, tests, bench, memcheck.
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
STEPS=${STEPS:-tests,bench,memcheck}
SITE=$(mktemp -d); export FLASHINFER_WORKSPACE_BASE=${FLASHINFER_WORKSPACE_BASE:-/tmp/fi_ws}
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .device-wheels/*.whl
export PYTHONPATH=$SITE:$PWD FLASHINFER_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 PYTHONUNBUFFERED=1 FLASHINFER_NO_DOWNLOAD=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/env.txt"
python3 -c "import loguru" 2>/dev/null || echo "loguru missing" | tee -a "$OUT/env.txt"
if [[ $STEPS == *probe* ]]; then
  python3 benchmarks/gpu_slowdown_probe.py 2>&1 | grep -vi warn | tee "$OUT/gpu_slowdown_probe.log" | tail -8
  python3 benchmarks/gpu_graph_probe.py 2>&1 | tee "$OUT/gpu_graph_probe.log" | grep -v Warning | tail -40
fi
if [[ $STEPS == *variance* ]]; then
  for config in ${VARIANCE_CONFIGS:-64x4096}; do
    python3 benchmarks/gpu_capture_variance.py --config $config 2>&1 | grep -vi warn | tee -a "$OUT/gpu_capture_variance.log" | tail -30
  done
fi
if [[ $STEPS == *host* ]]; then
  python3 benchmarks/gpu_host_probe.py 2>&1 | grep -vi warn | tee "$OUT/gpu_host_probe.log" | tail -12
fi
if [[ $STEPS == *tests* ]]; then
  python3 -m pytest tests/gpu -q -rA -s -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | grep -vE "^\s+[0-9]+ x " | tail -60
fi
if [[ $STEPS == *bench* ]]; then
  PROFILE_HOST=1 python3 benchmarks/gpu_bench.py --out "$OUT" 2>&1 | tee "$OUT/gpu_bench.log" | grep -vE "^\s+[0-9]+ x |^\{" | tail -50
fi
if [[ $STEPS == *memcheck* ]]; then
  { echo "== plain"; /usr/bin/time -f "wall %e s" python3 benchmarks/gpu_memcheck.py seed
    echo "== memcheck (caching allocator)"; /usr/bin/time -f "wall %e s" compute-sanitizer --tool memcheck python3 benchmarks/gpu_memcheck.py seed 2>&1 | grep -vE "^========= +(at|by|Host Frame|Saved host)" | tail -25
    echo "== memcheck, PYTORCH_NO_CUDA_MEMORY_CACHING=1"; PYTORCH_NO_CUDA_MEMORY_CACHING=1 /usr/bin/time -f "wall %e s" compute-sanitizer --tool memcheck python3 benchmarks/gpu_memcheck.py seed 2>&1 | grep -E "ERROR SUMMARY|Invalid|decode ms|row 5|wall" | sort | uniq -c | sort -rn | head -12
  } 2>&1 | tee "$OUT/memcheck.log" | tail -45
fi
