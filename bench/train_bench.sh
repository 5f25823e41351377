#!/usr/bin/env bash
# Training throughput of `pretrain` against the same model, same batch, in plain PyTorch
# (bench/train_bench.py), on the same machine in one run, alternating the two so that the
# machine's noise falls on both. Results: bench/out/train.md.
#
#   bench/train_bench.sh                    CPU, 2 threads, batch 64, 200 steps, 3 rounds
#   STEPS=100 ROUNDS=2 bench/train_bench.sh
#   DEVICE=cuda bench/train_bench.sh        on a GPU (needle gets --gpus auto)
#
# Model shape: CHANNELS (16), MULT (1,2,4), BLOCKS (1) — the demo's.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STEPS=${STEPS:-200}
BATCH=${BATCH:-64}
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-2}
CHANNELS=${CHANNELS:-16}
MULT=${MULT:-1,2,4}
BLOCKS=${BLOCKS:-1}
DEVICE=${DEVICE:-cpu}
OUT=$ROOT/bench/out
mkdir -p "$OUT"
WORK=$(mktemp -d "$OUT/train.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

make -s build >&2
PY=$ROOT/.venv/bin/python
GPUS=0
[[ $DEVICE == cuda ]] && GPUS=auto

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
params = { steps = $STEPS, batch = $BATCH, channels = $CHANNELS, mult = [$MULT], blocks = $BLOCKS, save_every = 0, seed = "\${round}" }
resources = { cpus = $THREADS, gpus = $([[ $DEVICE == cuda ]] && echo 1 || echo 0) }
TOML

rust=()
py=()
for r in $(seq 1 "$ROUNDS"); do
  "$ROOT/target/release/needle" run "$WORK/bench.toml" --store "$WORK/store" --gpus "$GPUS" --set round=$r >&2
  # The op's log line: "pretrain: S steps at batch B on DEVICE: X images/s, T s in the training loop".
  rust+=("$("$ROOT/target/release/needle" logs --store "$WORK/store" last:train \
    | "$PY" -c 'import re,sys; print(re.search(r"([0-9.]+) images/s", sys.stdin.read()).group(1))')")
  out=$("$PY" "$ROOT/bench/train_bench.py" --steps "$STEPS" --warmup 0 --batch "$BATCH" --threads "$THREADS" \
    --channels "$CHANNELS" --mult "$MULT" --blocks "$BLOCKS" --device "$DEVICE" 2>/dev/null)
  py+=("$(echo "$out" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["images_per_second"])')")
  echo "round $r: needle ${rust[-1]} images/s, pytorch ${py[-1]} images/s" >&2
done

"$PY" - "$OUT/train.md" "$DEVICE" "$THREADS" "$BATCH" "$STEPS" "$CHANNELS" "$MULT" "${rust[*]}" "${py[*]}" <<'PYEND'
import statistics, sys, datetime, torch
path, device, threads, batch, steps, channels, mult, rust, py = sys.argv[1:]
rust = [float(x) for x in rust.split()]
py = [float(x) for x in py.split()]
ratios = [r / p for r, p in zip(rust, py)]
lines = [
    f"## pretrain training throughput, {datetime.datetime.now():%Y-%m-%d %H:%M}",
    "",
    f"{device}, {threads} threads, batch {batch}, {steps} steps a round, U-Net channels {channels} mult [{mult}], torch {torch.__version__}",
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
