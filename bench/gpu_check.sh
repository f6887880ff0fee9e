#!/usr/bin/env bash
# The GPU re-check that fits one 15-minute lease (under 9.5 minutes on one H200): the CUDA tests (Triton
# quantizers bit for bit, FP8 GeMMs incl. fp8-block, CPU == GPU eager scales), the FP8 GeMM alone vs bf16 (bench/gpu_gemm.py), one layer at width 8192, steps
# compiled with CUDA graphs (gpt2-small: bf16, the hardware FP8 path, fp4-direct, nvfp4 with its stochastic
# rounding now in the graph; llama-400m:
# bf16 and hardware FP8), and where an eager step's time goes (bench/gpu_profile.py). The most wanted tables run
# first, so a cut leaves the rest; bench/gpu.sh is the full run. Same conventions as bench/gpu.sh (python3,
# PYTHONPATH=src, tables to $OUT).
source "$(dirname "$0")/gpu_common.sh"
section 80 tests.txt $PY -m pytest -q -p no:cacheprovider -k "cuda or gpu or device" \
    tests/test_kernels.py tests/test_hardware_gemm.py tests/test_quant.py tests/test_train.py tests/test_rng.py
tail -n 3 "$OUT/tests.txt"
section 20 gemm.md $PY bench/gpu_gemm.py --size 8192
section 40 qlinear.md $PY bench/qlinear.py --device cuda --widths 8192 --tokens 8192 --repeats 10 \
    --bf16-max-width 8192 \
    --recipes bf16,fp8-tensor,fp8-block,fp4-direct,mxfp8,nvfp4,fp8-tensor@hardware,fp8-rowwise@hardware,fp8-block@hardware
section 170 compile.md $PY bench/compile.py --models gpt2-small --device cuda --window 3 --windows 2 \
    --recipes bf16,fp8-tensor@hardware,fp4-direct,nvfp4 --mode reduce-overhead
grep -E "^ *gpt2" "$OUT/compile.md"
section 220 compile_llama.md $PY bench/compile.py --models llama-400m --device cuda --window 3 --windows 1 \
    --recipes bf16,fp8-tensor@hardware --mode reduce-overhead
grep -E "^ *llama" "$OUT/compile_llama.md"
section 50 profile.md $PY bench/gpu_profile.py --model gpt2-small --device cuda --skip 3 --steps 3 \
    --recipes bf16,fp8-tensor@hardware --cprofile fp8-tensor@hardware
echo "bench/gpu_check.sh: tables in $OUT (status $status)"
exit $status
