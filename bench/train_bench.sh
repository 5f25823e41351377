#!/usr/bin/env bash
# Training throughput of `pretrain` against the same model, same batch, in plain PyTorch
# (bench/train_bench.py), on the same machine in one run, alternating the two so that the
# machine's noise falls on both. Results: bench/out/train.md.
#
#   bench/train_bench.sh                    the demo's shape: CPU, 2 threads, batch 64, 200 steps, 3 rounds
#   bench/train_bench.sh large              channels 64, blocks 2, batch 256
#   PRECISION=bf16 bench/train_bench.sh     both under bfloat16 autocast (needle's `precision = "bf16"`)
#   STEPS=100 ROUNDS=2 bench/train_bench.sh
#   IDLE_WAIT=1 THREADS=1 bench/train_bench.sh   on a shared machine (see wait_idle in bench/torch_bench_common.sh)
#   DEVICE=cuda bench/train_bench.sh        on a GPU (needle gets --gpus auto; both let cuDNN
#                                           time its algorithms, as needle does on a GPU)
#
# Model shape: CHANNELS (16), MULT (1,2,4), BLOCKS (1), BATCH (64) — the demo's; `large` sets
# 64, 1,2,4, 2, 256 (each still overridable). On a machine without Rust (a GPU machine), give
# NEEDLE_BIN, a folder holding prebuilt `needle` and `needle-worker` (bench/train_bench_gpu.sh
# packs them), and PY, a Python with torch (default: .venv's, else python3). STORE keeps the
# needle store across invocations (the 20,000-image dataset is then made once).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
case "${1:-demo}" in
  demo) ;;
  large) : "${CHANNELS:=64}" "${BLOCKS:=2}" "${BATCH:=256}" ;;
  *) echo "usage: $0 [demo|large]" >&2; exit 2 ;;
esac
STEPS=${STEPS:-200}
BATCH=${BATCH:-64}
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-2}
CHANNELS=${CHANNELS:-16}
MULT=${MULT:-1,2,4}
BLOCKS=${BLOCKS:-1}
DEVICE=${DEVICE:-cpu}
PRECISION=${PRECISION:-fp32}
OUT=$ROOT/bench/out
mkdir -p "$OUT"
WORK=$(mktemp -d "$OUT/train.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
STORE=${STORE:-$WORK/store}

# BIN, PY, GPUS, PY_CUDA and wait_idle.
source "$ROOT/bench/torch_bench_common.sh"

cat >"$WORK/bench.toml" <<TOML
[recipe]
name = "train-bench"

[vars]
round = 0

[steps.data]
op = "haystack"
params = { images = 20000, seed = 1 }

[steps.train]
op = "pretrain"
inputs = { data = "data" }
params = { steps = $STEPS, batch = $BATCH, channels = $CHANNELS, mult = [$MULT], blocks = $BLOCKS, save_every = 0, seed = "\${round}", precision = "$PRECISION" }
resources = { cpus = $THREADS, gpus = $([[ $DEVICE == cuda ]] && echo 1 || echo 0) }
TOML

rust=()
py=()
for r in $(seq 1 "$ROUNDS"); do
  wait_idle
  # --force: a STORE kept from an earlier invocation may hold this very step.
  "$BIN/needle" run "$WORK/bench.toml" --store "$STORE" --gpus "$GPUS" --set round=$r --force train >&2
  # The op's log line: "pretrain: S steps at batch B on DEVICE: X images/s, T s in the training loop".
  rust+=("$("$BIN/needle" logs --store "$STORE" last:train \
    | "$PY" -c 'import re,sys; print(re.search(r"([0-9.]+) images/s", sys.stdin.read()).group(1))')")
  wait_idle
  out=$("$PY" "$ROOT/bench/train_bench.py" --steps "$STEPS" --warmup 0 --batch "$BATCH" --threads "$THREADS" \
    --channels "$CHANNELS" --mult "$MULT" --blocks "$BLOCKS" --device "$DEVICE" --precision "$PRECISION" \
    "${PY_CUDA[@]}" 2>/dev/null)
  py+=("$(echo "$out" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["images_per_second"])')")
  echo "round $r: needle ${rust[-1]} images/s, pytorch ${py[-1]} images/s" >&2
done

"$PY" - "$OUT/train.md" "$DEVICE" "$THREADS" "$BATCH" "$STEPS" "$CHANNELS" "$MULT" "$BLOCKS" "$PRECISION" \
  "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" "${rust[*]}" "${py[*]}" <<'PYEND'
import statistics, sys, datetime, torch
path, device, threads, batch, steps, channels, mult, blocks, precision, commit, rust, py = sys.argv[1:]
rust = [float(x) for x in rust.split()]
py = [float(x) for x in py.split()]
ratios = [r / p for r, p in zip(rust, py)]
where = torch.cuda.get_device_name(0) if device == "cuda" else f"cpu, {threads} threads"
lines = [
    f"## pretrain training throughput, {datetime.datetime.now():%Y-%m-%d %H:%M}, commit {commit}",
    "",
    f"{where}, {precision}, batch {batch}, {steps} steps a round, U-Net channels {channels} mult [{mult}] blocks {blocks}, torch {torch.__version__}",
    "",
    "| round | needle images/s | PyTorch images/s | ratio |",
    "|---:|---:|---:|---:|",
]
for i, (r, p, q) in enumerate(zip(rust, py, ratios), 1):
    lines.append(f"| {i} | {r:.1f} | {p:.1f} | {q:.2f} |")
lines.append(f"| median | {statistics.median(rust):.1f} | {statistics.median(py):.1f} | {statistics.median(ratios):.2f} |")
text = "\n".join(lines) + "\n"
print(text)
with open(path, "a") as f:
    f.write(text + "\n")
PYEND
