#!/usr/bin/env bash
# The GPU re-check (at most 9.5 minutes on one H200) for a session with one lease: the CUDA tests (Triton
# quantizers bit for bit, FP8 GeMMs incl. fp8-block, CPU == GPU eager scales), one layer at width 8192, where a
# gpt2-small step's time goes (bench/gpu_profile.py: device busy share, launches, syncs, top kernels and host
# ops, cProfile of the hardware FP8 step), gpt2-small and llama-400m steps, the Triton-vs-eager quantizer table,
# and gpt2-small steps compiled with CUDA graphs. Same conventions as bench/gpu.sh (python3, PYTHONPATH=src,
# tables to $OUT); the most wanted tables run first, so a cut leaves the rest.
source "$(dirname "$0")/gpu_common.sh"
section 80 tests.txt $PY -m pytest -q -p no:cacheprovider -k "cuda or gpu or device" \
    tests/test_kernels.py tests/test_hardware_gemm.py tests/test_quant.py tests/test_train.py
tail -n 12 "$OUT/tests.txt"
section 40 qlinear.md $PY bench/qlinear.py --device cuda --widths 8192 --tokens 8192 --repeats 10 \
    --bf16-max-width 8192 \
    --recipes bf16,fp8-tensor,fp8-rowwise,fp8-block,fp4-direct,mxfp8,nvfp4,fp8-tensor@hardware,fp8-rowwise@hardware,fp8-block@hardware
section 90 profile.md $PY bench/gpu_profile.py --model gpt2-small --device cuda --skip 3 --steps 3 \
    --recipes bf16,fp8-tensor,fp8-tensor@hardware,nvfp4 --cprofile fp8-tensor@hardware
section 70 train.md $PY bench/train.py --models gpt2-small --device cuda --window 3 --windows 2 --passes 1 \
    --recipes bf16,fp8-tensor,fp8-block,fp4-direct,mxfp8,nvfp4,fp8-tensor@hardware,fp8-block@hardware
section 80 llama.md $PY bench/train.py --models llama-400m --device cuda --window 3 --windows 2 --passes 1 \
    --recipes bf16,fp8-tensor,fp8-tensor@hardware
section 25 kernels.md $PY bench/gpu_kernels.py --size 8192 --repeats 20
tail -n 3 "$OUT/kernels.md"
section 180 compile.md $PY bench/compile.py --models gpt2-small --device cuda --window 3 --windows 2 \
    --recipes bf16,fp8-tensor,fp8-tensor@hardware --mode reduce-overhead
echo "bench/gpu_check.sh: tables in $OUT (status $status)"
exit $status
