"""Cluster files: check a Ray cluster-launcher YAML or a KubeRay RayCluster manifest before anything starts.

cluster/ holds two kinds of file: cluster-launcher YAMLs for `ray up` (provider: local, aws, gcp, ...) and
KubeRay RayCluster manifests for `kubectl apply`. Ray finds many mistakes in them only after machines are up and
billing, and some never: a GPU node type that declares no GPU is never chosen for a GPU trial, and a dashboard
bound to 0.0.0.0 lets anyone who reaches it run code. validate_cluster_file() finds them first, on the laptop,
and names the file and the key to fix.

Launcher files are checked against the JSON schema Ray itself uses (ray/autoscaler/ray-schema.json, read from
the installed Ray so the two never disagree), then against what emotune needs: trial drivers pinned to the head
by the `emotune_driver` resource, GPUs declared where there are GPUs, no credentials, a private dashboard, token
auth left on, shared storage for results.

Running a search on a cluster is a Ray job: `emotune submit` uploads this checkout (without results, data, the
virtualenv, .git and model files) as the job's working directory, and runs `python -m distributed tune ...` on the
head. The commands and their Ray CLI equivalents (all take the dashboard address, http://HEAD:8265):

    emotune cluster validate cluster/*.yaml       (no Ray equivalent: Ray finds these problems after `ray up`)
    emotune submit --address A SPACE.yaml --storage-path P [--set k=v] [--num-samples N] [--resume] [--no-wait]
        = ray job submit --address A --working-dir . -- python -m distributed tune SPACE.yaml --storage-path P ...
    emotune jobs --address A                      = ray job list --address A
    emotune logs JOB --address A [--follow]       = ray job logs JOB --address A [--follow]
                                                  (stop one: ray job stop JOB --address A)

Token auth: like `ray job submit`, the client sends the cluster's token only when RAY_AUTH_MODE=token is set, and
reads it from RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import shlex
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import jsonschema
import yaml

from distributed.config import ConfigError, did_you_mean, read_yaml
# DRIVER_RESOURCE: the custom resource only the head node offers. Tune's trial drivers ask for a little of it, so
# they always run on the on-demand head: losing a spot worker then costs a trial its workers (which Ray Train
# restarts from a checkpoint), never its driver.
from distributed.config import DRIVER_RESOURCE


# Provider types `ray up` knows (ray/autoscaler/_private/providers.py). A typo here would otherwise only surface
# as "Unsupported provider" after `ray up` has started.
RAY_PROVIDERS = ("aws", "gcp", "azure", "local", "vsphere", "aliyun", "kuberay", "readonly", "spark", "external")

# Instance families that carry NVIDIA GPUs. AWS: g4dn, g5, g6, gr6, p3, p4d, p5 ... GCP: a2/a3/a4 and g2/g4
# machine types come with their GPUs attached (g1-small is an old shared-core CPU type, hence [2-9]).
AWS_GPU_INSTANCE = re.compile(r"^(p\d|g\d|gr\d)[a-z0-9-]*\.")
GCP_GPU_MACHINE = re.compile(r"^(a[2-9]|g[2-9])-")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")

# Kubernetes node labels that put a pod on spot/preemptible machines.
K8S_SPOT_LABELS = {
    "cloud.google.com/gke-spot": "true",
    "cloud.google.com/gke-preemptible": "true",
    "eks.amazonaws.com/capacitytype": "spot",
    "karpenter.sh/capacity-type": "spot",
}


class ClusterFileError(ConfigError):
    """A cluster file that would fail or be unsafe. A ConfigError (a ValueError), so the CLI exits 2 on it."""


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
        return [f"{where}: not a Ray cluster file (expected a mapping with provider: or kind: RayCluster, "
                f"got a {type(doc).__name__})"]
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


# -- collecting problems ----------------------------------------------------------------------------------------

class Problems:
    """Collects one-line problems, each naming the file and the key path (a.b[0].c) they are about."""

    def __init__(self, where: str):
        self.where = where
        self.lines: list[str] = []

    def add(self, key: str | list, message: str) -> None:
        key = key if isinstance(key, str) else key_path(key)
        self.lines.append(f"{self.where}: {key}: {message}" if key else f"{self.where}: {message}")


def key_path(parts: Iterable) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def dig(doc: Any, *keys) -> Any:
    """doc[k1][k2]... or None where a level is missing or not a mapping/list."""
    for key in keys:
        if isinstance(doc, dict):
            doc = doc.get(key)
        elif isinstance(doc, list) and isinstance(key, int) and -len(doc) <= key < len(doc):
            doc = doc[key]
        else:
            return None
    return doc


# -- Ray's own schema -------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def ray_autoscaler_dir() -> Path:
    # find_spec locates the installed Ray without importing it (importing Ray takes seconds).
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        raise ClusterFileError("Ray is not installed; pip install 'ray[default]' to check cluster files")
    return Path(next(iter(spec.submodule_search_locations))) / "autoscaler"


@lru_cache(maxsize=None)
def ray_schema() -> dict:
    return json.loads((ray_autoscaler_dir() / "ray-schema.json").read_text())


@lru_cache(maxsize=None)
def ray_provider_defaults(provider_type: str) -> dict:
    """Ray's defaults.yaml for a provider: what `ray up` fills in for keys a file leaves out."""
    path = ray_autoscaler_dir() / provider_type / "defaults.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def launcher_keys() -> set[str]:
    """Top-level keys that make a file without `provider:` a launcher file that forgot it, rather than some
    other YAML (a search space, a training config). `metadata` is too generic to count."""
    return set(ray_schema()["properties"]) - {"metadata"}


