"""Every cluster file we ship validates; every broken example is caught, with the file and key named.

A broken example in tests/cluster_cases/ states what it must produce in `# expect:` lines, one per problem:
each line must match a problem and there must be no others, so a new check that adds noise to an unrelated
case fails here too. Add a case by adding a file.
"""
import json
import shlex
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from distributed.cluster.common import NodeType
from distributed.cluster.files import (
    DRIVER_RESOURCE,
    ClusterFileError,
    check_cluster_files,
    cluster_storage_path,
    validate_cluster_file,
    validate_cluster_files,
)
from distributed.cluster.nodes import search_node_types
from distributed.config import ConfigError

CLUSTER_FILES = sorted((REPO / "cluster").glob("*.yaml"))
CASES = sorted((REPO / "tests" / "cluster_cases").glob("*.yaml"))


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


def head_settings(path: Path) -> tuple[dict, str | None, bool]:
    """(the head's custom resources, its dashboard host, token auth on for every `ray start`), read from the file
    here without the validator, so a validator gone soft cannot pass our own files."""
    doc = yaml.safe_load(path.read_text())
    if doc.get("kind") == "RayCluster":
        params = doc["spec"]["headGroupSpec"]["rayStartParams"]
        # KubeRay passes the value through a shell: JSON inside shell quotes.
        return (json.loads(shlex.split(params["resources"])[0]), params.get("dashboard-host"),
                doc["spec"].get("authOptions", {}).get("mode") == "token")
    start = [c for c in doc["head_start_ray_commands"] if "ray start" in c]
    flags = dict(t[2:].split("=", 1) for t in shlex.split(start[0]) if t.startswith("--") and "=" in t)
    resources = json.loads(flags["resources"]) if "resources" in flags else {}
    if "available_node_types" in doc:
        resources.update(doc["available_node_types"][doc["head_node_type"]].get("resources", {}))
    starts = start + [c for c in doc["worker_start_ray_commands"] if "ray start" in c]
    return resources, flags.get("dashboard-host"), all(c.replace("\n", " ").split("ray start")[0]
                                                      .rstrip().endswith("RAY_AUTH_MODE=token") for c in starts)


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_file_pins_drivers_to_the_head_keeps_the_dashboard_private_and_token_auth_on(path):
    resources, host, token_on = head_settings(path)
    assert resources.get(DRIVER_RESOURCE, 0) > 0, resources
    assert host == "127.0.0.1"
    assert token_on


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


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name)
def test_planning_from_a_broken_case_warns_with_its_problems_or_says_in_one_line_why_it_cannot(case):
    """Planning is not policy: `emotune tune --cluster` warns with each problem `cluster validate` finds and plans,
    unless it cannot read node types from the file (then one line and exit 2), never a crash."""
    try:
        types, notes = search_node_types(str(case), joining=True)
    except ConfigError as exc:
        assert str(exc).startswith(f"{case}: ") and "\n" not in str(exc), str(exc)
        return
    assert all(isinstance(t, NodeType) for t in types)
    assert notes == [f"warning: {problem}" for problem in validate_cluster_file(case)]


def test_validate_cluster_files_takes_a_directory():
    assert validate_cluster_files([REPO / "cluster"]) == []
    problems = validate_cluster_files([REPO / "tests" / "cluster_cases"])
    # every case in the directory is checked, and says what it says when checked alone
    assert sorted(problems) == sorted(p for case in CASES for p in validate_cluster_files([case]))
    assert {p.split(": ", 1)[0] for p in problems} == {str(case) for case in CASES}


def test_check_cluster_files_raises_one_line_per_problem():
    check_cluster_files(CLUSTER_FILES)  # fine: no error
    cases = [REPO / "tests" / "cluster_cases" / name for name in ("unknown_node_type.yaml", "wrong_type.yaml")]
    with pytest.raises(ClusterFileError) as info:
        check_cluster_files(cases)
    lines = str(info.value).splitlines()
    assert len(lines) == 2
    assert "unknown_node_type.yaml: Ray refuses it: `head_node_type` must be one of `available_node_types`" in lines[0]
    # The CLI turns ConfigError (a ValueError) into exit code 2; a bad cluster file is bad input like any other.
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)


def test_missing_file_is_a_problem_not_a_crash(tmp_path):
    problems = validate_cluster_file(tmp_path / "nope.yaml")
    assert len(problems) == 1 and "no such file" in problems[0]


def test_a_path_to_a_key_file_is_not_a_credential(tmp_path):
    text = (REPO / "cluster" / "local.yaml").read_text()
    assert "ssh_private_key: ~/.ssh/" in text  # the real file exercises this already; keep it honest
    path = tmp_path / "key_path.yaml"
    path.write_text(text.replace("ssh_private_key: ~/.ssh/id_ed25519", "ssh_private_key: /home/me/keys/emotune.pem"))
    assert validate_cluster_file(path) == []


def test_storage_path_is_read_from_both_kinds():
    assert cluster_storage_path(REPO / "cluster" / "aws-gpu.yaml").startswith("s3://")
    assert cluster_storage_path(REPO / "cluster" / "gcp-gpu.yaml").startswith("gs://")
    assert cluster_storage_path(REPO / "cluster" / "local.yaml").startswith("/")
    assert cluster_storage_path(REPO / "cluster" / "kuberay.yaml").startswith("gs://")
    assert cluster_storage_path(REPO / "tests" / "cluster_cases" / "wrong_type.yaml") is None
