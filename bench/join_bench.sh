#!/usr/bin/env bash
# The cost of joining a runner: the same run of ~1,000 trivial steps (gen.py's DAG), timed
# alone on a fresh store, and timed as a run that joins a runner while that runner's own run
# goes (one step waiting for a file, holding one CPU slot). The joined run is given the same
# free slots as the run alone (-j 3 with one held, against -j 2), so the two differ only by
# where the run executes. Alternating order, fresh stores, medians (the machine is shared).
#
#   bench/join_bench.sh          7 rounds of N = 1,000
#   BENCH_ROUNDS=3 BENCH_N=200 bench/join_bench.sh
#   NEEDLE=path/to/needle ...
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
NEEDLE=${NEEDLE:-$ROOT/target/release/needle}
OUT=$ROOT/bench/out
N=${BENCH_N:-1000}
ROUNDS=${BENCH_ROUNDS:-7}
RUN_DIR=$OUT/join/$(date +%Y%m%d-%H%M%S)
mkdir -p "$RUN_DIR"
python3 bench/gen.py "$RUN_DIR/dag" "$N"
steps=$("$NEEDLE" plan "$RUN_DIR/dag/recipe.toml" --json --store "$RUN_DIR/plan-store" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["summary"]["unique"])')
cat >"$RUN_DIR/hold.toml" <<'EOF'
[recipe]
name = "hold"

[steps.hold]
op = "exec"
cmd = ["sh", "-c", "touch \"$NEEDLE_RECIPE_DIR/held\"; while [ ! -e \"$NEEDLE_RECIPE_DIR/release\" ]; do sleep 0.05; done; echo > \"$NEEDLE_OUT/v\""]
EOF

now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.3f}')"; }

alone() {
  local store=$1 t0
  sync
  t0=$(now)
  "$NEEDLE" --store "$store" run "$RUN_DIR/dag/recipe.toml" --gpus none -j 2 >/dev/null 2>&1
  secs "$t0" "$(now)"
}

joined() {
  local dir=$1 t0 took runner
  mkdir -p "$dir"
  cp "$RUN_DIR/hold.toml" "$dir/"
  "$NEEDLE" --store "$dir/store" run "$dir/hold.toml" --gpus none -j 3 >/dev/null 2>&1 &
  runner=$!
  while [[ ! -e $dir/held ]]; do sleep 0.02; done
  sync
  t0=$(now)
  "$NEEDLE" --store "$dir/store" run "$RUN_DIR/dag/recipe.toml" --gpus none -j 3 >"$dir/client.log" 2>&1
  took=$(secs "$t0" "$(now)")
  grep -q "joined the runner" "$dir/client.log" || { echo "the run did not join" >&2; exit 1; }
  touch "$dir/release"
  wait "$runner"
  echo "$took"
}

as=() js=() rs=()
for ((r = 0; r < ROUNDS; r++)); do
  if ((r % 2 == 0)); then
    a=$(alone "$RUN_DIR/alone$r")
    j=$(joined "$RUN_DIR/joined$r")
  else
    j=$(joined "$RUN_DIR/joined$r")
    a=$(alone "$RUN_DIR/alone$r")
  fi
  as+=("$a") js+=("$j") rs+=("$(python3 -c "print(f'{$j / $a:.3f}')")")
  echo "round $r: alone $a s, joined $j s" >&2
done
python3 - "$steps" "$ROUNDS" "${as[*]}" "${js[*]}" "${rs[*]}" <<'EOF'
import statistics, sys
steps, rounds = sys.argv[1], sys.argv[2]
a, j, r = (list(map(float, s.split())) for s in sys.argv[3:6])
print(f"| unique steps | rounds | alone, median (s) | joined, median (s) | joined / alone, median (range) |")
print(f"|---|---|---|---|---|")
print(f"| {steps} | {rounds} | {statistics.median(a):.2f} | {statistics.median(j):.2f} | "
      f"{statistics.median(r):.2f} ({min(r):.2f}–{max(r):.2f}) |")
EOF
find "$OUT/join" -mindepth 1 -maxdepth 1 ! -path "$RUN_DIR" -exec rm -rf {} +
