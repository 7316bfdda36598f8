"""The command line as README.md documents it: every command and flag of its command table is run by some test."""
from __future__ import annotations

import re

import yaml
from conftest import REPO

from distributed.cli import build_parser, main

# A README flag with no end-to-end run, and why (each one a known gap, said in the README's test section).
NOT_RUN: dict[tuple[str, str], str] = {}
# Test helpers that run one subcommand: their calls count as that subcommand's (tests/test_run.py's train_cli).
WRAPPERS = {"train_cli(": "train"}


def readme_commands() -> dict[str, set[str]]:
    """{subcommand: its flags} from the README's command table (rows starting with | `emotune ...`)."""
    found: dict[str, set[str]] = {}
    for row in re.findall(r"^\| `emotune ([^`]+)`", (REPO / "README.md").read_text(), re.M):
        words = row.split()
        sub = " ".join(words[:2]) if words[0] == "cluster" else words[0]
        found.setdefault(sub, set()).update(re.findall(r"--[a-z][a-z-]*", row))
    return found


def exercised() -> dict[str, set[str]]:
    """{subcommand: flags} that tests pass to the real CLI: main([...]) calls, `python -m distributed ...` and
    `emotune ...` subprocesses (the string literals of one call), and the bad-input cases' argv."""
    seen: dict[str, set[str]] = {}
    subs = readme_commands()
    for path in (REPO / "tests").glob("test_*.py"):
        text = path.read_text()
        for sub in subs:
            first = sub.split()[0]
            calls = [m.start() for m in re.finditer(rf'"{first}"', text)]
            calls += [m.start() for w, name in WRAPPERS.items() if name == sub for m in re.finditer(re.escape(w), text)]
            for start in calls:
                call = text[start:start + 600]
                call = call[:call.find("\n\n")] if "\n\n" in call else call  # the statement, not the next one
                seen.setdefault(sub, set()).update(re.findall(r'"(--[a-z][a-z-]*)', call))
    for case in (REPO / "tests" / "bad_inputs").glob("*.yaml"):
        argv = yaml.safe_load(case.read_text()).get("argv") or []
        if argv:
            sub = " ".join(argv[:2]) if argv[0] == "cluster" else argv[0]
            seen.setdefault(sub, set()).update(a.split("=")[0] for a in argv if a.startswith("--"))
    return seen


def test_every_readme_command_and_flag_is_run_by_a_test():
    documented, run = readme_commands(), exercised()
    assert len(documented) >= 11, documented  # the table was found
    missing = sorted((sub, flag) for sub, flags in documented.items() for flag in flags | {""}
                     if (flag and flag not in run.get(sub, set()) or not flag and sub not in run)
                     and (sub, flag) not in NOT_RUN)
    assert not missing, missing


def test_the_readme_table_names_only_real_flags():
    """The table cannot drift from the parser: every flag it shows, the subcommand accepts."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for sub, flags in readme_commands().items():
        words = sub.split()
        p = subparsers[words[0]]
        if len(words) > 1:
            p = next(a for a in p._actions if a.dest == "action").choices[words[1]]
        known = {s for a in p._actions for s in a.option_strings}
        assert flags <= known, (sub, flags - known)


def test_list_models_prints_every_architecture(capsys):
    from distributed.models import list_models

    assert main(["list-models"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["model", "params", "input", "kind"]
    assert [line.split()[0] for line in lines[1:]] == list(list_models())
    small = next(line for line in lines if line.startswith("small_cnn "))
    assert "48x48" in small
