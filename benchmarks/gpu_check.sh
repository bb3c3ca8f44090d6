#!/usr/bin/env bash
# The GPU check: the fast paths' correctness and the speed figures, in two parts of at most 8 minutes
# each (time limits and SIGTERM grace periods included), run from the repository root:
#
#   mkdir -p data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz data/fashion-mnist/
#   bash benchmarks/gpu_check.sh --part 1 OUT_DIR
#   bash benchmarks/gpu_check.sh --part 2 OUT_DIR
#   bash benchmarks/gpu_check.sh --dry-run          # the stage plan, each stage's limit, each part's sum
#
# Part 1: the interpreter; the CUDA-graph step against the eager step (tests/test_fast_path.py and the
#   loss tests); the pair benchmark (the main speed target); the quick-start run (Fashion-MNIST, two
#   ResNet-20s, 2 epochs) as it runs by default; a ResNet-20 + ViT-Tiny competitive run with
#   --compile --cuda-graphs.
# Part 2: the interpreter; the quick-start run with --compile --cuda-graphs (its accuracy must agree
#   with part 1's); the 4-network and the 224-px benchmarks.
#
# Each stage runs under `timeout` (SIGTERM at its limit, SIGKILL GRACE seconds later), logs to
# OUT_DIR/NAME.log, and a failing stage does not stop the next; OUT_DIR/partN.json is rewritten as each
# stage ends, so a cut-short call keeps what was measured (the benchmarks also write their own JSON per
# variant). The limits are estimates for a cold start: torch.compile's first compilation included.
# Without CUDA every stage still runs its setup (imports, flag parsing; the tests are collected) and
# reports "no GPU" on one line; the exit status is then 3 (0: every stage passed; 1: one failed).
set -uo pipefail

BUDGET=480            # seconds per part, limits and grace periods included
GRACE=5               # seconds between SIGTERM and SIGKILL (the scripts save and exit between steps)
PYTHON=${PYTHON:-python3}
FASHION_MNIST_FILES=(train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte)

usage_error() { echo "error: $1 (usage: bash benchmarks/gpu_check.sh --part 1|2 [--data-dir DIR] OUT_DIR, or --dry-run [--part 1|2])" >&2; exit 2; }

part="" dry_run=0 data_dir=data out=""
while [ $# -gt 0 ]; do
    case $1 in
        --part) [ $# -ge 2 ] || usage_error "--part needs 1 or 2"; part=$2; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        --data-dir) [ $# -ge 2 ] || usage_error "--data-dir needs a directory"; data_dir=$2; shift 2 ;;
        -*) usage_error "unknown option $1" ;;
        *) [ -z "$out" ] || usage_error "one OUT_DIR only"; out=$1; shift ;;
    esac
done
case $part in 1|2|"") ;; *) usage_error "--part must be 1 or 2, got '$part'" ;; esac
[ $dry_run = 1 ] || [ -n "$part" ] || usage_error "name the part to run: --part 1 or --part 2"
[ $dry_run = 1 ] || [ -n "$out" ] || usage_error "name an output directory"

# ---------------------------------------------------------------------------------------------------
# The plan: `stage NAME LIMIT COMMAND...` runs (or, in a dry run, lists) one stage.
# ---------------------------------------------------------------------------------------------------
plan() {
    local fmnist=(--dataset fashion-mnist --models resnet20 resnet20 --epochs 2 --device cuda --data-dir "$data_dir"
                  --no-download --no-progress)
    stage env 35 "$PYTHON" -c "$ENV_CHECK"   # imports from a cold disk cache can take tens of seconds
    if [ "$1" = 1 ]; then
        stage tests 80 "$PYTHON" -m pytest -q -p no:cacheprovider "${collect[@]}" tests/test_fast_path.py tests/test_losses.py
        stage bench_pair 160 "$PYTHON" benchmarks/bench.py --device cuda --models resnet32 resnet32 --json "$out/bench_pair.json"
        stage quickstart_default 80 "$PYTHON" train_competitive_distillation.py "${fmnist[@]}" --out-dir "$out/runs/quickstart-default"
        stage vit_fast 100 "$PYTHON" train_competitive_distillation.py --dataset fake --models resnet20 vit_tiny --epochs 1 \
            --train-subset 1024 --compile --cuda-graphs --device cuda --no-progress --out-dir "$out/runs/vit-fast"
    else
        stage quickstart_fast 150 "$PYTHON" train_competitive_distillation.py "${fmnist[@]}" --compile --cuda-graphs \
            --out-dir "$out/runs/quickstart-fast"
        stage bench_group4 120 "$PYTHON" benchmarks/bench.py --device cuda --models resnet32 resnet32 resnet32 resnet32 \
            --steps 20 --warmup 5 --json "$out/bench_group4.json"
        stage bench_224 150 "$PYTHON" benchmarks/bench.py --device cuda --models resnet32 resnet32 --img-size 224 \
            --steps 10 --warmup 3 --json "$out/bench_224.json"
    fi
}

# Imports, versions and the GPU; exits 1 only when torch or torchvision cannot be imported.
ENV_CHECK='
import importlib, sys
found, missing = {}, []
for name in ("torch", "torchvision", "tensorboard", "pytest"):
    try:
        found[name] = importlib.import_module(name).__version__
    except Exception as error:
        missing.append(f"{name} ({type(error).__name__}: {error})")
print("python", sys.version.split()[0], "|", " | ".join(f"{k} {v}" for k, v in found.items()))
if missing:
    print("missing:", "; ".join(missing))