JSON_TYPE_WORDS = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
                   "object": "a mapping", "array": "a list", "null": "null"}


def check_ray_schema(config: dict, problems: Problems) -> None:
    """Ray's JSON schema, with each error turned into "key.path: message"."""
    # Ray drops a top-level min_workers before it validates (fillout_defaults, prepare_local): the schema
    # forbids the key, yet on-prem files use it. We check it ourselves in check_launcher.
    config = {key: value for key, value in config.items() if key != "min_workers"}
    validator = jsonschema.Draft7Validator(ray_schema())
    for error in sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path]):
        path = list(error.absolute_path)
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            allowed = error.schema.get("properties", {})
            for extra in sorted(set(error.instance) - set(allowed)):
                problems.add(path + [extra], f"not a key Ray knows here{did_you_mean(extra, allowed)}")
        elif error.validator == "required" and isinstance(error.instance, dict):
            for name in error.validator_value:
                if name not in error.instance:
                    problems.add(path + [name], "missing; Ray requires it")
        elif error.validator == "type":
            wanted = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
            words = " or ".join(JSON_TYPE_WORDS.get(w, w) for w in wanted)
            hint = ""
            if "string" in wanted and isinstance(error.instance, dict):
                # `- ray start --resources='{"a": 1}'` is a mapping to YAML: the ": " inside splits it.
                hint = "; YAML read this line as a mapping because it contains ': ', so quote it or write it as >-"
            problems.add(path, f"expected {words}, got {error.instance!r}{hint}")
        elif error.validator == "minimum":
            problems.add(path, f"{error.instance!r} is below the minimum of {error.validator_value}")
        else:
            problems.add(path, error.message)


# -- cluster-launcher files -------------------------------------------------------------------------------------

def check_launcher(config: dict, problems: Problems) -> None:
    check_ray_schema(config, problems)
    provider = config.get("provider")
    provider_type = provider.get("type") if isinstance(provider, dict) else None
    if isinstance(provider_type, str) and provider_type not in RAY_PROVIDERS:
        problems.add("provider.type", f"unknown provider {provider_type!r}; Ray knows {', '.join(RAY_PROVIDERS)}")

    node_types = config.get("available_node_types")
    node_types = node_types if isinstance(node_types, dict) else {}
    head_type = config.get("head_node_type")

    if provider_type == "local":
        check_local_provider(config, provider, problems)
    elif provider_type is not None:
        # Every other provider needs the multi-node-type form (Ray's check_legacy_fields).
        if not node_types:
            problems.add("available_node_types", f"missing; provider {provider_type!r} needs the node types "
                         "to launch (a CPU head and GPU workers)")
        if head_type is None and node_types:
            problems.add("head_node_type", "missing; name the node type in available_node_types that runs the head")
        elif isinstance(head_type, str) and node_types and head_type not in node_types:
            problems.add("head_node_type", f"unknown node type {head_type!r}; "
                         f"available_node_types defines {', '.join(node_types)}")

    for name, node_type in node_types.items():
        if isinstance(node_type, dict):
            check_node_type(provider_type, name, node_type, head_type if head_type in node_types else None, problems)
    check_worker_counts(config, provider_type, node_types, problems)
    check_start_commands(config, provider_type, node_types.get(head_type), head_type, problems)
    check_storage_path(dig(config, "metadata", "emotune", "storage_path"), "metadata.emotune.storage_path",
                       problems)


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


