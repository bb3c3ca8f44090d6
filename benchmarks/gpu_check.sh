#!/usr/bin/env bash
# The GPU check: the fast paths' correctness and the speed figures in one command of at most 6 minutes
# (every stage's time limit and SIGTERM grace period, cold torch.compile compilations included), run
# from the repository root:
#
#   mkdir -p data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz data/fashion-mnist/
#   bash benchmarks/gpu_check.sh OUT_DIR
#   bash benchmarks/gpu_check.sh --dry-run          # the stages, each one's limit, and their sum
#
# The stages, most important first: the interpreter and the GPU; the CUDA runs of the tests whose
# bodies also run on the CPU (pytest -m cuda: the captured step against the eager one, the statistics
# summed inside the graph, the loader's and the perturbation's draws); the pair benchmark (reference,
# default, fast: the main speed target); the quick start (Fashion-MNIST, two ResNet-20s, 2 epochs) as it
# runs by default on the GPU; then the quick start with --compile --cuda-graphs and the agreement of the
# two (benchmarks/agreement.py: every network's final test accuracy within 1.5 points, its first-epoch
# loss within 5 %, or the stage fails), and the 4-network benchmark. The env stage compiles one tiny
# function with torch.compile: when that fails (no C compiler or Python headers for Triton), the stages
# that compile are skipped with one line and the benchmarks leave out their fast variant.
#
# Each stage runs under `timeout` (SIGTERM at its limit, SIGKILL GRACE seconds later); a stage whose
# limit no longer fits in what is left of the budget is skipped with one line; a failing stage does not
# stop the next. OUT_DIR ends with two files, both rewritten as each stage ends, so a call cut short
# keeps what was measured: summary.json (every stage's status, time and last line) and logs.tar.gz
# (every stage's log, the benchmarks' JSON, the runs' metrics and arguments; no weights). Without CUDA
# every stage says "no GPU" on one line (the scripts still run their setup: imports and flags; the
# tests are collected and skipped) and the exit status is 3; otherwise 0 when every stage that ran
# passed, 1 when one failed or timed out, 2 for bad arguments or missing data.
set -uo pipefail
# GPU_CHECK_SPENT_S: seconds of the slot already spent before this command (a machine's start-up, say),
# counted against the budget.
started=$((SECONDS - ${GPU_CHECK_SPENT_S:-0}))

BUDGET=360            # seconds for the whole command: every stage's limit and grace, and the RESERVE
GRACE=3               # seconds between SIGTERM and SIGKILL (the scripts save and exit between steps)
RESERVE=5             # seconds kept for the summary, the archive and the closing table
PYTHON=${PYTHON:-python3}
FASHION_MNIST_FILES=(train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte)

usage_error() { echo "error: $1 (usage: bash benchmarks/gpu_check.sh [--data-dir DIR] OUT_DIR, or --dry-run)" >&2; exit 2; }

dry_run=0 data_dir=data out=""
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) dry_run=1; shift ;;
        --data-dir) [ $# -ge 2 ] || usage_error "--data-dir needs a directory"; data_dir=$2; shift 2 ;;
        -*) usage_error "unknown option $1" ;;
        *) [ -z "$out" ] || usage_error "one OUT_DIR only"; out=$1; shift ;;
    esac
done
[ $dry_run = 1 ] || [ -n "$out" ] || usage_error "name an output directory"

