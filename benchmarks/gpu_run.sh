#!/usr/bin/env bash
# Everything measured on the lent GPU (H200, kind nvidia-h200), in one command (from the repo root):
#   ../shared/gpu/fetch-wheels.sh .device-wheels      # here, once: FlashInfer + tvm-ffi wheels
#   python3 -m pip download --no-deps -d .device-wheels loguru==0.7.3
#   run(command="bash benchmarks/gpu_run.sh", carry=[".device-wheels"], kind="nvidia-h200")
# Logs go to $OUT (or ./gpu_out); the runs the docs cite are kept in benchmarks/results/, each named
# with its machine (gpu_tests_h200.log, gpu_bench_h100.json, ...). Steps: install, then STEPS (default tests,bench,rules) in the order
# variance, host, tests, bench, rules, memcheck:
#   tests     tests/gpu (test_gpu_decode.py, test_gpu_graphs.py; TESTS= narrows them, pytest -k syntax)
#   bench     benchmarks/gpu_bench.py (the decode rule: eager, sync, graph, host; CONFIGS=64x4096,...)
#   rules     benchmarks/gpu_rules_bench.py (every rule's host and in-graph cost)
#   variance  benchmarks/gpu_capture_variance.py (the in-graph cost against its floor)
#   host      benchmarks/gpu_host_probe.py (where an eager call's host time goes)
#   memcheck  compute-sanitizer on the seed's case (benchmarks/gpu_memcheck.py)
#   model     benchmarks/gpu_model_step.py: a 32-layer model-sized decode step, eager and graphs, bare vs log
#   tp        benchmarks/gpu_tp_failfast.py: abort in a 2-rank NCCL job (kind nvidia-h200-x2)
#   track     benchmarks/gpu_track_pages.py: track_pages' host cost per allocation, its cost in a graph
#   sglang    benchmarks/gpu_sglang.py: SGLang's pools and backends on the GPU (SGLang in /tmp/sgl-site:
#             carry .device-sgl in a first call with STEPS=sglang-install, docs/gpu.md)
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
STEPS=${STEPS:-tests,bench,rules}
SITE=$(mktemp -d); export FLASHINFER_WORKSPACE_BASE=${FLASHINFER_WORKSPACE_BASE:-/tmp/fi_ws}
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .device-wheels/*.whl
export PYTHONPATH=$SITE:$PWD FLASHINFER_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 PYTHONUNBUFFERED=1 FLASHINFER_NO_DOWNLOAD=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/env.txt"
python3 -c "import loguru" 2>/dev/null || echo "loguru missing" | tee -a "$OUT/env.txt"
if [[ $STEPS == *variance* ]]; then
  for config in ${VARIANCE_CONFIGS:-64x4096}; do
    python3 benchmarks/gpu_capture_variance.py --config $config 2>&1 | grep -vi warn | tee -a "$OUT/gpu_capture_variance.log" | tail -30
  done
fi
if [[ $STEPS == *host* ]]; then
  python3 benchmarks/gpu_host_probe.py 2>&1 | grep -vi warn | tee "$OUT/gpu_host_probe.log" | tail -12
fi
if [[ $STEPS == *tests* ]]; then
  python3 -m pytest tests/gpu -q -rA -p no:cacheprovider ${TESTS:+-k "$TESTS"} 2>&1 | tee "$OUT/gpu_tests.log" | grep -vE "^\s+[0-9]+ x " | tail -60
fi
if [[ $STEPS == *bench* ]]; then
  PROFILE_HOST=1 python3 benchmarks/gpu_bench.py --out "$OUT" ${CONFIGS:+--configs $CONFIGS} 2>&1 | tee "$OUT/gpu_bench.log" | grep -vE "^\s+[0-9]+ x |^\{|^profile| {3,}[0-9]" | tail -50
fi
if [[ $STEPS == *rules* ]]; then
  python3 benchmarks/gpu_rules_bench.py --out "$OUT" 2>&1 | tee "$OUT/gpu_rules_bench.log" | grep -vE "^\s+[0-9]+ x |^\{" | tail -20
fi
if [[ $STEPS == *tp* ]]; then
  # TSAN_PAGED starts the sanitizer through the .pth at interpreter start: put it in a site dir
  # (the machine's python is a venv: its own site-packages, not the user site)
  cp tsan_paged_autostart.pth "$(python3 -c 'import site; print(site.getsitepackages()[0])')/"
  python3 -c "import sys; sys.path.insert(0, 'tests'); import tp_worker, torch; torch.cuda.set_device(0); s, _, _ = tp_worker.flashinfer_decode(0, 2); s(); torch.cuda.synchronize(); print('xqa built')"
  python3 benchmarks/gpu_tp_failfast.py 2>&1 | grep -vi warn | tee "$OUT/gpu_tp_failfast.log" | tail -12
fi
if [[ $STEPS == *model* ]]; then
  python3 benchmarks/gpu_model_step.py --out "$OUT" 2>&1 | grep -vi warn | tee "$OUT/gpu_model_step.log" | tail -8
fi
if [[ $STEPS == *track* ]]; then
  python3 benchmarks/gpu_track_pages.py 2>&1 | grep -vi warn | tee "$OUT/gpu_track_pages.log" | tail -12
fi
if [[ $STEPS == *sglang-install* ]]; then
  [ -d /tmp/sgl-site/sglang ] || { mkdir -p /tmp/sgl-site
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/sgl-site .device-sgl/*.whl
    tar -xJf .device-sgl/sgl_src.tar.xz -C /tmp/sgl-site; }
  ls /tmp/sgl-site | wc -l
elif [[ $STEPS == *sglang* ]]; then
  PYTHONPATH=/tmp/sgl-site:$PYTHONPATH python3 benchmarks/gpu_sglang.py 2>&1 | grep -vE "UserWarning|warnings\.warn|\| WARNING " | tee "$OUT/gpu_sglang.log" | tail -24
fi
if [[ $STEPS == *memcheck* ]]; then
  { echo "== plain"; /usr/bin/time -f "wall %e s" python3 benchmarks/gpu_memcheck.py seed
    echo "== memcheck (caching allocator)"; /usr/bin/time -f "wall %e s" compute-sanitizer --tool memcheck python3 benchmarks/gpu_memcheck.py seed 2>&1 | grep -vE "^========= +(at|by|Host Frame|Saved host)" | tail -25
    echo "== memcheck, PYTORCH_NO_CUDA_MEMORY_CACHING=1"; PYTORCH_NO_CUDA_MEMORY_CACHING=1 /usr/bin/time -f "wall %e s" compute-sanitizer --tool memcheck python3 benchmarks/gpu_memcheck.py seed 2>&1 | grep -E "ERROR SUMMARY|Invalid|decode ms|row 5|wall" | sort | uniq -c | sort -rn | head -12
  } 2>&1 | tee "$OUT/memcheck.log" | tail -45
fi
