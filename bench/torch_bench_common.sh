# Sourced by bench/train_bench.sh and bench/sample_bench.sh, after they set ROOT and DEVICE:
# where needle's binaries and Python are (BIN, PY), what each side gets for DEVICE (GPUS for
# needle, PY_CUDA for PyTorch), and wait_idle.

if [[ -n ${NEEDLE_BIN:-} ]]; then
  BIN=$(cd "$NEEDLE_BIN" && pwd)
else
  make -s build >&2
  BIN=$ROOT/target/release
fi
if [[ -z ${PY:-} ]]; then
  PY=python3
  [[ -x $ROOT/.venv/bin/python ]] && PY=$ROOT/.venv/bin/python
fi
GPUS=0
PY_CUDA=()
if [[ $DEVICE == cuda ]]; then
  GPUS=auto
  PY_CUDA=(--cudnn-benchmark)
fi

# IDLE_WAIT=1: before each timed run, wait (up to 10 minutes) until the CPUs were at least 90 %
# idle over a second, so that a build started by someone else on a shared machine does not
# land in the middle of a measurement as often.
wait_idle() {
  [[ ${IDLE_WAIT:-0} == 1 ]] || return 0
  local _i busy total
  for _i in $(seq 600); do
    read -r _ u n s i w q sq _ </proc/stat
    busy=$((u + n + s + q + sq)) total=$((u + n + s + i + w + q + sq))
    sleep 1
    read -r _ u n s i w q sq _ </proc/stat
    busy=$((u + n + s + q + sq - busy)) total=$((u + n + s + i + w + q + sq - total))
    ((busy * 10 <= total)) && return 0
  done
}
