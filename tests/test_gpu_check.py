"""benchmarks/gpu_check.sh on the CPU: its plan fits the budget, and with CUDA absent every stage
still runs its setup and reports "no GPU" on one line, without a traceback (about a minute on 2 cores)."""
import json
import os
import re
import subprocess
import sys

import pytest

from helpers import ROOT, cpu_env

SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
BUDGET_S = 480
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def gpu_check(*args):
    """Start the script from the repository root with this interpreter and CUDA hidden."""
    return subprocess.Popen(["bash", SCRIPT, *args], cwd=ROOT, env=cpu_env(PYTHON=sys.executable),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(process, timeout=300):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def planned_stages():
    """{part: [(name, limit + grace)]} and {part: printed total} from the dry run."""
    rc, out, err = finished(gpu_check("--dry-run"))
    assert rc == 0 and err == "", err
    stages, totals, part = {}, {}, None
    for line in out.splitlines():
        if match := re.fullmatch(r"part (\d):", line):
            part = int(match[1])
            stages[part] = []
        elif match := re.match(r"  (\w+) +(\d+) s \+ (\d+) s grace   \S", line):
            stages[part].append((match[1], int(match[2]) + int(match[3])))
        elif match := re.fullmatch(r"  total: (\d+) s of stage limits and grace periods \(budget 480 s\)", line):
            totals[part] = int(match[1])
        else:
            pytest.fail(f"unexpected dry-run line: {line!r}")
    return stages, totals


def test_dry_run_plans_two_parts_within_the_budget():
    stages, totals = planned_stages()
    assert sorted(stages) == [1, 2]
    for part, planned in stages.items():
        assert totals[part] == sum(seconds for _, seconds in planned) <= BUDGET_S, part
        assert planned[0][0] == "env"  # the interpreter is checked first
    # cold torch.compile stages get at least 100 s
    compiled = [seconds for part in stages.values() for name, seconds in part if "fast" in name or "bench" in name]
    assert len(compiled) == 5 and min(compiled) >= 100


@pytest.fixture
def data_dir(tmp_path):
    """A --data-dir holding Fashion-MNIST's four files (links to Debian's copy)."""
    if not os.path.isdir(FASHION_MNIST):
        pytest.skip(f"needs Debian's dataset-fashion-mnist in {FASHION_MNIST}")
    target = tmp_path / "data" / "fashion-mnist"
    target.mkdir(parents=True)
    for name in os.listdir(FASHION_MNIST):
        (target / name).symlink_to(os.path.join(FASHION_MNIST, name))
    return tmp_path / "data"


def test_without_a_gpu_every_stage_runs_its_setup_and_says_no_gpu(tmp_path, data_dir):
    stages, _ = planned_stages()
    for part in stages:  # one after the other: two cold torch imports at once can exceed the env stage's limit
        rc, out, err = finished(gpu_check("--part", str(part), "--data-dir", str(data_dir), str(tmp_path / f"out{part}")))
        assert rc == 3, (out, err)
        assert "Traceback" not in out + err
        names = [name for name, _ in stages[part]]
        reports = [line for line in out.splitlines() if line.startswith("== ")]
        assert [line.split(":")[0][3:] for line in reports] == names
        assert reports[0].startswith("== env: ok")
        assert "gpu: none" in out
        for line in reports[1:]:
            assert re.fullmatch(r"== \w+: no GPU \(setup ran.*; \d+ s\)", line), line
        # one line per stage: nothing printed between the stage reports
        after_env = out.splitlines()[out.splitlines().index("gpu: none") + 1:]
        assert after_env == reports[1:] + [f"no GPU: every stage's setup ran; nothing was measured "
                                           f"({tmp_path / f'out{part}' / f'part{part}.json'})"]
        saved = json.loads((tmp_path / f"out{part}" / f"part{part}.json").read_text())
        assert saved["done"] is True and saved["gpu"] == "none" and saved["part"] == part
        assert [(s["name"], s["status"]) for s in saved["stages"]] == [("env", "ok")] + [(n, "no GPU") for n in names[1:]]
        for name in names:
            log = (tmp_path / f"out{part}" / f"{name}.log").read_text()
            assert "Traceback" not in log, name


def test_missing_data_is_one_line_saying_what_to_copy_where(tmp_path):
    rc, out, err = finished(gpu_check("--part", "1", "--data-dir", str(tmp_path / "none"), str(tmp_path / "out")))
    assert rc == 2 and out == ""
    assert err.count("\n") == 1
    assert f"mkdir -p {tmp_path / 'none'}/fashion-mnist && cp {FASHION_MNIST}/*.gz {tmp_path / 'none'}/fashion-mnist/" in err
    assert not (tmp_path / "out").exists()  # nothing started


@pytest.mark.parametrize("args, message", [
    ([], "name the part to run"),
    (["--part", "3", "out"], "--part must be 1 or 2"),
    (["--part", "1"], "name an output directory"),
    (["--bogus"], "unknown option --bogus"),
])
def test_bad_arguments_are_one_line(args, message):
    rc, out, err = finished(gpu_check(*args))
    assert rc == 2 and out == "" and err.count("\n") == 1 and err.startswith(f"error: {message}")
