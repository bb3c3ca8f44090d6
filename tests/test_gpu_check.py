"""benchmarks/gpu_check.sh on the CPU: one command whose stage limits fit the 6-minute budget; with CUDA
absent every stage runs its setup and says "no GPU" on one line, and OUT_DIR holds only the summary and
the log archive (about a minute on 2 cores). And the tests it runs on the GPU, `pytest -m cuda`: each is
the CUDA run of a test whose body also runs, and passes, on the CPU."""
import json
import os
import time
import re
import subprocess
import sys
import tarfile

import pytest
import torch

from helpers import ROOT, cpu_env

SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
BUDGET_S = 360
MAX_FILES = 4
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
CUDA_AVAILABLE = "torch.cuda.is_available()"


def gpu_check(*args, **env):
    """Start the script from the repository root with this interpreter and CUDA hidden."""
    return subprocess.Popen(["bash", SCRIPT, *args], cwd=ROOT, env=cpu_env(PYTHON=sys.executable, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(process, timeout=300):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def planned_stages():
    """[(name, limit + grace)], their printed total, the reserve and the budget, from the dry run."""
    rc, out, err = finished(gpu_check("--dry-run"))
    assert rc == 0 and err == "", err
    first, *lines, last = out.splitlines()
    assert first.startswith("one command, the stages in order")
    stages = []
    for line in lines:
        match = re.match(r"  (\w+) +(\d+) s \+ (\d+) s grace   \S", line)
        assert match, f"unexpected dry-run line: {line!r}"
        stages.append((match[1], int(match[2]) + int(match[3])))
    total = re.fullmatch(r"  total: (\d+) s of stage limits and grace periods \+ (\d+) s for the summary "
                         r"\(budget (\d+) s\)", last)
    assert total, last
    return stages, *map(int, total.groups())


def test_dry_run_plans_one_command_within_six_minutes():
    stages, total, reserve, budget = planned_stages()
    assert budget == BUDGET_S and total == sum(seconds for _, seconds in stages) and total + reserve <= BUDGET_S
    names = [name for name, _ in stages]
    # the most important first: the interpreter, the CUDA tests, the pair benchmark, the quick start
    assert names[:4] == ["env", "tests", "bench_pair", "quickstart"] and len(set(names)) == len(names)
    limits = dict(stages)
    # cold torch.compile compilations: the quick start's two networks, and the benchmark's fast variant
    assert limits["quickstart_fast"] >= 100 and limits["bench_pair"] >= 85
    assert names.index("agreement") == names.index("quickstart_fast") + 1  # the fast path checked against the default


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


def output_files(out):
    """Every file under OUT_DIR, relative to it."""
    return sorted(str(path.relative_to(out)) for path in out.rglob("*") if not path.is_dir())


def test_without_a_gpu_every_stage_says_no_gpu_in_one_line(tmp_path, data_dir):
    stages, _, _, _ = planned_stages()
    names = [name for name, _ in stages]
    out = tmp_path / "out"
    rc, stdout, err = finished(gpu_check("--data-dir", str(data_dir), str(out)))
    assert rc == 3, (stdout, err)
    assert err == "" and "Traceback" not in stdout
    lines = stdout.splitlines()
    reports, (header, *table), last = lines[:len(names)], lines[len(names):-1], lines[-1]
    for name, line in zip(names, reports, strict=True):  # one line per stage, nothing between them
        assert re.fullmatch(rf"== {name}: no GPU \(.+; \d+ s\)", line), line
    assert "gpu: none" in reports[0] and "setup ran" in reports[2]
    assert header.split() == ["stage", "status", "time", "limit"]
    assert [row.split()[:3] for row in table] == [[name, "no", "GPU"] for name in names]
    assert last.startswith(f"no GPU: every stage's setup ran; nothing was measured ({out / 'summary.json'}")
    assert output_files(out) == ["logs.tar.gz", "summary.json"] and len(output_files(out)) <= MAX_FILES
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done"] is True and summary["gpu"] == "none" and summary["budget_s"] == BUDGET_S
    assert [(s["name"], s["status"]) for s in summary["stages"]] == [(name, "no GPU") for name in names]
    with tarfile.open(out / "logs.tar.gz") as archive:
        logs = {os.path.basename(m.name): archive.extractfile(m).read().decode() for m in archive.getmembers() if m.isfile()}
    assert set(logs) == {f"{name}.log" for name in names}
    assert all("Traceback" not in log for log in logs.values())


def test_a_stage_that_no_longer_fits_the_budget_is_skipped_in_one_line(tmp_path, data_dir):
    """With the slot mostly spent (GPU_CHECK_SPENT_S), only the first stage still fits: every later one
    says so on one line, and the summary records it."""
    stages, _, reserve, budget = planned_stages()
    spent = budget - reserve - stages[0][1]  # exactly the first stage's limit is left
    out = tmp_path / "out"
    rc, stdout, err = finished(gpu_check("--data-dir", str(data_dir), str(out), GPU_CHECK_SPENT_S=str(spent)))
    assert rc == 3 and err == "", (stdout, err)
    lines = stdout.splitlines()
    assert lines[0].startswith("== env: no GPU")
    statuses = ["no GPU"]
    for (name, seconds), line in zip(stages[1:], lines[1:len(stages)], strict=True):
        skipped = re.fullmatch(rf"== {name}: skipped \(-?\d+ s left of the budget, its limit is {seconds - 3} s \+ 3 s grace\)",
                               line)
        # whatever the first stage took, less than its limit is left: every stage as long is skipped (a
        # shorter one may still fit, how much less depends on the machine's speed)
        assert skipped or (seconds < stages[0][1] and line.startswith(f"== {name}: no GPU")), line
        statuses.append("skipped" if skipped else "no GPU")
    assert sum(status == "skipped" for status in statuses) >= sum(seconds >= stages[0][1] for _, seconds in stages[1:]) > 0
    summary = json.loads((out / "summary.json").read_text())
    assert [s["status"] for s in summary["stages"]] == statuses
    assert output_files(out) == ["logs.tar.gz", "summary.json"]


def test_missing_data_is_one_line_saying_what_to_copy_where(tmp_path):
    rc, out, err = finished(gpu_check("--data-dir", str(tmp_path / "none"), str(tmp_path / "out")))
    assert rc == 2 and out == ""
    assert err.count("\n") == 1
    assert f"mkdir -p {tmp_path / 'none'}/fashion-mnist && cp {FASHION_MNIST}/*.gz {tmp_path / 'none'}/fashion-mnist/" in err
    assert not (tmp_path / "out").exists()  # nothing started


@pytest.mark.parametrize("args, message", [
    ([], "name an output directory"),
    (["a", "b"], "one OUT_DIR only"),
    (["--part", "1", "out"], "unknown option --part"),
    (["--bogus"], "unknown option --bogus"),
])
def test_bad_arguments_are_one_line(args, message):
    rc, out, err = finished(gpu_check(*args))
    assert rc == 2 and out == "" and err.count("\n") == 1 and err.startswith(f"error: {message}")


def collected(*args):
    """The node ids pytest collects from tests/ with CUDA hidden."""
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args, "tests"],
                            cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return [line for line in result.stdout.splitlines() if "::" in line]


NO_BODY_PLUGIN = """import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    return True
"""


def test_every_cuda_test_body_also_runs_on_the_cpu(tmp_path):
    """The gpu check's tests stage (pytest -m cuda) finds the CUDA runs of tests parametrised over
    helpers.DEVICES; each has a CPU twin that this suite collects and does not skip (the twins' bodies run,
    and must pass, where the suite runs them: here a plugin replaces each body by a no-op, so only their
    collection, skip markers and fixtures are run again), and no test is skipped as a whole for want of
    CUDA, so a change that breaks a GPU test fails on the CPU first."""
    cuda = collected("-m", "cuda")
    assert any("test_captured_competitive_step_matches_eager" in node for node in cuda)
    twins = []
    for node in cuda:
        name, params = re.fullmatch(r"(.+)\[(.+)\]", node).groups()
        assert params.split("-").count("cuda") == 1, node
        twins.append(f"{name}[{'-'.join('cpu' if p == 'cuda' else p for p in params.split('-'))}]")
    for path in os.listdir(os.path.join(ROOT, "tests")):  # the only way to need CUDA is helpers.DEVICES
        if path.endswith(".py") and path != "helpers.py":
            with open(os.path.join(ROOT, "tests", path)) as f:
                source = re.sub(r"\s", "", f.read())
            for skip in ("skipif(not" + CUDA_AVAILABLE, "ifnot" + CUDA_AVAILABLE + ":pytest.skip"):
                assert skip not in source, path
    (tmp_path / "no_test_bodies.py").write_text(NO_BODY_PLUGIN)
    env = cpu_env(OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no_test_bodies",
                             *twins], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]  # a twin that is not collected is an error here
    assert re.search(rf"^{len(twins)} passed in ", result.stdout.splitlines()[-1]), result.stdout[-500:]


