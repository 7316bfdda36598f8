"""Experiments, configs and data on object storage: a real S3 server (moto in server mode on 127.0.0.1) with IAM
authentication switched on, so missing or wrong credentials are refused as by a real bucket.

Searches and training runs go through the real CLI in their own process (which starts its own local Ray with
the S3 settings in its environment, as a user's shell would).
"""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, crash_when, free_port, small_space
from PIL import Image

from distributed import storage
from distributed.data import decode_data
from distributed.results import read_trials

BUCKET = "emo"
S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
          "AWS_EC2_METADATA_DISABLED")


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server with one bucket and one IAM user allowed everything; its settings are in os.environ for
    the module (and so in every subprocess it starts). Yields the server's endpoint URL."""
    import boto3
    import moto.settings
    from moto.core.authorization import ActionAuthenticatorMixin
    from moto.server import ThreadedMotoServer

    # The first 4 requests (creating the user, its key, its policy, the bucket) go unauthenticated; every later
    # request must be signed with that user's key. moto counts requests per process, across servers: another
    # module's server (tests/test_cluster_jobs.py's bucket) has already counted its own, so start from 0.
    moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = 4
    ActionAuthenticatorMixin.request_count = 0
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    setup = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                 aws_secret_access_key="setup")
    iam = boto3.client("iam", **setup)
    iam.create_user(UserName="emotune")
    key = iam.create_access_key(UserName="emotune")["AccessKey"]
    iam.put_user_policy(UserName="emotune", PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    boto3.client("s3", **setup).create_bucket(Bucket=BUCKET)
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(AWS_ACCESS_KEY_ID=key["AccessKeyId"], AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"],
                      AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    try:
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
        moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = float("inf")


@pytest.fixture(scope="module")
def gcs():
    """A GCS emulator (gcp-storage-emulator, in memory) with one bucket on 127.0.0.1. pyarrow's GCS client (google-
    cloud-cpp) goes to CLOUD_STORAGE_EMULATOR_ENDPOINT when it is set; `gs://anonymous@BUCKET/...` skips the Google
    credential lookup, as for a public bucket. Yields the URI prefix."""
    import http.server
    from functools import partial

    from gcp_storage_emulator import server as emulator

    class Threaded(emulator.APIThread):  # the emulator serves one request at a time; Ray's uploads run in parallel
        def run(self):
            self._httpd = http.server.ThreadingHTTPServer((self._host, self._port),
                                                          partial(emulator.RequestHandler, self._storage))
            self.is_running.set()
            self._httpd.serve_forever()

    logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)
    port = free_port()
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server._api = Threaded("127.0.0.1", port, server._storage)
    server.start()
    saved = os.environ.get("CLOUD_STORAGE_EMULATOR_ENDPOINT")
    os.environ["CLOUD_STORAGE_EMULATOR_ENDPOINT"] = f"http://127.0.0.1:{port}"
    try:
        yield f"gs://anonymous@{BUCKET}"
    finally:
        if saved is None:
            os.environ.pop("CLOUD_STORAGE_EMULATOR_ENDPOINT", None)
        else:
            os.environ["CLOUD_STORAGE_EMULATOR_ENDPOINT"] = saved
        server.stop()


def emotune(*argv: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**(env or os.environ), "PYTHONWARNINGS": "ignore"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "distributed", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 48), dtype=np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


def parquet_from_synthetic(n: int = 400) -> bytes:
    """A one-file FER2013-style Parquet (image bytes, label, usage) made from the built-in synthetic faces."""
    d = decode_data("synthetic", size=48)
    rng = np.random.default_rng(0)
    train, test = rng.permutation(len(d.train_y))[:n], rng.permutation(len(d.test_y))[:n // 4]
    encoded = []
    for img in np.concatenate([d.train_x[train], d.test_x[test]]):
        buf = io.BytesIO()
        Image.fromarray(img[0]).save(buf, "PNG")
        encoded.append(buf.getvalue())
    labels = [d.class_names[i] for i in np.concatenate([d.train_y[train], d.test_y[test]])]
    usage = ["Training"] * len(train) + ["PublicTest"] * len(test)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"image": encoded, "label": labels, "usage": usage}), sink)
    return sink.getvalue().to_pybytes()