def check_worker_counts(config: dict, provider_type: str | None, node_types: dict, problems: Problems) -> None:
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
    # Ray refuses a cluster whose node types must keep more workers running than the cluster may have.
    lows = [t.get("min_workers", 0) for t in node_types.values() if isinstance(t, dict)]
    if is_int(max_workers) and all(is_int(n) for n in lows) and sum(lows) > max_workers:
        problems.add("max_workers", f"{max_workers} is less than the node types' min_workers together ({sum(lows)})")


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


def parse_resources(text: str) -> tuple[dict, str | None]:
    try:
        resources = json.loads(text)
    except json.JSONDecodeError as exc:
        return {}, exc.msg
    if not isinstance(resources, dict):
        return {}, f"got {type(resources).__name__}"
    return resources, None


def check_storage_path(value: Any, key: str, problems: Problems) -> None:
    """Results must go where every node can write and the driver can read: an object store or a shared mount."""
    if value is None:
        return  # given on the command line instead
    if not isinstance(value, str) or not value.strip():
        problems.add(key, f"expected a location like s3://bucket/prefix, got {value!r}")
    elif value.startswith("file://") or not ("://" in value or value.startswith("/")):
        problems.add(key, f"{value!r} is not shared storage; every node writes results there, so use s3://, "
                     "gs:// or an NFS path mounted at the same place on every node")


# -- KubeRay manifests ------------------------------------------------------------------------------------------

