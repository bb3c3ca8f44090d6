#!/usr/bin/env bash
# Set up this repository on a fresh machine: the Python requirements into the active python3
# (plus pytest with --test), and on Debian/Ubuntu as root the Fashion-MNIST package used by the
# quick start. Safe to run again: what is already there is left alone.
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}

echo "setup: installing requirements.txt into $($python -c 'import sys; print(sys.executable)')"
$python -m pip install --quiet --disable-pip-version-check -r requirements.txt
if [ "${1:-}" = "--test" ]; then
    echo "setup: installing pytest, matplotlib and scipy (the tests also check demo.py's plots and SVHN files)"
    $python -m pip install --quiet --disable-pip-version-check pytest matplotlib scipy
fi

fmnist=/usr/share/datasets/fashion-mnist
if [ -f "$fmnist/train-images-idx3-ubyte.gz" ]; then
    echo "setup: Fashion-MNIST already in $fmnist"
elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian package dataset-fashion-mnist (into $fmnist)"
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
else
    echo "setup: not Debian as root; Fashion-MNIST will be downloaded into ./data on first use"
fi
echo "setup: done"
