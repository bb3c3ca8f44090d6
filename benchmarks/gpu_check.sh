#!/usr/bin/env bash
# One device call that checks the CUDA-graph fast path and measures it (see README, Speed).
#
#   mkdir -p data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz data/fashion-mnist/
#   bash benchmarks/gpu_check.sh OUT_DIR        # on the GPU machine, from the repository root
#
# Stages run in order of importance, each under its own time limit, and a failing stage does not
# stop the next: the logs and JSON files in OUT_DIR hold whatever was measured. The limits add up
# to about 9 minutes; give the device call a timeout of 590 s.
#   1. the CUDA-graph step against the eager step (tests/test_fast_path.py and the loss tests);
#   2. the benchmark of the issue's main target: a ResNet-32 pair, batch 128, with perturbation;
#   3. the scripts end to end with --compile --cuda-graphs (a mutual and a competitive run);
#   4. Fashion-MNIST, 3 epochs, with and without the fast path (accuracy must agree);
#   5. the benchmark's 4-network group and 224-px pair.
set -uo pipefail
out=${1:-${OUT:-.}}
mkdir -p "$out"
stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log, report rc
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout --signal=TERM --kill-after=15 "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc=$rc, $((SECONDS - start)) s"
    tail -n 12 "$out/$name.log"
}
python3 -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name(), '| CUDA', torch.version.cuda)"

stage tests 80 python3 -m pytest -q -x tests/test_fast_path.py tests/test_losses.py
stage bench_pair 120 python3 benchmarks/bench.py --device cuda --models resnet32 resnet32 --json "$out/bench_pair.json"
stage script_competitive_fast 60 python3 train_competitive_distillation.py --dataset fake --models resnet20 vit_tiny \
    --epochs 2 --compile --cuda-graphs --out-dir "$out/runs/cd-fake-fast" --no-progress
stage script_mutual_graphs 40 python3 train_mutual_learning.py --dataset fake --models resnet20 resnet20 --epochs 1 \
    --cuda-graphs --out-dir "$out/runs/dml-fake-graphs" --no-progress
for variant in default fast; do
    extra=(); [ "$variant" = fast ] && extra=(--compile --cuda-graphs)
    stage "fmnist_$variant" $([ "$variant" = fast ] && echo 100 || echo 60) python3 train_competitive_distillation.py --dataset fashion-mnist \
        --models resnet20 resnet20 --epochs 3 "${extra[@]}" --out-dir "$out/runs/fmnist-$variant" --no-progress
done
stage bench_group4 60 python3 benchmarks/bench.py --device cuda --models resnet32 resnet32 resnet32 resnet32 \
    --json "$out/bench_group4.json"
stage bench_224 50 python3 benchmarks/bench.py --device cuda --models resnet32 resnet32 --img-size 224 \
    --steps 20 --warmup 5 --json "$out/bench_224.json"
rm -rf "$out"/runs/*/last.pt "$out"/runs/*/best.pt  # the weights are not needed back