def check_kuberay(doc: dict, problems: Problems) -> None:
    api = doc.get("apiVersion")
    if not (isinstance(api, str) and api.startswith("ray.io/v1")):
        problems.add("apiVersion", f"{api!r} is not a KubeRay API version; use ray.io/v1")
    name = dig(doc, "metadata", "name")
    if not (isinstance(name, str) and re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", name)):
        problems.add("metadata.name", f"{name!r} is not a Kubernetes name (lowercase letters, digits and '-')")
    check_storage_path(dig(doc, "metadata", "annotations", "emotune/storage-path"),
                       "metadata.annotations.emotune/storage-path", problems)

    spec = doc.get("spec")
    if not isinstance(spec, dict):
        problems.add("spec", "missing; a RayCluster needs spec.headGroupSpec")
        return
    if dig(spec, "authOptions", "mode") == "disabled":
        problems.add("spec.authOptions.mode", "disabled turns off Ray's token auth, so anyone who reaches the "
                     "pods can run code; use mode: token")

    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        problems.add("spec.headGroupSpec", "missing; KubeRay needs the head pod's rayStartParams and template")
    else:
        check_kuberay_head(head, problems)

    groups = spec.get("workerGroupSpecs", [])
    if not isinstance(groups, list):
        problems.add("spec.workerGroupSpecs", f"expected a list of worker groups, got {type(groups).__name__}")
        return
    seen = set()
    for i, group in enumerate(groups):
        key = f"spec.workerGroupSpecs[{i}]"
        if not isinstance(group, dict):
            problems.add(key, "expected a mapping (groupName, replicas, rayStartParams, template)")
            continue
        group_name = group.get("groupName")
        if not isinstance(group_name, str) or not group_name:
            problems.add(f"{key}.groupName", "missing; every worker group needs a name")
        elif group_name in seen:
            problems.add(f"{key}.groupName", f"{group_name!r} is used by another worker group")
        seen.add(group_name)
        check_kuberay_worker_group(group, key, problems)


def check_kuberay_head(head: dict, problems: Problems) -> None:
    key = "spec.headGroupSpec"
    params = head.get("rayStartParams")
    if params is None:
        problems.add(f"{key}.rayStartParams", "missing; it must at least set dashboard-host and the "
                     f"{DRIVER_RESOURCE} resource")
        params = {}
    elif not isinstance(params, dict):
        problems.add(f"{key}.rayStartParams", f"expected a mapping of ray start options, got {params!r}")
        params = {}
    check_ray_start_params(params, f"{key}.rayStartParams", problems)

    # KubeRay (after 0.5) binds the head's dashboard to 0.0.0.0 unless rayStartParams says otherwise.
    host = params.get("dashboard-host")
    if host not in LOOPBACK_HOSTS:
        what = "missing, so KubeRay binds the dashboard to 0.0.0.0" if host is None else f"{host} binds the dashboard"
        problems.add(f"{key}.rayStartParams.dashboard-host", f"{what}, open to the network; set dashboard-host: "
                     "\"127.0.0.1\" and reach it with kubectl port-forward")

    driver = kuberay_resources(params, head.get("resources"))
    if not (is_number(driver.get(DRIVER_RESOURCE)) and driver[DRIVER_RESOURCE] > 0):
        problems.add(f"{key}.rayStartParams.resources", f"the head offers no {DRIVER_RESOURCE} resource, so trial "
                     f"drivers could run on worker pods and die with them; set resources: "
                     f"'\"{{\\\"{DRIVER_RESOURCE}\\\": 1000}}\"'")

    check_pod_template(head.get("template"), f"{key}.template", problems)
    selector = dig(head, "template", "spec", "nodeSelector")
    if isinstance(selector, dict):
        for label, value in selector.items():
            if K8S_SPOT_LABELS.get(str(label).lower()) == str(value).lower():
                problems.add(f"{key}.template.spec.nodeSelector.{label}", "puts the head on spot machines; losing "
                             "it loses every trial driver and the search, so run the head on demand")


def check_kuberay_worker_group(group: dict, key: str, problems: Problems) -> None:
    counts = {}
    for name in ("replicas", "minReplicas", "maxReplicas"):
        value = group.get(name)
        if value is None:
            continue
        if not is_int(value):
            problems.add(f"{key}.{name}", f"expected an integer, got {value!r}")
        else:
            counts[name] = value
    low, high, replicas = counts.get("minReplicas"), counts.get("maxReplicas"), counts.get("replicas")
    if low is not None and high is not None and low > high:
        problems.add(f"{key}.minReplicas", f"{low} is more than maxReplicas ({high})")
    elif replicas is not None and ((low is not None and replicas < low) or (high is not None and replicas > high)):
        problems.add(f"{key}.replicas", f"{replicas} is outside minReplicas..maxReplicas ({low}..{high})")

    params = group.get("rayStartParams", {})
    if not isinstance(params, dict):
        problems.add(f"{key}.rayStartParams", f"expected a mapping of ray start options, got {params!r}")
        params = {}
    check_ray_start_params(params, f"{key}.rayStartParams", problems)
    if DRIVER_RESOURCE in kuberay_resources(params, group.get("resources")):
        problems.add(f"{key}.rayStartParams.resources", f"only the head may offer {DRIVER_RESOURCE}; on a worker "
                     "group, trial drivers could land on a spot node and die with it")

    containers = check_pod_template(group.get("template"), f"{key}.template", problems)
    if not containers or not isinstance(containers[0], dict):
        return
    # Kubernetes hands out GPUs only through limits; Ray counts them from the limit unless num-gpus says else.
    limits = dig(containers[0], "resources", "limits") or {}
    requests = dig(containers[0], "resources", "requests") or {}
    ckey = f"{key}.template.spec.containers[0]"
    gpu_limit = as_count(limits.get("nvidia.com/gpu")) if isinstance(limits, dict) else None
    gpu_request = as_count(requests.get("nvidia.com/gpu")) if isinstance(requests, dict) else None
    num_gpus = as_count(params.get("num-gpus"))
    if gpu_request is not None and gpu_request != gpu_limit:
        problems.add(f"{ckey}.resources.requests.nvidia.com/gpu", f"{gpu_request}, but the limit is {gpu_limit}; "
                     "Kubernetes needs GPU requests equal to limits")
    if num_gpus and not gpu_limit:
        problems.add(f"{key}.rayStartParams.num-gpus", f"{num_gpus}, but the pod has no nvidia.com/gpu limit, so "
                     "it gets no GPU; add nvidia.com/gpu to resources.limits")
    elif num_gpus is not None and gpu_limit and num_gpus != gpu_limit:
        problems.add(f"{key}.rayStartParams.num-gpus", f"{num_gpus}, but the pod's nvidia.com/gpu limit is "
                     f"{gpu_limit}; make them match or drop num-gpus")
    image = containers[0].get("image")
    cpu_only_image = isinstance(image, str) and image.startswith("rayproject/ray:") \
        and not re.search(r"-(gpu|cu\d+)", image)
    if gpu_limit and cpu_only_image:
        problems.add(f"{ckey}.image", f"{image} has no CUDA; GPU pods need a -gpu image such as "
                     "rayproject/ray:2.60.0-py311-gpu")


def check_ray_start_params(params: dict, key: str, problems: Problems) -> None:
    # KubeRay's CRD types rayStartParams as map[string]string: `num-cpus: 0` is rejected by kubectl apply.
    for name, value in params.items():
        if not isinstance(value, str):
            problems.add(f"{key}.{name}", f"expected a string (KubeRay passes it to `ray start`), got {value!r}; "
                         "quote it")


def kuberay_resources(params: dict, group_resources: Any) -> dict:
    """Custom resources a KubeRay group offers: rayStartParams.resources (JSON inside shell quotes, as KubeRay
    passes it through a shell) or the newer group-level resources mapping."""
    found = {}
    if isinstance(group_resources, dict):
        for name, value in group_resources.items():
            found[name] = as_count(value) if as_count(value) is not None else value
    text = params.get("resources")
    if isinstance(text, str):
        for candidate in (text, *safe_shlex(text)):
            resources, error = parse_resources(candidate)
            if not error:
                found.update(resources)
                break
    return found


def check_pod_template(template: Any, key: str, problems: Problems) -> list:
    containers = dig(template, "spec", "containers")
    if not isinstance(containers, list) or not containers:
        problems.add(f"{key}.spec.containers", "missing; the pod template needs a container running the Ray image")
        return []
    for j, container in enumerate(containers):
        image = container.get("image") if isinstance(container, dict) else None
        if not isinstance(image, str) or not image.strip():
            problems.add(f"{key}.spec.containers[{j}].image",
                         "missing; name the Ray image, e.g. rayproject/ray:2.60.0-py311")
    return containers


# -- checks for both kinds --------------------------------------------------------------------------------------

# Key names that hold a secret when they hold a literal value. A *path* to a key file (ssh_private_key:
# ~/.ssh/x.pem) and a reference ($VAR, valueFrom.secretKeyRef) are fine; the secret itself is not.
CREDENTIAL_WORDS = ("password", "passwd", "secret", "token", "credential", "credentials")
CREDENTIAL_ENDINGS = ("access_key_id", "secret_access_key", "access_key", "api_key", "apikey", "private_key",
                      "secret_key", "session_token", "client_secret", "auth_token")
CREDENTIAL_TEXT = [
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"[\"']private_key[\"']\s*:"), "a service-account key (JSON)"),
]
ENV_ASSIGNMENT = re.compile(r"^(?:--)?([A-Za-z_][A-Za-z0-9_-]*)=(.+)$")
CREDENTIAL_ADVICE = ("never write secrets into a cluster file: use instance profiles / service accounts, "
                     "or a Kubernetes Secret referenced with valueFrom.secretKeyRef")


