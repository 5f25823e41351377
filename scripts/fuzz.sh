#!/usr/bin/env bash
# Fuzz recipe parsing and planning: `scripts/fuzz.sh [SECONDS]` (default 300; `make fuzz`).
#
# cargo-fuzz drives libFuzzer, which needs nightly compiler flags; RUSTC_BOOTSTRAP=1 lets the
# stable toolchain accept them. The fuzz crate is its own workspace with its own target dir,
# since it is built with other flags than the main workspace. Seeds: every recipe in
# recipes/ and tests/bad-recipes/. A crash or a time-out stops the run and leaves the input in
# fuzz/artifacts/recipe/; reproduce it with `scripts/fuzz.sh repro FILE`.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
target_dir=${FUZZ_TARGET_DIR:-$root/fuzz/target}
corpus=$root/fuzz/corpus/recipe

if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked
fi

fuzz() {
    (cd "$root/fuzz" && RUSTC_BOOTSTRAP=1 cargo fuzz "$@")
}
# Safe Rust: no sanitizer (twice the executions per second), but overflow checks on.
build_flags=(--sanitizer none --debug-assertions --target-dir "$target_dir")
# One input may take at most 10 s and 2 GiB: more is a bug (a slow path, or memory that a
# recipe's size does not explain).
limits=(-timeout=10 -rss_limit_mb=2048 -max_len=16384)

if [[ ${1:-} == repro ]]; then
    fuzz run "${build_flags[@]}" recipe "$2" -- "${limits[@]}"
    exit
fi

secs=${1:-300}
mkdir -p "$corpus"
cp "$root"/recipes/*.toml "$root"/tests/bad-recipes/*.toml "$corpus"/ 2>/dev/null || true
fuzz run "${build_flags[@]}" recipe "$corpus" -- \
    -dict="$root/fuzz/recipe.dict" -max_total_time="$secs" -print_final_stats=1 "${limits[@]}"
