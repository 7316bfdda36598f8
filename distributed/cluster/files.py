"""Cluster-launcher files (`ray up`): the checks Ray does not make, before anything starts.

cluster/ holds cluster-launcher YAMLs (provider: local, aws, gcp, ...) and a KubeRay RayCluster manifest (checked
by kuberay.py). Ray finds some mistakes in them only after machines are up and billing, and some never: a GPU node
type that declares no GPU is never chosen for a GPU trial, and a dashboard bound to 0.0.0.0 lets anyone who
reaches it run code. validate_cluster_file() finds them first, on the laptop, naming the file and the key to fix.

What Ray itself checks is left to Ray: its JSON schema (ray/autoscaler/ray-schema.json, read from the installed
Ray so the two never disagree) and its validate_config (head_node_type, max_workers against the node types'
min_workers). On top, what emotune needs: trial drivers pinned to the head by the `emotune_driver` resource, GPUs
declared where there are GPUs, no spot head, no credentials, a private dashboard, token auth ON (RAY_AUTH_MODE=token
on every `ray start`), shared storage for results.

The same files say what an autoscaler may launch: launcher_node_types() reads it for planning (cluster/nodes.py).
"""
from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from pathlib import Path

from distributed.cluster.common import (
    DISABLED_MODE,
    LOOPBACK_HOSTS,
    ClusterFileError,
    NodeType,
    Problems,
    check_auth_not_disabled,
    check_no_credentials,
    check_storage_path,
    dig,
    is_int,
    is_number,
    parse_resources,
)
from distributed.cluster.kuberay import check_kuberay
from distributed.cluster.ray_schema import check_ray_schema, launcher_keys, ray_provider_defaults

# DRIVER_RESOURCE: the custom resource only the head node offers. Tune's trial drivers ask for a little of it, so
# they always run on the on-demand head: losing a spot worker then costs a trial its workers (which Ray Train
# restarts from a checkpoint), never its driver.
from distributed.config import DRIVER_RESOURCE, ConfigError, read_yaml

# Instance families that carry NVIDIA GPUs. AWS: g4dn, g5, g6, gr6, p3, p4d, p5 ... GCP: a2/a3/a4 and g2/g4
# machine types come with their GPUs attached (g1-small is an old shared-core CPU type, hence [2-9]).
AWS_GPU_INSTANCE = re.compile(r"^(p\d|g\d|gr\d)[a-z0-9-]*\.")
GCP_GPU_MACHINE = re.compile(r"^(a[2-9]|g[2-9])-")

TOKEN_MODE = re.compile(r"\bRAY_AUTH_MODE=[\"']?token\b", re.IGNORECASE)


# -- public API -------------------------------------------------------------------------------------------------

def validate_cluster_files(paths: Iterable[str | Path]) -> list[str]:
    """Problems in all these files (a directory stands for its *.yaml files); [] when all are fine."""
    return [problem for file in cluster_files(paths) for problem in validate_cluster_file(file)]


def cluster_files(paths: Iterable[str | Path]) -> list[Path]:
    """The files these paths name, a directory standing for its *.yaml/*.yml files."""
    files = []
    for path in map(Path, paths):
        files += sorted([*path.glob("*.yaml"), *path.glob("*.yml")]) if path.is_dir() else [path]
    return files


def validate_cluster_file(path: str | Path) -> list[str]:
    """Problems in one cluster file, each one line "file: key.path: what is wrong; what to do"; [] when fine."""
    where = str(path)
    try:
        doc = read_yaml(path)
    except ConfigError as exc:  # missing, empty, or a YAML syntax error (with its line number)
        return [str(exc)]
    if not isinstance(doc, dict):
        return [(f"{where}: not a Ray cluster file (expected a mapping with provider: or kind: RayCluster, "
                 f"got a {type(doc).__name__})")]
    problems = Problems(where)
    if doc.get("kind") == "RayCluster":
        check_kuberay(doc, problems)
    elif "provider" in doc or set(doc) & launcher_keys():
        check_launcher(doc, problems)
    elif "kind" in doc:
        return [f"{where}: not a Ray cluster file (kind: {doc['kind']!r}; expected kind: RayCluster)"]
    else:
        return [f"{where}: not a Ray cluster file (no provider: for `ray up`, no kind: RayCluster for KubeRay)"]
    check_no_credentials(doc, problems)
    check_auth_not_disabled(doc, problems)
    return problems.lines


def check_cluster_files(paths: Iterable[str | Path]) -> None:
    """Raise ClusterFileError listing every problem, one per line, if any file has one."""
    problems = validate_cluster_files(paths)
    if problems:
        raise ClusterFileError("\n".join(problems))