def check_no_credentials(doc: Any, problems: Problems, path: list | None = None) -> None:
    path = path or []
    if isinstance(doc, dict):
        # A Kubernetes env entry {name: AWS_SECRET_ACCESS_KEY, value: ...} is a key-value pair in disguise.
        if isinstance(doc.get("name"), str) and "value" in doc and is_credential_name(doc["name"]) \
                and is_literal_secret(doc["value"]):
            problems.add(path + ["value"], f"{doc['name']} is set inline; {CREDENTIAL_ADVICE}")
            return
        for key, value in doc.items():
            here = path + [str(key)]
            if is_credential_name(str(key)):
                if is_literal_secret(value):
                    problems.add(here, f"looks like an inline credential; {CREDENTIAL_ADVICE}")
                    continue
                if isinstance(value, dict) and value and normal_name(str(key)).endswith(("credential", "credentials")):
                    problems.add(here, f"inline credentials; {CREDENTIAL_ADVICE}")
                    continue
            check_no_credentials(value, problems, here)
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            check_no_credentials(value, problems, path + [i])
    elif isinstance(doc, str):
        for pattern, what in CREDENTIAL_TEXT:
            if pattern.search(doc):
                problems.add(path, f"contains {what}; {CREDENTIAL_ADVICE}")
                return
        # Shell commands: `export AWS_SECRET_ACCESS_KEY=...`, `RAY_AUTH_TOKEN=... ray start`, `--password=...`.
        for token in safe_shlex(doc) if " " in doc or "=" in doc else []:
            match = ENV_ASSIGNMENT.match(token.rstrip(";"))
            if match and is_credential_name(match.group(1)) and is_literal_secret(match.group(2)):
                problems.add(path, f"sets {match.group(1)} inline; {CREDENTIAL_ADVICE}")
                return