# ------------------------------------------------------------------------------------------ the file layer

def test_files_round_trip_on_s3_gcs_and_locally(s3, gcs, tmp_path):
    for base in (f"s3://{BUCKET}/layer", f"{gcs}/layer", str(tmp_path / "layer")):
        storage.write_text(storage.join(base, "a", "x.json"), '{"v": 1}')
        storage.write_bytes(storage.join(base, "a", "y.bin"), b"\x00\x01")
        storage.upload(__file__, storage.join(base, "b", "copy.py"))
        assert storage.read_text(storage.join(base, "a", "x.json")) == '{"v": 1}'
        assert storage.list_dir(storage.join(base, "a")) == ["x.json", "y.bin"]
        assert storage.glob(storage.join(base, "a"), "*.json") == [storage.join(base, "a", "x.json")]
        assert storage.list_files(base) == ["a/x.json", "a/y.bin", "b/copy.py"]
        assert storage.is_dir(storage.join(base, "a")) and storage.is_file(storage.join(base, "a", "y.bin"))
        assert not storage.exists(storage.join(base, "nothing"))
        storage.download(storage.join(base, "b", "copy.py"), tmp_path / "back.py")
        assert (tmp_path / "back.py").read_bytes() == Path(__file__).read_bytes()
    assert not list(tmp_path.glob("layer/a/.*.tmp")), "a local write left its temporary file"


def test_imagefolder_and_parquet_read_from_s3_equal_local(s3, tmp_path):
    root = tmp_path / "faces"
    for split, per in (("train", 3), ("test", 2)):
        for c, cls in enumerate(("happy", "sad")):
            for i in range(per):
                f = root / split / cls / f"{i}.png"
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_bytes(png(100 * c + 10 * i + len(split)))
    storage.upload_dir(root, f"s3://{BUCKET}/faces")
    local = decode_data(f"imagefolder:{root}")
    remote = decode_data(f"imagefolder:s3://{BUCKET}/faces")
    assert remote.class_names == local.class_names == ["happy", "sad"]
    assert np.array_equal(remote.train_x, local.train_x) and np.array_equal(remote.test_y,
                                                                                      local.test_y)
    storage.write_bytes(f"s3://{BUCKET}/fer/fer.parquet", parquet_from_synthetic(100))
    (tmp_path / "fer.parquet").write_bytes(storage.read_bytes(f"s3://{BUCKET}/fer/fer.parquet"))
    remote = decode_data(f"parquet:s3://{BUCKET}/fer/fer.parquet")
    local = decode_data(f"parquet:{tmp_path / 'fer.parquet'}")
    assert np.array_equal(remote.train_x, local.train_x) and len(remote.train_y) == 100


# -------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("case", ["missing bucket", "wrong endpoint", "no credentials", "wrong credentials"])
def test_bad_storage_is_one_line_exit_2_before_ray(s3, tmp_path, case):
    env = dict(os.environ, RAY_TMPDIR=str(tmp_path / "raytmp"))
    where, expect = f"s3://{BUCKET}/bad", "access denied"
    if case == "missing bucket":
        where, expect = "s3://no-such-bucket/x", "bucket 'no-such-bucket' does not exist"
    elif case == "wrong endpoint":
        env["AWS_ENDPOINT_URL"], expect = f"http://127.0.0.1:{free_port()}", "cannot reach the object store"
    elif case == "no credentials":
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.pop(k)
        env["AWS_SHARED_CREDENTIALS_FILE"], expect = str(tmp_path / "none"), "no AWS credentials found"
    else:
        env["AWS_SECRET_ACCESS_KEY"] = "wrong"
    done = emotune("tune", "quick", "--storage-path", where, env=env, timeout=180)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and expect in lines[0], (case, done.stderr[-2000:])
    assert not (tmp_path / "raytmp").exists(), "a Ray process was started"
    if case != "missing bucket":
        return
    # and `emotune train --config` from the same place says the same
    done = emotune("train", "--config", f"{where}/best_config.yaml", env=env, timeout=180)
    assert done.returncode == 2 and expect in done.stderr, (case, done.stderr[-2000:])