def cluster_storage_path(path: str | Path) -> str | None:
    """The results location a cluster file names: metadata.emotune.storage_path in a launcher file, the
    emotune/storage-path annotation in a KubeRay manifest; None when it names none."""
    doc = read_yaml(path)
    if not isinstance(doc, dict):
        return None
    if doc.get("kind") == "RayCluster":
        return dig(doc, "metadata", "annotations", "emotune/storage-path")
    return dig(doc, "metadata", "emotune", "storage_path")


def launcher_node_types(doc: dict, where: str) -> list[NodeType]:
    """The worker node types an autoscaler may launch for a launcher file; [] for an on-prem (local provider)
    cluster, whose machines are all up. Only what planning needs is checked here (cluster/nodes.py)."""
    types = doc.get("available_node_types")
    cap = doc.get("max_workers")
    found = []
    for name, spec in (types.items() if isinstance(types, dict) and dig(doc, "provider", "type") != "local" else ()):
        if name == doc.get("head_node_type") or not isinstance(spec, dict):
            continue
        resources = spec.get("resources") if isinstance(spec.get("resources"), dict) else {}
        resources = {k: float(v) for k, v in resources.items() if is_number(v)}
        if "CPU" not in resources:
            # Ray would read it from the instance type once the node is up; emotune must know it before.
            raise ClusterFileError(f"{where}: available_node_types.{name}.resources: no CPU count; emotune plans "
                                   f"trials from it before any node is up, so write it out (CPU: N, GPU: M)")
        most = spec.get("max_workers", cap if cap is not None else 2)
        if not is_int(most):
            raise ClusterFileError(f"{where}: available_node_types.{name}.max_workers: expected an integer, "
                                   f"got {most!r}")
        found.append(NodeType(name, resources, min(most, cap) if is_int(cap) else most))
    return found


# -- cluster-launcher files -------------------------------------------------------------------------------------

def check_launcher(config: dict, problems: Problems) -> None:
    before = len(problems.lines)
    check_ray_schema(config, problems)
    provider = config.get("provider")
    provider_type = provider.get("type") if isinstance(provider, dict) else None
    # Ray's own rules stop at the first schema error, which is reported already; for the local provider Ray
    # refuses node types before it would apply them (check_local_provider says so).
    if len(problems.lines) == before and provider_type != "local":
        check_ray_rules(config, problems)
    node_types = config.get("available_node_types")
    node_types = node_types if isinstance(node_types, dict) else {}
    head_type = config.get("head_node_type")

    if provider_type == "local":
        check_local_provider(config, provider, problems)
    for name, node_type in node_types.items():
        if isinstance(node_type, dict):
            check_node_type(provider_type, name, node_type, head_type if head_type in node_types else None, problems)
    check_worker_counts(config, provider_type, problems)
    check_start_commands(config, provider_type, node_types.get(head_type), head_type, problems)
    check_token_auth(config, provider_type, problems)
    check_storage_path(dig(config, "metadata", "emotune", "storage_path"), "metadata.emotune.storage_path",
                       problems)


def check_ray_rules(config: dict, problems: Problems) -> None:
    """What `ray up` checks before it launches anything: Ray's validate_config (head_node_type among the node
    types, max_workers against their min_workers) and its provider registry. Both are private Ray APIs, so a
    Ray upgrade that moves them shows here as an ImportError in tests/test_cluster_files.py, not as silence."""
    from ray.autoscaler._private.providers import _NODE_PROVIDERS
    from ray.autoscaler._private.util import validate_config

    provider_type = dig(config, "provider", "type")
    if isinstance(provider_type, str) and provider_type not in _NODE_PROVIDERS:
        problems.add("provider.type", f"unknown provider {provider_type!r}; Ray knows {', '.join(_NODE_PROVIDERS)}")
    # `ray up` fills these in from its defaults, and drops a top-level min_workers, before validating.
    filled = {"cluster_synced_files": [], "max_workers": ray_provider_defaults(str(provider_type))
              .get("max_workers", 2), **{k: v for k, v in config.items() if k != "min_workers"}}
    try:
        validate_config(filled)
    except ValueError as exc:
        problems.add("", f"Ray refuses it: {exc}")


def check_local_provider(config: dict, provider: dict, problems: Problems) -> None:
    # Ray builds the one node type of an on-prem cluster itself and aborts if the file defines any.
    for key in ("available_node_types", "head_node_type"):
        if key in config:
            problems.add(key, "not supported by the local provider, which makes its node type from head_ip and "
                         "worker_ips; remove it and set resources on `ray start` in head_start_ray_commands")
    if "coordinator_address" not in provider:
        for key in ("head_ip", "worker_ips"):
            if key not in provider:
                problems.add(f"provider.{key}", "missing; the local provider needs head_ip and worker_ips "
                             "(or a coordinator_address)")


