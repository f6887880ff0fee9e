#!/usr/bin/env bash
# The GPU check, in one go: its timeouts add up to under 8 minutes on one GPU. Installs nothing: it runs the source
# tree (PYTHONPATH=src) under the machine's own python3 with its CUDA torch and Triton, so it works on a machine
# with no network. In order of what matters most if time runs out:
#   1. the CUDA tests: Triton quantizers bit for bit the eager ones on the GPU, the FP8 GeMMs (gemm = "hardware",
#      fp8-block's block-scaled GeMM on Hopper) against the exact simulation, training on CUDA (tests.txt);
#   2. bench/gpu_kernels.py: Triton fake-quantize vs eager vs a plain copy (kernels.md);
#   3. bench/qlinear.py at widths 4096 and 8192, every recipe and the hardware variants (qlinear.md);
#   4. bench/train.py on small and gpt2-small, every recipe, Triton quantizers where they apply (train.md);
#   5. bench/train.py on gpt2-small and llama-400m with real FP8 GeMMs beside the simulation and bf16 (hardware_train.md);
# and machine.txt. Tables go to $OUT (default bench/gpu_out).
#   bash bench/gpu.sh                 # OUT=bench/gpu_out
#   OUT=/tmp/g PY=python bash bench/gpu.sh
source "$(dirname "$0")/gpu_common.sh"
section 120 tests.txt $PY -m pytest -q -p no:cacheprovider -k "cuda or gpu or hardware" \
    tests/test_kernels.py tests/test_hardware_gemm.py tests/test_train.py tests/test_quant.py tests/test_formats.py tests/test_rng.py
tail -n 4 "$OUT/tests.txt"
section 40 kernels.md $PY bench/gpu_kernels.py --size 8192 --repeats 20
HW=fp8-tensor@hardware,fp8-rowwise@hardware,fp8-rowwise-gw-hp@hardware,fp8-block@hardware
ALL=$($PY -c "from lowbit import recipes; print(','.join(recipes.names()))")
section 70 qlinear.md $PY bench/qlinear.py --device cuda --widths 4096 8192 --tokens 8192 --repeats 10 \
    --bf16-max-width 8192 --recipes "$ALL,$HW"
section 140 train.md $PY bench/train.py --models small,gpt2-small --device cuda --window 3 --windows 2 --passes 1
section 100 hardware_train.md $PY bench/train.py --models gpt2-small,llama-400m --device cuda --window 3 \
    --windows 2 --passes 1 --recipes "bf16,fp8-tensor,fp8-tensor@hardware,fp8-rowwise@hardware,fp8-block,fp8-block@hardware"
echo "bench/gpu.sh: tables in $OUT (status $status)"
exit $status