def normal_name(name: str) -> str:
    """secretAccessKey, secret-access-key and SECRET_ACCESS_KEY all become secret_access_key."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower().replace("-", "_")


def is_credential_name(name: str) -> bool:
    name = normal_name(name)
    return name.split("_")[-1] in CREDENTIAL_WORDS or name.endswith(CREDENTIAL_ENDINGS)


def is_literal_secret(value: Any) -> bool:
    """A non-empty string that is not a reference ($VAR, {{ template }}) nor a file path."""
    if not isinstance(value, str) or not value.strip():
        return False
    value = value.strip().strip("\"'")
    if value.startswith("$") or "{{" in value:
        return False
    looks_like_path = value.startswith(("/", "~", "./", "../")) or value.endswith((".pem", ".key", ".json"))
    return not (looks_like_path and " " not in value)


def check_auth_not_disabled(doc: Any, problems: Problems, path: list | None = None) -> None:
    """Ray's token auth stays on: RAY_AUTH_MODE=disabled anywhere (a command, an env entry) is an error."""
    path = path or []
    if isinstance(doc, dict):
        if doc.get("name") == "RAY_AUTH_MODE" and str(doc.get("value", "")).lower() == "disabled":
            problems.add(path + ["value"], "RAY_AUTH_MODE=disabled turns off Ray's token auth, so anyone who reaches "
                         "the cluster can run code; use token")
            return
        for key, value in doc.items():
            check_auth_not_disabled(value, problems, path + [str(key)])
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            check_auth_not_disabled(value, problems, path + [i])
    elif isinstance(doc, str) and re.search(r"RAY_AUTH_MODE=[\"']?disabled", doc, re.IGNORECASE):
        problems.add(path, "RAY_AUTH_MODE=disabled turns off Ray's token auth, so anyone who reaches the cluster "
                     "can run code; use RAY_AUTH_MODE=token")


# -- small helpers ----------------------------------------------------------------------------------------------

def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def as_count(value: Any) -> int | None:
    """A Kubernetes quantity or ray start option that counts things: 1, "1" -> 1; anything else -> None."""
    if is_int(value):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def safe_shlex(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError:
        return text.split()


# -- running a search on a cluster: Ray Jobs --------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]

# What a job's working directory leaves out (gitignore patterns, relative to the checkout): results and data stay
# where they are (the job writes to --storage-path and reads data from the cluster's own paths), and the rest is
# bulk that every node already has or never needs.
JOB_EXCLUDES = ["/results/", "/runs/", "/data/", "/.venv/", "/.git/", "/build/", "*.egg-info/", "__pycache__/",
                ".pytest_cache/", "*.pt", "*.pth", "*.ckpt", "*.parquet"]

# A job's final status -> the exit code of `emotune submit` / `emotune logs --follow`.
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1}


