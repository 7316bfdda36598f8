"""`emotune cluster validate` and `submit`, and the README's `ray job submit` / `ray job list` / `ray job logs`, on a
real cluster.

The cluster is two `ray start --block` processes on this machine (a head with 1 CPU and the driver resource, and a
worker node with 2 CPUs), with Ray's token auth on and a token of its own, and an S3 bucket (moto's server on
127.0.0.1) whose endpoint and keys are in the nodes' environment, as a cloud node has them from its instance.
Everything Ray-side runs in those processes and in the `emotune`/`ray` commands the tests run, never in the pytest
process. Teardown stops exactly what the fixture started: the two `ray start` processes (which stop their nodes),
then any process left from their process trees or naming the fixture's private temp directory.
"""
from __future__ import annotations

import csv
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import REPO, free_port, remove
from ray_procs import start_node, stop, wait_for_dashboard

from distributed import cli
from distributed.cluster.jobs import JOB_EXCLUDES, REPO_ROOT
from distributed.config import DRIVER_RESOURCE

BIN = Path(sys.executable).parent  # the virtualenv's bin: `ray`, and the `python` a job's entrypoint runs
QUICK = "search_spaces/quick.yaml"  # relative: the commands below run in the repository
JOB_TIMEOUT = 540  # seconds for one small search; the machine is shared and may be busy


# -- no cluster needed: everything wrong is refused before anything is contacted ------------------------------

def test_validate_prints_ok_for_good_files_and_exits_2_on_a_problem(capsys):
    assert cli.main(["cluster", "validate", str(REPO / "cluster")]) == 0
    out = capsys.readouterr().out
    assert f"{REPO}/cluster/local.yaml: ok" in out and f"{REPO}/cluster/kuberay.yaml: ok" in out

    case = REPO / "tests" / "cluster_cases" / "spot_head.yaml"
    assert cli.main(["cluster", "validate", str(REPO / "cluster" / "local.yaml"), str(case)]) == 2
    captured = capsys.readouterr()
    assert f"{REPO}/cluster/local.yaml: ok" in captured.out
    assert captured.err.startswith(f"{case}: ") and "spot" in captured.err


# An address nothing listens on: these must fail on the input, never on the connection.
NOBODY = "http://127.0.0.1:1"


