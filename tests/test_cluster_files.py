"""Every cluster file we ship validates; every broken example is caught, with the file and key named.

A broken example in tests/cluster_cases/ states what it must produce in `# expect:` lines, one per problem:
each line must match a problem and there must be no others, so a new check that adds noise to an unrelated
case fails here too. Add a case by adding a file.
"""
from pathlib import Path

import pytest

from distributed.cluster import (
    DRIVER_RESOURCE,
    ClusterFileError,
    check_cluster_files,
    cluster_storage_path,
    validate_cluster_file,
    validate_cluster_files,
)
from distributed.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_FILES = sorted((ROOT / "cluster").glob("*.yaml"))
CASES = sorted((ROOT / "tests" / "cluster_cases").glob("*.yaml"))


def expected_problems(case: Path) -> list[str]:
    return [line.split("# expect:", 1)[1].strip() for line in case.read_text().splitlines()
            if line.startswith("# expect:")]


def test_there_are_cluster_files_and_cases():
    # An empty glob would make the parametrized tests below pass by testing nothing.
    names = {path.name for path in CLUSTER_FILES}
    assert {"local.yaml", "aws-gpu.yaml", "gcp-gpu.yaml", "kuberay.yaml"} <= names
    assert len(CASES) >= 10


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_file_is_valid(path):
    assert validate_cluster_file(path) == []


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_file_pins_drivers_to_the_head_and_keeps_the_dashboard_private(path):
    # The validator checks these; this guards against the validator itself going soft on our own files.
    text = path.read_text()
    assert DRIVER_RESOURCE in text
    assert "--dashboard-host=127.0.0.1" in text or 'dashboard-host: "127.0.0.1"' in text


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name)
def test_broken_case_is_caught(case):
    expected = expected_problems(case)
    assert expected, f"{case.name}: add a '# expect: <substring>' line saying what it must produce"
    problems = validate_cluster_file(case)
    for want in expected:
        assert any(want in problem for problem in problems), f"{want!r} not in {problems}"
    assert len(problems) == len(expected), problems
    # Every problem names the file, so a person can tell which of several files is wrong.
    assert all(problem.startswith(f"{case}: ") for problem in problems), problems


def test_validate_cluster_files_takes_a_directory():
    assert validate_cluster_files([ROOT / "cluster"]) == []
    problems = validate_cluster_files([ROOT / "tests" / "cluster_cases"])
    assert len(problems) >= len(CASES)


def test_check_cluster_files_raises_one_line_per_problem():
    check_cluster_files(CLUSTER_FILES)  # fine: no error
    cases = [ROOT / "tests" / "cluster_cases" / name for name in ("unknown_node_type.yaml", "wrong_type.yaml")]
    with pytest.raises(ClusterFileError) as info:
        check_cluster_files(cases)
    lines = str(info.value).splitlines()
    assert len(lines) == 2
    assert "unknown_node_type.yaml: head_node_type: unknown node type 'nope'" in lines[0]
    # The CLI turns ConfigError (a ValueError) into exit code 2; a bad cluster file is bad input like any other.
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)


def test_missing_file_is_a_problem_not_a_crash(tmp_path):
    problems = validate_cluster_file(tmp_path / "nope.yaml")
    assert len(problems) == 1 and "no such file" in problems[0]


def test_a_path_to_a_key_file_is_not_a_credential(tmp_path):
    text = (ROOT / "cluster" / "local.yaml").read_text()
    assert "ssh_private_key: ~/.ssh/" in text  # the real file exercises this already; keep it honest
    path = tmp_path / "key_path.yaml"
    path.write_text(text.replace("ssh_private_key: ~/.ssh/id_ed25519", "ssh_private_key: /home/me/keys/emotune.pem"))
    assert validate_cluster_file(path) == []


def test_storage_path_is_read_from_both_kinds():
    assert cluster_storage_path(ROOT / "cluster" / "aws-gpu.yaml").startswith("s3://")
    assert cluster_storage_path(ROOT / "cluster" / "gcp-gpu.yaml").startswith("gs://")
    assert cluster_storage_path(ROOT / "cluster" / "local.yaml").startswith("/")
    assert cluster_storage_path(ROOT / "cluster" / "kuberay.yaml").startswith("gs://")
    assert cluster_storage_path(ROOT / "tests" / "cluster_cases" / "wrong_type.yaml") is None
