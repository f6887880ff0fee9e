#!/usr/bin/env bash
# The GPU check, in one go (its timeouts add up to 9.8 minutes on one GPU): installs nothing beyond the project
# itself (torch with CUDA must already be there), then
#   1. bench/train.py on small and gpt2-small for every recipe (tokens/s, step time and ratios to bf16),
#   2. bench/qlinear.py at widths 1024 and 4096 for every recipe (one layer, forward + backward),
#   3. the test subset that runs on CUDA (the quantizers and formats on both devices, the CUDA training path),
#   4. real FP8 GeMMs (gemm = "hardware", SM89+): bench/qlinear.py at widths 4096 and 8192 and bench/train.py on
#      small and llama-400m, each recipe beside its simulated twin and bf16,
# writing the tables to $OUT (default bench/gpu_out): train.md, qlinear.md, tests.txt, hardware_qlinear.md,
# hardware_train.md, machine.txt.
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
timeout 200 python bench/train.py --models small,gpt2-small --device cuda --window 3 --windows 2 --passes 1 \
    > "$OUT/train.md" 2>&1 || { echo "bench/train.py failed or timed out (see $OUT/train.md)"; status=1; }
timeout 100 python bench/qlinear.py --device cuda --widths 1024 4096 --bf16-max-width 8192 \
    > "$OUT/qlinear.md" 2>&1 || { echo "bench/qlinear.py failed or timed out (see $OUT/qlinear.md)"; status=1; }
timeout 120 python -m pytest -q -p no:cacheprovider tests/test_quant.py tests/test_formats.py \
    tests/test_train.py tests/test_hardware_gemm.py -k "cuda or hardware" > "$OUT/tests.txt" 2>&1 || { echo "CUDA tests failed (see $OUT/tests.txt)"; status=1; }
HW=bf16,fp8-tensor,fp8-tensor@hardware,fp8-rowwise,fp8-rowwise@hardware
timeout 80 python bench/qlinear.py --device cuda --widths 4096 8192 --bf16-max-width 8192 --recipes "$HW" \
    > "$OUT/hardware_qlinear.md" 2>&1 || { echo "hardware qlinear failed or timed out (see $OUT/hardware_qlinear.md)"; status=1; }
timeout 90 python bench/train.py --models small,llama-400m --device cuda --window 3 --windows 2 --passes 1 \
    --recipes "$HW" > "$OUT/hardware_train.md" 2>&1 || { echo "hardware train failed or timed out (see $OUT/hardware_train.md)"; status=1; }
tail -n 3 "$OUT/tests.txt"
echo "bench/gpu.sh: tables in $OUT"
exit $status