# ---------------------------------------------------------------------------------------------------
# The plan, most important first: `stage NAME LIMIT COMMAND...` runs (or, in a dry run, lists) a stage.
# The limits are estimates for a cold start on one H100/H200 (torch.compile's first compilation, cuDNN
# autotuning); work files go to $work, outside OUT_DIR.
# ---------------------------------------------------------------------------------------------------
plan() {
    local quickstart=(train_competitive_distillation.py --dataset fashion-mnist --models resnet20 resnet20 --epochs 2
                      --device cuda --data-dir "$data_dir" --no-download --no-progress)
    local fast=fast; [ $compile_ok = 1 ] || fast=""
    stage env 25 "$PYTHON" -c "$ENV_CHECK"   # imports from a cold disk cache can take tens of seconds
    stage tests 40 "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda tests
    stage bench_pair 85 "$PYTHON" benchmarks/bench.py --device cuda --models resnet32 resnet32 --steps 30 --warmup 5 \
        --variants reference default $fast --json "$work/bench_pair.json"
    stage quickstart 45 "$PYTHON" "${quickstart[@]}" --out-dir "$work/runs/quickstart"
    # two cold Inductor compilations (the networks' training graphs) and the capture, then two epochs
    compiling stage quickstart_fast 100 "$PYTHON" "${quickstart[@]}" --compile --cuda-graphs --out-dir "$work/runs/quickstart-fast"
    compiling stage agreement 5 "$PYTHON" benchmarks/agreement.py "$work/runs/quickstart" "$work/runs/quickstart-fast"
    stage bench_group4 25 "$PYTHON" benchmarks/bench.py --device cuda --models resnet32 resnet32 resnet32 resnet32 \
        --variants default $fast --steps 10 --warmup 3 --repeats 2 --json "$work/bench_group4.json"
}

compiling() {  # compiling stage NAME LIMIT COMMAND...: the stage, or one line when torch.compile cannot run here
    if [ $compile_ok = 1 ]; then "$@"; return; fi
    echo "== $2: skipped (torch.compile failed in the env stage: $compile_note)"
    planned_s=$((planned_s + $3 + GRACE))
    record "$2" "$3" 0 -1 "skipped" "torch.compile failed in the env stage"
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
if torch.cuda.is_available():  # torch.compile needs a working Triton toolchain (a C compiler, Python headers)
    try:
        torch.compile(lambda x: torch.sin(x) + 1)(torch.ones(8, device="cuda"))
        print("compile: ok")
    except Exception as error:
        print("compile: failed", f"{type(error).__name__}: {error}".splitlines()[0][:160])
else:
    print("compile: not tried (no GPU)")
'

json_escape() { local s=${1//\\/\\\\}; s=${s//\"/\\\"}; printf '%s' "${s//[$'\t\r\n']/ }"; }

write_summary() {  # write_summary DONE: OUT_DIR/summary.json and OUT_DIR/logs.tar.gz from the stages so far
    local entries="" entry
    for entry in "${results[@]}"; do entries+="${entries:+, }$entry"; done
    printf '{"budget_s": %s, "grace_s": %s, "elapsed_s": %s, "interpreter": "%s", "gpu": "%s", "done": %s, "archive": "logs.tar.gz", "stages": [%s]}\n' \
        "$BUDGET" "$GRACE" "$(elapsed)" "$(json_escape "$interpreter")" "$(json_escape "$gpu")" "$1" "$entries" > "$out/summary.json.tmp"
    mv "$out/summary.json.tmp" "$out/summary.json"
    tar -czf "$out/logs.tar.gz.tmp" -C "$work" --exclude='*.pt' . 2> /dev/null
    mv "$out/logs.tar.gz.tmp" "$out/logs.tar.gz"
}

elapsed() { echo $((SECONDS - started)); }

record() {  # record NAME LIMIT SECONDS RC STATUS LAST: one entry of the summary, rewritten at once
    results+=("{\"name\": \"$1\", \"limit_s\": $2, \"seconds\": $3, \"rc\": $4, \"status\": \"$5\", \"last_line\": \"$(json_escape "$6")\"}")
    table+=("$(printf '%-16s %-10s %4s s  (limit %3d s)' "$1" "$5" "$3" "$2")")
    write_summary false
}

stage() {  # stage NAME LIMIT COMMAND...
    local name=$1 limit=$2
    shift 2
    planned_s=$((planned_s + limit + GRACE))
    if [ $dry_run = 1 ]; then
        local shown="$*"
        printf '  %-16s %4d s + %d s grace   %s\n' "$name" "$limit" "$GRACE" "${shown//"$ENV_CHECK"/<imports, versions, GPU name>}"
        return
    fi
    if [ $aborted = 1 ]; then
        echo "== $name: not run (the interpreter cannot run the check)"
        record "$name" "$limit" 0 -1 "not run" "the env stage failed"
        return
    fi
    local left=$((BUDGET - RESERVE - $(elapsed)))
    if [ $left -lt $((limit + GRACE)) ]; then
        echo "== $name: skipped ($left s left of the budget, its limit is $limit s + $GRACE s grace)"
        record "$name" "$limit" 0 -1 "skipped" "$left s left of the budget"
        return
    fi
    local log="$work/$name.log" start=$SECONDS status rc
    timeout --signal=TERM --kill-after=$GRACE "$limit" "$@" > "$log" 2>&1
    rc=$?
    local seconds=$((SECONDS - start)) last
    last=$(grep -v '^[[:space:]]*$' "$log" | tail -n 1)
    if [ "$name" = env ]; then
        interpreter=$(head -n 1 "$log")
        gpu=$(sed -n 's/^gpu: //p' "$log")
        if grep -q '^compile: failed' "$log"; then
            compile_ok=0 compile_note=$(sed -n 's/^compile: failed //p' "$log")
        fi
        [ "$gpu" = none ] && no_gpu=1
        { [ $rc != 0 ] || [ -z "$gpu" ]; } && aborted=1
        last="$interpreter; gpu: ${gpu:-?}"
    fi
    if [ $rc = 124 ] || [ $rc = 137 ]; then
        status="timed out"
    elif [ $aborted = 1 ]; then
        status="failed"
    elif [ $no_gpu = 1 ] && [ "$name" = env ]; then
        status="no GPU"
    elif [ $no_gpu = 1 ] && [ $rc = 2 ] && grep -q "no CUDA device is available" "$log"; then
        status="no GPU"; last="setup ran (imports, flags), stopped at the device check"
    elif [ $no_gpu = 1 ] && [ "$name" = agreement ]; then
        status="no GPU"; last="no runs to compare"
    elif [ $no_gpu = 1 ] && [ $rc = 0 ] && [ "$name" = tests ]; then
        status="no GPU"; last="the CUDA tests were collected and skipped: $last"
    elif [ $rc = 0 ]; then
        status="ok"
    else
        status="failed"
    fi
    record "$name" "$limit" "$seconds" "$rc" "$status" "$last"
    case $status in
        ok) echo "== $name: ok, $seconds s"; tail -n 8 "$log" ;;
        "no GPU") echo "== $name: no GPU ($last; $seconds s)" ;;
        *) echo "== $name: $status (rc=$rc, $seconds s, limit $limit s)"; tail -n 12 "$log"; failed=1 ;;
    esac
}

