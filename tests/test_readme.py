"""Every command in the README and docs/ parses with its script's parser, so the documentation cannot drift."""
import argparse
import glob
import importlib
import os
import re
import flags
import shlex
import sys

import pytest

from datasets import DATASETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"train.py", "train_mutual_learning.py", "train_competitive_distillation.py", "train_ceit.py",
           "train_kdcl.py", "train_one.py", "train_okddip.py", "train_pcl.py", "train_byot.py", "demo.py", "export.py", "benchmarks/bench.py", "experiments/compare.py", "experiments/summarize.py",
           "experiments/bn_perturbed.py"}


# How a command may start our scripts: the environment setup.sh installed into (`.venv/bin/python`),
# an activated one (`python`, `python3`), or torchrun.
INTERPRETERS = {"python", "python3", ".venv/bin/python"}


def commands_in(text):
    """(launcher words, script, argv) for every invocation of one of our scripts in markdown text's
    code (bash blocks and inline code)."""
    blocks = re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, flags=re.S)
    # and the inline ones, such as the commands of the results table
    blocks += re.findall(r"(?<!`)`((?:\.venv/bin/)?python3? [^`]+)`(?!`)", text)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|;|\|", line.split(" #")[0]):
                words = shlex.split(part)
                for i, word in enumerate(words):
                    if word in SCRIPTS:
                        commands.append((words[:i], word, words[i + 1:]))
                        break
    return commands


DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
README = [command for path in DOCS for command in commands_in(open(os.path.join(ROOT, path)).read())]
COMMANDS = [(script, argv) for _, script, argv in README]


def test_readme_has_a_command_per_script():
    assert {script for script, _ in COMMANDS} >= SCRIPTS


def test_commands_are_found_behind_every_launcher():
    text = ("```bash\nbash setup.sh && .venv/bin/python train.py --epochs 2\n"
            "bash setup.sh --test && .venv/bin/python -m pytest -q tests\n```\n"
            "Inline: `.venv/bin/python demo.py runs/x`, `python3 train.py --model resnet20`, `python -m pytest`.")
    assert commands_in(text) == [([".venv/bin/python"], "train.py", ["--epochs", "2"]),
                                 ([".venv/bin/python"], "demo.py", ["runs/x"]),
                                 (["python3"], "train.py", ["--model", "resnet20"])]


@pytest.mark.parametrize("launcher,script", [(launcher, script) for launcher, script, _ in README],
                         ids=[" ".join([*l, s]) for l, s, _ in README])
def test_readme_commands_use_the_environment_convention(launcher, script):
    """Every command runs our scripts through the interpreter convention of the quick start (or torchrun)."""
    assert (launcher and launcher[-1] in INTERPRETERS) or launcher[:1] == ["torchrun"], launcher


@pytest.mark.parametrize("script,argv", COMMANDS, ids=[" ".join([s, *a])[:90] for s, a in COMMANDS])
def test_readme_command_parses(script, argv):
    module = importlib.import_module(script[:-3].replace("/", "."))
    # argparse exits (fails the test) on a bad flag; a namespace of our own: --config and --resume name files
    # of a user's run, which are not read here
    args = module.get_args_parser().parse_args(argv, argparse.Namespace())
    if hasattr(args, "dataset") and script.startswith(("train", "demo")):
        assert args.dataset in DATASETS
    if script.startswith("train"):
        flags.check_args(args)
        assert flags.model_names(args)  # every model name resolves
    if script == "experiments/compare.py":  # the flags after `--` parse for every run of the study
        for *_, run in module.commands(args):
            run_args = importlib.import_module(os.path.basename(run[1])[:-3]).get_args_parser().parse_args(
                run[2:], argparse.Namespace())
            flags.check_args(run_args)
            assert flags.model_names(run_args)


def test_readme_is_short_and_its_links_resolve():
    """The front door stays a five-minute read (its prose: the study table, one line per configuration
    that gains digits as seeds land, is data and counted apart); the reference pages it links to exist."""
    text = open(os.path.join(ROOT, "README.md")).read()
    tables = re.findall(r"<!-- (\S+) table: begin -->.*?<!-- \1 table: end -->", text, re.S)
    prose = re.sub(r"<!-- (\S+) table: begin -->.*?<!-- \1 table: end -->", "", text, flags=re.S)
    assert tables and len(prose.encode()) < 9 * 1024
    for name in tables:
        table = summarize_table(text, name)
        assert table.count("\n") < 25 and len(table.encode()) < 4 * 1024, name
    links = re.findall(r"\]\((docs/[^)]+)\)", text)
    assert links and all(os.path.isfile(os.path.join(ROOT, link)) for link in links), links


