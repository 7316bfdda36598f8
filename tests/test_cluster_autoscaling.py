"""A GPU search on an autoscaling cluster that starts with no GPU node: Ray's own fake multi-node autoscaler.

The head is a `ray start --head --autoscaling-config=FILE` process with RAY_FAKE_CLUSTER=1: its autoscaler (Ray's
fake multi-node provider, through a subclass named as an external provider module) "launches" a worker node by
starting a Ray node on this machine, LAUNCH_DELAY_S after it was asked, as a cloud GPU node takes minutes to boot.
The head has {CPU: 2, emotune_driver}; the one worker type has {CPU: 1, GPU: 1} (logical GPUs), min 0, max 2, as
the shipped cloud files have. `ray job submit -- python -m distributed tune SPACE`, with no emotune flag for the
cluster, must read the node types where `ray up` leaves them on a head (~/ray_bootstrap_config.yaml; here the test's
file, named to the head's processes by EMOTUNE_BOOTSTRAP_CONFIG), plan two trials
at a time against what the autoscaler may launch, wait past Ray Train's 60 s worker-group start timeout saying so
in its own lines only, and the autoscaler must then launch the nodes.

Ray 2.60's wheel lacks the fake_multi_node/example.yaml that ray.cluster_utils.AutoscalingCluster reads, its
start() runs `ray stop --force` (which would stop every Ray on this shared machine) and it passes custom head
resources with literal quotes; so the config is built here (from that example's keys) and the head started here.
"""
from __future__ import annotations

import csv
import json
import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import free_port, remove
from ray_procs import BIN, REPO, start_node, stop, wait_for_dashboard

from distributed import cli
from distributed.cluster.files import validate_cluster_file
from distributed.cluster.nodes import BOOTSTRAP_CONFIG
from distributed.config import DRIVER_RESOURCE

QUICK = REPO / "search_spaces" / "quick.yaml"
SEARCH_TIMEOUT = 900  # seconds: the autoscaler starts two Ray nodes on a busy 2-core machine
GPU_TYPE = {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2}
LAUNCH_DELAY_S = 62  # past Ray Train's default worker-group start timeout (60 s), and no more: CI time is dear

# Ray's fake provider with nodes that boot slowly (the monitor on the head imports it from PYTHONPATH).
SLOW_PROVIDER = f"""
import time

from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider


class SlowFakeProvider(FakeMultiNodeProvider):
    def create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        time.sleep({LAUNCH_DELAY_S})  # in the autoscaler's launcher thread, outside the provider's lock
        return super().create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
"""


def fake_cluster_config(gcs_port: int) -> dict:
    """The keys of Ray's fake_multi_node/example.yaml, with our head and worker type."""
    return {
        "cluster_name": "emotune-fake", "max_workers": 2, "upscaling_speed": 1.0,
        # Long enough that no node is taken down (and relaunched) between the two trials and the count below.
        "idle_timeout_minutes": 10,
        # launch_multiple: both nodes of one request boot at once (one delay, not one per node)
        "provider": {"type": "external", "module": "emotune_slow_provider.SlowFakeProvider", "launch_multiple": True,
                     "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{gcs_port}"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2, DRIVER_RESOURCE: 1000}, "node_config": {}, "max_workers": 0},
            "gpu_1x": GPU_TYPE,
        },
        "head_node_type": "ray.head.default", "auth": {}, "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }


@pytest.fixture(scope="module")
def autoscaling_cluster():
    root = Path(tempfile.mkdtemp(prefix="emotune-", dir="/tmp"))
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    gcs, dashboard = free_port(), free_port()
    config = root / "fake-cluster.yaml"
    config.write_text(yaml.safe_dump(fake_cluster_config(gcs), sort_keys=False))
    (root / "emotune_slow_provider.py").write_text(SLOW_PROVIDER)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")}
    env.pop("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", None)  # emotune sets it from --wait-timeout
    env.update(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
               RAY_TMPDIR=str(root), RAY_USAGE_STATS_ENABLED="0", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
               # The fake provider and a fast autoscaler loop (what AutoscalingCluster.start sets).
               RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1",
               # The nodes the autoscaler starts pick their address like a laptop: loopback only.
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               # The GPUs are logical: trials that reserved one train on the CPU and say so.
               EMOTUNE_LOGICAL_GPUS="1")
    # On the head (where a job's entrypoint runs), the cluster config where `ray up` leaves it for the head's own
    # autoscaler: ~/ray_bootstrap_config.yaml, here the test's file (the head's processes, jobs included, see it).
    head_env = {**env, BOOTSTRAP_CONFIG: str(config)}
    procs = []
    try:
        procs.append(start_node(
            ["--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", f"--autoscaling-config={config}",
             "--num-cpus=2", f'--resources={{"{DRIVER_RESOURCE}": 1000}}', "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={root}/ray"], root / "head.log", head_env))
        wait_for_dashboard(f"http://127.0.0.1:{dashboard}")
        yield f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", config, env, root
    finally:
        stop(procs, root)
        remove(root)