if "torch" not in found or "torchvision" not in found:
    sys.exit(1)
import torch
print("gpu:", f"{torch.cuda.get_device_name()} | CUDA {torch.version.cuda}" if torch.cuda.is_available() else "none")
'

json_escape() { local s=${1//\\/\\\\}; s=${s//\"/\\\"}; printf '%s' "${s//[$'\t\r\n']/ }"; }

write_json() {  # write_json DONE: OUT/partN.json from the stages so far
    local entries="" entry
    for entry in "${results[@]}"; do entries+="${entries:+, }$entry"; done
    printf '{"part": %s, "budget_s": %s, "grace_s": %s, "interpreter": "%s", "gpu": "%s", "done": %s, "stages": [%s]}\n' \
        "$part" "$BUDGET" "$GRACE" "$(json_escape "$interpreter")" "$(json_escape "$gpu")" "$1" "$entries" > "$json.tmp"
    mv "$json.tmp" "$json"
}

stage() {  # stage NAME LIMIT COMMAND...
    local name=$1 limit=$2
    shift 2
    planned_s=$((planned_s + limit + GRACE))
    if [ $dry_run = 1 ]; then
        local shown="$*"
        printf '  %-20s %4d s + %d s grace   %s\n' "$name" "$limit" "$GRACE" "${shown//"$ENV_CHECK"/<imports, versions, GPU name>}"
        return
    fi
    [ $aborted = 0 ] || return
    local log="$out/$name.log" start=$SECONDS status rc
    timeout --signal=TERM --kill-after=$GRACE "$limit" "$@" > "$log" 2>&1
    rc=$?
    local seconds=$((SECONDS - start)) last
    last=$(grep -v '^[[:space:]]*$' "$log" | tail -n 1)
    if [ $rc = 124 ] || [ $rc = 137 ]; then
        status="timed out"
    elif [ $no_gpu = 1 ] && [ $rc = 2 ] && grep -q "no CUDA device is available" "$log"; then
        status="no GPU"; last="setup ran (imports, flags), stopped at the device check"
    elif [ $no_gpu = 1 ] && [ $rc = 0 ] && [ "$name" = tests ]; then
        status="no GPU"; last="setup ran: $last"
    elif [ $rc = 0 ]; then
        status="ok"
    else
        status="failed"
    fi
    if [ "$name" = env ]; then
        interpreter=$(head -n 1 "$log")
        gpu=$(sed -n 's/^gpu: //p' "$log")
        if [ $rc != 0 ] || [ -z "$gpu" ]; then
            aborted=1; status="failed"
        elif [ "$gpu" = none ]; then
            no_gpu=1; collect=(--collect-only)
        fi
    fi
    results+=("{\"name\": \"$name\", \"limit_s\": $limit, \"seconds\": $seconds, \"rc\": $rc, \"status\": \"$status\", \"last_line\": \"$(json_escape "$last")\"}")
    write_json false
    case $status in
        ok) echo "== $name: ok, $seconds s"; [ "$name" = env ] && cat "$log" || tail -n 12 "$log" ;;
        "no GPU") echo "== $name: no GPU ($last; $seconds s)" ;;
        *) echo "== $name: $status (rc=$rc, $seconds s, limit $limit s)"; tail -n 12 "$log"; failed=1 ;;
    esac
    if [ $aborted = 1 ]; then
        echo "error: the interpreter cannot run the check (see $log); nothing else was run" >&2
    fi
}

check_plan() {  # check_plan PART: the sum of the part's limits and grace periods stays within the budget
    local saved=$dry_run
    planned_s=0 dry_run=1
    plan "$1" > /dev/null
    dry_run=$saved
    if [ "$planned_s" -gt $BUDGET ]; then
        echo "error: part $1's stage limits add up to $planned_s s, over the $BUDGET s budget" >&2
        exit 1
    fi
}

collect=()
if [ $dry_run = 1 ]; then
    out=${out:-OUT_DIR}
    for p in ${part:-1 2}; do
        echo "part $p:"
        planned_s=0
        plan "$p"
        echo "  total: $planned_s s of stage limits and grace periods (budget $BUDGET s)"
        check_plan "$p"
    done
    exit 0
fi
check_plan "$part"

# The data first: the machine that runs this may have no network, and data/ is not in git.
fmnist_dir=""
for dir in "$data_dir/fashion-mnist" "$data_dir/FashionMNIST/raw"; do
    have=0
    for file in "${FASHION_MNIST_FILES[@]}"; do
        [ -f "$dir/$file.gz" ] || [ -f "$dir/$file" ] && have=$((have + 1))
    done
    [ $have = ${#FASHION_MNIST_FILES[@]} ] && fmnist_dir=$dir && break
done
if [ -z "$fmnist_dir" ]; then
    echo "error: Fashion-MNIST's four files are not in $data_dir/fashion-mnist/; copy them there first: mkdir -p $data_dir/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz $data_dir/fashion-mnist/" >&2
    exit 2
fi

mkdir -p "$out"
json="$out/part$part.json"
results=() interpreter="" gpu="" no_gpu=0 aborted=0 failed=0 planned_s=0
plan "$part"
write_json true
rm -f "$out"/runs/*/last.pt "$out"/runs/*/best.pt  # the weights are not needed back
if [ $aborted = 1 ] || [ $failed = 1 ]; then
    exit 1
fi
if [ $no_gpu = 1 ]; then
    echo "no GPU: every stage's setup ran; nothing was measured ($json)"
    exit 3
fi
echo "part $part done: every stage passed ($json)"
