#!/usr/bin/env bash
# Set up this repository on a fresh machine: the Python requirements (matplotlib included, for
# demo.py's curves, scipy for the studies' statistics; plus pytest, pytest-xdist, timm, onnx and wandb with --test) into a Python environment, and on
# Debian/Ubuntu as root the Fashion-MNIST package used by the quick start. Safe to run again: what is
# already there is left alone.
#
#   bash setup.sh            requirements.txt only
#   bash setup.sh --test     and what the test suite needs
#
# Which environment: the active one when a virtualenv (VIRTUAL_ENV) or a conda environment
# (CONDA_PREFIX) is activated; otherwise .venv in this repository, created with `python3 -m venv`
# (the first python3 on PATH) or reused when it is already there. System interpreters that refuse
# pip installs (PEP 668: Debian 12, Ubuntu 23.04+, Fedora) are never installed into. Run the
# scripts with that environment's interpreter: `.venv/bin/python train.py ...`, or
# `source .venv/bin/activate` once and then `python train.py ...`.
#
# On Debian/Ubuntu as root, a python3 without its venv module gets the python3-venv package, and
# Fashion-MNIST comes from the dataset-fashion-mnist package; elsewhere torchvision downloads it
# into ./data on first use. SETUP_SKIP_DATASET=1 leaves the data set alone (this script's tests
# set it so that they never reach apt-get).
set -euo pipefail
cd "$(dirname "$0")"

test_deps=false
case "${1:-}" in
    "") ;;
    --test) test_deps=true ;;
    *) echo "usage: bash setup.sh [--test]" >&2; exit 2 ;;
esac

debian_root() { command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; }

if [ -n "${VIRTUAL_ENV:-}" ]; then
    python=$VIRTUAL_ENV/bin/python
    where="the active virtual environment $VIRTUAL_ENV"
elif [ -n "${CONDA_PREFIX:-}" ]; then
    python=$CONDA_PREFIX/bin/python
    where="the active conda environment $CONDA_PREFIX"
elif [ -x .venv/bin/python ] && .venv/bin/python -m pip --version >/dev/null 2>&1; then
    python=$PWD/.venv/bin/python
    where="the existing virtual environment .venv"
else
    # A python3 without ensurepip (Debian/Ubuntu without python3-venv) fails here and leaves a
    # .venv without pip, which the retry completes.
    if ! python3 -m venv .venv; then
        if debian_root; then
            echo "setup: installing Debian package python3-venv (python3 -m venv needs it)"
            apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
            python3 -m venv .venv
        else
            echo "setup: 'python3 -m venv .venv' failed; install your system's venv package (Debian/Ubuntu:" \
                 "python3-venv) or activate a virtualenv or conda environment, then run this again" >&2
            exit 1
        fi
    fi
    python=$PWD/.venv/bin/python
    where="the new virtual environment .venv (from $(command -v python3))"
fi
if [ ! -x "$python" ]; then
    echo "setup: $python does not exist; is $where a Python environment?" >&2
    exit 1
fi

echo "setup: installing into $python ($("$python" --version 2>&1), $where)"
pip=("$python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" -r requirements.txt
if $test_deps; then
    echo "setup: installing pytest, pytest-xdist, timm, onnx and wandb (the tests run on every core; they also check timm: models, export.py's ONNX and --log-wandb offline)"
    "${pip[@]}" pytest pytest-xdist timm onnx onnxscript onnxruntime wandb
fi

fmnist=/usr/share/datasets/fashion-mnist
if [ "${SETUP_SKIP_DATASET:-}" = 1 ]; then
    echo "setup: SETUP_SKIP_DATASET=1: Fashion-MNIST left alone"
elif [ -f "$fmnist/train-images-idx3-ubyte.gz" ]; then
    echo "setup: Fashion-MNIST already in $fmnist"
elif debian_root; then
    echo "setup: installing Debian package dataset-fashion-mnist (into $fmnist)"
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
else
    echo "setup: not Debian as root; Fashion-MNIST will be downloaded into ./data on first use"
fi
echo "setup: done"