def add_cluster_commands(sub) -> None:
    """`emotune cluster validate`, `emotune submit`, `emotune jobs` and `emotune logs` (sub: cli's subparsers)."""
    p = sub.add_parser("cluster", help="check Ray cluster files (launcher YAMLs, KubeRay manifests)")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    v = actions.add_parser("validate", help="validate cluster files (a directory means its *.yaml) without "
                           "launching anything")
    v.add_argument("files", nargs="+")
    v.set_defaults(func=cmd_validate)

    p = sub.add_parser("submit", help="run `emotune tune` on a Ray cluster as a Ray job")
    p.add_argument("space", help="search-space YAML inside this checkout (it is uploaded with the code)")
    add_address_arg(p)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="pin a TrainConfig field for every trial; paths are paths on the cluster")
    p.add_argument("--storage-path", help="where the cluster writes results: an absolute path that every node "
                   "shares (NFS) or s3://, gs:// (required: the job's own directory is temporary)")
    p.add_argument("--num-samples", type=int, default=None, help="override the file's num_samples")
    p.add_argument("--resume", action="store_true", help="finish an interrupted experiment of the same name")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return instead of following logs")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", help="list the Ray jobs of a cluster")
    add_address_arg(p)
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("logs", help="print (or --follow) the logs of a Ray job")
    p.add_argument("job", help="job id, as printed by `emotune submit` or listed by `emotune jobs`")
    add_address_arg(p)
    p.add_argument("--follow", action="store_true", help="follow until the job ends; exit 0 if it succeeded")
    p.set_defaults(func=cmd_logs)


def add_address_arg(p) -> None:
    p.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS"),
                   help="the head's dashboard, http://HOST:8265 (default: $RAY_API_SERVER_ADDRESS)")


def cmd_validate(args) -> int:
    files = cluster_files(args.files)
    if not files:
        raise ClusterFileError(f"{' '.join(args.files)}: no *.yaml files there")
    failed = False
    for file in files:
        problems = validate_cluster_file(file)
        for problem in problems:
            print(problem, file=sys.stderr)
        if not problems:
            print(f"{file}: ok")
        failed = failed or bool(problems)
    return 2 if failed else 0


def cmd_submit(args) -> int:
    from distributed.search_space import load_space

    # Everything checkable is checked here, before the cluster is contacted.
    space = load_space(args.space, args.overrides)
    if args.num_samples is not None and args.num_samples < 1:
        raise ConfigError("--num-samples must be >= 1")
    entrypoint = shlex.join(["python", "-m", "distributed", "tune", repo_relative(args.space),
                             "--storage-path", job_storage_path(args.storage_path),
                             *[f"--set={pair}" for pair in args.overrides],
                             *(["--num-samples", str(args.num_samples)] if args.num_samples is not None else []),
                             *(["--resume"] if args.resume else [])])
    client = job_client(args.address)
    with job_errors(args.address):
        job = client.submit_job(entrypoint=entrypoint,
                                runtime_env={"working_dir": str(REPO_ROOT), "excludes": JOB_EXCLUDES})
    print(f"emotune: submitted job {job}: {entrypoint}")
    if args.no_wait:
        print(f"emotune: follow it with: emotune logs {job} --address {args.address} --follow")
        return 0
    return follow(client, job, args.address)


def cmd_jobs(args) -> int:
    client = job_client(args.address)
    with job_errors(args.address):
        jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    if not jobs:
        print(f"no jobs on {args.address}")
    for j in jobs:
        print(f"{j.submission_id or j.job_id:<30}{j.status.value:<11}{j.entrypoint}")
    return 0


def cmd_logs(args) -> int:
    client = job_client(args.address)
    if args.follow:
        return follow(client, args.job, args.address)
    with job_errors(args.address, args.job):
        print(client.get_job_logs(args.job), end="")
    return 0


def repo_relative(space: str) -> str:
    """The space file's path inside the uploaded checkout, which is the job's working directory."""
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
            raise ConfigError(f"{job}: no such job on {address}; `emotune jobs --address {address}` lists "
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
