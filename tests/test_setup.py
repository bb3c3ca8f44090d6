"""setup.sh picks the right Python environment, checked with stub interpreters (nothing is installed).

Each test runs setup.sh in a temporary copy of the repository with a directory of stubs first on
PATH: `python3` (creates a stub `.venv/bin/python` for `-m venv` and logs every call), `apt-get`
and `id`, so that neither pip nor apt ever runs for real.
"""
import os
import shutil
import subprocess

import pytest

from helpers import ROOT

# Every call appends "<the stub's path> <its arguments>" to $STUB_LOG. A `-m venv DIR` call makes
# DIR/bin/python a copy of this stub; with $STUB_NO_ENSUREPIP set it fails (as Debian's python3
# does without python3-venv) until the stub apt-get has "installed" that package.
PYTHON_STUB = r"""#!/usr/bin/env bash
echo "$0 $*" >> "$STUB_LOG"
if [ "${1:-}" = --version ]; then echo "Python 3.99.0"; exit 0; fi
if [ "${1:-}" = -m ] && [ "${2:-}" = venv ]; then
    mkdir -p "$3/bin" && cp "$0" "$3/bin/python"
    if [ -n "${STUB_NO_ENSUREPIP:-}" ] && [ ! -f "$STUB_DIR/python3-venv-installed" ]; then
        echo "ensurepip is not available" >&2; exit 1
    fi
    exit 0
fi
exit 0
"""
APT_STUB = r"""#!/usr/bin/env bash
echo "apt-get $*" >> "$STUB_LOG"
case "$*" in *python3-venv*) touch "$STUB_DIR/python3-venv-installed" ;; esac
"""
ID_STUB = r"""#!/usr/bin/env bash
echo "${STUB_UID:-0}"
"""


@pytest.fixture
def repo(tmp_path):
    """A copy of what setup.sh needs, and a function running it there with the stubs first on PATH."""
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("setup.sh", "requirements.txt"):
        shutil.copy(os.path.join(ROOT, name), work / name)
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, text in (("python3", PYTHON_STUB), ("apt-get", APT_STUB), ("id", ID_STUB)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    log = tmp_path / "calls.log"

    def run(*args, **env):
        base = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX")}
        base.update(PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}", STUB_LOG=str(log), STUB_DIR=str(stubs),
                    SETUP_SKIP_DATASET="1", **env)
        result = subprocess.run(["bash", str(work / "setup.sh"), *args], capture_output=True, text=True,
                                env=base, cwd=tmp_path, timeout=60)
        calls = log.read_text().splitlines() if log.exists() else []
        return result, calls

    run.dir, run.stubs = work, stubs
    return run


def make_stub_env(path, stubs):
    """An environment directory whose bin/python is the stub interpreter."""
    (path / "bin").mkdir(parents=True)
    shutil.copy(stubs / "python3", path / "bin" / "python")
    return path


def pip_installs(calls, python):
    """The requirement lists `python -m pip install` was called with."""
    prefix = f"{python} -m pip install --quiet --disable-pip-version-check "
    return [call[len(prefix):] for call in calls if call.startswith(prefix)]


@pytest.mark.parametrize("variable", ["VIRTUAL_ENV", "CONDA_PREFIX"])
def test_the_active_environment_is_used(repo, tmp_path, variable):
    active = make_stub_env(tmp_path / "active", repo.stubs)
    result, calls = repo(**{variable: str(active)})
    assert result.returncode == 0, result.stderr
    python = f"{active}/bin/python"
    assert f"setup: installing into {python} (Python 3.99.0, the active" in result.stdout
    assert pip_installs(calls, python) == ["-r requirements.txt"]
    assert not (repo.dir / ".venv").exists()
    assert not [call for call in calls if " -m venv" in call or call.startswith("apt-get")]


def test_without_an_active_environment_a_venv_is_created_and_used(repo):
    result, calls = repo("--test")
    assert result.returncode == 0, result.stderr
    python = f"{repo.dir}/.venv/bin/python"
    assert calls[0] == f"{repo.stubs}/python3 -m venv .venv"   # the first python3 on PATH makes it
    assert f"setup: installing into {python} (Python 3.99.0, the new virtual environment .venv" in result.stdout
    assert pip_installs(calls, python) == ["-r requirements.txt", "pytest pytest-xdist timm onnx onnxscript onnxruntime wandb"]
    assert "setup: SETUP_SKIP_DATASET=1" in result.stdout and result.stdout.endswith("setup: done\n")


def test_an_existing_venv_is_reused(repo):
    make_stub_env(repo.dir / ".venv", repo.stubs)
    result, calls = repo()
    assert result.returncode == 0, result.stderr
    python = f"{repo.dir}/.venv/bin/python"
    assert "the existing virtual environment .venv" in result.stdout
    assert not [call for call in calls if " -m venv" in call]
    assert pip_installs(calls, python) == ["-r requirements.txt"]


def test_debian_root_without_the_venv_module_gets_python3_venv(repo):
    result, calls = repo(STUB_NO_ENSUREPIP="1")
    assert result.returncode == 0, result.stderr
    python = f"{repo.dir}/.venv/bin/python"
    venv = f"{repo.stubs}/python3 -m venv .venv"
    assert [call for call in calls if call == venv or call.startswith("apt-get")] == [
        venv, "apt-get update -qq", "apt-get install -y -qq python3-venv", venv]
    assert pip_installs(calls, python) == ["-r requirements.txt"]


def test_without_root_a_missing_venv_module_is_one_clear_error(repo):
    result, calls = repo(STUB_NO_ENSUREPIP="1", STUB_UID="1000")
    assert result.returncode == 1
    assert "install your system's venv package (Debian/Ubuntu: python3-venv)" in result.stderr
    assert not [call for call in calls if call.startswith("apt-get") or " -m pip " in call]


def test_an_active_environment_without_python_is_refused(repo, tmp_path):
    result, calls = repo(VIRTUAL_ENV=str(tmp_path / "gone"))
    assert result.returncode == 1
    assert f"{tmp_path}/gone/bin/python does not exist" in result.stderr
    assert not (repo.dir / ".venv").exists()


def test_unknown_argument(repo):
    result, calls = repo("--tests")
    assert result.returncode == 2 and "usage: bash setup.sh [--test]" in result.stderr
    assert calls == []