def summarize_table(text, name):
    """The README's table `name`, as experiments/summarize.py's markers delimit it."""
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import summarize
    return summarize.readme_table(text, name)


def test_ci_runs_the_readme_test_command():
    ci = [line for line in open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
          if line and not line.startswith(("#", "set ", "cd "))]
    assert len(ci) == 1 and f"```bash\n{ci[0]}\n```" in open(os.path.join(ROOT, "README.md")).read()


def test_the_results_table_is_the_committed_studys_summary():
    """The README's table is what experiments/summarize.py makes of experiments/study, number for number."""
    import sys
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import summarize
    table = summarize.readme_table(open(os.path.join(ROOT, "README.md")).read())
    assert table and table.startswith("| configuration |"), "README.md lacks the study table's markers"
    assert table == summarize.compact_table(os.path.join(ROOT, "experiments", "study"), summarize.headline)


def test_the_authors_cells_table_is_its_committed_runs_summary():
    """The README's table of the authors'-optimizer cell is what summarize.py makes of experiments/study-authors
    (its finished runs: a run under way has no results.json and is left out, as in a clean clone)."""
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import summarize
    table = summarize_table(open(os.path.join(ROOT, "README.md")).read(), "authors")
    assert table and table.startswith("| configuration |"), "README.md lacks the authors table's markers"
    assert table == summarize.compact_table(os.path.join(ROOT, "experiments", "study-authors"), summarize.headline)
    assert "| pcl | 3 × resnet20 | 3 |" in table and "| byot | 3 × resnet20 | 3 |" in table


def test_the_results_pages_tables_are_the_committed_studys_summary():
    """docs/results.md's full study tables (the compact one, the --versus one of the pairs its
    summarize.py command names, and the AdamW one) are what experiments/summarize.py makes of
    experiments/study and experiments/study-adamw."""
    import sys
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import summarize
    text = open(os.path.join(ROOT, "docs", "results.md")).read()
    study = os.path.join(ROOT, "experiments", "study")
    rows = summarize.summarize(summarize.load_study(study))[0]
    assert summarize.compact(rows) in text
    command = next(argv for _, script, argv in commands_in(text)
                   if script == "experiments/summarize.py" and "--versus" in argv and argv[0] == "experiments/study")
    args = summarize.get_args_parser().parse_args(command)
    assert len(args.versus) >= 5 and summarize.versus(rows, args.versus) in text
    adamw = summarize.summarize(summarize.load_study(os.path.join(ROOT, "experiments", "study-adamw")))[0]
    assert summarize.compact(adamw) in text
    authors = summarize.summarize(summarize.load_study(os.path.join(ROOT, "experiments", "study-authors")))[0]
    assert summarize.compact(authors) in text
    command = next(argv for _, script, argv in commands_in(text)
                   if script == "experiments/summarize.py" and "--versus" in argv and argv[0] == "experiments/study-authors")
    assert summarize.versus(authors, summarize.get_args_parser().parse_args(command).versus) in text


def test_the_adding_a_method_example_trains(tmp_path):
    """docs/usage.md's "Adding a method" file, as printed there, trains and resumes like every script."""
    import subprocess
    import sys
    from helpers import cpu_env
    text = open(os.path.join(ROOT, "docs", "usage.md")).read()
    start = text.index('"""Mean-teacher distillation')
    (tmp_path / "train_mean.py").write_text(text[start:text.index("```", start)])
    tiny = ["--models", "resnet20", "resnet20", "--dataset", "fake", "--img-size", "16", "--train-subset", "64",
            "--val-size", "32", "--batch-size", "32", "--device", "cpu", "--workers", "0", "--no-progress",
            "--perturb-every", "3", "--out-dir", str(tmp_path / "run")]
    for argv in (["--epochs", "2", "--stop-after", "1"], ["--epochs", "2", "--resume", "auto"]):
        done = subprocess.run([sys.executable, str(tmp_path / "train_mean.py"), *tiny, *argv], capture_output=True,
                              text=True, env=cpu_env(), cwd=tmp_path, timeout=300)
        assert done.returncode == 0, done.stderr
    rows = [line for line in open(tmp_path / "run" / "metrics.csv").read().splitlines()[1:]]
    assert len(rows) == 6 and "final test accuracy" in done.stdout  # 2 epochs x (2 networks + ensemble)
