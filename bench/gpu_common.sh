# Sourced by bench/gpu.sh and bench/gpu_check.sh: run from the repository root on the source tree (no install:
# a GPU machine may have no network), check for a CUDA device, write machine.txt, and define `section`.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-bench/gpu_out}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
$PY -c "import torch; assert torch.cuda.is_available()" 2>/dev/null || {
    echo "$(basename "$0"): no CUDA device visible to torch; run it on a GPU machine" >&2; exit 2; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'capability', torch.cuda.get_device_capability())"
  lscpu | grep -E 'Model name|^CPU\(s\)'; gcc --version | head -1; } > "$OUT/machine.txt" 2>&1
status=0
section() {  # section SECONDS FILE what... : run with a hard timeout (a SIGTERM makes training write a checkpoint
    local t=$1 f=$2; shift 2  # first and overrun), output to $OUT/FILE, a failure noted in $status
    local t0=$SECONDS
    timeout -s KILL "$t" "$@" > "$OUT/$f" 2>&1 || { echo "FAILED or timed out after $((SECONDS - t0)) s: $* (see $f)"; status=1; }
    echo "$f: $((SECONDS - t0)) s"
}
