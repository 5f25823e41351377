#!/usr/bin/env bash
# needle's benchmarks, side by side with their baselines in one run (the machine is shared
# and noisy: compare ratios, not absolute seconds). Results: bench/out/results.md.
#
#   bench/run.sh                 everything (installs Snakemake into a throwaway venv)
#   BENCH_N="1000" bench/run.sh  only N = 1,000
#   BENCH_SNAKEMAKE=0 ...        skip Snakemake
#   BENCH_ROUNDS=9 ...           first-run rounds per N (default: 7 at N <= 2,000, else 3)
#   BENCH_SCHED=0 ...            skip the scheduling benchmark
#   NEEDLE=path/to/needle ...    another build (to compare two, alternate invocations)
#
# Workload (gen.py): 1 shared root, N/4 arms of 4 chained steps, 1 final step reading all arms;
# every step one trivial `sh -c`. Scheduling (sched.py): sleeps needing 1, 2 or 4 GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
NEEDLE=${NEEDLE:-$ROOT/target/release/needle}
OUT=$ROOT/bench/out
NS=${BENCH_N:-"1000 10000"}
SNAKE=${BENCH_SNAKEMAKE:-1}
JOBS=2
# Each invocation works in a fresh directory and removes older ones only at its end: on ext4,
# inodes freed just before a measurement make new ones slow to allocate for a minute or more
# (`recently_deleted`), which would penalise whatever runs first.
RUN_DIR=$OUT/runs/$(date +%Y%m%d-%H%M%S)
mkdir -p "$RUN_DIR"
RESULTS=$OUT/results.md

now() { date +%s.%N; }
# t CMD...: run, print seconds taken (3 decimals); output goes to $OUT/last.log
t() {
  local t0 t1
  t0=$(now)
  "$@" >"$OUT/last.log" 2>&1 || { echo "FAILED: $*" >&2; tail -20 "$OUT/last.log" >&2; exit 1; }
  t1=$(now)
  python3 -c "print(f'{$t1 - $t0:.3f}')"
}
ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }
# median A B C...
median() { python3 -c "import statistics,sys; print(f'{statistics.median(map(float, sys.argv[1:])):.3f}')" "$@"; }
# range_of A B C...: "min–max"
range_of() { python3 -c "import sys; v=sorted(map(float, sys.argv[1:])); print(f'{v[0]:.2f}–{v[-1]:.2f}')" "$@"; }

if [[ $SNAKE == 1 && ! -x $OUT/venv/bin/snakemake ]]; then
  echo "installing snakemake into $OUT/venv" >&2
  python3 -m venv "$OUT/venv"
  "$OUT/venv/bin/pip" install -q 'snakemake>=9,<10'
fi

{
  echo "# needle benchmarks"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, needle $(git -C "$ROOT" rev-parse --short HEAD) ($NEEDLE)$( [[ $SNAKE == 1 ]] && echo ", $("$OUT/venv/bin/snakemake" --version | head -1 | sed 's/^/snakemake /')")"
  echo
  echo "| N | what | needle (s) | snakemake -j $JOBS (s) | no orchestrator (s) | needle / baseline |"
  echo "|---|---|---|---|---|---|"
} >"$RESULTS"

