#!/bin/bash
# GPU benchmarks by section. Each section is one tool run (the tool's docstring says what it
# measures); its log goes to stdout, its files to RESULTS_DIR. Run from anywhere:
#
#     bash tools/gpu_bench.sh RESULTS_DIR SECTION...
#     bash tools/gpu_bench.sh results/ engine kernels fit duet
#
# Environment:
#   DUETJAX_CACHE_DIR  converted models and compiled executables (default ~/.cache/duetjax);
#                      a second run finds them there and skips compiling
#   WHEELS_DIR         a folder of wheels for machines without a package index: installed
#                      without dependencies into a scratch folder on the Python path first
#   PYTHON             the interpreter (default python3)
#   Per section: FIT_ITERATIONS, FIT_REPS (fit); DUET_QPS, DUET_REQUESTS, DUET_MODES,
#   DUET_DATASET, DUET_MAX_MODEL_LEN, DUET_PROFILE, DUET_CARRY=1 (duet); PROFILE_TOP
#   (host-profile); CMDBUF_BATCHES (cmdbuf). Sections fp8, fp8-layers, fp8-triton, fp8-trace,
#   fp8-accuracy, load, prefill-mgpu, prefill-e2e, decode-fp8 and decode-mgpu: FP8 speed, its
#   kernels and accuracy, load times and the Mosaic GPU kernels. startup: cold starts by
#   compile threads. ncu-decode: Nsight Compute reports of the decode kernels.
# Each section takes a few minutes on an H100 or H200.
set -u
if [ $# -lt 2 ]; then
    sed -n '2,20p' "$0"
    exit 2
fi
mkdir -p "$1"
results_dir=$(cd "$1" && pwd)
shift
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -n "${WHEELS_DIR:-}" ]; then
    $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$scratch/site" "$WHEELS_DIR"/*.whl
    export PYTHONPATH=$PYTHONPATH:$scratch/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