def write_fake_run(run_dir, accuracies, losses):
    """results.json and metrics.csv of a finished run, with these final test accuracies and first-epoch losses."""
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps({"networks": [{"net": net, "final_test_acc": acc}
                                                                   for net, acc in accuracies.items()]}))
    rows = "".join(f"1,{net},{loss}\n" for net, loss in losses.items())
    (run_dir / "metrics.csv").write_text("epoch,net,train_loss\n" + rows + "1,ensemble,\n")


@pytest.mark.parametrize("fast, code", [
    (({"net0": 88.4, "net1": 87.9, "ensemble": 88.6}, {"net0": 0.61, "net1": 0.62}), 0),   # within 1.5 points, 5 %
    (({"net0": 85.9, "net1": 88.0, "ensemble": 88.6}, {"net0": 0.61, "net1": 0.62}), 1),   # net0 2.6 points lower
    (({"net0": 88.6, "net1": 88.1, "ensemble": 88.7}, {"net0": 0.66, "net1": 0.62}), 1),   # net0's loss 10 % higher
])
def test_the_agreement_stage_fails_when_the_fast_run_trains_otherwise(tmp_path, fast, code):
    write_fake_run(tmp_path / "default", {"net0": 88.5, "net1": 88.2, "ensemble": 88.7}, {"net0": 0.60, "net1": 0.62})
    write_fake_run(tmp_path / "fast", *fast)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "agreement.py"), str(tmp_path / "default"),
                             str(tmp_path / "fast")], capture_output=True, text=True, env=cpu_env())
    assert result.returncode == code, result.stdout
    assert result.stdout.splitlines()[-1].startswith("agree" if code == 0 else "disagree")
    assert (result.returncode == 1) == ("apart" in result.stdout)


def test_the_benchmark_times_a_captured_step_only_after_its_capture(monkeypatch):
    """--warmup 3 equals CapturedStep's own warm-up: the capture (the 4th call) must still be untimed."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench
    calls = []

    def step():
        calls.append(time.perf_counter())

    step.untimed = 3 + 1  # what repository_steps gives a captured step: its warm-up calls and the capture
    monkeypatch.setattr(bench, "repository_steps", lambda *a, **k: step)
    args = bench.get_args_parser().parse_args(["--device", "cpu", "--warmup", "3", "--steps", "2", "--repeats", "2"])
    result = bench.time_variant("fast", args, torch.device("cpu"))
    assert result["warmup_steps"] == 4 and len(calls) == 4 + 2 * 2
