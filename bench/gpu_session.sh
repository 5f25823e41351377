#!/usr/bin/env bash
# Everything issue 17 ("Fill the GPU") asks to measure on a GPU machine, in one go, side by side
# on the same machine (GPU time is short: see ../shared/notes/gpu-device.md). Logs and a summary
# go to $OUT (default bench/out/gpu-session).
#
# On the CPU machine, first:
#   make build && bench/gpu_session.sh --prepare     strips the binaries into bench/out/gpu-bin
# then on the GPU machine (the device tool, carrying bench/out/gpu-bin):
#   bench/gpu_session.sh ablation                    part 1, about 4 minutes on one H100
#   bench/gpu_session.sh train                       part 2, about 6 minutes
#   bench/gpu_session.sh                             both (over one 10-minute device call)
#
# What it measures:
#   1. the shortened ablation (pretrain 600 steps, tune 200) with its GPU steps on whole GPUs,
#      on quarter shares, and on quarter shares under MPS: makespan, the sum of the GPU steps'
#      times (the serial schedule), and mean GPU utilisation sampled by nvidia-smi every 250 ms;
#      `needle status` of each (its GPU column and busy share);
#   2. bench/train_bench_gpu.sh: needle's pretrain against the same model in plain PyTorch at
#      the demo's shape and at channels 64, blocks 2, batch 256, and its sampling against the
#      same DDIM sampler in PyTorch, each in fp32 and bf16.
#
# GPU_SESSION_DRY=1 runs the same script on a machine without GPUs, with fake ids and tiny
# steps, to check the script itself before spending GPU time on it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=$ROOT/bench/out/gpu-bin

if [[ ${1-} == --prepare ]]; then
  mkdir -p "$BIN"
  for b in needle needle-worker; do
    cp "$ROOT/target/release/$b" "$BIN/$b"
    strip "$BIN/$b"
  done
  ls -la "$BIN"
  exit 0
fi

PART=${1:-all}
case $PART in
  all | ablation | train) ;;
  *) echo "usage: $0 [--prepare | ablation | train]" >&2; exit 2 ;;
esac
DRY=${GPU_SESSION_DRY:-0}
OUT=${OUT:-$ROOT/bench/out/gpu-session}
mkdir -p "$OUT"
SUMMARY=$OUT/summary.md
: >"$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }

PY=${PY:-python3}
[[ -x $ROOT/.venv/bin/python && $DRY == 1 ]] && PY=$ROOT/.venv/bin/python
TORCH_LIB=$("$PY" -c 'import torch,os;print(os.path.dirname(torch.__file__)+"/lib")')
export LD_LIBRARY_PATH=$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
NEEDLE=$BIN/needle
[[ -x $NEEDLE ]] || NEEDLE=$ROOT/target/release/needle

if [[ $DRY == 1 ]]; then
  GPUS=(--gpus 1 --gpu-mem 80)
  SHORT=(--set pretrain_steps=4 --set tune_steps=2)
  TRAIN_STEPS=5
  SAMPLE_STEPS=2
  export ROUNDS=1 PROMPTS=2 SEEDS=2
else
  GPUS=(--gpus auto)
  SHORT=(--set pretrain_steps=600 --set tune_steps=200)
  TRAIN_STEPS=${TRAIN_STEPS:-200}
  SAMPLE_STEPS=${SAMPLE_STEPS:-25}
fi

say "# GPU session, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
say ""
"$NEEDLE" doctor >"$OUT/doctor.txt" 2>&1 || true
nvidia-smi -L >"$OUT/nvidia-smi-L.txt" 2>&1 || true
say "$(grep -E '^(cuda|gpus)' "$OUT/doctor.txt" || true)"