model=llama-3-8b
for section in "$@"; do
    echo "=== $section $(date +%T)"
    case $section in
    locality)  # decode kernel: page placement and pool values
        $python tools/kernel_bench.py --quick --skip correctness,decode,variants,prefill,write \
            --out "$results_dir/kernels-locality.json" --table "$results_dir/kernels-locality.md" ;;
    engine)  # decode step vs HBM roofline, host work per step (one decode step per dispatch)
        $python tools/bench_engine.py --model $model --sections decode,host \
            --out "$results_dir/engine.json" --table "$results_dir/engine.md" ;;
    decode4)  # decode step vs HBM roofline with 4 decode steps per dispatch (a device loop)
        $python tools/bench_engine.py --model $model --sections decode --decode-steps 4 \
            --out "$results_dir/engine-decode-k4.json" --table "$results_dir/engine-decode-k4.md" ;;
    host)  # host work per step at batch 64, 1 and 4 decode steps per dispatch
        for k in 1 4; do
            $python tools/bench_engine.py --model $model --sections host --batches 64 \
                --prefill 2048 --decode-steps $k --out "$results_dir/engine-host-k$k.json" \
                --table "$scratch/engine-host.md"
        done ;;
    check)  # the duet mechanism: MPS, CUDA IPC, shared penalty tables, tokens equal to
        # aggregated's, a killed worker; both ways of ending a split iteration
        $python tools/duet_check.py --out "$results_dir/duet-check.json"
        $python tools/duet_check.py --carry-stream --out "$results_dir/duet-check-carry.json" ;;
    gemm256)  # batch-256 decode step: cuBLAS against XLA's autotuned Triton GEMMs, one run
        for backend in cublas triton; do
            $python tools/bench_engine.py --model $model --sections decode --batches 128,256 \
                --gemm-backend $backend --out "$results_dir/engine-$backend-b256.json" \
                --table "$results_dir/engine-$backend-b256.md"
        done ;;
    host4)  # host work per step with 4 decode steps per dispatch
        $python tools/bench_engine.py --model $model --sections host --decode-steps 4 \
            --out "$results_dir/engine-k4.json" --table "$scratch/engine-k4.md" ;;
    host-profile)  # host work per step (engines sized for 256 or 64 sequences; k), cProfiled
        for run in 1,16,64,128,256:1 64:1 64:4; do
            echo "== batches ${run%:*}, decode steps ${run#*:}"
            $python tools/bench_engine.py --model $model --sections host --batches ${run%:*} \
                --prefill 2048 --decode-steps ${run#*:} --profile-host ${PROFILE_TOP:-45} \
                --out "$results_dir/engine-host-$(echo $run | tr ',:' '-_').json" --table "$scratch/engine-host.md"
        done ;;
    sampler)
        $python tools/bench_sampler.py --out "$results_dir/sampler.json" ;;
    structured)  # what structured outputs cost: free decodes alone, then beside constrained ones
        $python tools/bench_structured.py --dtype bfloat16 --batch 64 --constrained 0,1,8 \
            --max-tokens 256 --out "$results_dir/structured.json" --table "$results_dir/structured.md" ;;
    trace)  # every kernel of a batch-64 decode step
        $python tools/profile_step.py --model $model --unroll 32 --batches 64 --context 1024 \
            --trace --top-kernels 1000 --out-dir "$scratch" \
            && cp "$scratch/trace_b64_unroll32_cublas.json" "$results_dir/trace-b64.json" ;;
    prefill-trace)  # every kernel of 2k and 8k prefill steps
        $python tools/profile_step.py --model $model --unroll 32 --batches 64 \
            --trace-prefill 2048,8192 --top-kernels 1000 --out-dir "$scratch" \
            && cp "$scratch"/trace_prefill*_unroll32_cublas.json "$results_dir/" ;;
    kernels)  # every kernel against the ceilings and the built-in peers
        $python tools/kernel_bench.py --out "$results_dir/kernels.json" --table "$results_dir/kernels.md" ;;
    prefill-kernels)  # prefill and mixed-batch attention only
        $python tools/kernel_bench.py --skip correctness,decode,variants,locality,write \
            --out "$results_dir/kernels-prefill.json" --table "$results_dir/kernels-prefill.md" ;;
    offline)  # decode, prefill, host work and offline throughput
        $python tools/bench_engine.py --model $model --sections decode,prefill,host,offline \
            --out "$results_dir/engine.json" --table "$results_dir/engine.md" ;;
    mps)  # decode under MPS SM limits, added to the kernels section's report
        $python tools/kernel_bench.py --mps --out "$results_dir/kernels.json" --table "$results_dir/kernels.md" ;;
    decode-knobs)  # batch-64 decode step: block-table width (decode splits) and KV pool size
        i=0
        for knobs in "" "--max-model-len 8208" "--max-model-len 8208 --kv-cache-tokens 0"; do
            echo "== $knobs"
            $python tools/profile_step.py --model $model --unroll 32 --batches 64 --context 1024 \
                --trace --top-kernels 60 --out-dir "$scratch" $knobs 2>&1 | grep "ms/step\|trace:"
            cp "$scratch/trace_b64_unroll32_cublas.json" "$results_dir/trace-knobs-$i.json"
            i=$((i + 1))
        done ;;
    cmdbuf)  # XLA command buffers (CUDA graphs): update modes; batch-64 decode step
        # SKIP_TEMP / SKIP_PROFILED give temps stable addresses (the VMM allocator), so a step's
        # graph update touches only the nodes that read inputs or write outputs
        for flags in "" "--xla_gpu_command_buffer_update_mode=SKIP_TEMP" \
                "--xla_gpu_command_buffer_update_mode=SKIP_PROFILED"; do
            echo "== XLA_FLAGS=$flags"
            XLA_FLAGS="$flags" $python tools/profile_step.py --model $model --unroll 32 \
                --batches ${CMDBUF_BATCHES:-64} --context 1024 --out-dir "$scratch" \
                > "$scratch/cmdbuf.log" 2>&1
            grep "ms/step" "$scratch/cmdbuf.log" || tail -5 "$scratch/cmdbuf.log"
        done ;;
    fit)  # roofline error over 1,000 real mixed iterations, and the fitted profile
        $python tools/roofline_fit.py --model $model --dtype bfloat16 --iterations ${FIT_ITERATIONS:-1000} --reps ${FIT_REPS:-8} \
            --out "$results_dir/profile-fitted.json" --report "$results_dir/roofline-fit.json" ;;
    duet)  # aggregated vs static 50/50 vs adaptive duet at 8B (env: DUET_QPS, DUET_REQUESTS,
        # DUET_MODES, DUET_DATASET, DUET_MAX_MODEL_LEN, DUET_PROFILE, DUET_CARRY=1)
        $python tools/bench_duet.py --model $model --load-format dummy --dtype bfloat16 \
            --dataset ${DUET_DATASET:-azure-conversation} --qps ${DUET_QPS:-4,8} --num-requests ${DUET_REQUESTS:-40} \
            --duration-cap-s 15 --drain-timeout-s 40 --modes ${DUET_MODES:-aggregated,static,duet} \
            --tbt-slos-ms 50,25 --duet-pairs 70/30,50/50 --max-num-seqs 64 \
            --max-num-batched-tokens 2048 --max-model-len ${DUET_MAX_MODEL_LEN:-4096} --kv-cache-tokens 262144 \
            --max-decode-steps 4 --warmup-requests 4 \
            --worker-timeout-s 300 --save-requests ${DUET_PROFILE:+--device-profile $DUET_PROFILE} \
            ${DUET_CARRY:+--carry-stream} \
            --out "$results_dir/duet8b" ;;
    fp8)  # FP8 weights (W8A8, weight-only) and the FP8 KV cache against bf16: decode steps
        # (batch 1, 64; 1k contexts) and 8k prefill, each against its own HBM roofline; then
        # whether the step's HLO calls an FP8 GEMM
        $python tools/bench_engine.py --model $model --sections decode,prefill --batches 1,64 \
            --context 1024 --prefill 8192 --quantization none,fp8 --fp8-activation dynamic,none \
            --kv-cache-dtype auto,fp8 --kv-cache-tokens 131072 --dump-hlo "$scratch/hlo" \
            --out "$results_dir/fp8.json" --table "$results_dir/fp8.md"
        $python tools/fp8_gemm_check.py --model $model --batch 1 ;;
    fp8-triton)  # FP8 decode steps with XLA's Triton GEMMs, which read a layer's slice of the
        # stacked weights in place (cuBLASLt's FP8 call gets a copy of it) and fuse the
        # weight-only upcast into the GEMM
        $python tools/bench_engine.py --model $model --sections decode --batches 1,64 \
            --context 1024 --quantization none,fp8 --fp8-activation dynamic,none \
            --gemm-backend triton --kv-cache-tokens 131072 --dump-hlo "$scratch/hlo" \
            --out "$results_dir/fp8-triton.json" --table "$results_dir/fp8-triton.md" ;;
    fp8-layers)  # W8A8 and bf16 decode steps with stacked and per-layer weights
        # (EngineConfig.layer_weights), each step's HLO census counting weight copies
        $python tools/bench_engine.py --model $model --sections decode --batches 1,64 \
            --context 1024 --quantization none,fp8 --layer-weights stacked,per-layer \
            --kv-cache-tokens 131072 --dump-hlo "$scratch/hlo" \
            --out "$results_dir/fp8-layers.json" --table "$results_dir/fp8-layers.md" ;;
    fp8-trace)  # where an FP8 decode step's time goes: every kernel of the W8A8 step at batch
        # 1 and 64 and of the FP8-KV step at batch 64, beside bf16's, with each step's HLO census
        for variant in "" "--quantization fp8" "--kv-cache-dtype fp8"; do
            echo "== ${variant:-bf16}"
            $python tools/profile_step.py --model $model --unroll 32 --batches 1,64 --context 1024 \
                --trace --top-kernels 40 --out-dir "$scratch" $variant 2>&1 | grep "ms/step\|trace:\|census"
        done
        cp "$scratch"/trace_b*.json "$results_dir/" ;;
    fp8-accuracy)  # FP8 weights and KV cache against bf16: top-1 agreement, KL and perplexity
        # over a fixed text, and the capital question (embedded SmolLM2, tiny random Llama)
        $python tools/fp8_accuracy.py --model smollm2,tiny-llama --dtype bfloat16 \
            --out "$results_dir/fp8-accuracy.json" --table "$results_dir/fp8-accuracy.md" ;;
    load)  # safetensors against Orbax: restore to the device, peak host memory
        $python tools/bench_load.py --model $model --scratch "$scratch/load" --repeats 3 \
            --out "$results_dir/load.json" --table "$results_dir/load.md" ;;
    prefill-mgpu)  # the Mosaic GPU prefill kernel: GPU tests, then against Triton and cuDNN
        timeout 300 $python -m pytest tests/pallas_kernels/test_prefill_mgpu.py -q -m gpu \
            -p no:cacheprovider 2>&1 | tail -15
        $python tools/kernel_bench.py --sections prefill-mgpu \
            --out "$results_dir/prefill-mgpu.json" --table "$results_dir/prefill-mgpu.md" ;;
    prefill-e2e)  # Llama-3-8B prefill steps with each prefill kernel (DUETJAX_PREFILL_KERNEL)
        for kernel in triton mgpu; do
            DUETJAX_PREFILL_KERNEL=$kernel $python tools/bench_engine.py --model $model \
                --sections prefill --batches 1 --prefill 2048,8192 \
                --out "$results_dir/prefill-e2e-$kernel.json" --table "$results_dir/prefill-e2e-$kernel.md"
        done ;;
    startup)  # cold and warm start of a serving-sized engine (64 sequences, 2,048 tokens),
        # then a cold start compiling on 8 threads
        $python tools/bench_engine.py --model $model --sections startup \
            --startup-limits 64,2048 --compile-threads 1,8 \
            --out "$results_dir/startup.json" --table "$results_dir/startup.md" ;;
    decode-fp8)  # the decode kernel over bf16 and e4m3 pools against the copy (e4m3 with its
        # float16 dot operands, bfloat16 ones and a longer key block), after a GPU correctness
        # check of every kernel over e4m3 pools
        $python tools/kernel_bench.py --sections correctness,decode-fp8 \
            --out "$results_dir/decode-fp8.json" --table "$results_dir/decode-fp8.md" ;;
    decode-mgpu)  # the Mosaic GPU decode kernel: GPU tests, then against Triton and a copy at
        # 100 %, 30 % and 50 % of the SMs
        timeout 600 $python -m pytest tests/pallas_kernels/test_decode_mgpu.py -q -m gpu -x \
            -p no:cacheprovider 2>&1 | tail -15
        $python tools/kernel_bench.py --sections decode-mgpu --mps 30,50 \
            --out "$results_dir/decode-mgpu.json" --table "$results_dir/decode-mgpu.md" ;;
    ncu-decode)  # Nsight Compute on the decode kernels at batch 64, 2k context: Triton over a
        # bf16 pool, over an e4m3 pool (float16, then bfloat16 dot operands), then Triton and
        # Mosaic GPU at 30 % of the SMs under MPS; one text report per case (NCU_CASES: a comma
        # list of the case names to run, default all)
        ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -1)
        cases=("triton-bf16:--kernel triton" "triton-e4m3-f16:--kernel triton --kv-dtype float8_e4m3fn"
               "triton-e4m3-bf16:--kernel triton --kv-dtype float8_e4m3fn --fp8-operands bfloat16"
               "triton-bf16-mps30:--kernel triton --mps 30" "mgpu-bf16-mps30:--kernel mgpu --mps 30")
        for case in "${cases[@]}"; do
            name=${case%%:*}
            [[ -n "${NCU_CASES:-}" && ",$NCU_CASES," != *",$name,"* ]] && continue
            # shellcheck disable=SC2086
            timeout 240 "$ncu" --clock-control none --profile-from-start off --target-processes all \
                --kernel-name regex:duetjax_paged_decode --launch-count 1 --set full \
                --page details --print-units base \
                $python tools/kernel_profile.py ${case#*:} --batch 64 --ctx 2048 \
                > "$results_dir/ncu-$name.txt" 2>&1
            echo "--- $name (rc $?)"
            grep -E "Duration|DRAM Throughput|Memory Throughput|Compute \(SM\) Throughput|Issue Slots Busy|No Eligible|Registers Per|Achieved Occupancy|Warp Cycles Per Issued|Stall" \
                "$results_dir/ncu-$name.txt" | head -30
        done ;;
    *)
        echo "unknown section $section" ;;
    esac
done
ls -la "$results_dir"