def check_node_type(provider_type: str | None, name: str, node_type: dict, head_type: str | None,
                    problems: Problems) -> None:
    """One node type; head_type is None when the file names no head (or an unknown one)."""
    key = f"available_node_types.{name}"
    is_head = name == head_type
    resources = node_type.get("resources") if isinstance(node_type.get("resources"), dict) else {}
    node_config = node_type.get("node_config") if isinstance(node_type.get("node_config"), dict) else {}

    low, high = node_type.get("min_workers"), node_type.get("max_workers")
    if is_int(low) and is_int(high) and low > high:
        problems.add(f"{key}.min_workers", f"{low} is more than max_workers ({high})")

    instance, gpus = instance_gpus(provider_type, node_config)
    declared = resources.get("GPU", 0)
    if gpus and not declared:
        count = gpus if is_int(gpus) else 1
        problems.add(f"{key}.resources", f"declares no GPU for a GPU instance type ({instance}); add GPU: {count}")
    elif is_int(gpus) and is_int(declared) and declared != gpus:
        problems.add(f"{key}.resources.GPU", f"{declared}, but guestAccelerators attach {gpus} GPU(s); make them match")
    elif gpus is None and instance and is_int(declared) and declared > 0:
        problems.add(f"{key}.resources.GPU", f"{declared}, but {instance} has no GPU; GPU trials would be "
                     "scheduled on a machine without one")

    if is_head and is_spot(provider_type, node_config):
        problems.add(f"{key}.node_config", "the head node type is spot/preemptible; losing it loses every trial "
                     "driver and the search, so run the head on demand")
    if head_type is not None and not is_head and resources.get(DRIVER_RESOURCE):
        problems.add(f"{key}.resources.{DRIVER_RESOURCE}", "only the head may offer it; on a worker, trial drivers "
                     "could land on a spot node and die with it")


def instance_gpus(provider_type: str | None, node_config: dict) -> tuple[str, int | bool | None]:
    """(instance type, GPUs): an int where the file says how many, True for a GPU family, None for no GPU."""
    if provider_type == "aws":
        instance = node_config.get("InstanceType")
        if not isinstance(instance, str):
            return "", None
        return instance, (True if AWS_GPU_INSTANCE.match(instance) else None)
    if provider_type == "gcp":
        machine = node_config.get("machineType")
        machine = machine.rsplit("/", 1)[-1] if isinstance(machine, str) else ""
        accelerators = node_config.get("guestAccelerators")
        if isinstance(accelerators, list) and accelerators:
            counts = [a.get("acceleratorCount", 1) for a in accelerators if isinstance(a, dict)]
            return machine or "guestAccelerators", (sum(counts) if all(is_int(c) for c in counts) else True)
        return machine, (True if GCP_GPU_MACHINE.match(machine) else None)
    return "", None


def is_spot(provider_type: str | None, node_config: dict) -> bool:
    if provider_type == "aws":
        market = dig(node_config, "InstanceMarketOptions", "MarketType")
        return isinstance(market, str) and market.lower() == "spot"
    if provider_type == "gcp":
        scheduling = node_config.get("scheduling")
        # The GCE API takes a mapping; Ray's own examples write a list of one-key mappings. Accept both.
        items = scheduling if isinstance(scheduling, list) else [scheduling]
        return any(isinstance(s, dict) and (s.get("preemptible") is True
                                            or str(s.get("provisioningModel")).upper() == "SPOT")
                   for s in items)
    return False


def check_worker_counts(config: dict, provider_type: str | None, problems: Problems) -> None:
    max_workers = config.get("max_workers")
    low = config.get("min_workers")
    if low is not None and provider_type not in (None, "local"):
        # Ray keeps a top-level min_workers only for on-prem clusters; elsewhere it drops it without a word.
        problems.add("min_workers", f"ignored by Ray for provider {provider_type!r}; set min_workers on each "
                     "node type in available_node_types instead")
    elif low is not None and not is_int(low):
        problems.add("min_workers", f"expected an integer, got {low!r}")
    elif is_int(low) and is_int(max_workers) and low > max_workers:
        problems.add("min_workers", f"{low} is more than max_workers ({max_workers})")


