"""KubeRay RayCluster manifests (`kubectl apply`): the checks the RayCluster CRD does not make.

The CRD's schema already types the structure (rayStartParams values are strings, replica counts integers, a pod
template has containers), and `kubectl apply` refuses a manifest that breaks it, before any pod starts; those
checks are left to it. What remains is emotune's policy: a private dashboard, the driver resource on the head
only, no spot head, GPU limits that match num-gpus and a CUDA image, token auth ON (authOptions.mode: token).
"""
from __future__ import annotations

import re
from typing import Any

from distributed.cluster.common import (
    LOOPBACK_HOSTS,
    ClusterFileError,
    NodeType,
    Problems,
    as_count,
    check_storage_path,
    dig,
    is_int,
    is_number,
    parse_resources,
    safe_shlex,
)
from distributed.config import DRIVER_RESOURCE

# Kubernetes node labels that put a pod on spot/preemptible machines.
K8S_SPOT_LABELS = {
    "cloud.google.com/gke-spot": "true",
    "cloud.google.com/gke-preemptible": "true",
    "eks.amazonaws.com/capacitytype": "spot",
    "karpenter.sh/capacity-type": "spot",
}


def check_kuberay(doc: dict, problems: Problems) -> None:
    check_storage_path(dig(doc, "metadata", "annotations", "emotune/storage-path"),
                       "metadata.annotations.emotune/storage-path", problems)
    spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
    # Token auth ON: KubeRay generates a token Secret and sets RAY_AUTH_MODE=token in every Ray container only when
    # asked to; without authOptions it starts Ray with no token at all.
    mode = dig(spec, "authOptions", "mode")
    if mode != "token":
        what = "missing, so KubeRay starts Ray without token auth" if mode is None else \
            f"{mode} turns off Ray's token auth"
        problems.add("spec.authOptions.mode", f"{what}, so anyone who reaches the pods can run code; set "
                     "authOptions: {mode: token}")
    if isinstance(spec.get("headGroupSpec"), dict):
        check_kuberay_head(spec["headGroupSpec"], problems)
    groups = spec.get("workerGroupSpecs")
    for i, group in enumerate(groups if isinstance(groups, list) else []):
        if isinstance(group, dict):
            check_kuberay_worker_group(group, f"spec.workerGroupSpecs[{i}]", problems)


def check_kuberay_head(head: dict, problems: Problems) -> None:
    key = "spec.headGroupSpec"
    params = head.get("rayStartParams") if isinstance(head.get("rayStartParams"), dict) else {}

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

    selector = dig(head, "template", "spec", "nodeSelector")
    if isinstance(selector, dict):
        for label, value in selector.items():
            if K8S_SPOT_LABELS.get(str(label).lower()) == str(value).lower():
                problems.add(f"{key}.template.spec.nodeSelector.{label}", "puts the head on spot machines; losing "
                             "it loses every trial driver and the search, so run the head on demand")


def check_kuberay_worker_group(group: dict, key: str, problems: Problems) -> None:
    counts = {name: group[name] for name in ("replicas", "minReplicas", "maxReplicas") if is_int(group.get(name))}
    low, high, replicas = counts.get("minReplicas"), counts.get("maxReplicas"), counts.get("replicas")
    if low is not None and high is not None and low > high:
        problems.add(f"{key}.minReplicas", f"{low} is more than maxReplicas ({high})")
    elif replicas is not None and ((low is not None and replicas < low) or (high is not None and replicas > high)):
        problems.add(f"{key}.replicas", f"{replicas} is outside minReplicas..maxReplicas ({low}..{high})")

    params = group.get("rayStartParams") if isinstance(group.get("rayStartParams"), dict) else {}
    if DRIVER_RESOURCE in kuberay_resources(params, group.get("resources")):
        problems.add(f"{key}.rayStartParams.resources", f"only the head may offer {DRIVER_RESOURCE}; on a worker "
                     "group, trial drivers could land on a spot node and die with it")

    containers = dig(group, "template", "spec", "containers")
    if not isinstance(containers, list) or not containers or not isinstance(containers[0], dict):
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


def kuberay_node_types(doc: dict, where: str) -> list[NodeType]:
    """The worker groups the KubeRay autoscaler may scale (CPU and GPU from rayStartParams num-cpus/num-gpus, else
    from the first container's limits, as Ray counts them in the pod)."""
    found = []
    groups = dig(doc, "spec", "workerGroupSpecs")
    for i, group in enumerate(groups if isinstance(groups, list) else []):
        if not isinstance(group, dict):
            continue
        params = group.get("rayStartParams") if isinstance(group.get("rayStartParams"), dict) else {}
        limits = dig(group, "template", "spec", "containers", 0, "resources", "limits")
        limits = limits if isinstance(limits, dict) else {}
        cpus = k8s_cpus(params.get("num-cpus", limits.get("cpu")))
        if cpus is None:
            raise ClusterFileError(f"{where}: spec.workerGroupSpecs[{i}]: no CPU count (rayStartParams num-cpus or "
                                   f"a cpu limit); emotune plans trials from it before any pod is up")
        resources = {"CPU": cpus, "GPU": float(as_count(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))) or 0)}
        resources.update({k: float(v) for k, v in kuberay_resources(params, group.get("resources")).items()
                          if is_number(v)})
        # Without maxReplicas KubeRay may scale a group without bound; replicas is then the honest floor.
        most = as_count(group.get("maxReplicas", group.get("replicas", 0)))
        if most is None:
            raise ClusterFileError(f"{where}: spec.workerGroupSpecs[{i}].maxReplicas: expected an integer")
        found.append(NodeType(str(group.get("groupName", f"group{i}")), resources, most))
    return found


def k8s_cpus(quantity: Any) -> float | None:
    """A Kubernetes CPU quantity: 8, "8", "500m" -> 8.0, 8.0, 0.5; None when absent or unreadable."""
    text = str(quantity).strip() if quantity is not None else ""
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    if re.fullmatch(r"\d+m", text):
        return int(text[:-1]) / 1000
    return None
