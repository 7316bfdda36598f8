"""Ray's own description of a cluster-launcher file, read from the installed Ray without importing it: its JSON
schema (every error turned into "key.path: message"), the keys of a launcher file, and each provider's defaults
(what `ray up` fills in)."""
from __future__ import annotations

import importlib.util
import json
from functools import cache
from pathlib import Path

import jsonschema
import yaml

from distributed.cluster.common import ClusterFileError, Problems
from distributed.config import did_you_mean


@cache
def ray_autoscaler_dir() -> Path:
    # find_spec locates the installed Ray without importing it (importing Ray takes seconds).
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        raise ClusterFileError("Ray is not installed; pip install 'ray[default]' to check cluster files")
    return Path(next(iter(spec.submodule_search_locations))) / "autoscaler"


@cache
def ray_schema() -> dict:
    return json.loads((ray_autoscaler_dir() / "ray-schema.json").read_text())


@cache
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
