#!/usr/bin/env bash
# The short GPU re-check (at most 7 minutes on one H200), for a session with little device time left after
# bench/gpu.sh: the CUDA tests (Triton quantizers bit for bit, FP8 GeMMs incl. fp8-block, CPU == GPU eager
# scales), the Triton-vs-eager quantizer table, one layer at width 8192, gpt2-small steps with the eager and
# the Triton quantizers, and the same steps compiled with CUDA graphs (compile.md). Same conventions as
# bench/gpu.sh (python3, PYTHONPATH=src, tables to $OUT).
source "$(dirname "$0")/gpu_common.sh"
section 100 tests.txt $PY -m pytest -q -p no:cacheprovider -k "cuda or gpu or device" \
    tests/test_kernels.py tests/test_hardware_gemm.py tests/test_quant.py tests/test_train.py
tail -n 12 "$OUT/tests.txt"
section 25 kernels.md $PY bench/gpu_kernels.py --size 8192 --repeats 20
tail -n 3 "$OUT/kernels.md"
section 30 qlinear.md $PY bench/qlinear.py --device cuda --widths 8192 --tokens 8192 --repeats 10 \
    --bf16-max-width 8192 \
    --recipes bf16,fp8-tensor,fp8-rowwise,fp8-block,fp4-direct,mxfp8,nvfp4,fp8-tensor@hardware,fp8-rowwise@hardware,fp8-block@hardware
section 120 train.md $PY bench/train.py --models gpt2-small --device cuda --window 3 --windows 2 --passes 1 \
    --recipes bf16,fp8-tensor,fp8-block,fp4-direct,mxfp8,nvfp4,fp8-tensor@hardware,fp8-block@hardware --kernels eager,auto
section 150 compile.md $PY bench/compile.py --models gpt2-small --device cuda --window 3 --windows 2 \
    --recipes bf16,fp8-tensor,fp4-direct --mode reduce-overhead
echo "bench/gpu_check.sh: tables in $OUT (status $status)"
exit $status
