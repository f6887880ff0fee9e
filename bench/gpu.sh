#!/usr/bin/env bash
# The GPU check, in one go (about 10 minutes on one GPU): installs nothing beyond the project itself (torch
# with CUDA must already be there), then
#   1. bench/train.py on small and gpt2-small for every recipe (tokens/s, step time and ratios to bf16),
#   2. bench/qlinear.py at widths 1024 and 4096 for every recipe (one layer, forward + backward),
#   3. the test subset that runs on CUDA (the quantizers and formats on both devices, the CUDA training path),
# writing the tables to $OUT (default bench/gpu_out): train.md, qlinear.md, tests.txt, machine.txt.
#   bash bench/gpu.sh                 # OUT=bench/gpu_out
#   OUT=/tmp/g bash bench/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/gpu_out}
mkdir -p "$OUT"
python - <<'EOF' || { echo "bench/gpu.sh: no CUDA device visible to torch; run it on a GPU machine" >&2; exit 2; }
import torch
assert torch.cuda.is_available()
EOF
pip install -q --no-deps -e . >/dev/null 2>&1 || pip install -q --no-deps -e .
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; lscpu | grep -E 'Model name'; } > "$OUT/machine.txt" 2>&1
status=0
timeout 300 python bench/train.py --models small,gpt2-small --device cuda --window 3 --windows 2 --passes 1 \
    > "$OUT/train.md" 2>&1 || { echo "bench/train.py failed or timed out (see $OUT/train.md)"; status=1; }
timeout 150 python bench/qlinear.py --device cuda --widths 1024 4096 --bf16-max-width 8192 \
    > "$OUT/qlinear.md" 2>&1 || { echo "bench/qlinear.py failed or timed out (see $OUT/qlinear.md)"; status=1; }
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_quant.py tests/test_formats.py \
    tests/test_train.py -k cuda > "$OUT/tests.txt" 2>&1 || { echo "CUDA tests failed (see $OUT/tests.txt)"; status=1; }
tail -n 3 "$OUT/tests.txt"
echo "bench/gpu.sh: tables in $OUT"
exit $status
