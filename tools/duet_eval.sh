#!/bin/bash
# DuetServe against the best aggregated engine, on the GPU this runs on, into DIR:
#     bash tools/duet_eval.sh DIR profile sweep
# Sections:
#   profile  calibrate this GPU's roofline profile (tools/calibrate.py, with the Llama-3-8B
#            GEMMs) into DIR and into duetjax/perf/profiles/ for the sweeps that follow
#   sweep    one tools/bench_duet.py sweep (Llama-3-8B shape, random weights) into DIR/NAME
# The sweep is set by environment variables (defaults in brackets):
#   EVAL_NAME [sweep]  EVAL_DATASET [azure-conversation]  EVAL_QPS [2,4,8]
#   EVAL_REQUESTS [300]  EVAL_MODES [aggregated@512,aggregated@1024,slo,duet]
#   EVAL_SLOS [50,25] (the first is the one the slo and duet engines protect)
#   EVAL_MAX_TOKENS [2048] (the slo and duet engines' largest budget)
#   EVAL_KV_TOKENS [131072; empty: the engine's default sizing]  EVAL_MAX_MODEL_LEN [16384]
#   EVAL_MODEL [llama-3-8b]  EVAL_PAIRS [80/20,70/30] (the duet engine's worker pairs)
#   EVAL_EXTRA (more bench_duet flags)
# WHEELS_DIR: a folder of wheels to install first (for a machine without a package index).
set -u
out=$1
shift
if [ -n "${WHEELS_DIR:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS_DIR"/*.whl 2>/dev/null
    export PYTHONPATH=$PWD:/tmp/site
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
model=${EVAL_MODEL:-llama-3-8b}
for section in "$@"; do
    echo "=== $section $(date +%T)"
    case $section in
    profile)
        python3 tools/calibrate.py --model-config models/configs/$model --out "$out" \
            && cp "$out"/*.json duetjax/perf/profiles/ ;;
    sweep)
        name=${EVAL_NAME:-sweep}
        kv_tokens=${EVAL_KV_TOKENS-131072}
        # shellcheck disable=SC2086
        python3 tools/bench_duet.py --model-config models/configs/$model --load-format dummy \
            --dataset "${EVAL_DATASET:-azure-conversation}" --qps "${EVAL_QPS:-2,4,8}" \
            --num-requests "${EVAL_REQUESTS:-300}" \
            --modes "${EVAL_MODES:-aggregated@512,aggregated@1024,slo,duet}" \
            --tbt-slos-ms "${EVAL_SLOS:-50,25}" \
            --max-num-batched-tokens "${EVAL_MAX_TOKENS:-2048}" \
            ${kv_tokens:+--kv-cache-tokens "$kv_tokens"} \
            --max-model-len "${EVAL_MAX_MODEL_LEN:-16384}" --duet-pairs "${EVAL_PAIRS:-80/20,70/30}" \
            ${EVAL_EXTRA:-} --out "$out/$name" ;;
    *) echo "unknown section $section"; exit 2 ;;
    esac
done