@pytest.mark.parametrize("argv, message", [
    ([QUICK, "--set", "epochz=1", "--storage-path", "/tmp/x"], "unknown key 'epochz'"),
    ([QUICK, "--storage-path", "results"], "give an absolute path or a URI"),
    ([QUICK], "needs --storage-path"),
    ([QUICK, "--storage-path", "/tmp/x", "--num-samples", "0"], "--num-samples must be >= 1"),
    (["tests/cluster_cases/empty.yaml", "--storage-path", "/tmp/x"], "empty"),
    (["no_such_space", "--storage-path", "/tmp/x"], "nor a space shipped with emotune"),
], ids=["bad-set", "relative-storage", "no-storage", "zero-samples", "bad-space", "unknown-name"])
def test_submit_refuses_bad_input_before_contacting_the_cluster(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert cli.main(["submit", "--address", NOBODY, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and NOBODY not in err
    assert len(err.strip().splitlines()) == 1


def test_submit_needs_the_space_inside_the_uploaded_checkout(tmp_path, capsys):
    outside = tmp_path / "quick.yaml"
    shutil.copyfile(REPO / QUICK, outside)
    assert cli.main(["submit", "--address", NOBODY, str(outside), "--storage-path", "/tmp/x"]) == 2
    assert "must be inside it" in capsys.readouterr().err


def test_submit_wants_the_dashboard_address_not_the_gcs_one(capsys):
    assert cli.main(["submit", "--address", "127.0.0.1:6379", str(REPO / QUICK), "--storage-path", "/tmp/x"]) == 2
    assert "http://HOST:8265" in capsys.readouterr().err


def test_unreachable_cluster_is_one_line_exit_2(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert cli.main(["submit", "--address", NOBODY, QUICK, "--storage-path", "/tmp/x"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the Ray dashboard" in err and len(err.strip().splitlines()) == 1


def test_job_working_dir_leaves_out_results_data_and_the_virtualenv(tmp_path):
    # What Ray itself would upload: its own packaging code zips a checkout-shaped tree with our excludes.
    from ray._private.runtime_env.packaging import create_package

    assert REPO_ROOT == REPO
    tree = tmp_path / "checkout"
    kept = ["distributed/tune.py", "search_spaces/quick.yaml", "pyproject.toml", "cluster/aws-gpu.yaml"]
    dropped = ["results/quick/emotune.json", "runs/train/best_model.pt", "data/fer2013/train.parquet",
               ".venv/bin/python", ".git/HEAD", "distributed/__pycache__/tune.cpython-311.pyc", "model.pth",
               "ckpt/epoch.ckpt", "emotune.egg-info/PKG-INFO", "build/lib/x.py"]
    for name in kept + dropped:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text("x")
    create_package(str(tree), tmp_path / "job.zip", include_gitignore=False, excludes=JOB_EXCLUDES)
    with zipfile.ZipFile(tmp_path / "job.zip") as z:
        uploaded = {n for n in z.namelist() if not n.endswith("/")}
    assert uploaded == set(kept), uploaded


# -- a real two-node cluster -------------------------------------------------------------------------------------

@dataclass
class RayCluster:
    dashboard: str       # http://127.0.0.1:PORT, what `emotune submit --address` takes
    env: dict            # environment of a client: token auth on, the cluster's token
    root: Path           # private temp directory: Ray's files, logs, and results



BUCKET = "emo-jobs"


@pytest.fixture(scope="module")
def bucket():
    """A local S3 server with one bucket -> the variables that reach it (no IAM: any key is accepted)."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "jobs", "AWS_SECRET_ACCESS_KEY": "jobs",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1", aws_access_key_id="jobs",
                 aws_secret_access_key="jobs").create_bucket(Bucket=BUCKET)
    try:
        yield env
    finally:
        server.stop()


@pytest.fixture(scope="module")
def ray_cluster(bucket):
    # Short and private: Ray's socket paths live under it (a Unix socket path is limited to 107 bytes), and with
    # RAY_TMPDIR pointing here, Ray processes that look for "the local cluster" find this one, not another
    # engineer's in /tmp/ray.
    root = Path(tempfile.mkdtemp(prefix="emotune-", dir="/tmp"))
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes, in a file of our own
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
               RAY_TMPDIR=str(root), RAY_USAGE_STATS_ENABLED="0", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
               # Ray Train gives a worker group 60 s to start; importing torch on a busy 2-core box can take longer.
               RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="300", **bucket)
    gcs, dashboard = free_port(), free_port()
    procs = []
    try:
        # Every port is picked here: Ray's defaults (6379, 8265, 10001, 52365) may belong to another cluster on
        # this machine. Each node gets its own temp dir: nodes sharing one would share the job's unpacked
        # working_dir, and a node that unpacks it again deletes it from under the running job.
        procs.append(start_node(
            ["--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
             f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
             "--num-cpus=1", f'--resources={{"{DRIVER_RESOURCE}": 1000}}', f"--temp-dir={root}/ray"],
            root / "head.log", env))
        procs.append(start_node(
            [f"--address=127.0.0.1:{gcs}", f"--dashboard-agent-listen-port={free_port()}", "--num-cpus=2",
             f"--temp-dir={root}/worker"], root / "worker.log", env))
        url = f"http://127.0.0.1:{dashboard}"
        wait_for_dashboard(url)
        yield RayCluster(url, env, root)
    finally:
        stop(procs, root)
        remove(root)


def run(argv: list[str], env: dict, timeout: float = JOB_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def emotune(*args: str, env: dict, timeout: float = JOB_TIMEOUT) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "distributed", *args], env, timeout)


def assert_search_results(board: str, best_config: str, trials: int) -> None:
    """leaderboard.csv and best_config.yaml of a finished search (their text, from a disk or a bucket)."""
    statuses = [row["status"] for row in csv.DictReader(board.splitlines())]
    # Every trial ran to its end (1 epoch); none errored or diverged (the space's first points are its recipes).
    assert statuses == ["completed"] * trials, statuses
    best = yaml.safe_load(best_config)
    assert best["model"] == "small_cnn" and best["epochs"] == 1


@pytest.mark.slow
def test_submit_runs_a_search_as_a_job_and_results_land_in_the_bucket(ray_cluster, bucket):
    """`emotune submit ... --storage-path s3://...`: the job (on the head, with the node's S3 settings) writes the
    leaderboard, best config and study to the bucket, where `emotune best` on this machine reads them; the job's
    output is followed while it runs, and Ray's own CLI lists it and prints its logs afterwards."""
    import boto3

    # a shipped space by name, as `emotune tune quick` takes it: the job resolves the name on the cluster
    r = emotune("submit", "--address", ray_cluster.dashboard, "quick", "--num-samples", "2", "--set", "epochs=1",
                "--set", "train_limit=200", "--set", "final.top_k=0", "--storage-path", f"s3://{BUCKET}/jobs",
                env=ray_cluster.env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "emotune: submitted job raysubmit_" in out
    assert "SUCCEEDED" in out
    assert "best_config" in out  # the job's own summary, streamed back while following

    s3 = boto3.client("s3", endpoint_url=bucket["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id="jobs", aws_secret_access_key="jobs")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="jobs/quick/")["Contents"]}
    for name in ("emotune.json", "leaderboard.parquet", "leaderboard.csv", "best_config.yaml", "optuna.journal"):
        assert f"jobs/quick/{name}" in keys, (name, sorted(keys)[:40])

    def text(name: str) -> str:
        return s3.get_object(Bucket=BUCKET, Key=f"jobs/quick/{name}")["Body"].read().decode()

    assert_search_results(text("leaderboard.csv"), text("best_config.yaml"), trials=2)
    best = emotune("best", f"s3://{BUCKET}/jobs/quick", "--top", "2", env=ray_cluster.env, timeout=180)
    assert best.returncode == 0 and "top 2 of 2 trials by val_acc" in best.stdout, best.stderr[-2000:]

    # The README sends people to Ray's own CLI for everything after submitting.
    job = next(w for w in out.split() if w.startswith("raysubmit_")).rstrip(":")
    listed = run([str(BIN / "ray"), "job", "list", "--address", ray_cluster.dashboard], ray_cluster.env, 120)
    assert listed.returncode == 0 and job in listed.stdout and "SUCCEEDED" in listed.stdout, listed.stderr[-2000:]
    logs = run([str(BIN / "ray"), "job", "logs", job, "--address", ray_cluster.dashboard], ray_cluster.env, 120)
    assert logs.returncode == 0 and "leaderboard" in logs.stdout, logs.stderr[-2000:]


@pytest.mark.slow
def test_ray_job_submit_as_the_readme_shows(ray_cluster):
    """The README's `ray job submit --working-dir . -- python -m distributed ...`: the checkout is uploaded and the
    entrypoint runs from it on the cluster. (A whole search submitted this way, with no emotune flag for the
    cluster, is tests/test_cluster_autoscaling.py's; here the entrypoint checks every shipped space.)"""
    r = run([str(BIN / "ray"), "job", "submit", "--address", ray_cluster.dashboard, "--working-dir", ".", "--",
             "python", "-m", "distributed", "check-space", "quick", "fer2013", "multi_arch"], ray_cluster.env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "succeeded" in out
    for name in ("quick", "fer2013", "multi_arch"):
        assert f"{name}: ok (" in out, out[-6000:]


@pytest.mark.slow
def test_token_auth_is_on_and_a_client_without_the_token_is_refused(ray_cluster):
    submit = ["submit", "--address", ray_cluster.dashboard, QUICK, "--storage-path", "/tmp/never", "--no-wait"]
    no_mode = {k: v for k, v in ray_cluster.env.items() if k != "RAY_AUTH_MODE"}
    r = emotune(*submit, env=no_mode, timeout=120)
    assert r.returncode == 2 and "set RAY_AUTH_MODE=token" in r.stderr, r.stderr[-2000:]

    wrong = ray_cluster.root / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    r = emotune(*submit, env={**ray_cluster.env, "RAY_AUTH_TOKEN_PATH": str(wrong)}, timeout=120)
    assert r.returncode == 2 and "is not the cluster's" in r.stderr, r.stderr[-2000:]
    listed = run([str(BIN / "ray"), "job", "list", "--address", ray_cluster.dashboard], ray_cluster.env, 120)
    assert "/tmp/never" not in listed.stdout  # neither refused client submitted anything