for N in $NS; do
  W=$RUN_DIR/n$N
  python3 bench/gen.py "$W" "$N"
  python3 bench/gen.py "$W/changed" "$N" --change
  mkdir -p "$W/plain"
  export NEEDLE_STORE=$W/store

  plan=$(t "$NEEDLE" plan "$W/recipe.toml")
  # First runs against the same processes with no orchestrator, in alternating order, each in
  # a fresh directory, the filesystem synced before each (needle's syncs would otherwise also
  # write out what the run before it left dirty, and the kernel's write-back of either would
  # run into the next measurement). One pair is noise on a shared machine: report medians.
  rounds=${BENCH_ROUNDS:-$( ((N <= 2000)) && echo 7 || echo 3)}
  firsts=() plains=() ratios=()
  for ((r = 0; r < rounds; r++)); do
    R=$W/round$r
    mkdir -p "$R/plain"
    cp "$W/plain.sh" "$R/"
    export NEEDLE_STORE=$R/store
    if ((r % 2 == 0)); then
      sync; p=$(t sh "$R/plain.sh")
      sync; f=$(t "$NEEDLE" run "$W/recipe.toml" --gpus none -j $JOBS)
    else
      sync; f=$(t "$NEEDLE" run "$W/recipe.toml" --gpus none -j $JOBS)
      sync; p=$(t sh "$R/plain.sh")
    fi
    firsts+=("$f") plains+=("$p") ratios+=("$(ratio "$f" "$p")")
  done
  first=$(median "${firsts[@]}")
  plain=$(median "${plains[@]}")
  first_ratio="$(ratio "$(median "${ratios[@]}")" 1) median of $rounds rounds ($(range_of "${ratios[@]}"))"
  # The later measurements reuse the first round's store.
  export NEEDLE_STORE=$W/round0/store
  noop=$(t "$NEEDLE" run "$W/recipe.toml" --gpus none -j $JOBS)
  plan_cached=$(t "$NEEDLE" plan "$W/recipe.toml")
  change=$(t "$NEEDLE" run "$W/changed/recipe.toml" --gpus none -j $JOBS)
  executed=$("$NEEDLE" status last --json | python3 -c 'import json,sys; print(sum(s["status"]=="succeeded" for s in json.load(sys.stdin)["steps"]))')
  # The final step gathers every arm: its ancestry is the whole sweep.
  lineage=$(t "$NEEDLE" lineage 1:final)
  lineage_json=$(t "$NEEDLE" lineage 1:final --json)

  s_plan=- s_first=- s_noop=-
  if [[ $SNAKE == 1 ]]; then
    SM=$OUT/venv/bin/snakemake
    (cd "$W" && rm -rf .snakemake)
    s_plan=$(t bash -c "cd '$W' && '$SM' -n -j $JOBS --quiet")
    s_first=$(t bash -c "cd '$W' && '$SM' -j $JOBS --scheduler greedy --quiet")
    s_noop=$(t bash -c "cd '$W' && '$SM' -j $JOBS --quiet")
  fi
  {
    echo "| $N | plan (cold store) | $plan | $s_plan | | $( [[ $s_plan != - ]] && ratio "$plan" "$s_plan" ) vs snakemake |"
    echo "| $N | first run (medians) | $first | $s_first | $plain | $first_ratio vs no orchestrator |"
    echo "| $N | no-op rerun | $noop | $s_noop | | $( [[ $s_noop != - ]] && ratio "$noop" "$s_noop" ) vs snakemake |"
    echo "| $N | plan (all cached) | $plan_cached | | | |"
    echo "| $N | one arm changed ($executed steps run) | $change | | | |"
    echo "| $N | lineage of the final step (tree / json) | $lineage / $lineage_json | | | |"
  } >>"$RESULTS"
  unset NEEDLE_STORE
done

# Scheduling: makespan against its lower bound on --gpus 4.
if [[ ${BENCH_SCHED:-1} == 1 ]]; then
S=$RUN_DIR/sched
read -r bound critical gpu_seconds count < <(python3 bench/sched.py "$S" 4)
makespan=$(NEEDLE_STORE=$S/store t "$NEEDLE" run "$S/sched.toml" --gpus 4 -j 16)
{
  echo
  echo "## Scheduling"
  echo
  echo "$count sleep steps needing 1, 2 or 4 GPUs on \`--gpus 4\`: GPU-seconds $gpu_seconds, critical path $critical s."
  echo
  echo "| lower bound max(critical path, GPU-s / 4) (s) | makespan (s) | ratio |"
  echo "|---|---|---|"
  echo "| $bound | $makespan | $(ratio "$makespan" "$bound") |"
} >>"$RESULTS"
fi

cat "$RESULTS"
find "$OUT/runs" -mindepth 1 -maxdepth 1 ! -path "$RUN_DIR" -exec rm -rf {} +
