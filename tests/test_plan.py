"""Trial planning (distributed/plan.py), on node dicts and node types: no Ray runs here.

Nodes are resource dicts as ray.nodes() reports them; node types are what an autoscaler may launch, read from the
shipped cluster files.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO, SPACES

from distributed import cli
from distributed.cluster.common import NodeType
from distributed.cluster.files import validate_cluster_file
from distributed.cluster.nodes import BOOTSTRAP_CONFIG, node_types, search_node_types, unknown_node_types_line
from distributed.config import DRIVER_RESOURCE, DRIVER_SLOTS, ConfigError, Scaling
from distributed.plan import NodeWait, plan_trials
from distributed.search_space import SpaceError, load_space

QUICK = SPACES / "quick.yaml"

HEAD = {DRIVER_RESOURCE: float(DRIVER_SLOTS)}              # a head that runs drivers only
CPU_NODE = {"CPU": 1.0}
GPU_NODE = {"CPU": 1.0, "GPU": 2.0}                        # a GPU node with 2 GPUs
CPU_HEAD = {"CPU": 2.0, DRIVER_RESOURCE: float(DRIVER_SLOTS)}
GPU_1X = NodeType("gpu_1x", {"CPU": 1.0, "GPU": 1.0}, 2)   # the fake autoscaler's worker type


def space_with(tmp_path: Path, num_samples: int = 8, worker_group: str | None = None, **scaling):
    """quick.yaml with other scaling (and worker_group), loaded."""
    doc = yaml.safe_load(QUICK.read_text())
    doc["scaling"] = {**doc["scaling"], **scaling, **({"worker_group": worker_group} if worker_group else {})}
    doc["num_samples"] = num_samples
    path = tmp_path / "quick.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_space(path)


# -- nodes that are up -------------------------------------------------------------------------------------------

def test_concurrency_is_planned_from_node_resources():
    space = load_space(QUICK)
    cpu_box = [{"CPU": 2.0, "GPU": 0.0, DRIVER_RESOURCE: 1000}]
    plan = plan_trials(space, cpu_box)
    assert (plan.concurrent, plan.in_process, plan.trial_resources) == (2, True, {"CPU": 1.0})
    space.scaling = Scaling(workers=2, cpus_per_worker=1)
    plan = plan_trials(space, cpu_box)
    assert (plan.concurrent, plan.in_process, plan.trial_resources) == (1, False, {"CPU": 0, DRIVER_RESOURCE: 0.001})
    # fractional GPUs: four 48x48 trials share each GPU; workers are placed per node
    space.scaling = Scaling(workers=1, cpus_per_worker=1, gpus_per_worker=0.25)
    gpu_nodes = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 4.0}]
    assert plan_trials(space, gpu_nodes).concurrent == 4 + 2
    space.scaling = Scaling(workers=1, cpus_per_worker=1, gpus_per_worker=8)
    with pytest.raises(SpaceError, match="no node has that much"):
        plan_trials(space, gpu_nodes)
    space.scaling = Scaling(workers=3, cpus_per_worker=1)
    with pytest.raises(SpaceError, match="needs 3 workers"):
        plan_trials(space, cpu_box)


@pytest.mark.parametrize("cpus, gpus, expected", [
    (0.5, 1, 2),     # GPU node: min(1 CPU / 0.5, 2 GPU / 1) = 2 workers; the CPU node holds no GPU worker
    (0.5, 0.5, 2),   # min(2, 4): the CPU is the limit
    (0.25, 0.5, 4),  # min(4, 4)
    (1, 2, 1),       # one worker takes the whole node
])
def test_plan_counts_gpus_per_node(tmp_path, cpus, gpus, expected):
    space = space_with(tmp_path, cpus_per_worker=cpus, gpus_per_worker=gpus)
    assert plan_trials(space, [HEAD, CPU_NODE, GPU_NODE]).concurrent == expected


def test_multi_node_trials_use_worker_groups_with_drivers_pinned_to_the_head(tmp_path):
    space = space_with(tmp_path)
    plan = plan_trials(space, [HEAD, CPU_NODE, GPU_NODE])
    assert not plan.in_process and plan.driver_pinned
    assert plan.trial_resources == {"CPU": 0, DRIVER_RESOURCE: 0.001}  # the driver holds no CPU a worker needs
    assert plan.concurrent == 2
    # One machine: a one-worker trial trains inside its own trial process.
    single = plan_trials(space, [{"CPU": 2.0, DRIVER_RESOURCE: float(DRIVER_SLOTS)}])
    assert single.in_process and single.trial_resources == {"CPU": 1.0}


@pytest.mark.parametrize("worker_group, nodes, in_process", [
    ("never", [HEAD, CPU_NODE, GPU_NODE], True),   # never: in the trial process even on several nodes
    ("always", [CPU_HEAD], False),                 # always: a worker group even on one machine
    ("auto", [CPU_HEAD], True),
    ("auto", [HEAD, CPU_NODE], False),
])
def test_worker_group_setting_decides_where_the_loop_runs(tmp_path, worker_group, nodes, in_process):
    plan = plan_trials(space_with(tmp_path, worker_group=worker_group), nodes)
    assert plan.in_process == in_process
    # An in-process trial holds its worker's resources itself; a worker-group trial's driver holds none of them.
    assert plan.trial_resources == ({"CPU": 1.0} if in_process else {"CPU": 0, DRIVER_RESOURCE: 0.001})


@pytest.mark.parametrize("scaling, message", [
    ({"gpus_per_worker": 3}, "no node has that much (largest: 1 CPU, 2 GPU)"),
    ({"cpus_per_worker": 2}, "no node has that much"),
    ({"workers": 3}, "the cluster holds only 2"),
], ids=["gpus", "cpus", "workers"])
def test_a_trial_bigger_than_the_cluster_is_refused(tmp_path, scaling, message):
    with pytest.raises(SpaceError, match="scaling") as err:
        plan_trials(space_with(tmp_path, **scaling), [HEAD, CPU_NODE, GPU_NODE])
    assert message in str(err.value)


# -- node types an autoscaler may launch -------------------------------------------------------------------------

def test_a_gpu_search_on_a_cluster_with_no_gpu_node_up_plans_against_the_node_types(tmp_path):
    space = space_with(tmp_path, cpus_per_worker=1, gpus_per_worker=1)
    with pytest.raises(SpaceError, match="no node has that much"):
        plan_trials(space, [CPU_HEAD])  # what happened before: only the nodes up counted
    plan = plan_trials(space, [CPU_HEAD], [GPU_1X])
    assert plan.concurrent == 2 and plan.launched == [GPU_1X]
    assert not plan.in_process and plan.trial_resources == {"CPU": 0, DRIVER_RESOURCE: 0.001}


def test_nodes_up_of_a_type_count_once(tmp_path):
    space = space_with(tmp_path, cpus_per_worker=1, gpus_per_worker=1)
    # One gpu_1x node is up: it holds one trial, and the autoscaler may add one more, not two.
    assert plan_trials(space, [CPU_HEAD, {"CPU": 1.0, "GPU": 1.0}], [GPU_1X]).concurrent == 2
    # All up: nothing left to launch.
    both = plan_trials(space, [CPU_HEAD, {"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}], [GPU_1X])
    assert both.concurrent == 2 and both.launched == []


def test_num_samples_and_workers_bound_concurrency_on_node_types(tmp_path):
    big = NodeType("gpu_4x", {"CPU": 16.0, "GPU": 4.0}, 3)
    assert plan_trials(space_with(tmp_path, num_samples=5, gpus_per_worker=1), [CPU_HEAD], [big]).concurrent == 5
    # 2-worker trials of 1 GPU each: 3 nodes x 4 GPUs = 12 workers = 6 trials
    plan = plan_trials(space_with(tmp_path, num_samples=20, workers=2, gpus_per_worker=1), [CPU_HEAD], [big])
    assert plan.concurrent == 6


def test_a_request_no_node_type_could_hold_is_refused_naming_the_largest(tmp_path):
    space = space_with(tmp_path, gpus_per_worker=2)
    types = [GPU_1X, NodeType("cpu_8", {"CPU": 8.0}, 4)]
    with pytest.raises(SpaceError) as err:
        plan_trials(space, [CPU_HEAD], types)
    assert "no node or node type has that much (largest node type: gpu_1x with 1 CPU, 1 GPU)" in str(err.value)
    assert "lower cpus_per_worker/gpus_per_worker" in str(err.value)  # the fix


@pytest.mark.parametrize("name, expected", [
    ("aws-gpu.yaml", [NodeType("gpu_1x", {"CPU": 4.0, "GPU": 1.0}, 8), NodeType("gpu_4x", {"CPU": 48.0, "GPU": 4.0}, 2)]),
    ("kuberay.yaml", [NodeType("gpu-1x", {"CPU": 8.0, "GPU": 1.0}, 8)]),
    ("local.yaml", []),  # on-prem: every machine is up already
])
def test_node_types_are_read_from_the_shipped_cluster_files(name, expected):
    assert node_types(REPO / "cluster" / name) == expected


def test_gcp_node_types_carry_their_gpu():
    found = node_types(REPO / "cluster" / "gcp-gpu.yaml")
    assert found and all(t.resources.get("GPU", 0) >= 1 and t.max_workers > 0 for t in found), found


# -- where node types come from ------------------------------------------------------------------------------------

AWS_TYPES = node_types(REPO / "cluster" / "aws-gpu.yaml")


def test_node_types_are_read_from_the_bootstrap_config_on_a_launcher_head(tmp_path, monkeypatch):
    """`ray up` leaves the cluster config on the head as ~/ray_bootstrap_config.yaml, where a job's entrypoint runs:
    a search that joins the cluster without --cluster plans from it."""
    bootstrap = tmp_path / "ray_bootstrap_config.yaml"
    bootstrap.write_text((REPO / "cluster" / "aws-gpu.yaml").read_text())
    monkeypatch.setenv(BOOTSTRAP_CONFIG, str(bootstrap))
    assert search_node_types(None, joining=True) == (AWS_TYPES, [])
    assert search_node_types(None, joining=False) == ([], [])  # a Ray started here has no autoscaler
    # --cluster FILE wins over the bootstrap config.
    assert search_node_types(str(REPO / "cluster" / "kuberay.yaml"), joining=True)[0] == \
        [NodeType("gpu-1x", {"CPU": 8.0, "GPU": 1.0}, 8)]
    # One the search cannot read is not counted, said in one line, and the search runs.
    doc = yaml.safe_load(bootstrap.read_text())
    del doc["available_node_types"]["gpu_1x"]["resources"]["CPU"]
    bootstrap.write_text(yaml.safe_dump(doc))
    types, notes = search_node_types(None, joining=True)
    assert types is None and len(notes) == 1 and "no CPU count" in notes[0] and "not counted" in notes[0]
    monkeypatch.setenv(BOOTSTRAP_CONFIG, str(tmp_path / "none.yaml"))  # not a launcher head
    assert search_node_types(None, joining=True) == (None, [])


def test_a_cluster_file_without_the_driver_resource_plans_with_warnings_while_validate_refuses_it(tmp_path, capsys):
    """Planning is not policy: --cluster reads the node types, and each of the file's problems is one warning line;
    `emotune cluster validate` still refuses the file. Drivers are then not pinned to the head."""
    case = tmp_path / "no_driver.yaml"
    doc = yaml.safe_load((REPO / "cluster" / "aws-gpu.yaml").read_text())
    del doc["available_node_types"][doc["head_node_type"]]["resources"][DRIVER_RESOURCE]
    case.write_text(yaml.safe_dump(doc, sort_keys=False))
    problems = validate_cluster_file(case)
    assert len(problems) == 1 and f"the head offers no {DRIVER_RESOURCE} resource" in problems[0]

    types, notes = search_node_types(str(case), joining=True)
    assert types == AWS_TYPES and notes == [f"warning: {problems[0]}"]
    plan = plan_trials(space_with(tmp_path, gpus_per_worker=1), [{"CPU": 8.0}], types)  # the head: no driver resource
    assert plan.concurrent == 8 and not plan.driver_pinned and plan.trial_resources == {"CPU": 0}

    assert cli.main(["cluster", "validate", str(case)]) == 2
    assert capsys.readouterr().err.strip() == problems[0]
    with pytest.raises(ConfigError, match="give its --address too"):
        search_node_types(str(case), joining=False)


def test_with_no_node_type_source_a_joined_cluster_plans_from_what_is_up_and_waits(tmp_path, capsys, monkeypatch):
    """A GPU search on a cluster joined without a cluster config (an autoscaler may run, nothing names its node
    types) is not refused: one trial at a time waits for a node, said in one line, under --wait-timeout."""
    space = space_with(tmp_path, cpus_per_worker=1, gpus_per_worker=1)
    with pytest.raises(SpaceError, match="no node has that much"):
        plan_trials(space, [CPU_HEAD], [])  # known to launch nothing (a Ray started here, an on-prem cluster)
    plan = plan_trials(space, [CPU_HEAD], None)
    assert (plan.concurrent, plan.waits, plan.in_process, plan.launched) == (1, True, False, [])
    assert plan.trial_resources == {"CPU": 0, DRIVER_RESOURCE: 0.001}  # a worker group; the driver on the head
    # Where the nodes up hold the trials, nothing changes.
    assert plan_trials(space, [CPU_HEAD, GPU_NODE], None) == plan_trials(space, [CPU_HEAD, GPU_NODE], [])
    assert not plan_trials(space, [CPU_HEAD, GPU_NODE], None).waits

    line = unknown_node_types_line(20)
    assert "\n" not in line and "planning from the nodes up, 1 trial at a time" in line
    assert "waiting up to 20 min (--wait-timeout)" in line and "--cluster FILE" in line
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")  # in a KubeRay pod: only --cluster names them
    assert "on KubeRay, give --cluster with the RayCluster manifest" in unknown_node_types_line(20)

    clock = Clock()
    wait = NodeWait(space, [], timeout_s=1200, nodes=lambda: [CPU_HEAD], clock=clock)
    assert not wait.check()
    assert capsys.readouterr().out.strip() == "emotune: waiting for a node that holds one worker (1 CPU and 1 GPU), 0 min"
    clock.now = 1201
    assert wait.check() and "--wait-timeout" in wait.gave_up


# -- waiting for nodes -------------------------------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_waiting_for_nodes_is_said_every_30_s_and_given_up_after_the_timeout(tmp_path, capsys):
    space = space_with(tmp_path, cpus_per_worker=1, gpus_per_worker=1)
    clock, up = Clock(), [CPU_HEAD]
    wait = NodeWait(space, [GPU_1X], timeout_s=600, nodes=lambda: up, clock=clock)
    said = []
    for t in range(0, 240, 5):  # Tune calls check() many times a second; it looks every few seconds
        clock.now = t
        assert not wait.check()
        said += capsys.readouterr().out.splitlines()
    assert said == [f"emotune: waiting for 1 GPU node (type gpu_1x): 0 of 2 up, {m} min" for m in (0, 0, 1, 1, 2, 2, 3, 3)]

    up.append({"CPU": 1.0, "GPU": 1.0})  # the autoscaler delivered: quiet, and the clock starts again
    clock.now = 300
    assert not wait.check() and capsys.readouterr().out == ""
    up.pop()
    clock.now = 400
    assert not wait.check()
    assert capsys.readouterr().out.strip() == "emotune: waiting for 1 GPU node (type gpu_1x): 0 of 2 up, 0 min"
    clock.now = 1001
    assert wait.check() and wait.gave_up.startswith("gave up waiting for 1 GPU node (type gpu_1x): 0 of 2 up, 10 min")
    assert "--wait-timeout" in wait.gave_up  # the fix


def test_a_two_worker_trial_waits_for_two_nodes_and_counts_those_up(tmp_path, capsys):
    space = space_with(tmp_path, workers=2, cpus_per_worker=1, gpus_per_worker=1)
    wait = NodeWait(space, [GPU_1X], timeout_s=600, nodes=lambda: [CPU_HEAD, {"CPU": 1.0, "GPU": 1.0}],
                    clock=Clock())
    assert not wait.check()
    assert capsys.readouterr().out.strip() == "emotune: waiting for 2 GPU nodes (type gpu_1x): 1 of 2 up, 0 min"
