"""`emotune submit`: run `emotune tune` on a Ray cluster as a Ray job (Ray's Jobs API).

It uploads this checkout (without results, data, the virtualenv, .git and model files) as the job's working
directory and runs `python -m distributed tune ...` on the head. What it adds to `ray job submit`: the space,
overrides and storage path are checked here, before the cluster is contacted, and the entrypoint and excludes are
filled in. Everything else is Ray's own CLI, with the dashboard address (http://HEAD:8265):

    emotune submit --address A SPACE.yaml --storage-path P [--set k=v] [--num-samples N] [--resume] [--no-wait]
        = ray job submit --address A --working-dir . -- python -m distributed tune SPACE.yaml --storage-path P ...
    ray job list --address A;  ray job logs JOB --address A [--follow];  ray job stop JOB --address A

Token auth: like `ray job submit`, the client sends the cluster's token only when RAY_AUTH_MODE=token is set, and
reads it from RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import sys
import time
from pathlib import Path

from distributed.config import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]

# What a job's working directory leaves out (gitignore patterns, relative to the checkout): results and data stay
# where they are (the job writes to --storage-path and reads data from the cluster's own paths), and the rest is
# bulk that every node already has or never needs.
JOB_EXCLUDES = ["/results/", "/runs/", "/data/", "/.venv/", "/.git/", "/build/", "*.egg-info/", "__pycache__/",
                ".pytest_cache/", "*.pt", "*.pth", "*.ckpt", "*.parquet"]

# A job's final status -> the exit code of `emotune submit`.
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1}


def submit(space_file: str, address: str | None, storage_path: str | None, overrides: list[str],
           num_samples: int | None = None, resume: bool = False, wait: bool = True, cluster: str | None = None,
           wait_timeout: float | None = None) -> int:
    """Check everything checkable here, submit the job, and (wait) follow its logs; returns the exit code.
    cluster: a cluster file whose node types the job plans from (it is uploaded with the checkout) and whose
    storage path is the default for storage_path."""
    from distributed.cluster.files import cluster_storage_path
    from distributed.cluster.nodes import node_types
    from distributed.search_space import find_space, load_space

    load_space(find_space(space_file), overrides)
    # A shipped space's name (quick, fer2013, ...) or a URI reaches the job as given; a file must be in the checkout.
    by_name = "://" in space_file or not Path(space_file).expanduser().exists()
    if num_samples is not None and num_samples < 1:
        raise ConfigError("--num-samples must be >= 1")
    if cluster:
        node_types(cluster)  # a file the job could not plan from fails here (its policy problems: the job warns)
        storage_path = storage_path or cluster_storage_path(cluster)
    entrypoint = shlex.join(["python", "-m", "distributed", "tune", space_file if by_name else repo_relative(space_file),
                             "--storage-path", job_storage_path(storage_path),
                             *[f"--set={pair}" for pair in overrides],
                             *(["--num-samples", str(num_samples)] if num_samples is not None else []),
                             *(["--cluster", repo_relative(cluster)] if cluster else []),
                             *(["--wait-timeout", f"{wait_timeout:g}"] if wait_timeout is not None else []),
                             *(["--resume"] if resume else [])])
    client = job_client(address)
    with job_errors(address):
        job = client.submit_job(entrypoint=entrypoint,
                                runtime_env={"working_dir": str(REPO_ROOT), "excludes": JOB_EXCLUDES})
    print(f"emotune: submitted job {job}: {entrypoint}")
    if not wait:
        print(f"emotune: follow it with: ray job logs {job} --address {address} --follow")
        return 0
    return follow(client, job, address)


def repo_relative(space: str) -> str:
    """A file's path (the space, the cluster file) inside the uploaded checkout, the job's working directory."""
    path = Path(space).resolve()
    if not (REPO_ROOT / "pyproject.toml").is_file():
        raise ConfigError(f"{REPO_ROOT}: not a source checkout; emotune submit uploads the checkout as the job's "
                          f"working directory, so run it from one (pip install -e .)")
    try:
        return path.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        raise ConfigError(f"{space}: the job runs in a copy of {REPO_ROOT}, so the search space must be inside it; "
                          f"copy it to search_spaces/") from None


def job_storage_path(storage: str | None) -> str:
    """A relative path would land in the job's working directory, which Ray deletes; a path on one node's disk
    is only fine on a one-machine cluster. So: an absolute path (shared by every node) or a URI."""
    if not storage:
        raise ConfigError("emotune submit needs --storage-path: where the cluster writes results, storage every "
                          "node shares (an NFS path mounted on every node, s3://, gs://)")
    if not (storage.startswith("/") or "://" in storage):
        raise ConfigError(f"--storage-path {storage}: give an absolute path or a URI; a relative path would land "
                          f"in the job's temporary working directory on the head")
    return storage


def job_client(address: str | None):
    if not address:
        raise ConfigError("--address: give the head's dashboard, e.g. http://127.0.0.1:8265 (forwarded by "
                          "`ray dashboard cluster/local.yaml`), or set RAY_API_SERVER_ADDRESS")
    if not address.startswith(("http://", "https://")):
        raise ConfigError(f"--address {address}: expected the dashboard's http://HOST:8265, not the GCS address "
                          f"(HOST:6379) that `emotune tune --address` takes")
    from ray.job_submission import JobSubmissionClient

    with job_errors(address):
        return JobSubmissionClient(address)


@contextlib.contextmanager
def job_errors(address: str, job: str | None = None):
    """Turns the Jobs SDK's failures that mean "wrong address, token or job id" into one-line ConfigErrors."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as exc:
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            fix = "set RAY_AUTH_MODE=token, with the cluster's token in ~/.ray/auth_token (or RAY_AUTH_TOKEN_PATH)"
        elif "Authentication required" in str(exc):  # HTTP 401: no token was sent
            fix = "no token found; put the cluster's token in ~/.ray/auth_token (or RAY_AUTH_TOKEN_PATH)"
        else:  # HTTP 403
            fix = "the token sent (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) is not the cluster's"
        raise ConfigError(f"{address}: the cluster refused the request (Ray token auth); {fix}") from None
    except ConnectionError:
        raise ConfigError(f"{address}: cannot reach the Ray dashboard there; is the cluster up, and the port "
                          f"forwarded (`ray dashboard cluster/local.yaml`)?") from None
    except RuntimeError as exc:
        if job and "404" in str(exc):
            raise ConfigError(f"{job}: no such job on {address}; `ray job list --address {address}` lists "
                              f"them") from None
        raise


def follow(client, job: str, address: str) -> int:
    """Print the job's logs as they come until it ends; the exit code says how it ended."""

    async def tail():
        async for chunk in client.tail_job_logs(job):
            print(chunk, end="", flush=True)

    with job_errors(address, job):
        client.get_job_info(job)  # an unknown id is a one-line error here, not a failed websocket handshake
    try:
        with job_errors(address, job):
            asyncio.run(tail())
    except KeyboardInterrupt:
        print(f"\nemotune: stopped following; job {job} keeps running (stop it: ray job stop {job} --address "
              f"{address})", file=sys.stderr)
        raise
    except RuntimeError as exc:  # the log stream broke; the job may still be fine, so ask for its status
        print(f"emotune: lost the log stream ({exc}); waiting for the job's status", file=sys.stderr)
    with job_errors(address, job):
        info = client.get_job_info(job)
        while not info.status.is_terminal():  # the stream can end a moment before the status is final
            time.sleep(1)
            info = client.get_job_info(job)
    status = info.status.value
    print(f"emotune: job {job} {status}" + (f": {info.message}" if status != "SUCCEEDED" and info.message else ""))
    return EXIT_CODES[status]
