#!/bin/bash
# The same GPU measurement on this tree and on another checkout of duetjax, one after the other
# in one run on one GPU, to check that a change left performance where it was:
#     git archive REV | tar -x -C OTHER        # the other tree, e.g. the commit before a change
#     bash tools/compare_trees.sh DIR OTHER SECTION...
# Sections:
#   engine  decode step at batch 1, 64 and 256 (1k contexts) and host work per step at batch 64
#           (tools/bench_engine.py --sections decode,host)
#   duet    one DuetServe point: Azure-conversation lengths at COMPARE_QPS [8] req/s,
#           COMPARE_REQUESTS [100] requests, worker pairs 70/30 and 50/50, a 2,048-token budget,
#           a 131,072-token KV pool (tools/bench_duet.py --modes duet), both trees with this
#           tree's roofline profile of the GPU
# Results: DIR/this/SECTION.{json,md} and DIR/other/SECTION.{json,md}; each tree runs with its
# own compilation cache, so neither reuses the other's executables.
# WHEELS_DIR: a folder of wheels to install first (for a machine without a package index).
set -u
if [ $# -lt 3 ]; then
    sed -n '2,15p' "$0"
    exit 2
fi
mkdir -p "$1"
out=$(cd "$1" && pwd)
other=$(cd "$2" && pwd)
shift 2
this=$(cd "$(dirname "$0")/.." && pwd)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
extra=
if [ -n "${WHEELS_DIR:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$scratch/site" "$WHEELS_DIR"/*.whl
    extra=:$scratch/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
# Both trees plan with this tree's roofline profile of the GPU (an older tree may not ship one).
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
profile=
for f in "$this"/duetjax/perf/profiles/*.json; do
    python3 -c "import json, sys; sys.exit(json.load(open(sys.argv[1]))['gpu_name'] != sys.argv[2])" \
        "$f" "$gpu" && profile=$f
done
for section in "$@"; do
    for tree in this other; do
        dir=$this
        [ $tree = other ] && dir=$other
        mkdir -p "$out/$tree"
        echo "=== $section, $tree tree ($dir) $(date +%T)"
        export PYTHONPATH=$dir$extra DUETJAX_CACHE_DIR=$scratch/cache-$tree
        case $section in
        engine)
            (cd "$dir" && python3 tools/bench_engine.py --model llama-3-8b --sections decode,host \
                --batches 1,64,256 --context 1024 \
                --out "$out/$tree/engine.json" --table "$out/$tree/engine.md") ;;
        duet)
            (cd "$dir" && python3 tools/bench_duet.py --model llama-3-8b --load-format dummy \
                --dtype bfloat16 --dataset azure-conversation --qps "${COMPARE_QPS:-8}" \
                --num-requests "${COMPARE_REQUESTS:-100}" --modes duet --tbt-slos-ms 50,25 \
                --duet-pairs 70/30,50/50 --max-num-seqs 64 --max-num-batched-tokens 2048 \
                --max-model-len 4096 --kv-cache-tokens 131072 --max-decode-steps 4 \
                --warmup-requests 4 --drain-timeout-s 40 --worker-timeout-s 300 \
                ${profile:+--device-profile "$profile"} \
                --out "$scratch/duet-$tree" \
                && cp "$scratch/duet-$tree/results.json" "$out/$tree/duet.json" \
                && cp "$scratch/duet-$tree/results.md" "$out/$tree/duet.md") ;;
        *) echo "unknown section $section"; exit 2 ;;
        esac
    done
done
