"""Everything `emotune tune` checks before a search starts, without importing Ray, Optuna or torch (torch only for
a space that names weight files): the space and its overrides, the experiment directory, the weights, the data
(decoded once here when no trial changes it, so the trials share it), the cluster address and file, whether the
trials fit on this machine, and the storage. Bad input is one line and exit 2 in about a second; tune.run_search
takes what this found."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

from distributed import storage
from distributed.cluster.common import NodeType
from distributed.config import DECODE_FIELDS, ConfigError, TrainConfig
from distributed.search_space import SearchSpace, find_space, load_space


@dataclass
class Prepared:
    """A search ready to start: the space as it will run, where its results go, the data the trials share (None:
    each trial decodes its own), the node types an autoscaler may launch ([] for a Ray started here; None: nothing
    names them) and the cluster file's policy notes."""
    space: SearchSpace
    space_file: str
    exp: str
    data: object
    node_types: list[NodeType] | None
    notes: list[str]


def experiment_dir(storage_path: str, name: str) -> str:
    return storage.join(storage.resolve(storage_path), name)


def prepare_search(space_file: str, overrides: list[str], storage_path: str = "results", resume: bool = False,
                   address: str | None = None, num_samples: int | None = None, cluster: str | None = None,
                   wait_timeout_min: float = 20) -> Prepared:
    """cluster: the cluster file of the cluster at `address`, whose node types the autoscaler may launch."""
    space_file = find_space(space_file)
    storage.check_reachable(storage_path)
    if resume:
        from distributed.results import read_meta

        exp = experiment_dir(storage_path, load_space(space_file, overrides).name)
        meta = read_meta(exp, resuming=True)
        space = load_space(storage.join(exp, "space.yaml"), meta["overrides"])
        space.num_samples = meta["num_samples"]
    else:
        space = load_space(space_file, overrides)
        if num_samples is not None:
            if num_samples < 1:
                raise ConfigError("--num-samples must be >= 1")
            space.num_samples = num_samples
        exp = experiment_dir(storage_path, space.name)
        if storage.is_dir(exp) and [n for n in storage.list_dir(exp) if not n.startswith(".")]:
            raise ConfigError(f"{exp}: an experiment of this name exists; add --resume to finish it, or pick another "
                              f"--storage-path or name")
    for w in space.warnings():
        warnings.warn(w, stacklevel=1)
    space.check_weights()
    fixed = TrainConfig.from_dict(dict(space.fixed))
    data = None
    if not space.searches(DECODE_FIELDS):  # decode once here: bad data fails before Ray starts, trials share it
        from distributed.data import load_data
        from distributed.splits import make_splits

        data = load_data(fixed)
        make_splits(data, fixed)
    # (autoscaling) an unreachable address or an unreadable cluster file exits 2 here, before Ray starts
    if wait_timeout_min <= 0:
        raise ConfigError("--wait-timeout must be > 0 minutes")
    if address:
        check_reachable(address)
    from distributed.cluster.nodes import search_node_types
    from distributed.plan import local_nodes, plan_trials

    joining = bool(address or os.environ.get("RAY_ADDRESS"))
    node_types, notes = search_node_types(cluster, joining)
    if not joining:
        # refuse an impossible request, or a local Ray without token auth, before starting Ray
        check_auth_mode()
        plan_trials(space, local_nodes(count_gpus=space.scaling.gpus_per_worker > 0))
    storage.check_writable(exp)  # last check (it creates a local experiment directory)
    return Prepared(space, space_file, exp, data, node_types, notes)


def check_auth_mode() -> None:
    """The local Ray that emotune starts runs with token auth on: with RAY_AUTH_MODE unset, Ray 2.60's ray.init()
    turns it on itself for a new local cluster (and creates ~/.ray/auth_token if there is none); set to token, it is
    on. (Setting the variable here would not do: Ray reads it when imported, and its processes would then disagree
    with it about the token.) Anything else turns it off, which we refuse."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        raise ConfigError(f"RAY_AUTH_MODE={os.environ['RAY_AUTH_MODE']}: emotune starts its local Ray with token "
                          f"auth on; unset RAY_AUTH_MODE (or set it to token)")


def check_reachable(address: str) -> None:
    """ray.init() waits minutes on an address where no Ray listens; say so at once (HOST:PORT addresses only:
    "auto" and ray:// fail fast or differently)."""
    import socket

    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise ConfigError(f"--address {address}: no Ray cluster answers there ({exc.strerror or exc}); start it, or "
                          f"give the head's GCS address HOST:6379 (`ray status` on the head prints it)") from None
