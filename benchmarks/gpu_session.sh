#!/usr/bin/env bash
# Everything the Triton path needs checked on a GPU, in one call (a lent machine is short on time):
#   1. gpu_bench.py with the default block sizes (bf16 check vs the torch backend, timings vs HF grouped_mm);
#   2. tune_triton.py for the same shape, writing the bundled table;
#   3. gpu_bench.py again, now reading the tuned table;
#   4. gpu_fp8_bench.py: the FP8 layer (block-scaled FP8 kernels) vs the bf16 layer vs HF's FP8 experts;
#   5. autocast_bench.py: a float32 layer's training step under bf16 autocast vs float32 (both backends).
# Logs and the tuned table go to $OUT (default /tmp/moegraph-gpu). Wheels of packages the machine lacks
# (pydantic, ...) may be carried in .whl/; they are installed into /tmp/site first.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_session.sh [gpu_bench args]   # TUNE_S=150 BENCH_S=240 FP8_S=180 by default
set -u
OUT=${OUT:-/tmp/moegraph-gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XDG_CACHE_HOME=/tmp/moegraph-cache
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used,memory.total --format=csv
python3 -c "import torch, triton, moegraph; print('torch', torch.__version__, 'triton', triton.__version__)" || exit 1

step() {  # name, seconds, command...
    local name=$1 secs=$2; shift 2
    echo "=== $name (limit ${secs}s) ==="
    local t0=$SECONDS
    timeout "$secs" "$@" > >(tee "$OUT/$name.log") 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0))s ==="
    return $rc
}

step bench_default "${BENCH_S:-240}" python3 benchmarks/gpu_bench.py "$@" || exit 1  # nothing to tune if it fails
# TUNE_ARGS e.g. "--tokens 8192 4096 --block-m 64 128" for a focused search; the table is merged.
step tune "$(( ${TUNE_S:-150} + 60 ))" python3 benchmarks/tune_triton.py --budget-s "${TUNE_S:-150}" \
    ${TUNE_ARGS:---tokens 1 16 128 1024 8192} \
    && for f in moegraph/triton_backend/tuned/*.json; do cp "$f" "$OUT/tuned_$(basename "$f" | tr -c 'A-Za-z0-9._\n-' _)"; done \
    && step bench_tuned "${BENCH_S:-240}" python3 benchmarks/gpu_bench.py "$@"
step bench_fp8 "${FP8_S:-180}" python3 benchmarks/gpu_fp8_bench.py --tokens 1 16 128 1024 8192
for backend in torch triton; do
    step "autocast_$backend" "${AUTOCAST_S:-90}" python3 benchmarks/autocast_bench.py --device cuda --backend "$backend" \
        --tokens 1024 8192
done
