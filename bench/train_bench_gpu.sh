#!/usr/bin/env bash
# Every GPU comparison of `pretrain` and `sample` with PyTorch, in one go, for a session that
# has a GPU for a few minutes (see /work/shared/notes/gpu-device.md: GPU machines have no Rust
# toolchain and no network, so needle is built here and its binaries carried there).
#
#   bench/gpu_session.sh --prepare  on the build machine, after `make build`: strips `needle` and
#                                   `needle-worker` into bench/out/gpu-bin/ (ignored by git; ~13 MB)
#   bench/train_bench_gpu.sh        on the GPU machine: training at the demo's shape and the
#                                   large one (channels 64, blocks 2, batch 256), fp32 and bf16,
#                                   then sampling at the demo's shape, fp32 and bf16; needle and
#                                   PyTorch alternating, ROUNDS (2) rounds of TRAIN_STEPS (300) steps.
#
# Results: bench/out/train.md, bench/out/sample.md, the GPU's utilisation every 250 ms
# (gpu-util.csv) and when each part started (phases.txt), all also copied into $OUT when the
# caller gives one (the device tool collects what is there). `bench/gpu_session.sh train` runs
# it as part of the issue's GPU session. About 6 minutes on an H100 (estimated from the
# 2026-12-06 figures, not yet timed). DEVICE=cpu with small TRAIN_STEPS checks it without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=${NEEDLE_BIN:-$ROOT/bench/out/gpu-bin}

export ROUNDS=${ROUNDS:-2} DEVICE=${DEVICE:-cuda} NEEDLE_BIN=$BIN PY=${PY:-python3}
LD_LIBRARY_PATH=$("$PY" -c 'import torch, os; print(os.path.dirname(torch.__file__) + "/lib")')${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export LD_LIBRARY_PATH
RESULTS=$ROOT/bench/out
mkdir -p "$RESULTS"
export STORE=$RESULTS/gpu-store
rm -f "$RESULTS/train.md" "$RESULTS/sample.md" "$RESULTS/phases.txt"
"$BIN/needle" doctor | tee "$RESULTS/doctor.txt" || true
SMI=
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -lms 250 \
    >"$RESULTS/gpu-util.csv" &
  SMI=$!
fi
collect() {
  [[ -n $SMI ]] && kill "$SMI" 2>/dev/null || true
  if [[ -n ${OUT:-} ]]; then
    mkdir -p "$OUT"
    cp "$RESULTS"/{train.md,sample.md,gpu-util.csv,phases.txt,doctor.txt} "$OUT"/ 2>/dev/null || true
  fi
}
trap collect EXIT
phase() { echo "$(date +%s.%N) $*" | tee -a "$RESULTS/phases.txt" >&2; }

for precision in fp32 bf16; do
  for shape in demo large; do
    phase "train $shape $precision"
    STEPS=${TRAIN_STEPS:-300} PRECISION=$precision bench/train_bench.sh "$shape"
  done
done
for precision in fp32 bf16; do
  phase "sample demo $precision"
  STEPS=${SAMPLE_STEPS:-25} PRECISION=$precision bench/sample_bench.sh demo
done
phase done
cat "$RESULTS/train.md" "$RESULTS/sample.md"
