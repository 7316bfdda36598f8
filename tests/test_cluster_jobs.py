"""`emotune cluster validate`, `submit`, `jobs` and `logs`, and the README's `ray job submit`, on a real cluster.

The cluster is two `ray start --block` processes on this machine (a head with 1 CPU and the driver resource, and a
worker node with 2 CPUs), with Ray's token auth on and a token of its own. Everything Ray-side runs in those
processes and in the `emotune`/`ray` commands the tests run, never in the pytest process. Teardown stops exactly
what the fixture started: the two `ray start` processes (which stop their nodes), then any process left from their
process trees or naming the fixture's private temp directory.
"""
from __future__ import annotations

import csv
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import free_port, remove
from distributed import cli
from distributed.cluster import JOB_EXCLUDES, REPO_ROOT
from distributed.config import DRIVER_RESOURCE

REPO = Path(__file__).resolve().parents[1]
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
], ids=["bad-set", "relative-storage", "no-storage", "zero-samples", "bad-space"])
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


def test_unreachable_cluster_is_one_line_exit_2(capsys):
    assert cli.main(["jobs", "--address", NOBODY]) == 2
    assert "cannot reach the Ray dashboard" in capsys.readouterr().err


def test_job_working_dir_leaves_out_results_data_and_the_virtualenv():
    assert REPO_ROOT == REPO
    for pattern in ("/results/", "/runs/", "/data/", "/.venv/", "/.git/", "*.pt"):
        assert pattern in JOB_EXCLUDES


# -- a real two-node cluster -------------------------------------------------------------------------------------

@dataclass
class RayCluster:
    dashboard: str       # http://127.0.0.1:PORT, what `emotune submit --address` takes
    env: dict            # environment of a client: token auth on, the cluster's token
    root: Path           # private temp directory: Ray's files, logs, and results



def start_node(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    """`ray start --block ARGS`, returned once the node is up. --block keeps the process (our handle on the node)
    in the foreground; SIGTERM to it stops the node's processes."""
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--block", *args], env=env, cwd=REPO,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while "Ray runtime started" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop([proc], None)
            pytest.fail(f"ray start {' '.join(args)} did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    return proc


def wait_for_dashboard(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=5)
            return
        except urllib.error.HTTPError:
            return  # it answers (401 without a token): it is up
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"the dashboard at {url} did not come up in {timeout:.0f}s")
            time.sleep(1)


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process on this machine, from /proc (none without /proc: then
    the `ray start` processes alone clean up)."""
    found = {}
    for d in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                found[int(d.name)] = (ppid, (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except (OSError, IndexError, ValueError):
                pass  # it ended while we looked
    return found


def stop(procs: list[subprocess.Popen], root: Path | None) -> None:
    """Stop what we started and nothing else: our `ray start` processes (each stops its node), then whatever is left
    of their process trees, or names our private temp directory (Ray workers and job drivers that outlived their
    parents). A pid is only signalled while its command line is still the one we saw."""
    before = processes()
    ours = {p.pid for p in procs}
    while True:  # everything below our `ray start` processes, by parent links
        more = {pid for pid, (ppid, _) in before.items() if ppid in ours} - ours
        if not more:
            break
        ours |= more
    try:
        for proc in reversed(procs):  # worker nodes first, the head last
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        now = processes()
        left = {pid for pid in ours if pid in now and now[pid][1] == before.get(pid, (0, None))[1]}
        if root is not None:
            left |= {pid for pid, (_, cmd) in now.items() if str(root) in cmd and pid != os.getpid()}
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in left:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 20
            while left and time.monotonic() < deadline:
                time.sleep(0.5)
                left = {pid for pid in left if Path(f"/proc/{pid}").exists() and not zombie(pid)}
            if not left:
                break


def zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture(scope="module")
def ray_cluster():
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
               RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="300")
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


def assert_search_results(exp: Path, trials: int) -> None:
    with open(exp / "leaderboard.csv", newline="") as f:
        statuses = [row["status"] for row in csv.DictReader(f)]
    # Every trial ran to its end (1 epoch); none errored. (A NaN loss would read "diverged": a finished run too.)
    assert len(statuses) == trials and set(statuses) <= {"completed", "diverged"}, statuses
    best = yaml.safe_load((exp / "best_config.yaml").read_text())
    assert best["model"] == "small_cnn" and best["epochs"] == 1


@pytest.mark.slow
def test_submit_runs_a_search_as_a_job_and_results_land_in_storage(ray_cluster):
    storage = ray_cluster.root / "results-submit"
    r = emotune("submit", "--address", ray_cluster.dashboard, QUICK, "--num-samples", "2", "--set", "epochs=1",
                "--storage-path", str(storage), env=ray_cluster.env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "emotune: submitted job raysubmit_" in out
    assert "SUCCEEDED" in out
    assert "best_config" in out  # the job's own summary, streamed back while following
    assert_search_results(storage / "quick", trials=2)

    job = next(w for w in out.split() if w.startswith("raysubmit_")).rstrip(":")
    listed = emotune("jobs", "--address", ray_cluster.dashboard, env=ray_cluster.env, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert any(job in line and "SUCCEEDED" in line and "distributed tune" in line
               for line in listed.stdout.splitlines()), listed.stdout
    logs = emotune("logs", job, "--address", ray_cluster.dashboard, env=ray_cluster.env, timeout=120)
    assert logs.returncode == 0 and "leaderboard" in logs.stdout, logs.stderr[-2000:]
    followed = emotune("logs", job, "--address", ray_cluster.dashboard, "--follow", env=ray_cluster.env,
                       timeout=120)
    assert followed.returncode == 0 and f"job {job} SUCCEEDED" in followed.stdout, followed.stderr[-2000:]


@pytest.mark.slow
def test_ray_job_submit_as_the_readme_shows(ray_cluster):
    storage = ray_cluster.root / "results-ray"
    r = run([str(BIN / "ray"), "job", "submit", "--address", ray_cluster.dashboard, "--working-dir", ".", "--",
             "python", "-m", "distributed", "tune", QUICK, "--num-samples", "2", "--set", "epochs=1",
             "--storage-path", str(storage)], ray_cluster.env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "succeeded" in out
    assert_search_results(storage / "quick", trials=2)


@pytest.mark.slow
def test_token_auth_is_on_and_a_client_without_the_token_is_refused(ray_cluster):
    no_mode = {k: v for k, v in ray_cluster.env.items() if k != "RAY_AUTH_MODE"}
    r = emotune("jobs", "--address", ray_cluster.dashboard, env=no_mode, timeout=120)
    assert r.returncode == 2 and "set RAY_AUTH_MODE=token" in r.stderr, r.stderr[-2000:]

    wrong = ray_cluster.root / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    r = emotune("jobs", "--address", ray_cluster.dashboard, env={**ray_cluster.env, "RAY_AUTH_TOKEN_PATH": str(wrong)},
                timeout=120)
    assert r.returncode == 2 and "is not the cluster's" in r.stderr, r.stderr[-2000:]

    r = emotune("logs", "raysubmit_nosuchjob", "--address", ray_cluster.dashboard, "--follow", env=ray_cluster.env,
                timeout=120)
    assert r.returncode == 2 and "no such job" in r.stderr, r.stderr[-2000:]
