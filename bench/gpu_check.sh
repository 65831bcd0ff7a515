#!/usr/bin/env bash
# GPU verification in one call, on any CUDA machine with python3 + torch:
#   build for the local GPU -> the whole test suite on CUDA -> compute-sanitizer
#   (memcheck, and racecheck for the shared-memory kernels) over a short pass
#   of every CUDA op -> the benchmarks -> results under bench/results/.
#
#   bench/gpu_check.sh                    full run: every stage
#   bench/gpu_check.sh build test         only these stages, in this order
#   QUICK=1 bench/gpu_check.sh            short GPU slots: fewer fuzz examples, fewer benchmarks
#
# Stages: build, test, sanitize, bench, capacity, and tune (not in the full
# run: `bench/gpu_check.sh tune` rebuilds with QSVD_GEMM_MENU=tune for the
# local GPU, times every candidate on the benchmark shapes and writes
# bench/results/<gpu>-<date>-table.json; see docs/tuning.md). A machine that limits one
# command's time (e.g. 10 minutes) runs them over a few calls on the same
# warm machine; the build is incremental, so a later call's `build` (run
# first by every stage list that needs the extension) costs seconds.
#
# Offline machines: put the nvidia-cutlass wheel (and any missing test
# packages) in .whl/ at the repo root; they are installed to /tmp/site.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl nvidia-cutlass==4.2.0.0
# Outputs (also copied to $OUT when set):
#   bench/results/<gpu>-<date>.json, .md (roofline table), -sanitizer.log, -tests.log,
#   capacity-<gpu>-<date>.json/.md; README.md's performance section is regenerated.
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK="${QUICK:-0}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(build test sanitize bench capacity)
want() { local s; for s in "${stages[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
for s in "${stages[@]}"; do
  case "$s" in build|test|sanitize|bench|capacity|tune) ;; *) echo "unknown stage '$s' (build test sanitize bench capacity tune)"; exit 2;; esac
done

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

gpu="$("$PY" -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "-"))' 2>/dev/null)" || {
  echo "no CUDA device visible: nothing to verify"; exit 2; }
stamp="$(date -u +%Y-%m-%d)"
res="bench/results/${gpu}-${stamp}"
mkdir -p bench/results
t0=$(date +%s)
log() { echo "[gpu_check +$(( $(date +%s) - t0 ))s] $*"; }

# Every stage needs the extension: build (incremental) whatever was asked.
log "build for $gpu (MAX_JOBS=${MAX_JOBS:=$(nproc)})"
export MAX_JOBS QSVD_BUILD_CUDA=1
# The visible GPU picks the arch list (sm_90 -> 9.0a); build in place.
"$PY" setup.py -q build_ext --inplace > "${res}-build.log" 2>&1 || { tail -50 "${res}-build.log"; exit 1; }
"$PY" -c 'import qsvd_kernels, json; print(json.dumps(qsvd_kernels.build_info()))' | tee "${res}-build-info.json"

status=0
if want test; then
log "test suite (cpu + cuda)"
fuzz=$([ "$QUICK" = 1 ] && echo 20 || echo 150)
QSVD_FUZZ_EXAMPLES=$fuzz "$PY" -m pytest python_tests -q -p no:cacheprovider -x --junitxml="${res}-tests.xml" \
  2>&1 | tee "${res}-tests.log" | tail -30 || status=1
[ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

if want sanitize; then
log "compute-sanitizer (memcheck, racecheck) on a short pass of every CUDA op"
if command -v compute-sanitizer > /dev/null; then
  : > "${res}-sanitizer.log"
  for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 99 "$PY" -m pytest -q -p no:cacheprovider \
      python_tests/test_hadamard.py python_tests/test_quant_gemm.py python_tests/test_latent_cache.py \
      python_tests/test_latent_attention.py python_tests/test_latent_attention_cuda.py \
      -k "cuda and (12 or 96 or 4096 or 32768 or matches or append or unchecked or reconstruct or nan)" \
      >> "${res}-sanitizer.log" 2>&1 || { echo "compute-sanitizer $tool reported errors"; status=1; }
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "${res}-sanitizer.log" | tail -2
  done
else
  echo "compute-sanitizer not found" | tee "${res}-sanitizer.log"
fi
fi

if want bench; then
log "benchmarks"
if [ "$QUICK" = 1 ]; then
  export QSVD_BENCH_QUICK=1
  sel=(-k "cuda and (4096x4096 or 16x4096 or decode or E4096-r1536 or latent)")
else
  sel=(-k cuda)
fi
"$PY" -m pytest bench -q -p no:cacheprovider "${sel[@]}" --benchmark-json="${res}.json" --benchmark-columns=median \
  2>&1 | tail -15 || status=1
[ -f "${res}.json" ] && "$PY" bench/summarize.py "${res}.json" > "${res}.md" && cat "${res}.md"
fi

if want capacity; then
log "capacity under a 12 GiB budget, with measured throughput"
"$PY" bench/capacity.py --measure --out "bench/results/capacity-${gpu}-${stamp}" | tail -12 || status=1
fi
want bench || want capacity && { "$PY" bench/update_readme.py || status=1; }

if want tune; then
log "tune: build the tune menu, check and time every candidate (quant_gemm, latent_attention, hadamard), reduce to a table"
# Results are appended as they come (${res}-tune.jsonl): a rerun after a
# timeout or crash skips what is recorded and carries on.
QSVD_GEMM_MENU=tune "$PY" setup.py -q build_ext --inplace > "${res}-tune-build.log" 2>&1 \
  || { tail -50 "${res}-tune-build.log"; exit 1; }
"$PY" -m qsvd_kernels tune \
  --shapes "$( [ "$QUICK" = 1 ] && echo 1x1536x4096,256x1536x4096 || \
    echo 1x1536x4096,16x1536x4096,64x1536x4096,256x1536x4096,4096x1536x4096,1x4096x1536,16x4096x1536,256x4096x1536,4096x4096x1536,1x3072x4096,256x3072x4096)" \
  --bits 8,8 --bits 8,4 --bits 4,4 --bits 4,8 \
  --results "${res}-tune.jsonl" --out "${res}-table.json" 2>&1 | tail -8 || status=1
# latent_attention plans and hadamard variants, into the same table (tune
# keeps the other ops' rules of an --out for this GPU).
"$PY" -m qsvd_kernels tune --op latent_attention \
  $( [ "$QUICK" = 1 ] && echo --latent-shapes 1,32,8,512,128,4096 --latent-shapes 16,32,8,512,128,4096 || \
    echo --latent-shapes "1,32,8,512,128,4096;16,32,8,512,128,4096;64,32,8,512,128,4096;1,32,8,512,128,32768;16,32,8,512,128,32768;1,32,32,256,128,4096;16,32,32,256,128,4096" ) \
  --results "${res}-tune.jsonl" --out "${res}-table.json" 2>&1 | tail -6 || status=1
"$PY" -m qsvd_kernels tune --op hadamard \
  --hadamard-shapes "$( [ "$QUICK" = 1 ] && echo 1x4096,256x4096 || echo 1x1536,256x1536,1x4096,256x4096,4096x4096,256x14336)" \
  --hadamard-dtypes f16,bf16 \
  --results "${res}-tune.jsonl" --out "${res}-table.json" 2>&1 | tail -6 || status=1
"$PY" -m pytest -q -p no:cacheprovider python_tests/test_tuning.py 2>&1 | tail -5 || status=1
fi

if [ -n "${OUT:-}" ]; then cp "${res}"* "$OUT"/ 2>/dev/null; fi
log "done (status $status)"
exit $status
