"""The benches stay runnable: every script imports and answers --help (a refactor that removes a name one imports
breaks here, not in the next benchmark run), and the space copies they write load as the variant they name."""
from __future__ import annotations

import importlib

import pytest
from conftest import REPO

from distributed.search_space import load_space

# every script of bench/ and bench/hpo/, as its module name (hpo.curves)
SCRIPTS = sorted(".".join(p.relative_to(REPO / "bench").with_suffix("").parts)
                 for p in [*(REPO / "bench").glob("*.py"), *(REPO / "bench" / "hpo").glob("*.py")]
                 if p.stem not in ("__init__", "common", "proc"))


@pytest.fixture(autouse=True)
def bench_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))  # `python -m bench.NAME` runs from the repository root


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_answers_help(name, capsys):
    module = importlib.import_module(f"bench.{name}")
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_search_efficiency_kinds_differ_in_sampler_and_schedule_only():
    """Each kind is its space file and --set pairs (search seed, sampler, ASHA's max_t), read as emotune reads them."""
    from bench.hpo.search_efficiency import KINDS, kind_sets

    def space(kind, epochs):
        sets = kind_sets(kind, 3, epochs)
        return load_space(KINDS[kind][0], [v for flag, v in zip(sets[::2], sets[1::2]) if flag == "--set"])

    spaces = {kind: space(kind, 12) for kind in KINDS}
    assert {k: s.algorithm for k, s in spaces.items()} == {"random": "random", "asha": "tpe", "random-asha": "random"}
    assert spaces["random"].asha is None
    assert spaces["asha"].asha == spaces["random-asha"].asha == {"max_t": 12, "grace_period": 2, "reduction_factor": 3}
    for s in spaces.values():
        assert s.seed == 3 and s.fixed == spaces["random"].fixed and s.num_samples == 16
    # a longer search moves ASHA's last rung with it (a trial is never cut short of random search's epochs)
    assert space("asha", 30).asha["max_t"] == 30


def test_curves_record_ckplus48_validated_by_person(tmp_path):
    """bench.hpo.curves on the real CK+48: one tiny config, its table named 'ckplus48 by subject', every val_acc a
    whole number of the person-split validation faces (splits.make_splits with group_by=subject)."""
    import numpy as np
    import pyarrow.parquet as pq
    from conftest import DATA, need

    from bench.hpo import curves
    from distributed.config import TrainConfig
    from distributed.data import load_data
    from distributed.splits import make_splits

    need(DATA / "ckplus48")
    assert curves.main(["--data-dir", str(DATA), "--datasets", "ckplus48", "--models", "small_cnn", "--configs", "1",
                        "--epochs", "2", "--workers", "1", "--train-limit", "64", "--limit-s", "600",
                        "--out", str(tmp_path)]) == 0
    rows = pq.read_table(tmp_path / "curves_ckplus48.parquet").to_pylist()
    assert [r["epoch"] for r in rows] == [1, 2] and {r["dataset"] for r in rows} == {"ckplus48 by subject"}
    cfg = TrainConfig(data=f"imagefolder:{DATA / 'ckplus48'}", group_by="subject", seed=0)
    n_val = len(make_splits(load_data(cfg), cfg).val_y)
    acc = np.array([r["val_acc"] for r in rows])
    assert np.allclose(acc * n_val, np.round(acc * n_val)) and n_val == 108  # the table's by-person split


def test_proc_counts_the_cpu_of_a_grandchild(tmp_path):
    """bench.proc.run charges a command for its whole tree: here a child whose own child burns CPU (as `emotune`
    starts Ray, whose processes start the trials). The grandchild's seconds land in ray_system, not in the driver."""
    import sys

    from bench import proc

    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.5: pass"
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {burn!r}])"
    run = proc.run([sys.executable, "-c", child], tmp_path / "log")
    assert run["rc"] == 0
    assert 0.9 < run["cpu"]["ray_system"] < 3 and run["cpu"]["driver"] < 0.9 and run["cpu"]["trial"] == 0