@pytest.mark.parametrize("case", ["missing bucket", "wrong endpoint"])
def test_bad_gcs_location_is_one_line_exit_2_before_ray(gcs, tmp_path, case):
    env = dict(os.environ, RAY_TMPDIR=str(tmp_path / "raytmp"))
    where, expect = "gs://anonymous@no-such-bucket/x", "bucket 'no-such-bucket' does not exist"
    if case == "wrong endpoint":
        where, expect = f"{gcs}/x", "cannot reach the object store"
        env["CLOUD_STORAGE_EMULATOR_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"
    done = emotune("tune", "quick", "--storage-path", where, env=env, timeout=180)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and expect in lines[0], (case, done.stderr[-2000:])
    assert not (tmp_path / "raytmp").exists(), "a Ray process was started"


# --------------------------------------------------------------------------------------- whole workflows

@pytest.mark.slow
def test_search_on_gcs_with_data_there_then_best_and_train(gcs, tmp_path):
    """On gs:// (the GCS emulator): a search with its data in the bucket, `best`, `report`, and a re-run of the best
    config from the bucket that leaves its files there. (s3:// does the same after a kill and --resume, below.)"""
    data = f"{gcs}/data/fer.parquet"
    storage.write_bytes(data, parquet_from_synthetic(400))
    space = small_space(tmp_path, "cloud", num_samples=2, scheduler="none",
                        fixed={"model": "small_cnn", "epochs": 1, "train_limit": 200, "data": f"parquet:{data}"})
    done = emotune("tune", str(space), "--storage-path", f"{gcs}/x")
    assert done.returncode == 0, done.stderr[-3000:]
    check_workflow(gcs, f"{gcs}/x/cloud", trials=2, epochs=1)


@pytest.mark.slow
def test_search_on_s3_killed_then_resumed_runs_each_trial_once_then_best_and_train(s3, tmp_path):
    # (the data on this machine: reading it from a bucket is test_imagefolder_and_parquet_read_from_s3_equal_local's
    # and the gs:// workflow's)
    space = small_space(tmp_path, "resume", num_samples=4, scheduler="none",
                        fixed={"model": "small_cnn", "epochs": 2, "train_limit": 200})
    exp = f"s3://{BUCKET}/k/resume"
    cmd = [sys.executable, "-m", "distributed", "tune", str(space), "--storage-path", f"s3://{BUCKET}/k"]
    # killed as the driver says a first trial finished (Tune is then saving and uploading its state); the bucket
    # lags the driver (trial files are uploaded with checkpoints), so the driver's word is the sure moment
    crash_when(cmd, printed="finished 2 epochs")
    before = finished(exp)
    assert len(before) < 4

    done = emotune("tune", str(space), "--storage-path", f"s3://{BUCKET}/k", "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = pq.read_table(io.BytesIO(storage.read_bytes(f"{exp}/leaderboard.parquet"))).to_pylist()
    errors = [storage.read_text(f"{t}/error.txt")[-2000:] for t in storage.glob(exp, "*")
              if storage.is_file(f"{t}/error.txt")]
    why = ([(r["trial_id"], r["status"], r["epochs_run"]) for r in rows], before, errors, done.stdout[-3000:])
    assert len(rows) == 4 == len({r["trial_id"] for r in rows}), why
    assert all(r["status"] == "completed" and r["epochs_run"] == 2 for r in rows), why
    # each epoch of each trial reported once: nothing was run twice (as emotune reads the trials: a directory the
    # saved state did not know, started just before the kill, is not a trial of the search; a result.json uploaded
    # before its trial's last epoch is completed from the state's last result)
    seen = {t["trial_id"]: [r["epoch"] for r in t["rows"]] for t in read_trials(exp) if not t["orphan"]}
    assert seen == {r["trial_id"]: [1, 2] for r in rows}, seen
    journal = tmp_path / "optuna.journal"
    storage.download(f"{exp}/optuna.journal", journal)
    check_study(journal, "resume", 4)
    # the resumed experiment serves `best`, `report` and `train --config` from the bucket like any other
    check_workflow(f"s3://{BUCKET}", exp, trials=4, epochs=2)


def check_workflow(bucket: str, exp: str, trials: int, epochs: int) -> None:
    """A finished search at `exp` in a bucket: its files, `best`, `report` rebuilt from the bucket alone, and a
    re-run of its best config from the bucket that leaves its files there."""
    names = storage.list_dir(exp)
    for f in ("emotune.json", "space.yaml", "leaderboard.parquet", "leaderboard.csv", "best_config.yaml",
              "optuna.journal", "report.html"):
        assert f in names, (f, names)
    rows = pq.read_table(io.BytesIO(storage.read_bytes(f"{exp}/leaderboard.parquet"))).to_pylist()
    assert len(rows) == trials and all(r["status"] == "completed" for r in rows), rows
    assert not (REPO / "results").exists() or not list((REPO / "results").glob("cloud*")), "a study landed in ./results"

    best = emotune("best", exp, "--top", "2")
    assert best.returncode == 0, best.stderr[-2000:]
    assert f"top 2 of {trials} trials by val_acc" in best.stdout and rows[0]["trial_id"] in best.stdout
    # the report rebuilds from the bucket alone, with the best trial's weights (and its data) read from there
    storage.delete(f"{exp}/report.html")
    report = emotune("report", exp)
    assert report.returncode == 0 and report.stdout.strip() == f"wrote {exp}/report.html", report.stderr[-2000:]
    page = storage.read_text(f"{exp}/report.html")
    assert f"{rows[0]['trial_id']}'s best weights" in page and '"text":"confusion matrix (accuracy ' in page

    # The best config re-runs from the bucket, with its data from the bucket, and leaves its files there (one
    # worker on this machine: in the command's own process, its checkpoint under run/checkpoint/).
    run = f"{exp}-rerun"
    done = emotune("train", "--config", f"{exp}/best_config.yaml", "--output", run)
    assert done.returncode == 0, done.stderr[-3000:]
    # (each name looked up on its own: the GCS emulator's listing leaves out prefixes such as run/)
    missing = [f for f in ("config.yaml", "best_model.pt", "final_model.pt", "metrics.parquet", "test_metrics.json",
                           "run/checkpoint/state.pt", "run/checkpoint/best_model.pt")
               if not storage.is_file(f"{run}/{f}")]
    assert not missing, (missing, storage.list_files(run)[:40])
    history = pq.read_table(io.BytesIO(storage.read_bytes(f"{run}/metrics.parquet"))).to_pylist()
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))


def finished(exp: str) -> list[str]:
    return [t for t in storage.glob(exp, "*") if storage.is_file(f"{t}/result.json")
            and 2 in epochs(f"{t}/result.json")]


def epochs(result_file: str) -> list[int]:
    return [json.loads(line)["epoch"] for line in storage.read_text(result_file).splitlines() if '"epoch"' in line]


def check_study(journal: Path, name: str, num_samples: int, states=(optuna.trial.TrialState.COMPLETE,)) -> None:
    """Exactly num_samples trials in the study, each finished in an expected state, no two with the same point."""
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(JournalFileBackend(str(journal))))
    assert len(study.trials) == num_samples, [(t.number, t.state) for t in study.trials]
    assert all(t.state in states for t in study.trials), [t.state for t in study.trials]
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == num_samples
