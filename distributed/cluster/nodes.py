"""Where a search learns the node types an autoscaler may launch (plan.py counts trials against them).

In order: the cluster file given with --cluster (a launcher YAML or a KubeRay manifest); the cluster config that
`ray up` leaves on a launcher cluster's head, ~/ray_bootstrap_config.yaml (the head's autoscaler reads it there, and
Ray Tune's tune/execution/cluster_info.py checks it to tell an autoscaling cluster), which is where a `ray job
submit` entrypoint runs; the cluster config in the GCS. A KubeRay pod has none of these: there, --cluster.

Reading node types is not checking policy: what `emotune cluster validate` refuses (no emotune_driver on the head,
token auth off, an open dashboard) is one warning line each here, and the search runs.
"""
from __future__ import annotations

import os
from pathlib import Path

from distributed.cluster.common import ClusterFileError, NodeType
from distributed.cluster.files import launcher_node_types, validate_cluster_file
from distributed.cluster.kuberay import kuberay_node_types
from distributed.config import DRIVER_RESOURCE, ConfigError, read_yaml

BOOTSTRAP_CONFIG = "EMOTUNE_BOOTSTRAP_CONFIG"  # another path than ~/ray_bootstrap_config.yaml (tests)


def node_types(path: str | Path) -> list[NodeType]:
    """The worker node types an autoscaler may launch for a cluster file; [] for an on-prem (local provider)
    cluster, whose machines are all up. An error only where planning cannot read them (no CPU count)."""
    doc = read_yaml(path)
    if isinstance(doc, dict) and doc.get("kind") == "RayCluster":
        return kuberay_node_types(doc, str(path))
    if isinstance(doc, dict) and "provider" in doc:
        return launcher_node_types(doc, str(path))
    raise ClusterFileError(f"{path}: not a Ray cluster file (no provider: for `ray up`, no kind: RayCluster for "
                           f"KubeRay)")


def bootstrap_config() -> Path | None:
    """The cluster config `ray up` wrote on this head; None elsewhere (a laptop, a worker, a KubeRay pod)."""
    path = Path(os.environ.get(BOOTSTRAP_CONFIG) or "~/ray_bootstrap_config.yaml").expanduser()
    return path if path.is_file() else None


def search_node_types(cluster: str | None, joining: bool) -> tuple[list[NodeType] | None, list[str]]:
    """(node types, lines to print) for a search, before Ray starts: [] for a Ray it starts itself (no autoscaler);
    for a cluster it joins, from --cluster FILE (its policy problems as warnings), else from the bootstrap config,
    else None (nothing here names them)."""
    if cluster and not joining:
        raise ConfigError(f"--cluster {cluster}: describes a running cluster; give its --address too")
    if not joining:
        return [], []
    if cluster:
        return node_types(cluster), [f"warning: {problem}" for problem in validate_cluster_file(cluster)]
    path = bootstrap_config()
    if path is None:
        return None, []
    try:
        return node_types(path), []
    except ConfigError as exc:  # the cluster's own config: it runs, so plan without it rather than refuse
        return None, [f"{str(exc).splitlines()[0]}; its node types are not counted"]


def autoscaler_node_types() -> list[NodeType]:
    """The node types in the cluster config kept in the GCS (ray._private.state, a private API; Ray Data reads
    it too). In Ray 2.60 only a reporter outside Ray's wheel fills it: `ray up`'s autoscaler and the fake
    multi-node provider leave it empty. Empty: nothing names them there."""
    from ray._private.state import state

    config = state.get_cluster_config()
    if config is None:
        return []
    return [NodeType(g.name, {k: float(v) for k, v in g.resources.items()}, g.max_count if g.max_count >= 0 else 10**6)
            for g in config.node_group_configs if g.max_count and not g.resources.get(DRIVER_RESOURCE)]


def unknown_node_types_line(wait_timeout_min: float) -> str:
    """What a search says when it joined a cluster whose node types nothing names, and no node up holds a trial."""
    fix = ("on KubeRay, give --cluster with the RayCluster manifest" if os.environ.get("KUBERNETES_SERVICE_HOST")
           else "--cluster FILE names them")
    return (f"no node up holds a trial's workers and no cluster config names the node types an autoscaler may "
            f"launch ({fix}): planning from the nodes up, 1 trial at a time, waiting up to {wait_timeout_min:g} "
            f"min (--wait-timeout) for a node")
