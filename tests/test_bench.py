"""The benches stay runnable: every script imports and answers --help (a refactor that removes a name one imports
breaks here, not in the next benchmark run), and the space copies they write load as the variant they name."""
from __future__ import annotations

import importlib

import pytest
from conftest import REPO

from distributed.search_space import load_space

SCRIPTS = sorted(p.stem for p in (REPO / "bench").glob("*.py") if p.stem not in ("__init__", "common", "proc"))


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


def test_derived_space_changes_only_what_it_names(tmp_path):
    from bench.common import SPACES, derived_space

    src = SPACES / "overhead.yaml"
    copy = derived_space(src, tmp_path, "group", {"scaling.worker_group": "always", "search.seed": 7})
    assert copy.parent == tmp_path / "spaces" and copy.name == "overhead_group.yaml"
    base, group = load_space(src), load_space(copy)
    assert (base.worker_group, group.worker_group) == ("auto", "always")
    assert (base.seed, group.seed) == (0, 7)
    assert group.fixed == base.fixed and group.points == base.points and group.scaling == base.scaling


def test_search_efficiency_kinds_differ_in_sampler_and_schedule_only(tmp_path):
    from bench.common import derived_space
    from bench.search_efficiency import KINDS

    spaces = {kind: load_space(derived_space(src, tmp_path, kind, {**changes, "search.seed": 3}))
              for kind, (src, changes) in KINDS.items()}
    assert {k: s.algorithm for k, s in spaces.items()} == {"random": "random", "asha": "tpe", "random-asha": "random"}
    assert spaces["random"].asha is None
    assert spaces["asha"].asha == spaces["random-asha"].asha == {"max_t": 12, "grace_period": 2, "reduction_factor": 3}
    for s in spaces.values():
        assert s.seed == 3 and s.fixed == spaces["random"].fixed and s.num_samples == 16
