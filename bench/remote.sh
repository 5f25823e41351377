#!/usr/bin/env bash
# The shared cache against a local SeaweedFS (`weed server -s3`; `scripts/setup.sh --test`
# installs it into .venv): `needle plan` against a remote holding a sweep of N steps, beside
# the same plan with no remote; and push / pull throughput beside plain concurrent HTTP PUTs
# and GETs (curl, 8 at once, unsigned) of the same bytes. Results: bench/out/remote.md.
#
#   bench/remote.sh                  N = 10,000 steps; 8 blobs of 32 MiB
#   BENCH_N=1000 BENCH_MB=8 ...      smaller
#   WEED=path/to/weed NEEDLE=path/to/needle ...
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
NEEDLE=${NEEDLE:-$ROOT/target/release/needle}
WEED=${WEED:-$ROOT/.venv/bin/weed}
N=${BENCH_N:-10000}
MB=${BENCH_MB:-32}
OUT=$ROOT/bench/out
W=$OUT/remote-$(date +%Y%m%d-%H%M%S)
mkdir -p "$W"
RESULTS=$OUT/remote.md
PORT=18433

now() { date +%s.%N; }
t() {
  local t0 t1
  t0=$(now)
  "$@" >"$W/last.log" 2>&1 || { echo "FAILED: $*" >&2; tail -20 "$W/last.log" >&2; exit 1; }
  t1=$(now)
  python3 -c "print(f'{$t1 - $t0:.3f}')"
}

"$WEED" server -dir="$W/s3" -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.port=18431 \
  -volume.port=18432 -filer -filer.port=18434 -s3 -s3.port=$PORT -s3.port.iceberg=0 \
  -s3.port.lance=0 -master.volumeSizeLimitMB=256 -volume.max=0 >"$W/weed.log" 2>&1 &
WEED_PID=$!
trap 'kill $WEED_PID 2>/dev/null || true' EXIT
mkdir -p "$W/s3"
until curl -s -o /dev/null -X PUT "http://127.0.0.1:$PORT/bench" 2>/dev/null &&
  curl -s -f -o /dev/null "http://127.0.0.1:$PORT/bench" 2>/dev/null; do sleep 0.2; done

export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench
CONF="[remote]
url = \"s3://bench/plan\"
endpoint = \"http://127.0.0.1:$PORT\"
region = \"us-east-1\""

# 1. plan against a remote holding N steps
python3 bench/gen.py "$W/a" "$N"
mkdir -p "$W/b"
cp "$W/a/recipe.toml" "$W/b/"
echo "$CONF" >"$W/a/needle.toml"
echo "$CONF" >"$W/b/needle.toml"
cd "$W/a"
echo "running $N steps on machine a (uploading as they go)" >&2
t "$NEEDLE" run recipe.toml -j 2 >/dev/null
cd "$W/b"
plan_none=$(t "$NEEDLE" plan recipe.toml --no-remote)
plan_remote=$(t "$NEEDLE" plan recipe.toml)
grep -q " 0 cached · $((N + 2)) remote · 0 to run" "$W/last.log" || { cat "$W/last.log"; exit 1; }
plan_local_a=$(cd "$W/a" && t "$NEEDLE" plan recipe.toml --no-remote)

# 2. throughput: 8 blobs of MB MiB, pushed and pulled, against curl
mkdir -p "$W/c" "$W/d" "$W/raw"
cat >"$W/c/recipe.toml" <<EOF
[recipe]
name = "big"

[steps.big]
op = "exec"
cmd = ["sh", "-c", "for i in 1 2 3 4 5 6 7 8; do head -c ${MB}M /dev/urandom > \"\$NEEDLE_OUT/f\$i\"; done"]
EOF
CONF_T="${CONF/plan/bytes}"
echo "$CONF_T" >"$W/c/needle.toml"
echo "$CONF_T" >"$W/d/needle.toml"
cp "$W/c/recipe.toml" "$W/d/"
cd "$W/c"
"$NEEDLE" run recipe.toml --no-remote >/dev/null 2>&1
push=$(t "$NEEDLE" push)
cd "$W/d"
pull=$(t "$NEEDLE" pull recipe.toml)
view=$(cd "$W/c" && "$NEEDLE" show last:big --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["view"])')
cp "$view"/f* "$W/raw/"
curl_put=$(t sh -c "ls '$W/raw' | xargs -P 8 -I{} curl -s -f -T '$W/raw/{}' 'http://127.0.0.1:$PORT/bench/raw/{}'")
curl_get=$(t sh -c "ls '$W/raw' | xargs -P 8 -I{} curl -s -f -o '$W/raw/{}.back' 'http://127.0.0.1:$PORT/bench/raw/{}'")
bytes=$((8 * MB))
rate() { python3 -c "print(f'{$bytes / $1:.0f}')"; }

{
  echo "## The shared cache ($(date -u +%Y-%m-%d), $(nproc) CPUs, SeaweedFS on localhost)"
  echo
  echo "| what | seconds |"
  echo "|---|---|"
  echo "| plan, $((N + 2)) steps, no remote, empty store | $plan_none |"
  echo "| plan, $((N + 2)) steps, all on the remote, empty store | $plan_remote |"
  echo "| plan, $((N + 2)) steps, all in the local store | $plan_local_a |"
  echo
  echo "| $bytes MiB in 8 blobs | seconds | MiB/s |"
  echo "|---|---|---|"
  echo "| needle push | $push | $(rate "$push") |"
  echo "| curl PUT, 8 at once | $curl_put | $(rate "$curl_put") |"
  echo "| needle pull (verified, committed) | $pull | $(rate "$pull") |"
  echo "| curl GET, 8 at once | $curl_get | $(rate "$curl_get") |"
} | tee "$RESULTS"