planned() {  # the sum of every stage's limit and grace period
    local saved=$dry_run
    planned_s=0 dry_run=1
    plan > /dev/null
    dry_run=$saved
}

work=WORK_DIR compile_ok=1 compile_note=""
if [ $dry_run = 1 ]; then
    out=${out:-OUT_DIR}
    echo "one command, the stages in order (a stage is skipped when the time left cannot hold its limit):"
    planned_s=0
    plan
    echo "  total: $planned_s s of stage limits and grace periods + $RESERVE s for the summary (budget $BUDGET s)"
    [ $((planned_s + RESERVE)) -le $BUDGET ] || { echo "error: the plan needs $((planned_s + RESERVE)) s, over the $BUDGET s budget" >&2; exit 1; }
    exit 0
fi
planned
if [ $((planned_s + RESERVE)) -gt $BUDGET ]; then
    echo "error: the stage limits add up to $((planned_s + RESERVE)) s, over the $BUDGET s budget" >&2
    exit 1
fi

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
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
results=() table=() interpreter="" gpu="" no_gpu=0 aborted=0 failed=0 planned_s=0
plan
write_summary true
echo "stage            status      time    limit"
printf '%s\n' "${table[@]}"
summary="$out/summary.json, logs in $out/logs.tar.gz; $(elapsed) s of $BUDGET s"
if [ $aborted = 1 ] || [ $failed = 1 ]; then
    echo "gpu check: a stage failed ($summary)"
    exit 1
fi
if [ $no_gpu = 1 ]; then
    echo "no GPU: every stage's setup ran; nothing was measured ($summary)"
    exit 3
fi
skipped=$(printf '%s\n' "${table[@]}" | grep -c ' skipped ')
note=""
[ "$skipped" = 0 ] || note=", $skipped skipped for time"
echo "gpu check done: every stage that ran passed$note ($summary)"
