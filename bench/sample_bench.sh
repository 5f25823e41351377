#!/usr/bin/env bash
# Sampling throughput of `sample` against the same DDIM sampler in plain PyTorch
# (bench/sample_bench.py) on the very model needle trained, on the same machine in one run,
# alternating the two round by round. Results: bench/out/sample.md.
#
#   bench/sample_bench.sh                   the demo's sampling: 16 prompts x 15 seeds, 25 steps,
#                                           guidance 3, batch 256, demo U-Net; CPU, 2 threads
#   bench/sample_bench.sh large             the U-Net of channels 64, blocks 2
#   PRECISION=bf16 bench/sample_bench.sh    both under bfloat16 autocast
#   IDLE_WAIT=1 THREADS=1 bench/sample_bench.sh   on a shared machine (see wait_idle in bench/torch_bench_common.sh)
#   DEVICE=cuda bench/sample_bench.sh       on a GPU
#
# CHANNELS, MULT, BLOCKS shape the model (a one-step `pretrain`: the weights do not change the
# work); PROMPTS (16), SEEDS (15), STEPS (25), BATCH (256), ROUNDS (3), THREADS (2).
# NEEDLE_BIN, PY and STORE as for bench/train_bench.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
case "${1:-demo}" in
  demo) ;;
  large) : "${CHANNELS:=64}" "${BLOCKS:=2}" ;;
  *) echo "usage: $0 [demo|large]" >&2; exit 2 ;;
esac
CHANNELS=${CHANNELS:-16}
MULT=${MULT:-1,2,4}
BLOCKS=${BLOCKS:-1}
PROMPTS=${PROMPTS:-16}
SEEDS=${SEEDS:-15}
STEPS=${STEPS:-25}
BATCH=${BATCH:-256}
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-2}
DEVICE=${DEVICE:-cpu}
PRECISION=${PRECISION:-fp32}
OUT=$ROOT/bench/out
mkdir -p "$OUT"
WORK=$(mktemp -d "$OUT/sample.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
STORE=${STORE:-$WORK/store}

# BIN, PY, GPUS, PY_CUDA and wait_idle.
source "$ROOT/bench/torch_bench_common.sh"

# The prompts bench/sample_bench.py uses: colour-major within each shape, the first PROMPTS.
prompts=$("$PY" -c "
import sys
sys.path.insert(0, 'bench')
from sample_bench import COLOURS, SHAPES
print(', '.join([f'\"a {c} {s}\"' for s in SHAPES for c in COLOURS][:$PROMPTS]))")

cat >"$WORK/bench.toml" <<TOML
[recipe]
name = "sample-bench"

[vars]
round = 0

[steps.data]
op = "haystack"
params = { images = 2000, seed = 1 }

[steps.model]
op = "pretrain"
inputs = { data = "data" }
params = { steps = 1, batch = 8, channels = $CHANNELS, mult = [$MULT], blocks = $BLOCKS, save_every = 0 }
resources = { cpus = $THREADS }

[steps.sample]
op = "sample"
inputs = { model = "model" }
params = { prompts = [$prompts], seeds = $SEEDS, steps = $STEPS, guidance = 3.0, batch = $BATCH, noise_seed = "\${round}", precision = "$PRECISION" }
resources = { cpus = $THREADS, gpus = $([[ $DEVICE == cuda ]] && echo 1 || echo 0) }
TOML

rust=()
py=()
for r in $(seq 1 "$ROUNDS"); do
  wait_idle
  "$BIN/needle" run "$WORK/bench.toml" --store "$STORE" --gpus "$GPUS" --set round=$r --force sample >&2
  [[ -d $WORK/model ]] || "$BIN/needle" export --store "$STORE" last:model "$WORK/model" >&2
  # The op's log line: "sample: N images in T s (X images/s), PRECISION".
  rust+=("$("$BIN/needle" logs --store "$STORE" last:sample \
    | "$PY" -c 'import re,sys; print(re.search(r"\(([0-9.]+) images/s\)", sys.stdin.read()).group(1))')")
  wait_idle
  out=$("$PY" "$ROOT/bench/sample_bench.py" --model "$WORK/model" --prompts "$PROMPTS" --seeds "$SEEDS" \
    --steps "$STEPS" --batch "$BATCH" --threads "$THREADS" --device "$DEVICE" --precision "$PRECISION" \
    "${PY_CUDA[@]}" 2>/dev/null)
  py+=("$(echo "$out" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["images_per_second"])')")
  echo "round $r: needle ${rust[-1]} images/s, pytorch ${py[-1]} images/s" >&2
done

"$PY" - "$OUT/sample.md" "$DEVICE" "$THREADS" "$PRECISION" "$CHANNELS" "$MULT" "$BLOCKS" "$PROMPTS" "$SEEDS" \
  "$STEPS" "$BATCH" "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" "${rust[*]}" "${py[*]}" <<'PYEND'
import statistics, sys, datetime, torch
path, device, threads, precision, channels, mult, blocks, prompts, seeds, steps, batch, commit, rust, py = sys.argv[1:]
rust = [float(x) for x in rust.split()]
py = [float(x) for x in py.split()]
ratios = [r / p for r, p in zip(rust, py)]
where = torch.cuda.get_device_name(0) if device == "cuda" else f"cpu, {threads} threads"
lines = [
    f"## sample throughput, {datetime.datetime.now():%Y-%m-%d %H:%M}, commit {commit}",
    "",
    f"{where}, {precision}, {prompts} prompts x {seeds} seeds, {steps} DDIM steps, batch {batch}, U-Net channels {channels} mult [{mult}] blocks {blocks}, torch {torch.__version__}",
    "",
    "| round | needle images/s | PyTorch images/s | ratio |",
    "|---:|---:|---:|---:|",
]
for i, (r, p, q) in enumerate(zip(rust, py, ratios), 1):
    lines.append(f"| {i} | {r:.2f} | {p:.2f} | {q:.2f} |")
lines.append(f"| median | {statistics.median(rust):.2f} | {statistics.median(py):.2f} | {statistics.median(ratios):.2f} |")
text = "\n".join(lines) + "\n"
print(text)
with open(path, "a") as f:
    f.write(text + "\n")
PYEND
