"""What launcher files (files.py) and KubeRay manifests (kuberay.py) share: the node type both describe, one-line
problems with their key path, the scans for inline credentials and for token auth turned off, the shared-storage
and dashboard rules, and small value helpers."""
from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from distributed.config import ConfigError


class ClusterFileError(ConfigError):
    """A cluster file that would fail or be unsafe. A ConfigError (a ValueError), so the CLI exits 2 on it."""


@dataclass(frozen=True)
class NodeType:
    """A kind of worker node an autoscaler may launch (a launcher file's available_node_types entry, a KubeRay
    worker group): what plan.py counts trials against before any node of it is up."""
    name: str
    resources: dict      # what one node of it offers, as Ray counts it: {"CPU": 4, "GPU": 1, ...}
    max_workers: int     # how many of it may run at once


# Dashboard hosts that keep the dashboard (which runs any code it is sent) off the network.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


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


DISABLED_MODE = re.compile(r"RAY_AUTH_MODE=[\"']?disabled", re.IGNORECASE)


def parse_resources(text: str) -> tuple[dict, str | None]:
    try:
        resources = json.loads(text)
    except json.JSONDecodeError as exc:
        return {}, exc.msg
    if not isinstance(resources, dict):
        return {}, f"got {type(resources).__name__}"
    return resources, None


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
    elif isinstance(doc, str) and DISABLED_MODE.search(doc):
        problems.add(path, "RAY_AUTH_MODE=disabled turns off Ray's token auth, so anyone who reaches the cluster "
                     "can run code; use RAY_AUTH_MODE=token")


def check_storage_path(value: Any, key: str, problems: Problems) -> None:
    """Results must go where every node can write and the driver can read: an object store or a shared mount."""
    if value is None:
        return  # given on the command line instead
    if not isinstance(value, str) or not value.strip():
        problems.add(key, f"expected a location like s3://bucket/prefix, got {value!r}")
    elif value.startswith("file://") or not ("://" in value or value.startswith("/")):
        problems.add(key, f"{value!r} is not shared storage; every node writes results there, so use s3://, "
                     "gs:// or an NFS path mounted at the same place on every node")


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