# Utilisation sampling: SAMPLER holds the pid while one runs.
SAMPLER=
sample_start() {
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader,nounits \
      -lms 250 >"$1" 2>/dev/null &
    SAMPLER=$!
  else
    : >"$1"
  fi
}
sample_stop() {
  [[ -n $SAMPLER ]] && kill "$SAMPLER" 2>/dev/null && wait "$SAMPLER" 2>/dev/null || true
  SAMPLER=
}
mean_util() {
  "$PY" - "$1" <<'PY'
import sys
vals = []
for line in open(sys.argv[1]):
    f = [x.strip() for x in line.split(",")]
    if len(f) >= 2 and f[1].isdigit():
        vals.append(int(f[1]))
print(f"{sum(vals) / len(vals):.0f} %" if vals else "n/a")
PY
}
# The span of the run's executed attempts (first start to last end: the makespan without the
# planning before them) and the sum of its GPU steps' times (the serial schedule), from
# `status --json`, in seconds.
times() {
  "$PY" - "$1" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
attempts = [a for step in s["steps"] for a in step["attempts"] if a["ended"] > a["started"]]
gpu = sum(a["ended"] - a["started"] for a in attempts if a.get("gpus"))
span = max(a["ended"] for a in attempts) - min(a["started"] for a in attempts) if attempts else 0
print(f"{span / 1000:.1f} {gpu / 1000:.1f}")
PY
}

if [[ $PART != train ]]; then
  # 1. The shortened ablation: whole GPUs, shares, shares under MPS.
  STORE=$OUT/store
  rm -rf "$STORE"
  WHOLE=$OUT/emu-ablation-whole.toml
  sed 's/gpus = 0.25/gpus = 1/' "$ROOT/recipes/emu-ablation.toml" >"$WHOLE"
  GPU_STEPS=(--force pretrained --force tuned --force quantity --force samples_pretrained
    --force samples_tuned --force samples_quantity)
  say ""
  say "## The shortened ablation (${SHORT[*]})"
  # Everything once, so that the measured runs share the cached CPU steps and execute only the
  # GPU steps (and what reads them).
  t0=$(date +%s)
  "$NEEDLE" --store "$STORE" run "$ROOT/recipes/emu-ablation.toml" "${SHORT[@]}" "${GPUS[@]}" \
    >"$OUT/ablation-first.log" 2>&1 || true
  say "first run (everything, shares): $(($(date +%s) - t0)) s"
  say ""
  say "| variant | makespan (s) | GPU steps' time (s) | makespan / serial | mean GPU utilisation |"
  say "|---|---:|---:|---:|---:|"
  variant() {
    local name=$1 recipe=$2
    shift 2
    sample_start "$OUT/util-$name.csv"
    "$NEEDLE" --store "$STORE" run "$recipe" "${SHORT[@]}" "${GPUS[@]}" "${GPU_STEPS[@]}" "$@" \
      >"$OUT/ablation-$name.log" 2>&1 || echo "($name failed: see ablation-$name.log)" | tee -a "$SUMMARY"
    sample_stop
    "$NEEDLE" --store "$STORE" status last --json >"$OUT/status-$name.json"
    "$NEEDLE" --store "$STORE" status last >"$OUT/status-$name.txt" || true
    read -r span gpu < <(times "$OUT/status-$name.json")
    local ratio
    ratio=$("$PY" -c "print(f'{$span / $gpu:.2f}' if $gpu else 'n/a')")
    say "| $name | $span | $gpu | $ratio | $(mean_util "$OUT/util-$name.csv") |"
  }
  variant whole "$WHOLE"
  variant shares "$ROOT/recipes/emu-ablation.toml"
  if command -v nvidia-cuda-mps-control >/dev/null; then
    variant shares-mps "$ROOT/recipes/emu-ablation.toml" --mps
  else
    say "| shares-mps | no nvidia-cuda-mps-control on this machine | | | |"
  fi
fi

# 2. Training and sampling against PyTorch: two shapes, fp32 and bf16 (bench/train_bench_gpu.sh).
if [[ $PART != ablation ]]; then
  say ""
  say "## pretrain and sample against PyTorch"
  DEVICE=cuda
  [[ $DRY == 1 ]] && DEVICE=cpu
  OUT=$OUT/train NEEDLE_BIN=$(dirname "$NEEDLE") PY=$PY DEVICE=$DEVICE TRAIN_STEPS=$TRAIN_STEPS \
    SAMPLE_STEPS=$SAMPLE_STEPS ROUNDS=${ROUNDS:-2} "$ROOT/bench/train_bench_gpu.sh" \
    >"$OUT/train.log" 2>&1 || say "(train_bench_gpu failed: train.log)"
  grep -h -E '^(\||#)' "$ROOT"/bench/out/{train,sample}.md 2>/dev/null | tee -a "$SUMMARY" || true
fi
say ""
say "logs: $OUT"
