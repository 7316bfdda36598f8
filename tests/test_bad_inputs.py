"""Every bad input in tests/bad_inputs/ (one case per file) is refused with exit code 2 and one line naming the
problem (`expect`) and the fix (`fix`), before any Ray process starts, and leaves no half-written result directory.
Warnings stay on, as a user sees them: a warning line before the error counts as a second line.

Each case runs the real CLI in its own process with Ray's temporary directory pointed at a fresh folder:
if anything started Ray, that folder would exist afterwards.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import REPO, Payload
from PIL import Image

from distributed.models import create_model

CASES = sorted((Path(__file__).parent / "bad_inputs").glob("*.yaml"))


def png_bytes(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 48), dtype=np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


def materialise(case: dict, tmp: Path) -> None:
    for rel in case.get("dirs", []):
        (tmp / rel).mkdir(parents=True, exist_ok=True)
    for i, rel in enumerate(case.get("pngs", [])):
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(png_bytes(i))
    for rel in case.get("truncated_pngs", []):
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(png_bytes()[:60])
    for rel, text in case.get("files", {}).items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        pixels = " ".join(["128"] * 2304)
        (tmp / rel).write_text(text.replace("PIXELS2304", pixels).replace("PIXELS2303", pixels[4:]))
    for rel, columns in case.get("parquet", {}).items():
        table = {k: [png_bytes() if v == "png" else v for v in vals] for k, vals in columns.items()}
        pq.write_table(pa.table(table), tmp / rel)
    for rel, blob in case.get("torch_files", {}).items():  # plain dicts, as torch.save writes our files
        torch.save(blob, tmp / rel)
    for rel, model in case.get("model_weights", {}).items():  # model.state_dict() of a fresh MODEL, as users save it
        torch.save(create_model(model, num_classes=7).state_dict(), tmp / rel)
    for rel, target in case.get("pickled_code", {}).items():
        torch.save({"format": "emotune-model/1", "payload": Payload(str(tmp / target))}, tmp / rel)


@pytest.fixture(scope="module")
def refusals(tmp_path_factory) -> dict:
    """Every case run as the real CLI in a fresh process, three at a time (each its own files and Ray temp folder;
    the processes are what costs, mostly imports): {case: (case, its folder, the folder's files before, the Ray temp
    folder, the finished process)}."""
    from concurrent.futures import ThreadPoolExecutor

    prepared = []
    for path in CASES:  # the folders one by one (mktemp numbers them: not from several threads at once)
        case = yaml.safe_load(path.read_text())
        tmp = tmp_path_factory.mktemp(path.stem)
        materialise(case, tmp)
        prepared.append((path, case, tmp, sorted(p.name for p in tmp.iterdir())))

    def run(item):
        path, case, tmp, before = item
        argv = [a.replace("{tmp}", str(tmp)) for a in case["argv"]]
        ray_tmp = tmp.parent / f"{tmp.name}-raytmp"
        env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
        for name in ("RAY_ADDRESS", "PYTHONWARNINGS"):
            env.pop(name, None)
        done = subprocess.run([sys.executable, "-m", "distributed", *argv], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
        return path.stem, (case, tmp, before, ray_tmp, done)

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(pool.map(run, prepared))


def test_the_cases_are_there():
    assert len(CASES) >= 60, CASES  # a moved or emptied folder would otherwise collect no case at all


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_bad_input_is_refused_clearly(path, refusals):
    case, tmp_path, before, ray_tmp, done = refusals[path.stem]
    err = done.stderr.strip()
    assert done.returncode == 2, (case["what"], done.stdout[-500:], err[-2000:])
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and case["expect"] in lines[0] and case["fix"] in lines[0], err
    assert not ray_tmp.exists(), "a Ray process was started"
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "something was written"
    for rel in case.get("absent", []):
        assert not (tmp_path / rel).exists()


# a missing file is the commonest bad input: refusing it must not wait seconds for torch to import
LEAN_REFUSALS = {"check-space": ["check-space", "/nonexistent.yaml"],
                 "cluster validate": ["cluster", "validate", "/nonexistent.yaml"]}
REPORT_HEAVY = ("import sys; from distributed.cli import main; rc = main(sys.argv[1:]); "
                "print(' '.join(m for m in ('torch', 'torchvision') if m in sys.modules)); sys.exit(rc)")


@pytest.mark.parametrize("argv", LEAN_REFUSALS.values(), ids=LEAN_REFUSALS)
def test_missing_file_is_refused_without_importing_torch(argv):
    done = subprocess.run([sys.executable, "-c", REPORT_HEAVY, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(done.stderr.strip().splitlines()) == 1 and "/nonexistent.yaml" in done.stderr, done.stderr
    assert done.stdout.strip() == "", f"imported {done.stdout.strip()} only to refuse a missing file"


def test_check_space_on_every_shipped_space_imports_no_torch():
    """Checking a space names its models against model_names, never the registry in models.py: no torch (seconds)."""
    spaces = sorted(str(p.relative_to(REPO)) for p in (REPO / "search_spaces").glob("*.yaml"))
    assert {"search_spaces/quick.yaml", "search_spaces/multi_arch.yaml", "search_spaces/resnet50.yaml"} <= set(spaces)
    done = subprocess.run([sys.executable, "-c", REPORT_HEAVY, "check-space", *spaces], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    *checked, imported = done.stdout.splitlines()
    assert sum(": ok (" in line for line in checked) == len(spaces), done.stdout
    assert imported == "", f"imported {imported} only to check search spaces"


def test_every_input_error_is_caught_by_the_cli():
    from distributed.cluster.common import ClusterFileError
    from distributed.config import ConfigError
    from distributed.data import DataError
    from distributed.errors import InputError
    from distributed.modelfile import ModelFileError
    from distributed.models import ModelError
    from distributed.search_space import SpaceError
    from distributed.storage import StorageError

    for cls in (ConfigError, DataError, ModelError, ModelFileError, StorageError, SpaceError, ClusterFileError):
        assert issubclass(cls, InputError), cls
