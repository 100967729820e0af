#!/bin/bash
# The DuetServe evaluation's grid, simulated on CPU (tools/serve_sim.py), into DIR:
#     bash tools/sim_eval.sh DIR
# Every mode (fixed budgets 256-2,048, SLO-aware, duet) on the three workloads at 50 and 25 ms
# on the H100's and the H200's profiles, plus long outputs on the H200 at 25 ms. A few minutes.
# The simulated devices (what each profile's roofline misses, measured on GPU runs):
# - H100: aggregated steps x1.1 + 2 ms, 512-token steps x1.25 (fitted on the fixed 512 and
#   1,024 budgets of duet-eval-mooncake-h100-2026-12-07b/c), 256-token steps x1.65 (fitted on
#   the fixed 256 budget of slo-paced-mooncake-h100-2026-12-08); split chunks x1.1 and decode steps
#   x1.4 (the first split iteration of duet-eval-mooncake-h100-2026-12-07c, before the online
#   correction had learned anything); 1 ms a worker dispatch;
# - H200: aggregated steps x1.1 (the fixed 2,048 budget of duet-8b-mooncake-h200-2026-11-21);
#   the split's factors as the H100's but decode steps x1.3 (split iterations there were about a
#   third longer than the calibrated roofline before it was fitted).
set -eu
out=$1
mkdir -p "$out"
cd "$(dirname "$0")/.."
h100="--mixed-factor 1.1 --step-overhead-ms 2 --bucket-factors 256:1.65,512:1.25,1024:1.1 --decode-factor 1.4
      --prefill-factor 1.1 --dispatch-overhead-ms 1 --kv-cache-tokens 309344"
h200="--profile duetjax/perf/profiles/nvidia-h200.json --mixed-factor 1.1 --decode-factor 1.3
      --prefill-factor 1.1 --dispatch-overhead-ms 1 --kv-cache-tokens 700000"
modes="--modes aggregated@256,aggregated@512,aggregated@1024,aggregated@2048,slo,duet"
run() {
    name=$1
    shift
    # shellcheck disable=SC2086
    python3 tools/serve_sim.py $modes "$@" --out "$out/$name.json" --table "$out/$name.md" > /dev/null
    echo "$name"
}
for gpu in h100 h200; do
    device=$([ $gpu = h100 ] && echo "$h100" || echo "$h200")
    for slo in 50 25; do
        other=$([ $slo = 50 ] && echo 25 || echo 50)
        # shellcheck disable=SC2086
        run conversation-$gpu-$slo $device --dataset azure-conversation --qps 4,8,12,16 --tbt-slos-ms $slo,$other
        # shellcheck disable=SC2086
        run code-$gpu-$slo $device --dataset azure-code --qps 4,8,12,16 --tbt-slos-ms $slo,$other
        # shellcheck disable=SC2086
        run mooncake-$gpu-$slo $device --dataset mooncake --qps 1.5,2,2.5,3,3.5,4 --tbt-slos-ms $slo,$other
    done
done
# shellcheck disable=SC2086
run long-output-h200-25 $h200 --dataset mooncake --output-scale 6.25 --qps 0.8,1,1.2,1.4,1.6 \
    --tbt-slos-ms 25,50 --duet-pairs 60/40,50/50
# shellcheck disable=SC2086
run long-output-h200-25-pairs80 $h200 --dataset mooncake --output-scale 6.25 --qps 0.8,1,1.2,1.4,1.6 \
    --tbt-slos-ms 25,50
# The check against the GPU run: the H100 device on the measured Mooncake point.
# shellcheck disable=SC2086
run mooncake-h100 $h100 --dataset mooncake --qps 3.5 --tbt-slos-ms 50,25 \
    --compare benchmarks/results/duet-eval-mooncake-h100-2026-12-07c/results.json
# ... and duet with 1 ms less a step than the aggregated engines (what its loop statistics
# suggest; docs/design.md, "Simulating the serving policies").
# shellcheck disable=SC2086
run mooncake-h100-duet-1ms $h100 --dataset mooncake --qps 3.5 --tbt-slos-ms 50,25 --modes duet \
    --step-overhead-ms 1 --compare benchmarks/results/duet-eval-mooncake-h100-2026-12-07c/results.json
# ... and the 25 ms point: the fixed budgets (256 fitted there) against the same GPU run.
# shellcheck disable=SC2086
run mooncake-h100-25-check $h100 --dataset mooncake --qps 2.5 --tbt-slos-ms 25,50 \
    --modes aggregated@256,aggregated@512,aggregated@1024 \
    --compare benchmarks/results/slo-paced-mooncake-h100-2026-12-08/results.json
python3 tools/serve_sim.py summary "$out"/{code,conversation,mooncake}-h{100,200}-{50,25}.json \
    "$out"/long-output-h200-25-pairs80.json "$out"/long-output-h200-25.json > "$out/summary.md"
