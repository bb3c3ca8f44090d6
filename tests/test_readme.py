"""Every command in the README and docs/ parses with its script's parser, so the documentation cannot drift."""
import glob
import importlib
import os
import re
import flags
import shlex

import pytest

from datasets import DATASETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"train.py", "train_mutual_learning.py", "train_competitive_distillation.py", "train_ceit.py",
           "train_kdcl.py", "train_one.py", "train_okddip.py", "demo.py", "export.py", "benchmarks/bench.py", "experiments/compare.py", "experiments/summarize.py",
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
    args = module.get_args_parser().parse_args(argv)  # argparse exits (fails the test) on a bad flag
    if hasattr(args, "dataset") and script.startswith(("train", "demo")):
        assert args.dataset in DATASETS
    if script.startswith("train"):
        flags.check_args(args)
        assert flags.model_names(args)  # every model name resolves
    if script == "experiments/compare.py":  # the flags after `--` parse for every run of the study
        for *_, run in module.commands(args):
            run_args = importlib.import_module(os.path.basename(run[1])[:-3]).get_args_parser().parse_args(run[2:])
            flags.check_args(run_args)
            assert flags.model_names(run_args)


def test_readme_is_short_and_its_links_resolve():
    """The front door stays a five-minute read (its prose: the study table, one line per configuration
    that gains digits as seeds land, is data and counted apart); the reference pages it links to exist."""
    text = open(os.path.join(ROOT, "README.md")).read()
    begin, end = text.index("<!-- study table: begin -->"), text.index("<!-- study table: end -->")
    assert len((text[:begin] + text[end:]).encode()) < 9 * 1024
    assert text[begin:end].count("\n") < 25 and len(text[begin:end].encode()) < 4 * 1024
    links = re.findall(r"\]\((docs/[^)]+)\)", text)
    assert links and all(os.path.isfile(os.path.join(ROOT, link)) for link in links), links


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