def check_start_commands(config: dict, provider_type: str | None, head: dict | None, head_type: str | None,
                         problems: Problems) -> None:
    head_commands = config.get("head_start_ray_commands")
    from_defaults = head_commands is None and provider_type is not None
    if from_defaults:
        # `ray up` fills missing keys from Ray's defaults.yaml, and the AWS and GCP defaults bind the dashboard
        # to 0.0.0.0. So a file without head_start_ray_commands is checked as if it had Ray's.
        head_commands = ray_provider_defaults(provider_type).get("head_start_ray_commands", [])
    head_commands = head_commands if isinstance(head_commands, list) else []

    driver_on_head = is_int(dig(head, "resources", DRIVER_RESOURCE)) and dig(head, "resources", DRIVER_RESOURCE) > 0
    for i, command in enumerate(head_commands):
        if not isinstance(command, str):
            continue
        key = "head_start_ray_commands" if from_defaults else f"head_start_ray_commands[{i}]"
        flags, error = ray_start_flags(command)
        if error:
            problems.add(key, f"cannot read this shell command ({error})")
            continue
        host = flags.get("dashboard-host")
        if host is not None and host not in LOOPBACK_HOSTS:
            how = f"missing, so Ray's {provider_type} default applies, and it" if from_defaults else "this"
            problems.add(key, f"{how} binds the dashboard to {host}, open to the network; use "
                         "--dashboard-host=127.0.0.1 and reach it with `ray dashboard <this file>`")
        if "resources" in flags:
            resources, error = parse_resources(flags["resources"])
            if error:
                problems.add(key, f"--resources is not a JSON mapping ({error}); "
                             f"write --resources='{{\"{DRIVER_RESOURCE}\": 1000}}'")
            elif is_number(resources.get(DRIVER_RESOURCE)) and resources[DRIVER_RESOURCE] > 0:
                driver_on_head = True

    # An unknown head_node_type is reported already; guessing where its resources would go helps nobody.
    head_unknown = provider_type != "local" and head_type is not None and head is None
    if not driver_on_head and not head_unknown:
        if provider_type == "local" or head is None:
            key = "head_start_ray_commands"
            fix = f"add --resources='{{\"{DRIVER_RESOURCE}\": 1000}}' to `ray start --head`"
        else:
            key = f"available_node_types.{head_type}.resources"
            fix = f"add {DRIVER_RESOURCE}: 1000"
        problems.add(key, f"the head offers no {DRIVER_RESOURCE} resource, so trial drivers could run on spot "
                     f"workers and die with them; {fix}")

    worker_commands = config.get("worker_start_ray_commands")
    for i, command in enumerate(worker_commands if isinstance(worker_commands, list) else []):
        if isinstance(command, str) and DRIVER_RESOURCE in command:
            problems.add(f"worker_start_ray_commands[{i}]", f"only the head may offer {DRIVER_RESOURCE}; on a "
                         "worker, trial drivers could land on a spot node and die with it")



def check_token_auth(config: dict, provider_type: str | None, problems: Problems) -> None:
    """Token auth ON, not merely not disabled: `ray start` only turns it on when RAY_AUTH_MODE=token is in its
    environment, so every `ray start` line (head and workers) must set it, in the line or an earlier `export`."""
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        commands = config.get(key)
        from_defaults = commands is None and provider_type is not None
        if from_defaults:
            commands = ray_provider_defaults(provider_type).get(key, [])
        exported = False
        for i, command in enumerate(commands if isinstance(commands, list) else []):
            if not isinstance(command, str):
                continue
            if DISABLED_MODE.search(command):
                return  # reported by check_auth_not_disabled
            exported = exported or bool(re.search(r"\bexport\s+RAY_AUTH_MODE=[\"']?token\b", command))
            if re.search(r"\bray\s+start\b", command) and not (exported or TOKEN_MODE.search(command)):
                where = f"missing, so Ray's {provider_type} default applies, and its" if from_defaults else "this"
                problems.add(key if from_defaults else f"{key}[{i}]",
                             f"{where} `ray start` runs without RAY_AUTH_MODE=token, so token auth is off and "
                             "anyone who reaches the cluster can run code; write RAY_AUTH_MODE=token ray start ...")


def ray_start_flags(command: str) -> tuple[dict[str, str], str | None]:
    """The --flag=value / --flag value options of a shell command line, unquoted as the shell would."""
    try:
        tokens = shlex.split(command)
    except ValueError as exc:
        return {}, str(exc)
    flags = {}
    for i, token in enumerate(tokens):
        if token.startswith("--"):
            name, sep, value = token[2:].partition("=")
            if not sep and i + 1 < len(tokens) and not tokens[i + 1].startswith("-"):
                value = tokens[i + 1]
            flags[name.rstrip(";")] = value.rstrip(";")
    return flags, None

