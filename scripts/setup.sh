#!/usr/bin/env bash
# Install what `make build`, `make demo` and `make test` need and this machine lacks.
# Idempotent and quiet when everything is there.
set -euo pipefail

log() { echo "[setup] $*" >&2; }

if ! command -v cargo >/dev/null 2>&1; then
  if [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    log "cargo is in ~/.cargo/bin but not on PATH: run 'source ~/.cargo/env' and retry"
  else
    log "no Rust toolchain found: install one with rustup (https://rustup.rs), then retry"
  fi
  exit 1
fi

# The demo's exec steps are python3 scripts (standard library only).
if ! command -v python3 >/dev/null 2>&1; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    log "installing python3"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 >/dev/null
  else
    log "python3 is missing: install it (Debian: apt-get install python3)"
    exit 1
  fi
fi