def nodes_ever(address: str, env: dict) -> list[dict]:
    """Every node the cluster has had (alive or not), from ray.nodes() in a fresh process."""
    code = ("import json, ray\n"
            f"ray.init(address={address!r}, logging_level='ERROR')\n"
            "print(json.dumps([{'alive': n['Alive'], 'resources': n['Resources']} for n in ray.nodes()]))")
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=180, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_gpu_search_scales_the_cluster_up_from_no_gpu_node(autoscaling_cluster, tmp_path):
    address, dashboard, config, env, root = autoscaling_cluster
    # The file the autoscaler runs is a valid cluster file for emotune too.
    assert validate_cluster_file(config) == []
    assert [n for n in nodes_ever(address, env) if n["resources"].get("GPU")] == []  # no GPU node before the search

    doc = yaml.safe_load(QUICK.read_text())
    doc.update(num_samples=2, scaling={"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 1}, final={"top_k": 0})
    space = root / "quick-gpu.yaml"  # (on this machine: the job's entrypoint runs on the head, which is here)
    space.write_text(yaml.safe_dump(doc, sort_keys=False))
    storage = root / "results"
    # The ordinary Ray way, no emotune flag for the cluster: Ray's own `ray job submit -- emotune tune SPACE`, the
    # entrypoint on the head (emotune installed there, as on the nodes of a `ray up` cluster), where the node types
    # come from the cluster config `ray up` leaves (no --cluster, no --address). (No --working-dir: the fake nodes
    # share the head's temp folder, and a node unpacking a job's working_dir deletes it under the running job.)
    r = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", dashboard, "--", "emotune", "tune",
                        str(space), "--set", "epochs=1", "--set", "train_limit=200", "--storage-path", str(storage)],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=SEARCH_TIMEOUT, check=False)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "succeeded" in out, out[-8000:]
    # Planned against the two GPU nodes the autoscaler may launch, though none was up.
    assert "2 trials of quick, 2 at a time, 1-worker Ray Train trials" in out, out[-8000:]
    assert "counting nodes the autoscaler may launch: gpu_1x (up to 2)" in out
    # Waiting past a minute is emotune's lines, and nothing from Ray: no traceback of its retries or timeouts.
    for minute in (0, 1):
        assert f"emotune: waiting for 1 GPU node (type gpu_1x): 0 of 2 up, {minute} min" in out, out[-8000:]
    for noise in ("Traceback", "GetTimeoutError", "Error in control loop"):
        assert noise not in out, out[-8000:]
    # Ray Train waited as long as --wait-timeout says, not its own 60 s (its controller's log keeps every error).
    logs = list(root.glob("ray/session_*/logs/train/ray-train-sys-controller-*.log"))
    assert logs and not any("WorkerGroupStartupTimeoutError" in log.read_text() for log in logs), logs
    assert "reserved 1 logical GPU and trains on the CPU (EMOTUNE_LOGICAL_GPUS=1)" in out  # never in silence

    launched = [n for n in nodes_ever(address, env) if n["resources"].get("GPU")]
    assert len(launched) == 2, launched  # one per trial running at once: the autoscaler scaled up for both
    assert all(n["resources"]["GPU"] == 1 and n["resources"]["CPU"] == 1 for n in launched)
    with open(storage / "quick" / "leaderboard.csv", newline="") as f:
        statuses = [row["status"] for row in csv.DictReader(f)]
    # Both trials ran to their end (1 epoch); none errored. (A NaN loss would read "diverged": a finished run too.)
    errors = [f.read_text()[-3000:] for f in (storage / "quick").glob("*/error.txt")]
    assert len(statuses) == 2 and set(statuses) <= {"completed", "diverged"}, (statuses, errors, out[-4000:])


def test_an_unreachable_cluster_address_is_one_line_exit_2_before_trials(tmp_path, capsys):
    storage = tmp_path / "results"
    assert cli.main(["tune", str(QUICK), "--address", f"127.0.0.1:{free_port()}", "--storage-path",
                     str(storage)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no Ray cluster answers there" in err, err
    assert "HOST:6379" in err  # the fix
    assert not (storage / "quick" / "emotune.json").exists()


def test_cluster_file_needs_an_address(tmp_path, capsys):
    assert cli.main(["tune", str(QUICK), "--cluster", str(REPO / "cluster" / "aws-gpu.yaml"), "--storage-path",
                     str(tmp_path)]) == 2
    assert "give its --address too" in capsys.readouterr().err
